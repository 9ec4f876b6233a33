"""Run directory: layout, metrics, atomic checkpoints, resume truncation, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from raylign.config import ConfigError, load_config
from raylign.rundir import RunDir, read_metrics
from raylign.workers.group import shard_batch


def _config(tmp_path, **over):
    return load_config("sft", [f"output.dir={tmp_path}", "output.name=r1"] + [f"{k}={v}" for k, v in over.items()])


def test_layout_metrics_samples_tensorboard(tmp_path):
    run = RunDir(_config(tmp_path))
    run.log_metrics(1, {"train/loss": 2.5, "bad": float("nan")})
    run.log_samples(1, [{"prompt": "hi", "completion": "hello"}])
    run.close()
    root = tmp_path / "r1"
    assert yaml.safe_load((root / "config.yaml").read_text())["algorithm"] == "sft"
    rows = read_metrics(root)
    assert rows[0]["step"] == 1 and rows[0]["train/loss"] == 2.5 and rows[0]["bad"] is None
    assert json.loads((root / "samples.jsonl").read_text())["completion"] == "hello"
    assert any((root / "tb").iterdir())


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    RunDir(_config(tmp_path)).close()
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        RunDir(_config(tmp_path))
    RunDir(_config(tmp_path), resume=True).close()
    RunDir(_config(tmp_path, **{"output.overwrite": "true"})).close()
    with pytest.raises(ConfigError, match="does not exist"):
        RunDir(load_config("sft", [f"output.dir={tmp_path}", "output.name=nope"]), resume=True)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    run = RunDir(_config(tmp_path, **{"output.keep_last": 2}))
    for step in (1, 2, 3):
        tmp = run.begin_checkpoint(step)
        (tmp / "weights").write_text(str(step))
        assert not run.checkpoint_path(step).exists()  # invisible until committed
        run.commit_checkpoint(step, tmp)
    assert [p.name for p in run.list_checkpoints()] == ["step_2", "step_3"]
    assert (run.latest_checkpoint() / "weights").read_text() == "3"
    run.close()


def test_resume_truncates_rows_after_checkpoint(tmp_path):
    run = RunDir(_config(tmp_path))
    for step in (1, 2, 3):
        run.log_metrics(step, {"x": step})
    run.truncate_logs_after(2)
    run.log_metrics(3, {"x": 30})
    run.close()
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "r1")] == [(1, 1), (2, 2), (3, 30)]


def test_shard_batch_covers_rows_in_order():
    batch = {"a": np.arange(5), "b": np.arange(5) * 10}
    shards = shard_batch(batch, 2)
    assert [s["a"].tolist() for s in shards] == [[0, 1, 2], [3, 4]]
    assert np.concatenate([s["b"] for s in shards]).tolist() == batch["b"].tolist()
    with pytest.raises(ValueError, match="different lengths"):
        shard_batch({"a": np.arange(2), "b": np.arange(3)}, 2)
