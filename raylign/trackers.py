"""Experiment trackers: where a run's parameters, metrics and final model go besides `metrics.jsonl`.

`output.trackers` picks any of

- `tensorboard`: scalars in `<run>/tb/` (`tensorboard --logdir runs/`);
- `wandb`: a Weights & Biases run (`output.wandb_project`, `output.wandb_mode`) under `<run>/wandb/`;
  offline by default, so nothing leaves the machine until `wandb sync <run>/wandb/offline-run-*`;
- `mlflow`: an MLflow run in experiment `output.mlflow_experiment`, by default in a local store
  `<run>/mlruns/` (or `output.mlflow_tracking_uri`: a server, `sqlite:///...`, ...).

Each is a `Tracker`: `log_params(config)` once, `log_metrics(step, metrics)` per logged step (finite
floats only: `RunDir` drops NaN/inf and non-numbers, as metrics.jsonl writes them null),
`log_artifact(path, name)` for `final/`, `close()`. `metrics.jsonl` stays the source of truth: every
tracker is a copy of it. The tracker libraries are imported only when asked for, so the ground floor
stays light; a missing one is one `ConfigError` naming the extra to install.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from raylign.config import ConfigError, RunConfig

TENSORBOARD_DIR = "tb"  # <run>/tb/: TensorBoard event files (re-exported by raylign.rundir with the other names)
WANDB_DIR = "wandb"  # <run>/wandb/: W&B's run dirs (offline-run-*/ or run-*/), made by wandb itself
MLFLOW_DIR = "mlruns"  # <run>/mlruns/: the default MLflow store (runs, metrics, params, artifacts)
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow")
# The module each tracker imports and the raylign extra that installs it (tensorboard is a core dependency).
_LIBRARIES = {"tensorboard": ("torch.utils.tensorboard", None), "wandb": ("wandb", "wandb"),
              "mlflow": ("mlflow", "mlflow")}


class Tracker:
    """One metric sink. The base class does nothing, so a sink implements only what it supports."""

    name = "none"
    stores_artifacts = False  # whether `log_artifact` keeps anything (TensorBoard: no)

    def log_params(self, config: dict[str, Any]) -> None:
        """The resolved config (`RunConfig.model_dump(mode="json")`), once at the start."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """The metrics of one step: names like `train/loss`, finite floats."""

    def log_artifact(self, path: Path, name: str) -> None:
        """A directory (`final/`) stored as an artifact called `name`."""

    def close(self) -> None:
        """Flush and finish; called once, also when the run failed."""


class TensorBoardTracker(Tracker):
    """Scalars only, in `<run>/tb/`, exactly what RunDir wrote before trackers existed."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker(Tracker):
    """A W&B run. Offline mode needs no account or network and writes `<run>/wandb/offline-run-*/`
    (the `.wandb` transaction log holds history, config and the artifact) for a later `wandb sync`."""

    name = "wandb"
    stores_artifacts = True

    def __init__(self, project: str, run_name: str, run_path: Path, mode: str, config: dict[str, Any]):
        import wandb

        self._wandb = wandb
        self.run_name = run_name
        # create_new: a run of its own even if the caller already has a W&B run active.
        init: dict[str, Any] = {"project": project, "name": run_name, "dir": str(run_path), "mode": mode,
                                "config": config, "reinit": "create_new"}
        try:
            self._run: Any = wandb.init(**init)
        except Exception as exc:  # noqa: BLE001 - wandb raises many kinds (auth, network, settings)
            hint = " (output.wandb_mode=offline needs no account or network)" if mode == "online" else ""
            raise ConfigError(f"wandb could not start a run: {exc}{hint}") from exc

    def log_params(self, config: dict[str, Any]) -> None:
        self._run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def log_artifact(self, path: Path, name: str) -> None:
        artifact = self._wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{self.run_name}-{name}"), type="model")
        # immutable: wandb reads the files where they are (when it uploads or syncs) instead of copying a
        # whole model into its staging cache; final/ is not written again after it is logged.
        artifact.add_dir(str(path), policy="immutable")
        self._run.log_artifact(artifact, aliases=["latest", name])

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.finish()


def mlflow_tracking_uri(uri: str | None, default_dir: Path) -> str:
    """`uri`, or a local store in `default_dir` (`file:` URI). MLflow 3 refuses file stores unless
    MLFLOW_ALLOW_FILE_STORE is set; a local store is what was asked for, so it is allowed here (a user's
    own MLFLOW_ALLOW_FILE_STORE=false still wins: then pass a `sqlite:///...` URI)."""
    if uri is None:
        uri = Path(default_dir).resolve().as_uri()
    scheme = uri.split("/", 1)[0]
    if uri.startswith("file:") or ":" not in scheme:  # file:... or a plain path
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def mlflow_key(name: str) -> str:
    """A valid MLflow metric/param name: '/', '.', '-', '_', ' ', ':' and alphanumerics, no empty or
    relative path parts ('train/loss' stays 'train/loss')."""
    parts = [re.sub(r"[^\w.\- :]", "_", p) for p in name.split("/") if p]
    return "/".join("_" if p in (".", "..") else p for p in parts) or "_"


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'train.lr': '1e-05', 'output.trackers': '["mlflow"]', ...}: strings as they are,
    everything else as JSON (so None is 'null' and lists stay readable)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, prefix=f"{dotted}."))
        else:
            out[dotted] = value if isinstance(value, str) else json.dumps(value)
    return out


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MlflowTracker(Tracker):
    """An MLflow run through an `MlflowClient` of its own (no global `mlflow.set_tracking_uri`)."""

    name = "mlflow"
    stores_artifacts = True

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_path: Path):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils import validation

        self._metric, self._param = Metric, Param
        # MLflow's own limits (they differ between versions: 500 or 6000 characters per value).
        self._max_value = getattr(validation, "MAX_PARAM_VAL_LENGTH", 500)
        self._max_key = getattr(validation, "MAX_ENTITY_KEY_LENGTH", 250)
        self._params_per_batch = getattr(validation, "MAX_PARAMS_TAGS_PER_BATCH", 100)
        self._metrics_per_batch = getattr(validation, "MAX_METRICS_PER_BATCH", 1000)
        self.tracking_uri = tracking_uri
        try:
            self._client = MlflowClient(tracking_uri=tracking_uri)
            experiment_id = self._experiment_id(experiment)
            run = self._client.create_run(experiment_id, run_name=run_name, tags={"raylign.run_dir": str(run_path)})
        except Exception as exc:  # noqa: BLE001 - MlflowException, connection errors, ...
            raise ConfigError(f"mlflow could not start a run at {tracking_uri}: {exc}") from exc
        self.run_id = run.info.run_id
        self._status = "RUNNING"

    def _experiment_id(self, experiment: str) -> str:
        found = self._client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(experiment)
        except Exception:  # noqa: BLE001 - another run (a parallel trial) created it first
            found = self._client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return found.experiment_id

    def log_params(self, config: dict[str, Any]) -> None:
        params = [self._param(mlflow_key(k)[: self._max_key], v[: self._max_value])
                  for k, v in flatten_params(config).items()]
        for chunk in _chunks(params, self._params_per_batch):
            self._client.log_batch(self.run_id, params=list(chunk))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        rows = [self._metric(mlflow_key(k)[: self._max_key], float(v), now, step) for k, v in metrics.items()]
        for chunk in _chunks(rows, self._metrics_per_batch):
            self._client.log_batch(self.run_id, metrics=list(chunk))

    def log_artifact(self, path: Path, name: str) -> None:
        self._client.log_artifacts(self.run_id, str(path), artifact_path=name)

    def close(self) -> None:
        if self._status == "RUNNING":
            self._status = "FINISHED"
            self._client.set_terminated(self.run_id, status="FINISHED")


def missing_libraries(trackers: Iterable[str]) -> list[str]:
    """The trackers among `trackers` whose library does not import."""
    import importlib

    missing = []
    for name in trackers:
        try:
            importlib.import_module(_LIBRARIES[name][0])
        except ImportError:
            missing.append(name)
    return missing


def require_libraries(trackers: Iterable[str]) -> None:
    """One ConfigError naming the extras to install when a requested tracker's library is missing."""
    missing = missing_libraries(trackers)
    if missing:
        extras = [e for e in (_LIBRARIES[m][1] for m in missing) if e]
        fix = f"pip install 'raylign[{','.join(extras)}]'" if extras else "pip install tensorboard"
        raise ConfigError(f"output.trackers asks for {', '.join(missing)}, which is not installed: {fix} "
                          "(or drop it from output.trackers)")


def close_trackers(trackers: Sequence[Tracker]) -> None:
    """Close every tracker, each in its own try/finally: one failing close does not skip the others
    (after all were tried, the last failure propagates, the earlier ones chained as its __context__)."""
    if not trackers:
        return
    try:
        trackers[0].close()
    finally:
        close_trackers(trackers[1:])


def build_trackers(config: RunConfig, run_path: Path, run_name: str) -> list[Tracker]:
    """The trackers `config.output.trackers` names, in order, for the run in `run_path`."""
    out = config.output
    names = list(dict.fromkeys(out.trackers))
    require_libraries(names)
    built: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                built.append(TensorBoardTracker(Path(run_path) / TENSORBOARD_DIR))
            elif name == "wandb":
                built.append(WandbTracker(out.wandb_project, run_name, Path(run_path), out.wandb_mode,
                                          config.model_dump(mode="json")))
            elif name == "mlflow":
                uri = mlflow_tracking_uri(out.mlflow_tracking_uri, Path(run_path) / MLFLOW_DIR)
                built.append(MlflowTracker(uri, out.mlflow_experiment, run_name, Path(run_path)))
            else:  # the config's Literal keeps this unreachable
                raise ConfigError(f"unknown tracker '{name}'; one of {', '.join(TRACKERS)}")
    except BaseException:
        close_trackers(built)
        raise
    return built
