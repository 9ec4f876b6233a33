"""Online RL on the shared local Ray with a tiny model and a reward a few steps can move.

The reward is 10 x the share of the letter 'e' in the completion (tests/rl_rewards.py): dense, so
every algorithm can raise it within a few dozen small steps.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest

from raylign.config import load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")

REWARD = 'reward.sources=[{source: "function:tests.rl_rewards:letter_share", weight: 10}]'
TINY = ["model.path=tiny:llama", "model.lora=null", REWARD, "rollout.max_new_tokens=16",
        "rollout.prompts_per_step=8", "rollout.n_samples=4", "train.batch_size=32", "train.micro_batch_size=32",
        "train.lr=3e-3", "train.eval_every=0", "rl.eval_prompts=16", "resources.cpus_per_learner=0.5",
        "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_reward_worker=0.25", "progress=false",
        "output.trackers=[]"]
SHAPES = {  # PPO: one completion per prompt, 2 epochs x 2 minibatches; REINFORCE++: pairs
    "ppo": ["rollout.n_samples=1", "rollout.prompts_per_step=32", "train.batch_size=16",
            "train.micro_batch_size=16"],
    "reinforce_pp": ["rollout.n_samples=2", "rollout.prompts_per_step=16"],
    "grpo": [], "rloo": [],
}


def _config(tmp_path, algorithm, name, *extra):
    return load_config(algorithm, TINY + SHAPES[algorithm] + [f"output.dir={tmp_path}/runs", f"output.name={name}",
                                                             *extra])


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo", "reinforce_pp"])
def test_algorithm_raises_reward_with_finite_kl(tmp_path, algorithm):
    result = run_pipeline(_config(tmp_path, algorithm, algorithm, "train.max_steps=25"))
    rows = read_metrics(result.run_dir)
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == list(range(1, 26))
    assert all(math.isfinite(r["kl/seq_mean"]) and math.isfinite(r["policy/entropy"]) for r in steps)
    before, after = rows[0], rows[-1]
    assert before["eval/kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert math.isfinite(after["eval/kl"]) and after["eval/kl"] > 0
    # Held-out reward (10 x letter share; the base model sits near 0.9) rises by a clear margin.
    assert after["eval/reward"] > before["eval/reward"] + 0.6, (before, after)
    if algorithm == "ppo":
        assert all(math.isfinite(r["critic/value_loss"]) for r in steps)
    assert (tmp_path / "runs" / algorithm / "final" / "config.json").exists()


def test_overlapped_sampling_is_one_update_behind_and_still_learns(tmp_path):
    """rollout.overlap with decoupled PPO, and the reference log-probs from the rollout workers."""
    result = run_pipeline(_config(tmp_path, "grpo", "overlap", "train.max_steps=25", "rollout.overlap=true",
                                  "rollout.reference_on_workers=true"))
    rows = read_metrics(result.run_dir)
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["rollout/weight_lag"] for r in steps] == [0] + [1] * 24
    # Behaviour weights: 1 when sampled with the current weights (step 1), near 1 one update later.
    assert steps[0]["policy/behavior_weight"] == pytest.approx(1.0, abs=1e-4)
    assert all(0.5 < r["policy/behavior_weight"] < 1.5 for r in steps)
    assert all(math.isfinite(r["kl/seq_mean"]) for r in steps) and steps[-1]["kl/seq_mean"] > 0
    assert rows[-1]["eval/reward"] > rows[0]["eval/reward"] + 0.6, (rows[0], rows[-1])


def _steps(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir) if "reward/mean" in r}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """Uninterrupted 6-step GRPO runs (sequential, or with rollout.overlap), the references for the
    fault and resume tests; each is run on first use."""
    cache: dict[bool, dict] = {}

    def get(overlap: bool = False) -> dict:
        if overlap not in cache:
            tmp = tmp_path_factory.mktemp("baseline")
            result = run_pipeline(_config(tmp, "grpo", "baseline", "train.max_steps=6",
                                          f"rollout.overlap={str(overlap).lower()}"))
            cache[overlap] = _steps(result.run_dir)
        return cache[overlap]

    return get


def _cli(tmp_path, *extra):
    args = [a for a in TINY + SHAPES["grpo"]]
    return [sys.executable, "-m", "raylign.cli", "train", "grpo", *args, f"output.dir={tmp_path}/runs",
            "output.name=resumed", "train.max_steps=6", "output.save_every=2", *extra]


@pytest.mark.parametrize("overlap", [True], ids=["overlap"])
def test_resumed_run_matches_the_uninterrupted_one(tmp_path, baselines, overlap):
    """With rollout.overlap the checkpoint also holds the batch already sampled for the next step.
    (Resume without overlap, after a killed learner or a full disk: tests/e2e/test_faults.py.)"""
    baseline = baselines(overlap)
    env = dict(os.environ, RAY_ADDRESS="")  # each CLI run starts its own local Ray
    flag = f"rollout.overlap={str(overlap).lower()}"
    proc = subprocess.Popen(_cli(tmp_path, flag), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = tmp_path / "runs" / "resumed" / "checkpoints" / "step_4"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), "the run never wrote its step-4 checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_cli(tmp_path, flag, "--resume"), check=True, env=env, timeout=300)
    resumed = _steps(tmp_path / "runs" / "resumed")
    assert sorted(resumed) == list(range(1, 7))  # no step lost or logged twice
    for step in range(1, 7):
        assert resumed[step]["reward/mean"] == pytest.approx(baseline[step]["reward/mean"], rel=1e-5, abs=1e-6)
        assert resumed[step]["kl/seq_mean"] == pytest.approx(baseline[step]["kl/seq_mean"], rel=1e-4, abs=1e-6)
