"""The one interface every reward source implements, its error type, and the weighted mix.

A reward source maps a batch of (prompt, completion) to one float per completion:

    source.name                                  # for logs: "lexicon:vader", "length", "rm:runs/x/final"
    source.score(prompts, completions)           # -> np.ndarray, float32, shape (len(completions),)

Prompts are strings, chat message lists ({role, content}) or None (scoring text alone); sources that
do not look at the prompt ignore it. Sources are plain Python objects, so they run in the driver, in a
reward actor, or in a test alike.

Sources that learn while the policy trains (the discriminator of adversarial training) set
`trainable = True` and implement `update(...)`; the driver calls it between policy steps. Every other
source keeps the default no-op, so loops can call `update` on any source (or a mix) unconditionally.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from raylign.errors import UserError

# The spec forms `build_reward_source` understands; every RewardSourceError message lists them.
SPEC_FORMS = (
    "'lexicon:vader' (VADER sentiment valence in [-1, 1]); "
    "'length' (completion length in tokens, or words without a tokenizer; use a negative weight "
    "for a penalty); "
    "'function:module:attr' or 'module:attr' (your Python callable f(prompts, completions) -> floats); "
    "or a reward model: a directory saved by `raylign train reward`, a Hugging Face id, "
    "'builtin:<name>' or 'tiny:<arch>'"
)


class RewardSourceError(UserError, ValueError):
    """A reward source spec or callable the user must fix; the message names the spec."""


class RewardSource(ABC):
    """Scores completions; see the module docstring for the contract."""

    name: str = "reward"
    #: True for sources that keep learning during training (they implement `update`).
    trainable: bool = False

    @abstractmethod
    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        """One float32 score per completion, shape (len(completions),)."""

    def update(self, prompts: Sequence[Any], completions: Sequence[str], **batch: Any) -> dict[str, float]:
        """Learn from a batch; returns metrics to log (e.g. {"disc/loss": ..., "disc/accuracy": ...}).

        Used by trainable sources only: the adversarial pipeline's discriminator will receive the
        policy's fresh samples here (label 0), with human text passed in `batch` (label 1). Fixed
        sources (lexicons, functions, frozen reward models) do nothing and return {}.
        """
        return {}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        return self.score(prompts, completions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def check_batch(prompts: Sequence[Any] | None, completions: Sequence[str]) -> list[Any]:
    """Prompts as a list matching `completions` (None -> a list of Nones); raises on a length mismatch."""
    if isinstance(completions, str):
        raise TypeError("completions must be a sequence of strings, not one string")
    if prompts is None:
        return [None] * len(completions)
    prompts = list(prompts)
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions; pass one prompt "
                         "per completion (repeat a prompt for its n samples)")
    return prompts


class WeightedMix(RewardSource):
    """Σ_i w_i · r_i(prompt, completion): several sources in one reward.

    `score_components` gives each source's own (unweighted) scores keyed by source name, for logging
    `reward/<name>` next to the total; `score_with_components` returns both from one evaluation of
    each source. Two sources with the same name are told apart as `name`, `name#2`, ...
    """

    def __init__(self, sources: Sequence[RewardSource], weights: Sequence[float] | None = None):
        sources = list(sources)
        if not sources:
            raise RewardSourceError(f"a reward mix needs at least one source; the forms are: {SPEC_FORMS}")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"{len(sources)} reward sources but {len(weights)} weights")
        if not all(np.isfinite(weights)):
            raise RewardSourceError(f"reward weights must be finite numbers, got {weights}")
        self.sources = sources
        self.weights = weights
        self.keys = _unique_names([s.name for s in sources])
        self.trainable = any(s.trainable for s in sources)
        self.name = " + ".join(
            (k if w == 1.0 else f"{w:g}*{k}") for k, w in zip(self.keys, weights, strict=True)
        )

    def score_components(self, prompts: Sequence[Any], completions: Sequence[str]) -> dict[str, np.ndarray]:
        prompts = check_batch(prompts, completions)
        # Every source is held to one finite number per completion: a NaN reward would reach the
        # advantages and the loss, and the run would then stop far from its cause.
        return {key: as_scores(source.score(prompts, completions), len(completions), key, finite=True)
                for key, source in zip(self.keys, self.sources, strict=True)}

    def score_with_components(
        self, prompts: Sequence[Any], completions: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        components = self.score_components(prompts, completions)
        total = np.zeros(len(completions), dtype=np.float64)
        for key, weight in zip(self.keys, self.weights, strict=True):
            total += weight * components[key].astype(np.float64)
        return total.astype(np.float32), components

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        return self.score_with_components(prompts, completions)[0]

    def update(self, prompts: Sequence[Any], completions: Sequence[str], **batch: Any) -> dict[str, float]:
        """Forward to every trainable source; their metrics are merged (prefixed by source name)."""
        metrics: dict[str, float] = {}
        for key, source in zip(self.keys, self.sources, strict=True):
            if source.trainable:
                metrics.update({f"{key}/{k}": v for k, v in source.update(prompts, completions, **batch).items()})
        return metrics


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def as_scores(values: Any, n: int, who: str, finite: bool = False) -> np.ndarray:
    """A source's output checked to be n numbers (all finite when `finite`), as float32.

    Lists, tuples, numpy arrays, CPU tensors and one-shot iterables (generators) are accepted."""
    if hasattr(values, "__iter__") and not hasattr(values, "__len__") and not isinstance(values, str):
        values = list(values)
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise RewardSourceError(f"reward source '{who}' returned something that is not a list of numbers "
                                f"({type(values).__name__}: {exc})") from None
    if arr.ndim != 1 or len(arr) != n:
        got = f"{len(arr)} scores" if arr.ndim == 1 else f"an array of shape {arr.shape}"
        raise RewardSourceError(f"reward source '{who}' returned {got} for {n} completions; "
                                "it must return one number per completion")
    if finite and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise RewardSourceError(f"reward source '{who}' returned {bad} non-finite score(s) (nan/inf) "
                                f"for {n} completions")
    return arr
