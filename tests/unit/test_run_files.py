"""Issue 15 items 2-4 without Ray: checkpoints are flushed before their rename and a half-written one
is deleted at the next start; Tune puts a checkpoint back atomically; --resume refuses a config that
makes a different run; the reference log-prob cache is keyed by the reference too; a learner refuses
a non-finite step and non-finite weights; every reward source is held to finite scores."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from raylign.config import ConfigError, load_config
from raylign.pipelines.offline import reference_cache_name, reference_identity
from raylign.rundir import CHECKPOINTS_DIR, TRAINER_STATE, RunDir, identity_changes, read_trainer_state
from raylign.tuning.trainable import _place_checkpoint


def _config(tmp_path, *extra):
    return load_config("sft", [f"output.dir={tmp_path}", "output.name=r", "output.trackers=[]", *extra])


def _checkpoint(run: RunDir, step: int, payload: str) -> Path:
    tmp = run.begin_checkpoint(step)
    (tmp / "weights.bin").write_text(payload)
    (tmp / TRAINER_STATE).write_text(f'{{"step": {step}}}')
    return run.commit_checkpoint(step, tmp)


def test_a_checkpoint_is_flushed_before_it_is_renamed(tmp_path, monkeypatch):
    run = RunDir(_config(tmp_path))
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    _checkpoint(run, 2, "w")
    run.close()
    # Two files and the dir itself flushed, then the rename, then the checkpoints dir flushed.
    assert events == ["fsync", "fsync", "fsync", "replace step_2", "fsync"]


def test_a_half_written_checkpoint_is_removed_at_the_next_start_and_never_resumed(tmp_path):
    config = _config(tmp_path)
    run = RunDir(config)
    _checkpoint(run, 2, "good")
    partial = run.begin_checkpoint(4)  # the run dies while writing step 4
    (partial / "weights.bin").write_text("half")
    run.close()
    resumed = RunDir(config, resume=True)
    assert not partial.exists()
    assert resumed.latest_checkpoint() == resumed.checkpoint_path(2)
    resumed.close()


def test_rotation_only_deletes_older_committed_checkpoints(tmp_path):
    run = RunDir(_config(tmp_path, "output.keep_last=1"))
    _checkpoint(run, 2, "a")
    run.begin_checkpoint(4)  # never committed: step_2 must survive it
    assert [p.name for p in run.list_checkpoints()] == ["step_2"]
    _checkpoint(run, 4, "b")
    assert [p.name for p in run.list_checkpoints()] == ["step_4"]
    run.close()


def test_tune_places_a_checkpoint_atomically_and_replaces_a_same_step_one(tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "tune_ckpt"
    src.mkdir()
    (src / TRAINER_STATE).write_text('{"step": 4}')
    (src / "weights.bin").write_text("exploited")
    run_path = tmp_path / "trial" / "run"
    own = run_path / CHECKPOINTS_DIR / "step_4"
    own.mkdir(parents=True)
    (own / "weights.bin").write_text("own")
    (run_path / CHECKPOINTS_DIR / "step_2").mkdir()

    real_copytree = shutil.copytree

    def dies_midway(a, b, **kw):
        Path(b).mkdir(parents=True)
        (Path(b) / "weights.bin").write_text("exp")  # part of the copy, then the trial is killed
        raise OSError("killed")

    monkeypatch.setattr(shutil, "copytree", dies_midway)
    with pytest.raises(OSError):
        _place_checkpoint(src, run_path)
    assert (own / "weights.bin").read_text() == "own"  # the interrupted copy never became step_4
    monkeypatch.setattr(shutil, "copytree", real_copytree)
    assert _place_checkpoint(src, run_path) == 4
    ckpts = sorted(p.name for p in (run_path / CHECKPOINTS_DIR).iterdir())
    assert ckpts == ["step_4"]  # the partial copy and the other step are gone
    assert (own / "weights.bin").read_text() == "exploited" and read_trainer_state(own)["step"] == 4


@pytest.mark.parametrize("change, shown", [
    ("seed=7", "seed: 0 -> 7"),
    ("model.path=tiny:qwen2", 'model.path: "tiny:llama" -> "tiny:qwen2"'),
    ("data.train=other.jsonl", "data.train:"),
    ("algorithm=dpo", 'algorithm: "sft" -> "dpo"'),
])
def test_resume_refuses_a_config_that_makes_another_run(tmp_path, change, shown):
    RunDir(_config(tmp_path, "model.path=tiny:llama")).close()
    changed = _config(tmp_path, "model.path=tiny:llama", change)
    with pytest.raises(ConfigError, match="--resume-force") as info:
        RunDir(changed, resume=True)
    assert shown in str(info.value)
    RunDir(changed, resume=True, resume_force=True).close()


def test_resume_accepts_changes_that_keep_the_run(tmp_path):
    RunDir(_config(tmp_path)).close()
    same_run = _config(tmp_path, "train.lr=1e-3", "train.max_steps=50", "resources.learners=2")
    assert identity_changes({"algorithm": "sft"}, same_run)  # a different saved config is noticed ...
    RunDir(same_run, resume=True).close()  # ... but lr, steps and resources are not the run's identity


def test_the_cli_resume_refusal_is_one_message(tmp_path, capsys, pairs_file):
    from raylign.cli import main

    args = [f"output.dir={tmp_path}", "output.name=r", "model.path=tiny:llama", f"data.train={pairs_file}"]
    RunDir(load_config("sft", args)).close()
    assert main(["train", "sft", *args, "seed=3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "seed: 0 -> 3" in err and "Traceback" not in err


def test_the_reference_cache_is_keyed_by_the_reference_model_and_the_data(tmp_path):
    splits = {"train": [{"seqs": [{"input_ids": [1, 2, 3]}]}]}
    base = load_config("dpo", ["model.path=tiny:llama"])
    other_ref = load_config("dpo", ["model.path=tiny:llama", "reference={path: 'tiny:qwen2'}"])
    lora = load_config("dpo", ["model.path=tiny:llama", "model.lora={r: 4}"])
    name = reference_cache_name(splits, reference_identity(base))
    assert name.startswith("ref_logps_") and name.endswith(".npz")
    assert reference_cache_name(splits, reference_identity(other_ref)) != name
    # LoRA without a separate reference: the reference is the base model, the same cache.
    assert reference_cache_name(splits, reference_identity(lora)) == name
    assert reference_cache_name({"train": [{"seqs": [{"input_ids": [1, 2, 4]}]}]}, reference_identity(base)) != name


def test_every_reward_source_must_give_finite_scores():
    from raylign.rewards import RewardSourceError
    from raylign.rewards.base import RewardSource, WeightedMix

    class Broken(RewardSource):
        name = "broken-model"
        trainable = False

        def score(self, prompts, completions):
            return np.array([1.0, np.nan], dtype=np.float32)

    with pytest.raises(RewardSourceError, match="broken-model' returned 1 non-finite"):
        WeightedMix([Broken()]).score(["p", "q"], ["a", "b"])


def test_a_learner_refuses_a_nonfinite_step_and_nonfinite_weights(tmp_path):
    """LearnerWorker outside Ray (a plain class): a NaN batch loss never reaches the weights."""
    import torch

    from raylign.runtime import NonFiniteError
    from raylign.workers.learner import LearnerWorker

    config = load_config("sft", ["model.path=tiny:llama", "model.lora=null", "train.batch_size=2",
                                 "train.micro_batch_size=2"])
    learner = LearnerWorker(0, 1, 1.0, config, "sft")
    learner.setup_optimizer(10)
    before = {k: v.clone() for k, v in learner.trainable_state().items()}
    params = [p for p in learner.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(NonFiniteError, match="grad_norm is nan on learner 0"):
        learner.optimizer_step(params, {"nll_sum": 1.0})
    skipping = LearnerWorker(0, 1, 1.0, config.model_copy(update={"train": config.train.model_copy(
        update={"on_nonfinite": "skip_step"})}), "sft")
    skipping.setup_optimizer(10)
    sparams = [p for p in skipping.model.parameters() if p.requires_grad]
    for p in sparams:
        p.grad = torch.ones_like(p)
    out = skipping.optimizer_step(sparams, {"nll_sum": float("inf")})
    assert out["skipped_step"] == 1.0 and all(p.grad is None for p in sparams)
    assert all(torch.equal(before[k], v) for k, v in skipping.trainable_state().items())  # same init seed
    with torch.no_grad():
        sparams[0].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="nothing was saved"):
        skipping.save_final(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
