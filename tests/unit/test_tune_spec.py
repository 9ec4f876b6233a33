"""Sweep configs: the shipped ones load, overrides go where they belong, mistakes are one message."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylign.config import ConfigError
from raylign.pipelines.online import check_online_config
from raylign.tuning.objective import alignment_objective
from raylign.tuning.spec import load_spec, override_item, sample_values
from raylign.tuning.trainable import trial_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "tune_configs").glob("*.yaml"))


def test_shipped_sweeps():
    names = {p.name for p in SHIPPED}
    assert {"multitask_weights.yaml", "grpo_hparams.yaml", "dpo_beta.yaml"} <= names
    specs = {p.stem: load_spec(str(p)) for p in SHIPPED}
    assert set(specs["multitask_weights"].search_space) == {
        f"multitask.tasks.{t}.weight" for t in ("imitation", "preference", "rating")}
    assert specs["multitask_weights"].scheduler.type == "asha"
    assert {"train.lr", "rl.kl_coef", "rl.clip_eps", "rollout.n_samples"} <= set(specs["grpo_hparams"].search_space)
    assert specs["grpo_hparams"].search_alg == "optuna"
    assert specs["dpo_beta"].scheduler.type == "pbt" and "preference.beta" in specs["dpo_beta"].search_space


def test_every_grpo_trial_is_a_valid_online_config(tmp_path):
    spec = load_spec(str(ROOT / "tune_configs" / "grpo_hparams.yaml"))
    for n in sample_values(spec.search_space["rollout.n_samples"]):
        cfg = trial_config(spec, {"rollout.n_samples": n, "train.lr": 1e-5}, tmp_path)
        check_online_config(cfg, n_prompts=100)
        assert cfg.train.max_steps == spec.iterations * spec.steps_per_iteration
        assert cfg.output.save_every == cfg.train.eval_every == spec.steps_per_iteration


def test_overrides_are_routed_to_sweep_or_recipe():
    spec = load_spec(str(ROOT / "tune_configs" / "multitask_weights.yaml"),
                     ["num_samples=2", "scheduler.type=none", "model.path=tiny:llama", "train.lr=1e-3"])
    assert spec.num_samples == 2 and spec.scheduler.type == "none"
    assert spec.overrides[-2:] == ["model.path=tiny:llama", "train.lr=1e-3"]
    assert override_item("a.b", 0.001) == "a.b=0.001" and override_item("x", [1, 2]) == "x=[1, 2]"


@pytest.mark.parametrize("overrides, message", [
    (["num_sample=2"], "Did you mean 'num_samples'?"),
    (["scheduler.typ=asha"], "unknown key 'scheduler.typ'"),
    (["scheduler.type=hyperband"], "'scheduler.type'"),
    (["search_space={train.lrr: {uniform: [0.1, 0.2]}}"], "Did you mean 'train.lr'?"),
    (["search_space={train.lr: {logunifrom: [0.1, 0.2]}}"], "Did you mean 'loguniform'?"),
    (["search_space={train.lr: {loguniform: [0, 0.2]}}"], "loguniform needs 0 < low < high"),
    (["search_space={train.lr: {uniform: [-1, 0.2]}}"], "'train.lr'"),
])
def test_sweep_mistakes_are_one_clear_message(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_spec(str(ROOT / "tune_configs" / "multitask_weights.yaml"), overrides)
    assert message in str(exc.value)


def test_missing_sweep_file_lists_the_shipped_ones(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="tune_configs/dpo_beta.yaml"):
        load_spec("tune_configs/nope.yaml")


def test_alignment_objective_by_hand():
    assert alignment_objective("grpo", {"eval/reward": 0.5, "eval/kl": 2.0}, 0.1) == pytest.approx(0.3)
    assert alignment_objective("grpo", {"reward/mean": 0.4, "kl/seq_mean": 1.0}, 0.2) == pytest.approx(0.2)
    assert alignment_objective("dpo", {"eval/accuracy": 0.8, "eval/loss": 0.3}) == 0.8
    assert alignment_objective("sft", {"eval/nll": 2.5}) == -2.5
    assert alignment_objective("kto", {"eval/loss": 0.4}) == -0.4
    assert alignment_objective("multitask", {"eval/multitask_score": 0.3}) == 0.3
    assert alignment_objective("dpo", {"train/loss": 0.3}) is None
