"""Learner group on the shared local Ray: SFT learns, DDP equals one big batch, kill + resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raylign.config import load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics
from raylign.workers.group import WorkerGroup
from raylign.workers.learner import LearnerWorker
from raylign.workers.objectives import count_units

pytestmark = pytest.mark.usefixtures("ray_session")

TINY = ["model.path=tiny:llama", "model.lora=null", "resources.cpus_per_learner=0.5", "progress=false",
        "output.trackers=[]"]


def _sft_config(tmp_path, pairs_file, *extra):
    return load_config("sft", TINY + [f"data.train={pairs_file}", f"output.dir={tmp_path}/runs",
                                      "train.lr=3e-3", "train.batch_size=8", "train.micro_batch_size=4",
                                      "train.warmup_steps=0", *extra])


def test_sft_lowers_heldout_nll(tmp_path, pairs_file):
    cfg = _sft_config(tmp_path, pairs_file, "train.max_steps=30", "train.eval_every=15", "output.name=sft")
    result = run_pipeline(cfg)
    evals = [r["eval/nll"] for r in read_metrics(result.run_dir) if "eval/nll" in r]
    assert len(evals) == 3  # before training, step 15, step 30
    assert evals[-1] < evals[0] - 1.0, evals
    assert (Path(result.run_dir) / "final" / "model.safetensors").exists()


def _one_step_weights(config, batch, learners: int) -> dict[str, np.ndarray]:
    group = WorkerGroup(LearnerWorker, learners, 0.5, name=f"ddp{learners}",
                        init_kwargs={"config": config.model_dump(), "objective": "sft"})
    try:
        addr, port = group.call("master_address")[0]
        group.call("setup_distributed", addr, port)
        group.call("setup_optimizer", 10)
        group.call_sharded("train_step", batch, global_units=count_units("sft", batch))
        weights = group.call("get_weights")
        if learners > 1:
            for name, value in weights[0].items():  # every rank holds the same model after the step
                np.testing.assert_array_equal(value, weights[1][name])
        group.call("shutdown")
        return weights[0]
    finally:
        group.shutdown()


def test_two_learners_match_one_learner_on_the_whole_batch(tmp_path, pairs_file):
    from raylign.data import load_dataset
    from raylign.models import load_tokenizer
    from raylign.pipelines.offline import collate, encode_sft_rows

    cfg = _sft_config(tmp_path, pairs_file, "train.lr=1e-3", "train.micro_batch_size=2")
    tok = load_tokenizer(cfg.model.path)
    rows = load_dataset(pairs_file, "pairs").to_pylist()[:8]
    batch = collate(encode_sft_rows(rows, "pairs", tok, cfg), tok.pad_token_id)
    # Uneven lengths make per-shard token counts differ: a per-shard mean would not match.
    assert len(set(batch["loss_mask"].sum(1).tolist())) > 1
    one = _one_step_weights(cfg, batch, 1)
    two = _one_step_weights(cfg, batch, 2)
    from raylign.models import load_causal_lm

    initial = dict(load_causal_lm(cfg.model)[0].named_parameters())
    moved = max(float(np.abs(one[k] - initial[k].detach().numpy()).max()) for k in one)
    assert moved > 5e-4  # the step really changed the weights
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=2e-5, err_msg=name)


def test_interrupted_run_resumes_to_the_same_final_loss(tmp_path, pairs_file):
    """Ctrl-C after the step-8 checkpoint (in-process, on the shared Ray; kill -9 of the driver:
    test_online_rl.py, of a learner: tests/e2e/test_faults.py), then --resume: steps 9-12 repeat the
    uninterrupted run."""

    def config(name):
        return _sft_config(tmp_path, pairs_file, "train.max_steps=12", "output.save_every=4", f"output.name={name}")

    run_pipeline(config("full"))

    def interrupt_at_8(step, metrics):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config("stopped"), on_step=interrupt_at_8)
    assert not list((tmp_path / "runs" / "stopped" / "checkpoints").glob(".tmp*"))
    run_pipeline(config("stopped"), resume=True)

    full = {r["step"]: r for r in read_metrics(tmp_path / "runs" / "full") if "train/loss" in r}
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "runs" / "stopped") if "train/loss" in r}
    assert sorted(resumed) == list(range(1, 13))  # no step lost or logged twice
    for step in range(9, 13):
        assert resumed[step]["train/loss"] == pytest.approx(full[step]["train/loss"], rel=1e-5, abs=1e-6)
