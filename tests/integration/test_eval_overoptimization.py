"""Reward over-optimisation curves across a real tiny GRPO run's checkpoints, and the online loop's
light eval every k steps (distinct-n, reward-length correlation)."""

from __future__ import annotations

import json
import math

import pytest

from raylign.cli import main
from raylign.config import load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.ray

REWARD = 'reward.sources=[{source: "function:tests.rl_rewards:letter_share", weight: 10}]'
TINY_GRPO = ["model.path=tiny:llama", "model.lora=null", REWARD, "rollout.max_new_tokens=8",
             "rollout.prompts_per_step=4", "rollout.n_samples=2", "train.batch_size=8", "train.micro_batch_size=8",
             "train.lr=1e-2", "train.eval_every=1", "rl.eval_prompts=4", "train.max_steps=2", "output.save_every=1",
             "resources.cpus_per_learner=0.5", "resources.cpus_per_rollout_worker=0.5",
             "resources.cpus_per_reward_worker=0.25", "progress=false", "output.trackers=[]"]


def test_curves_across_a_grpo_runs_checkpoints_and_light_eval_every_step(tmp_path, ray_session, capsys):
    result = run_pipeline(load_config("grpo", [*TINY_GRPO, f"output.dir={tmp_path}", "output.name=grpo"]))
    run = result.run_dir
    # light eval at step 1 (eval_every=1, before the end) carries the reward-hacking signals
    step1 = [r for r in read_metrics(run) if r["step"] == 1 and "eval/reward" in r]
    assert step1, "no eval row at step 1"
    assert 0 < step1[0]["eval/distinct_1"] <= 1 and 0 < step1[0]["eval/distinct_2"] <= 1
    corr = step1[0].get("eval/reward_length_corr")
    assert corr is None or -1 <= corr <= 1

    prompts = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": f"Tell me about item {i}."} for i in range(8)])
    out = tmp_path / "curves"
    assert main(["eval", run, "--checkpoints", "--prompts", prompts, "--gold", "lexicon:vader",
                 "--max-new-tokens", "8", "--actors", "1", "--cpus-per-actor", "0.5", "--batch-size", "8",
                 "--out", str(out), "--no-progress"]) == 0
    o = json.loads((out / "eval.json").read_text())["overoptimization"]
    assert [(p["checkpoint"], p["step"]) for p in o["points"]] == [("reference", 0), ("step_1", 1), ("final", 2)]
    assert "letter_share" in o["proxy"] and o["gold"] == "lexicon:vader" and o["reference"] == "tiny:llama"
    ref, *trained = o["points"]
    assert abs(ref["kl"]) < 1e-3 and ref["sqrt_kl"] < 0.04  # the reference sampled and scored by itself
    for p in o["points"]:
        assert p["sqrt_kl"] == pytest.approx(math.sqrt(max(p["kl"], 0.0)))
        assert p["proxy_ci"][0] <= p["proxy"] <= p["proxy_ci"][1] and p["gold_ci"][0] <= p["gold"] <= p["gold_ci"][1]
        assert -1 <= p["gold"] <= 1  # VADER compound
    assert trained[-1]["kl"] > ref["kl"]  # two lr=1e-2 steps move the policy away from the reference
    assert "generation" not in json.loads((out / "eval.json").read_text())  # the prompts fed the curves
    report = (out / "report.md").read_text()
    assert "Reward over-optimisation" in report and "| step_1 | 1 |" in report
    assert (out / "overoptimization.png").stat().st_size > 1000
    assert "gold peaks at" in capsys.readouterr().out


def test_checkpoint_curve_mistakes_are_one_message(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    assert main(["eval", "tiny:llama", "--prompts", prompts, "--gold", "lexicon:vader", "--out", str(tmp_path / "o")]) == 2
    assert "--proxy and --gold go with --checkpoints" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--checkpoints", "--prompts", prompts, "--out", str(tmp_path / "o")]) == 2
    assert "needs --prompts F" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--checkpoints", "--prompts", prompts, "--gold", "lexicon:vader",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not one" in capsys.readouterr().err
