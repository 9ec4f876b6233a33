"""The ground floor every layer may import: the Ray connection, CPU threads per actor, quiet
libraries inside actors, and the one seeding scheme of the project.

Seeds. Every random choice raylign makes is drawn from `rng(seed, purpose, step, index)` or seeded
with `derive_seed(seed, purpose, step, index)`: a NumPy `SeedSequence` over the words
[seed, step, purpose, index]. `seed` is the run's (or request's) seed, `purpose` one of `Purpose`
(which kind of choice: rows of a step, sampling, minibatch order, ...), `step` the training step (or
epoch), `index` the position inside it (a prompt's index in the step, a row of a request). Because a
draw depends on nothing but these four numbers, a same-seed run repeats exactly, a resumed run draws
what the uninterrupted one would have, a retried actor call repeats its share, and different purposes
never share a stream. (`SeedSequence` ignores trailing zero words, so rng(s, DATA_ORDER, e) equals
`numpy.random.default_rng([s, e])`: the row order of offline training is what it always was.)
Two seeds are not a run's randomness and stay plain constants: the build seed of a `tiny:` model
(`models/tiny.py`, so every machine builds the same weights) and a sweep's `search_seed`, which Ray
Tune's search algorithm takes as it is. Unseeded serving requests draw fresh OS entropy on purpose.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from enum import IntEnum
from typing import Any

import numpy as np

from raylign.errors import UserError

log = logging.getLogger(__name__)


class ResourceError(UserError, RuntimeError):
    """The cluster cannot host the requested actors; the message says what to change."""


class RunStopped(UserError, RuntimeError):
    """A run ended on purpose with one message: a non-finite loss, a dead or hung worker, a full disk.
    The message names what happened and what to do; the last checkpoint is intact."""


class NonFiniteError(RunStopped):
    """A loss, gradient norm, reward or weight that is NaN or infinite (`train.on_nonfinite`)."""


# ---- seeds ---------------------------------------------------------------------------------------


class Purpose(IntEnum):
    """What a random draw is for: its word in the seed sequence, so no two purposes share a stream."""

    DATA_ORDER = 0  # the epoch's permutation of the training rows (step = epoch)
    SAMPLE = 1  # rollout sampling of a training step (index = the chunk's first prompt in the step)
    MINIBATCH = 2  # order of an RL step's completions across minibatches
    EVAL = 3  # held-out generation of the online loop (step 0 every time: before/after differ by weights)
    DISCRIMINATOR = 4  # replayed and human texts drawn for the discriminator's update
    WARMUP = 5  # the discriminator's warm-up batches: prompts and texts drawn (step = warm-up update)
    PREFIX = 6  # SeqGAN Monte-Carlo continuations of response prefixes
    ANNOTATE = 7  # `raylign data annotate` sampling (index = the chunk's first prompt)
    GENERATE = 8  # `raylign eval` generation (index = the part's first prompt)
    SERVE = 9  # one row of a served request that gave a seed (index = row)
    SPLIT = 10  # the train/validation split of a data file (seed = data.split_seed)
    BOOTSTRAP = 11  # bootstrap resampling of an evaluation statistic
    TASK_WEIGHTING = 12  # PCGrad's projection order
    INIT = 13  # process-global torch/numpy/random generators of an actor
    WARMUP_SAMPLE = 14  # sampling of the discriminator's warm-up batches (step = warm-up update)


def _words(seed: int, purpose: int, step: int, index: int) -> list[int]:
    # SeedSequence takes non-negative integers of any size; a negative user seed wraps like a uint64.
    return [int(seed) % 2**64, int(step), int(purpose), int(index)]


def rng(seed: int, purpose: Purpose, step: int = 0, index: int = 0) -> np.random.Generator:
    """The generator for one purpose at one (step, index) of a run seeded `seed` (module docstring)."""
    return np.random.default_rng(np.random.SeedSequence(_words(seed, purpose, step, index)))


def derive_seed(seed: int, purpose: Purpose, step: int = 0, index: int = 0) -> int:
    """A 31-bit integer seed (fits torch, NumPy and `random`) for the same key as `rng`."""
    return int(np.random.SeedSequence(_words(seed, purpose, step, index)).generate_state(1)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed the process-global generators (`random`, NumPy, torch) of an actor."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- Ray -----------------------------------------------------------------------------------------


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once. Under `ray job submit` (RAY_ADDRESS set) or with an address this attaches
    to the cluster; otherwise it starts an embedded local Ray. Already connected: do nothing."""
    import ray

    if ray.is_initialized():
        return
    # ray.init installs its own SIGTERM handler (a crash report, then abort): keep the one the command set,
    # so SIGTERM stops a run as cleanly as Ctrl-C (cli.main).
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        _init(address, num_cpus)
    finally:
        if callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)


def _init(address: str | None, num_cpus: int | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
        # One line, so a job's log shows it joined the cluster rather than starting its own Ray.
        print(f"raylign: attached to the Ray cluster at {address}", flush=True)
    else:
        # A private local instance, so a stale `ray start` cluster elsewhere on the machine is never joined.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)


def cpu_threads(num_cpus: float) -> int:
    """Threads for an actor given its CPU share: oversubscription is the first performance bug on CPU."""
    return max(1, int(num_cpus))


def quiet_libraries() -> None:
    """Inside actors: no per-file progress bars or info logs from transformers (they flood the driver)."""
    import warnings

    import transformers

    # transformers' own deprecation notices about its internals are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
