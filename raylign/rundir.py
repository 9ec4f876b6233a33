"""The run directory contract `runs/<name>/` of DESIGN.md: the resolved config, metrics, trackers,
samples, atomic checkpoints and `final/`, and the name of every file a run or a checkpoint holds.

Every loop, worker and tool that reads or writes a run uses these names; none spells a file name itself.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raylign.config import ConfigError, RunConfig, dump_config
from raylign.trackers import TENSORBOARD_DIR as TENSORBOARD_DIR  # noqa: F401 - one name table for the run dir
from raylign.trackers import Tracker, build_trackers, close_trackers

# The run directory.
CONFIG_FILE = "config.yaml"  # the resolved config
METRICS_FILE = "metrics.jsonl"  # one JSON row per logged step
SAMPLES_FILE = "samples.jsonl"  # generations as training goes
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"  # checkpoints/step_<n>/
FINAL_DIR = "final"  # loadable by transformers and `raylign serve`
REFERENCE_CACHE_PREFIX = "ref_logps_"  # ref_logps_<fingerprint>.npz: precomputed reference log-probs
PLACEMENT_FILE = "placement.json"  # where each actor group landed: {group: {placement, node_ids, nodes}}
RUN_MARKER = ".raylign-run"  # written when raylign creates a run dir: only such a dir is ever replaced

# Inside a checkpoint.
TRAINER_STATE = "trainer_state.json"  # the driver's state: {"step": n, ...}
MODEL_DIR = "model"  # the HF model dir of a learner checkpoint (LoRA merged)
TRAINABLE_WEIGHTS = "trainable.safetensors"  # the trainable tensors (the adapter only under LoRA)
OPTIMIZER_STATE = "optimizer.pt"  # optimizer + scheduler state (weights_only torch file)
RNG_STATE = "rng.pt"  # the learner's torch RNG state
LEARNER_INFO = "learner.json"  # {"world_size": n}
CRITIC_DIR = "critic"  # PPO: the critic's learner checkpoint
PENDING_ROLLOUTS = "rollouts.npz"  # rollout.overlap: the batch sampled for the next step (arrays)
PENDING_ROLLOUTS_META = "rollouts.json"  # ... and its texts, versions and timings
DISCRIMINATOR_DIR = "discriminator"  # adversarial: D's weights and optimizer (also under final/)
ADVERSARIAL_STATE = "adversarial_state.json"  # adversarial: replay buffer and collapse watch

# What makes a run the run it is: `--resume` with any of these changed is a different run (refused
# unless --resume-force). Everything else (lr, steps, logging, resources) may change on resume.
RUN_IDENTITY = ("algorithm", "seed", "model.path", "model.lora", "reference.path", "data.train", "data.validation",
                "data.kind", "multitask.tasks")


def _jsonable(value: Any) -> Any:
    """Metrics are floats; NaN/inf are written as null so metrics.jsonl stays valid JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class RunResult:
    """What a finished run hands back: its directory, step count and headline metrics."""

    run_dir: str
    steps: int
    final_metrics: dict[str, Any] = field(default_factory=dict)

    def summary_line(self) -> str:
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.final_metrics.items()
        )
        return f"done: {self.steps} steps -> {self.run_dir}/{FINAL_DIR}  ({shown})"


def identity_changes(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """`key: old -> new` for every RUN_IDENTITY key where `config` differs from a run's saved config."""
    new = config.model_dump(mode="json")
    changes = []
    for key in RUN_IDENTITY:
        old_value, new_value = _lookup(saved, key), _lookup(new, key)
        if old_value != new_value:
            changes.append(f"{key}: {_short(old_value)} -> {_short(new_value)}")
    return changes


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_jsonl_atomic(rows: Iterable[dict[str, Any]], out: Path) -> None:
    """All rows to `<out>.tmp`, flushed and synced, then renamed over `out`; on error no tmp is left
    (a file raylign writes is complete or untouched)."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, and the directories themselves, to the disk (before a rename
    makes them a checkpoint: a power cut must not leave a committed checkpoint of empty files)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or the error a Ray actor raised, which Ray wraps) is ENOSPC/EDQUOT."""
    cause = getattr(exc, "cause", None) or exc
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


class RunDir:
    """Owns `<output.dir>/<name>/`. Writers append line by line so a crashed run keeps its history."""

    def __init__(self, config: RunConfig, resume: bool = False, resume_force: bool = False):
        name = config.output.name or f"{config.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.path = Path(config.output.dir) / name
        self.name = name
        # Actor names are global in a Ray namespace: concurrent runs with one name (Tune trials) must differ.
        self.actor_prefix = f"raylign-{name}-{uuid.uuid4().hex[:8]}"
        if self.path.exists() and any(self.path.iterdir()) and not resume:
            if not config.output.overwrite:
                raise ConfigError(
                    f"run directory {self.path} already exists; pass --resume to continue it, "
                    "output.overwrite=true to replace it, or output.name=<new name>"
                )
            if not (self.path / RUN_MARKER).is_file():
                raise ConfigError(
                    f"{self.path} exists and raylign did not create it (no {RUN_MARKER} marker): output.overwrite "
                    "only replaces raylign's own run directories; choose another output.name or remove it yourself"
                )
            shutil.rmtree(self.path)
        if resume and not self.path.exists():
            raise ConfigError(f"--resume: run directory {self.path} does not exist")
        if resume and not resume_force:
            self._check_same_run(config)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / RUN_MARKER).touch()
        self.checkpoints = self.path / CHECKPOINTS_DIR
        self.checkpoints.mkdir(exist_ok=True)
        self.remove_partial_checkpoints()  # what a run killed mid-checkpoint left behind
        self.keep_last = config.output.keep_last
        (self.path / CONFIG_FILE).write_text(dump_config(config))
        self._metrics = open(self.path / METRICS_FILE, "a", encoding="utf-8")
        self._samples = open(self.path / SAMPLES_FILE, "a", encoding="utf-8")
        try:  # output.trackers: TensorBoard (tb/), W&B (wandb/), MLflow (mlruns/ or a server)
            self._trackers: list[Tracker] = build_trackers(config, self.path, name)
            resolved = config.model_dump(mode="json")
            for tracker in self._trackers:
                tracker.log_params(resolved)
        except BaseException:
            self._metrics.close()
            self._samples.close()
            if hasattr(self, "_trackers"):
                self.close_trackers()
            raise

    def _check_same_run(self, config: RunConfig) -> None:
        saved_file = self.path / CONFIG_FILE
        if not saved_file.is_file():
            return
        changes = identity_changes(yaml.safe_load(saved_file.read_text()) or {}, config)
        if changes:
            raise ConfigError(
                f"--resume: this config would make {self.path} a different run ({'; '.join(changes)}). Resume with "
                "the run's own settings (its config.yaml), start a new run with another output.name, or pass "
                "--resume-force to continue anyway")

    def remove_partial_checkpoints(self) -> None:
        """Delete `.tmp_step_*` dirs: checkpoints whose writing never finished (never read back)."""
        for tmp in self.checkpoints.glob(f".tmp_{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)

    @property
    def final(self) -> Path:
        return self.path / FINAL_DIR

    def log_final_model(self) -> None:
        """Log `final/` as a model artifact to every tracker that keeps artifacts (W&B: artifact
        `<run name>-final`; MLflow: artifact dir `final/`; TensorBoard keeps none).

        The driver loop calls this once, right after the learners have written `final/` (and after any
        extra file it puts there, such as the discriminator), before `close()`. Without a `final/`
        directory (a run that failed before saving) it does nothing.
        """
        if not self.final.is_dir():
            return
        for tracker in self._trackers:
            if tracker.stores_artifacts:
                tracker.log_artifact(self.final, FINAL_DIR)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        values = {k: _jsonable(v) for k, v in metrics.items()}
        row = {"step": step, "time": round(time.time(), 3)}
        row.update(values)
        self._metrics.write(json.dumps(row) + "\n")  # the source of truth, written before any tracker
        self._metrics.flush()
        # Trackers get the numbers only: NaN/inf (null in metrics.jsonl), bools and strings are skipped.
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            for tracker in self._trackers:
                tracker.log_metrics(step, scalars)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for sample in samples:
            self._samples.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
        self._samples.flush()

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"

    def begin_checkpoint(self, step: int) -> Path:
        """A temp dir to write into; `commit_checkpoint` renames it so a crash never leaves half a checkpoint."""
        tmp = self.checkpoints / f".tmp_{CHECKPOINT_PREFIX}{step}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, step: int, tmp: Path) -> Path:
        """Flush `tmp` to disk, rename it to step_<n> (atomic on one filesystem), then rotate: only
        committed checkpoints are ever deleted, and only once a newer one is committed."""
        final = self.checkpoint_path(step)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.checkpoints)
        for old in self.list_checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def list_checkpoints(self) -> list[Path]:
        steps = []
        for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*"):
            suffix = p.name[len(CHECKPOINT_PREFIX) :]
            if p.is_dir() and suffix.isdigit():
                steps.append((int(suffix), p))
        return [p for _, p in sorted(steps)]

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def truncate_logs_after(self, step: int) -> None:
        """On resume, drop metric/sample rows written after the checkpoint so the history is not doubled."""
        for fh_name, file in (("_metrics", METRICS_FILE), ("_samples", SAMPLES_FILE)):
            getattr(self, fh_name).close()
            path = self.path / file
            rows, lines, torn = _read_jsonl(path)
            if torn:
                print(f"raylign: {path.name}: cut a torn last line (a run stopped mid-write): {torn[:60]!r}",
                      flush=True)
            kept = [line for row, line in zip(rows, lines, strict=True) if row.get("step", 0) <= step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            setattr(self, fh_name, open(path, "a", encoding="utf-8"))

    def close(self) -> None:
        try:
            self._metrics.close()
            self._samples.close()
        finally:
            self.close_trackers()

    def close_trackers(self) -> None:
        """Close every tracker once, each in its own try/finally (a failing one does not skip the rest)."""
        trackers, self._trackers = self._trackers, []
        close_trackers(trackers)


def read_metrics(run_path: str | Path) -> list[dict[str, Any]]:
    """Every row of a run's metrics.jsonl (a torn last line, from a run stopped mid-write, is left out)."""
    return _read_jsonl(Path(run_path) / METRICS_FILE)[0]


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str], str]:
    """(rows, their lines, the torn last line or ""). Only the last line may be torn: a bad line before
    it is damage no crash explains, and stays an error naming it."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                return rows, lines[:-1], line
            raise ConfigError(f"{path}: line {number} is not JSON ({exc.msg}); fix or remove it") from None
    return rows, lines, ""


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The driver's state saved in a checkpoint (`TRAINER_STATE`): at least {"step": n}."""
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def write_trainer_state(checkpoint: str | Path, state: dict[str, Any]) -> None:
    (Path(checkpoint) / TRAINER_STATE).write_text(json.dumps(state))
