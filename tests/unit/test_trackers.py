"""Experiment trackers (no Ray): one tiny fake run logged to TensorBoard, W&B (offline) and MLflow (a
local store), each read back with its own reader; config errors; closing; Tune's sweep callbacks.

The readers below are also used by tests/integration/test_trackers_run.py.

W&B: wandb >= 0.2x has no Python reader for offline runs any more (`wandb.sdk.internal.datastore` is
gone with the Python backend, the public `wandb.Api` needs the server, and offline runs write no
history/summary json). The run's `.wandb` file is what `wandb sync` uploads: a LevelDB-log framed
stream of `wandb_internal_pb2.Record` protobufs (the schema ships with wandb as `wandb.proto`), so
`wandb_records` unframes it (7-byte header, 32 KiB blocks, FULL/FIRST/MIDDLE/LAST chunks) and parses
each record with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from raylign import rundir, trackers
from raylign.config import ConfigError, load_config
from raylign.rundir import RunDir, read_metrics
from raylign.trackers import Tracker, close_trackers, flatten_params, mlflow_key

ALL = "output.trackers=[tensorboard,wandb,mlflow]"


def set_tracker_env(monkeypatch, home: Path) -> None:
    """Nothing reaches the network or ~/: W&B offline and silent, its config/cache/data dirs under `home`."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
                       "WANDB_DATA_DIR": str(home / "data"), "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def tracker_env(monkeypatch, tmp_path_factory):
    set_tracker_env(monkeypatch, tmp_path_factory.mktemp("wandb-home"))


# ---- readers, one per sink ----------------------------------------------------------------------


def tensorboard_scalars(run_path: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_path / trackers.TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """Every record of a `.wandb` transaction log, parsed with wandb's protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, part = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            yield wandb_internal_pb2.Record.FromString(chunk)
        elif kind == 2:  # FIRST
            part = chunk
        elif kind == 3:  # MIDDLE
            part += chunk
        elif kind == 4:  # LAST
            yield wandb_internal_pb2.Record.FromString(part + chunk)
            part = b""


def wandb_offline_run(run_path: Path) -> dict:
    """History per step, config and artifacts of the one offline run under `<run>/wandb/`."""
    dirs = sorted((run_path / trackers.WANDB_DIR).glob("offline-run-*"))
    assert len(dirs) == 1, dirs
    (log,) = dirs[0].glob("run-*.wandb")
    history: dict[int, dict] = {}
    config: dict = {}
    artifacts: dict[str, dict] = {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
        elif kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in update})
        elif kind == "artifact":
            artifacts[record.artifact.name] = {"type": record.artifact.type,
                                               "files": sorted(e.path for e in record.artifact.manifest.contents)}
    return {"history": history, "config": config, "artifacts": artifacts}


def wandb_series(run: dict, key: str) -> list[tuple[int, float]]:
    return [(step, row[key]) for step, row in sorted(run["history"].items()) if key in row]


def mlflow_run(run_path: Path, experiment: str = "raylign") -> dict:
    """Params, metric histories and artifact files of the one run in `<run>/mlruns/`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_path / trackers.MLFLOW_DIR).resolve().as_uri())
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    rid = run.info.run_id
    metrics = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(rid, key), key=lambda m: m.step)]
               for key in run.data.metrics}
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    listed = sorted(f.path for f in client.list_artifacts(rid, "final"))
    return {"params": run.data.params, "metrics": metrics, "files": files, "listed": listed, "root": root,
            "status": run.info.status, "name": run.info.run_name}


def jsonl_series(run_path: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run_path) if r.get(key) is not None]


# ---- the tests ------------------------------------------------------------------------------------


def test_one_run_reads_back_the_same_from_every_sink(tmp_path, tracker_env):
    cfg = load_config("sft", [f"output.dir={tmp_path}", "output.name=t", ALL])
    run = RunDir(cfg)
    losses = [2.5, 2.0, 1.6, 1.25, 0.875]
    for step, loss in enumerate(losses, start=1):
        run.log_metrics(step, {"train/loss": loss, "train/lr": 1e-3 * step, "train/bad": float("nan"),
                               "train/note": "text"})
    run.final.mkdir()
    (run.final / "model.safetensors").write_bytes(b"weights")
    run.log_final_model()
    run.close()
    root = tmp_path / "t"

    want = list(enumerate(losses, start=1))
    assert jsonl_series(root, "train/loss") == want
    assert all(r["train/bad"] is None for r in read_metrics(root))  # metrics.jsonl keeps the NaN as null

    tb = tensorboard_scalars(root)
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4, 5]
    assert tb["train/loss"][-1][1] == pytest.approx(losses[-1])  # float32 in event files
    assert "train/bad" not in tb and "train/note" not in tb  # NaN and strings are skipped

    wb = wandb_offline_run(root)
    assert wandb_series(wb, "train/loss") == want
    assert "train/bad" not in {k for row in wb["history"].values() for k in row}
    assert wb["config"]["train"]["lr"] == cfg.train.lr and wb["config"]["output"]["trackers"][1] == "wandb"
    assert wb["artifacts"] == {"t-final": {"type": "model", "files": ["model.safetensors"]}}

    ml = mlflow_run(root)
    assert ml["metrics"]["train/loss"] == want  # '/' is a valid MLflow metric name
    assert [s for s, _ in ml["metrics"]["train/lr"]] == [1, 2, 3, 4, 5]
    assert "train/bad" not in ml["metrics"]
    assert float(ml["params"]["train.lr"]) == cfg.train.lr
    assert json.loads(ml["params"]["output.trackers"]) == ["tensorboard", "wandb", "mlflow"]
    assert "model.lora" not in ml["params"] and ml["params"]["model.lora.r"] == "16"  # nested: dotted keys
    assert ml["listed"] == ["final/model.safetensors"] and ml["files"] == ["final/model.safetensors"]
    assert (ml["root"] / "final" / "model.safetensors").read_bytes() == b"weights"
    assert ml["status"] == "FINISHED" and ml["name"] == "t"


def test_no_trackers_and_default(tmp_path):
    run = RunDir(load_config("sft", [f"output.dir={tmp_path}", "output.name=none", "output.trackers=[]"]))
    run.log_metrics(1, {"train/loss": 1.0})
    run.final.mkdir()
    run.log_final_model()
    run.close()
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == [
        rundir.RUN_MARKER, "checkpoints", "config.yaml", "final", "metrics.jsonl", "samples.jsonl"]
    assert load_config("sft").output.trackers == ["tensorboard"]
    assert rundir.TENSORBOARD_DIR == trackers.TENSORBOARD_DIR


def test_unknown_tracker_is_one_config_error():
    with pytest.raises(ConfigError) as info:
        load_config("sft", ["output.trackers=[tensorboard,wandbb]"])
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and "output.trackers" in lines[1] and "wandbb" in lines[1], lines


def test_output_tensorboard_moved_to_trackers():
    with pytest.raises(ConfigError, match=r"unknown key 'output.tensorboard'. Did you mean 'output.trackers'\?"):
        load_config("sft", ["output.tensorboard=false"])


def test_missing_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if not installed
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError) as info:
        RunDir(load_config("sft", [f"output.dir={tmp_path}", "output.name=m", ALL]))
    assert "pip install 'raylign[wandb,mlflow]'" in str(info.value)
    with pytest.raises(ConfigError, match=r"asks for wandb, which is not installed: pip install 'raylign\[wandb\]'"):
        RunDir(load_config("sft", [f"output.dir={tmp_path}", "output.name=w", "output.overwrite=true",
                                   "output.trackers=[tensorboard,wandb]"]))


class _Fake(Tracker):
    def __init__(self, fail: bool):
        self.fail, self.closed = fail, False

    def close(self) -> None:
        self.closed = True
        if self.fail:
            raise RuntimeError("tracker close failed")


def test_a_failing_close_does_not_skip_the_others(tmp_path):
    run = RunDir(load_config("sft", [f"output.dir={tmp_path}", "output.name=c", "output.trackers=[]"]))
    fakes = [_Fake(True), _Fake(False), _Fake(True), _Fake(False)]
    run._trackers = list(fakes)
    with pytest.raises(RuntimeError, match="tracker close failed"):
        run.close()
    assert all(f.closed for f in fakes) and run._metrics.closed and run._samples.closed
    close_trackers([])  # nothing to close is fine


def test_param_and_metric_names():
    assert mlflow_key("train/loss") == "train/loss"
    assert mlflow_key("eval/win@ref(0)") == "eval/win_ref_0_" and mlflow_key("a//../b/") == "a/_/b"
    flat = flatten_params({"train": {"lr": 1e-5, "max_steps": None}, "output": {"trackers": ["mlflow"]},
                           "multitask": {"tasks": {}}, "recipe": "sft"})
    assert flat == {"train.lr": "1e-05", "train.max_steps": "null", "output.trackers": '["mlflow"]',
                    "multitask.tasks": "{}", "recipe": "sft"}


def test_mlflow_params_respect_the_value_limit(tmp_path, tracker_env):
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    uri = trackers.mlflow_tracking_uri(None, tmp_path / "mlruns")
    assert uri == (tmp_path / "mlruns").resolve().as_uri()
    tracker = trackers.MlflowTracker(uri, "limits", "r", tmp_path)
    tracker.log_params({"description": "x" * (MAX_PARAM_VAL_LENGTH + 100), "a": {"b": 1}})
    tracker.close()
    params = MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.params
    assert len(params["description"]) == MAX_PARAM_VAL_LENGTH and params["a.b"] == "1"


def test_mlflow_file_store_is_allowed_only_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "x")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # recorded, so the test leaves the variable as it was
    assert trackers.mlflow_tracking_uri("http://host:5000", tmp_path) == "http://host:5000"
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    trackers.mlflow_tracking_uri(None, tmp_path)
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"


def test_sweep_callbacks_follow_the_recipe_trackers(tmp_path, monkeypatch, tracker_env):
    from ray.air.integrations import wandb as ray_wandb
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    from raylign.tuning.tuner import sweep_callbacks

    def output(*over):
        return load_config("sft", list(over)).output

    assert sweep_callbacks(output(), "s", tmp_path) == []  # tensorboard: Tune's own TBX logger
    assert sweep_callbacks(output("output.trackers=[]"), "s", tmp_path) == []
    assert sweep_callbacks(output("output.trackers=[wandb]", "output.wandb_mode=disabled"), "s", tmp_path) == []

    wb, ml = sweep_callbacks(output(ALL, "output.wandb_project=p", "output.mlflow_experiment=e"), "sweep1", tmp_path)
    assert isinstance(wb, WandbLoggerCallback) and isinstance(ml, MLflowLoggerCallback)
    assert (wb.project, wb.group, wb.kwargs) == ("p", "sweep1", {"mode": "offline", "dir": str(tmp_path)})
    assert ml.tracking_uri == (tmp_path / "mlruns").resolve().as_uri() and ml.experiment_name == "e"
    assert ml.tags == {"raylign.sweep": "sweep1"}

    # Ray asks for an API key unless $WANDB_MODE is offline; the recipe's mode is set for that check only.
    seen = []
    monkeypatch.setattr(ray_wandb, "_set_api_key", lambda *a, **k: seen.append(os.environ.get("WANDB_MODE")))
    monkeypatch.delenv("WANDB_MODE")
    wb.setup()
    assert seen == ["offline"] and "WANDB_MODE" not in os.environ

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"raylign\[mlflow\]"):
        sweep_callbacks(output("output.trackers=[mlflow]"), "s", tmp_path)
