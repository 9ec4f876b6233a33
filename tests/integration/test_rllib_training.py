"""RLlib's DQN and PPO on text, on the shared local Ray with tiny:llama and a reward a few hundred episodes
can move: 10 x the share of the letter 'e' in the completion (tests/rl_rewards.py, a raylign function reward).

Fast: a DQN run checkpoints, resumes with the same replay size and step count, and its final/ loads with
transformers and serves with raylign's serving engine; a PPO run trains with its KL to the reference logged.
Slow (minutes on a loaded 2-core machine): each raises the mean episode reward, last 20 vs first 20
episodes, by more than 2 standard errors.
"""

from __future__ import annotations

import json
import math

import pytest

from raylign.config import load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics, read_trainer_state

pytestmark = pytest.mark.usefixtures("ray_session")

REWARD = 'reward.sources=[{source: "function:tests.rl_rewards:letter_share", weight: 10}]'
TINY = [REWARD, "model.path=tiny:llama", "data.limit=64", "data.max_prompt_length=48", "rollout.max_new_tokens=8",
        "progress=false", "output.trackers=[]", "resources.cpus_per_learner=0.5", "rllib.cpus_per_env_runner=0.5",
        "resources.cpus_per_reward_worker=0.25"]
DQN = ["rllib.score_offset=5", "rllib.envs_per_env_runner=8", "rllib.learning_starts=64", "rllib.training_intensity=4"]
PPO = ["rllib.envs_per_env_runner=8", "rllib.ppo_batch_steps=256", "rllib.minibatch_size=64", "rllib.ppo_epochs=2"]


def _config(tmp_path, algorithm, name, *extra):
    return load_config(algorithm, TINY + (DQN if algorithm == "dqn" else PPO)
                       + [f"output.dir={tmp_path}/runs", f"output.name={name}", *extra])


def _episodes(run_dir):
    with open(f"{run_dir}/samples.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_dqn_resumes_with_the_same_replay_and_steps_and_its_final_model_serves(tmp_path):
    from transformers import AutoModelForCausalLM

    from raylign.serving.engine import Engine, Job, Sampling

    short = ["rllib.training_intensity=1", "rllib.learning_starts=32", "output.save_every=2"]
    first = run_pipeline(_config(tmp_path, "dqn", "resume", "rllib.iterations=2", *short))
    checkpoint = read_trainer_state(f"{first.run_dir}/checkpoints/step_2")
    assert checkpoint["replay_timesteps"] == checkpoint["env_steps"] == 2 * 8 * 8 > 0  # 2 x (8 envs x 8 steps)
    resumed = run_pipeline(_config(tmp_path, "dqn", "resume", "rllib.iterations=3", *short), resume=True)
    rows = read_metrics(resumed.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    after = rows[2]
    # restored exactly as saved (checked again by the runner), then one more iteration on top of it
    assert after["resume/replay_timesteps"] == checkpoint["replay_timesteps"]
    assert after["resume/env_steps"] == checkpoint["env_steps"]
    assert after["env_steps"] == checkpoint["env_steps"] + 64 and after["replay/timesteps"] == after["env_steps"]
    assert after["episodes"] == checkpoint["episodes"] + len([e for e in _episodes(resumed.run_dir) if e["step"] == 3])
    assert math.isfinite(after["learner/qf_loss"])
    # final/ is a plain Hugging Face model directory, which raylign's serving engine serves
    model = AutoModelForCausalLM.from_pretrained(f"{resumed.run_dir}/final")
    assert model.config.vocab_size > 0
    engine = Engine(f"{resumed.run_dir}/final")
    result = engine.generate([Job([engine.encode_text("Tell me about the sea")], Sampling(6, temperature=0.0))])
    (text, tokens, finish), = result.rows[0]
    assert 1 <= tokens <= 6 and finish in ("stop", "length") and isinstance(text, str)


def test_rllib_ppo_trains_with_its_kl_to_the_reference_logged(tmp_path):
    # Sampling in the driver (rllib.env_runners=0): one actor start less, and that path covered too.
    result = run_pipeline(_config(tmp_path, "rllib_ppo", "ppo", "rllib.iterations=2", "rllib.ppo_batch_steps=64",
                                  "rllib.minibatch_size=32", "rllib.kl_coef=0.1", "rllib.env_runners=0"))
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["learner/ref_kl"]) and r["learner/ref_kl"] >= 0 for r in rows)
    assert all(math.isfinite(r["learner/vf_loss"]) for r in rows)
    assert rows[-1]["episodes"] == len(_episodes(result.run_dir)) > 0
    assert (tmp_path / "runs" / "ppo" / "final" / "config.json").is_file()


def _raised(run_dir, episodes):
    """(first-20 mean, last-20 mean, their combined standard error) of the episodes' rewards."""
    from raylign.rllib.runner import mean_and_sem

    rewards = [e["reward"] for e in _episodes(run_dir)]
    assert len(rewards) >= episodes
    (m0, s0), (m1, s1) = mean_and_sem(rewards[:20]), mean_and_sem(rewards[-20:])
    return m0, m1, math.hypot(s0, s1)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,episodes", [("dqn", 200), ("rllib_ppo", 320)])
def test_training_raises_the_mean_episode_reward(tmp_path, algorithm, episodes):
    # DQN: the recipe's learning-starts (128 env steps)
    extra = ["rllib.learning_starts=128"] if algorithm == "dqn" else []
    result = run_pipeline(_config(tmp_path, algorithm, algorithm, f"rllib.episodes={episodes}", *extra))
    first, last, sem = _raised(result.run_dir, episodes)
    assert last - first > 2 * sem, (first, last, sem)
