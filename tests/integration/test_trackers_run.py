"""A real tiny SFT run on the shared local Ray logs to TensorBoard, W&B (offline) and MLflow (local store);
each sink, read back with its own reader, holds the same 3 steps and final `train/loss` as metrics.jsonl,
and W&B and MLflow hold `final/` as an artifact (the loop calls `RunDir.log_final_model()`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylign.config import load_config
from raylign.pipelines import run_pipeline
from tests.unit.test_trackers import (
    jsonl_series,
    mlflow_run,
    set_tracker_env,
    tensorboard_scalars,
    wandb_offline_run,
    wandb_series,
)

pytestmark = pytest.mark.usefixtures("ray_session")


def test_sft_run_logs_to_every_tracker(tmp_path, pairs_file, monkeypatch):
    set_tracker_env(monkeypatch, tmp_path / "wandb-home")
    cfg = load_config("sft", [
        "model.path=tiny:llama", "model.lora=null", "resources.cpus_per_learner=0.5", "progress=false",
        f"data.train={pairs_file}", f"output.dir={tmp_path}/runs", "output.name=trk", "train.max_steps=3",
        "train.batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=0", "train.lr=3e-3",
        "output.trackers=[tensorboard,wandb,mlflow]"])
    result = run_pipeline(cfg)
    root = Path(result.run_dir)

    truth = jsonl_series(root, "train/loss")
    assert [step for step, _ in truth] == [1, 2, 3]
    final_loss = truth[-1][1]

    tb = tensorboard_scalars(root)["train/loss"]
    assert [step for step, _ in tb] == [1, 2, 3] and tb[-1][1] == pytest.approx(final_loss, rel=1e-6)

    wb = wandb_offline_run(root)
    assert wandb_series(wb, "train/loss") == truth
    assert wb["config"]["model"]["path"] == "tiny:llama"

    ml = mlflow_run(root)
    assert ml["metrics"]["train/loss"] == truth
    assert ml["params"]["model.path"] == "tiny:llama" and ml["status"] == "FINISHED"

    # final/ as an artifact: the loop's RunDir.log_final_model() after the learners saved it.
    saved = sorted(str(p.relative_to(root / "final")) for p in (root / "final").rglob("*") if p.is_file())
    assert "model.safetensors" in saved
    assert wb["artifacts"]["trk-final"]["files"] == saved
    assert ml["files"] == [f"final/{name}" for name in saved]
