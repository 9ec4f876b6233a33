"""The one driver skeleton: everything a training loop does besides its algorithm, written once.

`run_loop(config, algorithm, ...)` owns, in this order: the run directory; the Ray connection; the
actor groups the algorithm starts (released on every path out, errors included, each group's
shutdown guarded so one failure does not leak the rest); the learners' process groups and
optimizers; `--resume` from the latest checkpoint (learner states, the algorithm's own state, the
logs cut back to the checkpoint's step); the progress bar; logging every `train.log_every` steps;
evaluation every `train.eval_every`; atomic checkpoints every `output.save_every` (written to a temp
dir, renamed when complete); `final/`; the trackers' artifact; the one-line result.

An algorithm (`offline.py`, `online.py`, `multitask.py`; adversarial training is the online loop
with a second player) subclasses `Algorithm` and fills in `start` (its actor groups) and `step` (one
training step's metrics), plus whichever hooks it needs. A step names its phases with
`timer.phase(name)` (veRL's marked_timer): `generate`, `score`, `reference`, `values`,
`advantages`, `train`; each phase's seconds reach metrics.jsonl as `perf/<phase>_seconds` from this
one place, with `perf/step_seconds` for the whole step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from raylign import storage
from raylign.config import RunConfig
from raylign.rundir import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    FINAL_DIR,
    PLACEMENT_FILE,
    RunDir,
    RunResult,
    is_disk_full,
    read_trainer_state,
    write_trainer_state,
)
from raylign.runtime import NonFiniteError, Purpose, RunStopped, init_ray, rng
from raylign.workers.group import WorkerGroup, gather

log = logging.getLogger(__name__)

PHASES = ("generate", "score", "reference", "values", "advantages", "train")
OnStep = Callable[[int, dict[str, Any]], None]


def step_indices(n_rows: int, batch_size: int, seed: int, step: int, stream: int = 0) -> np.ndarray:
    """Rows of global step `step`: a fresh permutation each epoch (`Purpose.DATA_ORDER`, step = epoch,
    index = `stream`, e.g. a multi-task run's task), incomplete batches dropped. A pure function of
    (seed, step, stream), so a resumed run sees exactly the batches it would have seen."""
    per_epoch = n_rows // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = rng(seed, Purpose.DATA_ORDER, epoch, stream).permutation(n_rows)
    return order[offset * batch_size : (offset + 1) * batch_size]


class PhaseTimer:
    """Seconds per named phase of one step: `with timer.phase("train"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase '{name}'; phases: {', '.join(PHASES)}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def metrics(self) -> dict[str, float]:
        return {f"perf/{name}_seconds": s for name, s in self.seconds.items()} | {"perf/step_seconds": self.elapsed()}


@dataclass
class LearnerSlot:
    """A learner group and where its state goes: `subdir` of each checkpoint ("" = the checkpoint
    itself), with an HF model dir there or not, and whether it writes `final/`."""

    group: WorkerGroup
    subdir: str = ""
    model_dir: bool = True
    final: bool = True


class Algorithm:
    """What a loop fills in. Hooks run in this order: start, (learners set up), prepare, load_state
    (on resume), begin, then per step: step, [evaluate], [save_state], and at the end finish,
    (final/ saved), after_final."""

    name: str = "train"  # the progress bar's label
    total_steps: int = 0

    def __init__(self, config: RunConfig, console: Console):
        self.config = config
        self.console = console
        self.learners: list[LearnerSlot] = []
        self.groups: list[WorkerGroup] = []  # every other group the algorithm started

    @property
    def optimizer_steps(self) -> int:
        """Scheduler length: optimizer steps over the whole run (several per step in online RL)."""
        return self.total_steps

    def describe(self, run: RunDir) -> str:
        """The run's one-line header."""
        return f"[bold]{self.name}[/bold] {run.path}  ·  {self.total_steps} steps"

    def start(self, run: RunDir) -> None:
        """Start the actor groups: learner groups into `self.learners`, others into `self.groups`."""
        raise NotImplementedError

    def prepare(self, run: RunDir) -> None:
        """After the learners' set-up, before resume (e.g. precompute reference log-probs)."""

    def load_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Restore the algorithm's own state from `checkpoint` (its trainer state is `state`)."""

    def begin(self, run: RunDir, start: int, checkpoint: Path | None) -> None:
        """Just before the first step (`start` > 0 on resume; `checkpoint` the one resumed from)."""

    def step(self, step: int, timer: PhaseTimer) -> dict[str, Any]:
        """Train step `step` (0-based); its metrics (perf/* are added by the skeleton)."""
        raise NotImplementedError

    def eval_due(self, done: int) -> bool:
        every = self.config.train.eval_every
        return bool(every) and done % every == 0

    def evaluate(self, done: int) -> dict[str, Any]:
        """Metrics measured on held-out data after `done` steps (merged into that step's row)."""
        return {}

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {}

    def save_state(self, checkpoint: Path) -> dict[str, Any]:
        """Write the algorithm's own files into the (temporary) checkpoint dir; return what joins the
        trainer state."""
        return {}

    def finish(self, run: RunDir, metrics: dict[str, Any]) -> dict[str, Any]:
        """After the last step, before `final/` is saved: final evaluation; the run's headline metrics."""
        return metrics

    def after_final(self, run: RunDir) -> None:
        """After `final/` is saved (e.g. save a second player next to it)."""


def run_loop(config: RunConfig, algorithm: Algorithm, *, resume: bool = False, resume_force: bool = False,
             on_step: OnStep | None = None) -> RunResult:
    """Run `algorithm` in a new (or resumed) run directory. `on_step(done, metrics)` is called after
    each step's metrics are logged and its checkpoint (if any) is committed (Ray Tune reports from it).
    `resume_force`: resume even when the config changed what makes the run the same run."""
    run = RunDir(config, resume=resume, resume_force=resume_force)
    algorithm.console.print(algorithm.describe(run))
    try:
        result = _run(config, algorithm, run, resume, on_step)
    except BaseException as exc:
        _release(run, algorithm, quiet=True)  # the run's own error is the one the user sees
        if is_disk_full(exc):
            last = run.latest_checkpoint()
            then = (f"the last checkpoint, {last.name}, is intact: free space, then --resume" if last
                    else "no checkpoint was written yet: free space and start again")
            raise RunStopped(f"the disk holding {run.path} is full; the run stopped and {then}") from None
        raise
    _release(run, algorithm, quiet=False)
    return result


def _run(config: RunConfig, algorithm: Algorithm, run: RunDir, resume: bool, on_step: OnStep | None) -> RunResult:
    init_ray(config.resources.ray_address)
    algorithm.start(run)
    wait_ready([slot.group for slot in algorithm.learners] + algorithm.groups)
    log_placement(algorithm, run)
    for slot in algorithm.learners:
        addr, port = slot.group.call("master_address")[0]
        slot.group.call("setup_distributed", addr, port)
        slot.group.call("setup_optimizer", algorithm.optimizer_steps)
    algorithm.prepare(run)
    start, checkpoint = 0, latest_checkpoint(run, config.output.storage) if resume else None
    if checkpoint is not None:
        state = read_trainer_state(checkpoint)
        for slot in algorithm.learners:
            source = checkpoint_source(config.output.storage, run, checkpoint, slot.subdir, slot.group)
            slot.group.call("load_checkpoint", str(checkpoint / slot.subdir), source=source)
        algorithm.load_state(checkpoint, state)
        start = int(state["step"])
        run.truncate_logs_after(start)
        algorithm.console.print(f"resumed from {checkpoint} at step {start}")
    algorithm.begin(run, start, checkpoint)
    metrics = _train(config, algorithm, run, start, on_step)
    final = algorithm.finish(run, metrics)
    for slot in algorithm.learners:
        if slot.final:
            handoff = storage.Handoff.to(run.final, run_storage(config.output.storage, run))
            far = off_driver_node(slot.group)  # on this node the learners write run.final themselves
            for delivered in slot.group.call("save_final", str(run.final), **({"handoff": handoff} if far else {})):
                storage.receive(handoff, delivered)
    algorithm.after_final(run)
    if config.output.storage and run.final.is_dir():
        storage.put_dir(run.final, storage.join(config.output.storage, run.name, FINAL_DIR))
    run.log_final_model()
    return RunResult(str(run.path), algorithm.total_steps, final)


def _release(run: RunDir, algorithm: Algorithm, quiet: bool) -> None:
    """Close the run directory and release every group; with `quiet`, errors on the way are logged
    rather than raised (an error is already propagating), and the learners are killed without the
    collective goodbye (a learner may be dead, its peers stuck waiting for it)."""
    errors = []
    try:
        run.close()
        run.remove_partial_checkpoints()
    except BaseException as exc:  # noqa: BLE001 - release the actors whatever happens
        errors.append(exc)
    errors += shutdown_groups(algorithm, graceful=not quiet)
    if errors and quiet:
        for err in errors:
            log.warning("while releasing the run's resources: %r", err)
    elif errors:
        raise errors[0]


def _train(config: RunConfig, algorithm: Algorithm, run: RunDir, start: int, on_step: OnStep | None) -> dict[str, Any]:
    total = algorithm.total_steps
    bar = tqdm(range(start, total), desc=algorithm.name, disable=not config.progress, initial=start, total=total,
               unit="step")
    metrics: dict[str, Any] = {}
    skipped = 0.0
    for step in bar:
        timer = PhaseTimer()
        try:
            metrics = algorithm.step(step, timer)
        except NonFiniteError as exc:
            last = run.latest_checkpoint()
            raise NonFiniteError(
                f"step {step + 1}: {exc} (train.on_nonfinite=stop); nothing of this step was saved"
                f"{f', the last checkpoint is {last.name}' if last else ''}. Lower train.lr (or "
                "train.max_grad_norm) and start again, or set train.on_nonfinite=skip_step to skip such steps") from None
        metrics.update(timer.metrics())
        now_skipped = sum(v for k, v in metrics.items() if k.endswith("skipped_steps") and v)
        if now_skipped and not skipped:
            tqdm.write(f"raylign: step {step + 1}: a non-finite loss or gradient norm; that optimizer step was "
                       "skipped (train.on_nonfinite=skip_step; counted in */skipped_steps)")
        skipped += now_skipped
        done = step + 1
        if algorithm.eval_due(done):
            metrics.update(algorithm.evaluate(done))
        if done % config.train.log_every == 0 or done == total:
            run.log_metrics(done, metrics)
        bar.set_postfix(algorithm.postfix(metrics))
        if config.output.save_every and done % config.output.save_every == 0 and done < total:
            save_checkpoint(algorithm, run, done)
        if on_step is not None:
            on_step(done, metrics)
    return metrics


def wait_ready(groups: list[WorkerGroup]) -> None:
    """Wait for every actor's constructor, all groups at once, with no call timeout (loading a model
    may take long); from then on a call that hangs is the call's fault. A constructor error surfaces
    here naming the actor."""
    refs, labels = [], []
    for group in groups:
        ready = group.ready_async()
        refs += ready
        labels += [f"{group.name}[{rank}].__init__" for rank in range(len(ready))]
    gather(refs, labels)


def save_checkpoint(algorithm: Algorithm, run: RunDir, step: int) -> Path:
    """Every learner's state and the algorithm's into a temp dir, renamed to checkpoints/step_<n>."""
    tmp = run.begin_checkpoint(step)
    uri = algorithm.config.output.storage
    try:
        extra = algorithm.save_state(tmp)
        for slot in algorithm.learners:
            # merge: the algorithm's own files (save_state) are already in the checkpoint dir.
            handoff = storage.Handoff.to(tmp / slot.subdir, run_storage(uri, run), merge=True)
            far = {"handoff": handoff} if off_driver_node(slot.group) else {}
            for delivered in slot.group.call("save_checkpoint", str(tmp / slot.subdir), with_model_dir=slot.model_dir,
                                             **far):
                storage.receive(handoff, delivered)
        write_trainer_state(tmp, {"step": step, **extra})
        committed = run.commit_checkpoint(step, tmp)
    finally:
        run.remove_partial_checkpoints()  # a half-written checkpoint (disk full, a dead learner) goes
    if uri:
        push_checkpoint(committed, uri, run)
    return committed


# ---- clusters: where the groups landed, checkpoints on output.storage ----------------------------


def run_storage(uri: str | None, run: RunDir) -> str | None:
    """`<output.storage>/<run name>`, or None without storage."""
    return storage.join(uri, run.name) if uri else None


def off_driver_node(group: WorkerGroup) -> bool:
    """Whether any of the group's actors runs on another node than this driver."""
    here = storage.current_node_id()
    return any(node != here for node in getattr(group, "node_ids", ()))  # () for groups without actors


def checkpoint_source(uri: str | None, run: RunDir, checkpoint: Path, subdir: str,
                      group: WorkerGroup) -> storage.Source | None:
    """Where `group`'s actors read `checkpoint/subdir` from: None when they all run on this node (they
    read the path itself); else its copy on `output.storage`, or its files shipped through the object store."""
    if not off_driver_node(group):
        return None
    stored = storage.join(uri, run.name, CHECKPOINTS_DIR, checkpoint.name) if uri else None
    return storage.Source.of(checkpoint / subdir, stored, ship=True, part=subdir)


def push_checkpoint(checkpoint: Path, uri: str, run: RunDir) -> None:
    """Copy a committed checkpoint to `<storage>/<run>/checkpoints/<step_n>` (complete or absent there)
    and keep the same `output.keep_last` there as in the run directory."""
    root = storage.join(uri, run.name, CHECKPOINTS_DIR)
    storage.put_dir(checkpoint, storage.join(root, checkpoint.name))
    kept = {p.name for p in run.list_checkpoints()}
    for name in storage.list_complete(root):
        if name.startswith(CHECKPOINT_PREFIX) and name not in kept:
            storage.delete_dir(storage.join(root, name))


def latest_checkpoint(run: RunDir, uri: str | None) -> Path | None:
    """The checkpoint to resume from: the newest of the run directory's and, with `output.storage`,
    of `<storage>/<run>/checkpoints/`, fetched into the run directory when only storage has it (the
    driver's disk was lost, or another node wrote it)."""
    local = run.latest_checkpoint()
    if not uri:
        return local
    root = storage.join(uri, run.name, CHECKPOINTS_DIR)
    steps = [(int(n[len(CHECKPOINT_PREFIX):]), n) for n in storage.list_complete(root)
             if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()]
    if not steps:
        return local
    step, name = max(steps)
    if local is not None and int(local.name[len(CHECKPOINT_PREFIX):]) >= step:
        return local
    print(f"raylign: fetching checkpoint {name} from {root}", flush=True)
    return storage.get_dir(storage.join(root, name), run.checkpoint_path(step))


def node_names() -> dict[str, str]:
    """Node id -> its `node_*` resource names (`raylign cluster up`), else its IP."""
    import ray

    names = {}
    for node in ray.nodes():
        custom = sorted(k for k in node.get("Resources", {}) if k.startswith("node_"))
        names[node["NodeID"]] = ",".join(custom) or node.get("NodeManagerAddress", "?")
    return names


def log_placement(algorithm: Algorithm, run: RunDir) -> None:
    """One line per group saying on which node(s) its actors landed (asked of the actors themselves),
    and the same as `placement.json` in the run directory."""
    # Only real worker groups can be asked (the skeleton's unit tests run fake groups without Ray).
    groups = [g for g in [slot.group for slot in algorithm.learners] + algorithm.groups if hasattr(g, "locate")]
    if not groups:
        return
    names = node_names()
    record = {}
    for group in groups:
        ids = group.locate()
        record[group.name] = {"placement": group.placement, "node_ids": ids, "nodes": [names.get(i, "?") for i in ids]}
        where = ", ".join(f"{names.get(i, '?')} [{i[:8]}]" for i in ids)
        print(f"raylign: placement: {group.name} ({group.placement}) -> {where}", flush=True)
    (run.path / PLACEMENT_FILE).write_text(json.dumps(record, indent=2))


def shutdown_groups(algorithm: Algorithm, graceful: bool = True) -> list[BaseException]:
    """Release every actor and placement group, whatever fails on the way; returns what failed.
    `graceful`: the learners first leave their process group (skipped on an error path)."""
    errors: list[BaseException] = []
    for slot in algorithm.learners:
        try:
            if graceful:
                slot.group.call("shutdown")  # leave the process group cleanly
        except BaseException as exc:  # noqa: BLE001 - keep releasing the rest
            errors.append(exc)
        finally:
            try:
                slot.group.shutdown()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
    for group in algorithm.groups:
        try:
            group.shutdown()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    algorithm.learners, algorithm.groups = [], []
    return errors
