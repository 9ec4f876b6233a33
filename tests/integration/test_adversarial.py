"""Adversarial training end to end on the shared local Ray with tiny:llama as generator and discriminator.

The "human" texts are the base policy's own samples with about 30% of their characters turned into
'e': they differ from the policy in one property, which D can learn and the policy can acquire. The
share of 'e' in the policy's samples is logged through a reward source of weight 0.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from raylign.config import load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")

LETTER = "function:tests.rl_rewards:letter_share"
TINY = ["model.path=tiny:llama", "model.lora=null", "rollout.max_new_tokens=16", "rollout.prompts_per_step=8",
        "rollout.n_samples=4", "train.batch_size=32", "train.micro_batch_size=32", "train.lr=3e-3",
        "train.eval_every=0", "rl.eval_prompts=0", "resources.cpus_per_learner=0.5",
        "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_reward_worker=0.25", "progress=false",
        "output.trackers=[]", "output.save_every=0", "adversarial.discriminator=tiny:llama",
        "adversarial.lr=1e-3", "adversarial.label_smoothing=0"]


@pytest.fixture(scope="module")
def human_file(tmp_path_factory):
    """Base-policy samples with ~30% of characters replaced by 'e' (the property the policy lacks)."""
    from raylign.data import load_dataset
    from raylign.workers.rollout import RolloutWorker

    threads = torch.get_num_threads()
    prompts = load_dataset("builtin:everyday-prompts").column("prompt").to_pylist()[:100]
    worker = RolloutWorker(0, 1, 1, {"path": "tiny:llama"}, seed=1)
    groups = worker.generate_texts(prompts, {"n_samples": 3, "max_new_tokens": 16, "batch_size": 50})
    torch.set_num_threads(threads)
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("human") / "human.jsonl"
    with path.open("w") as f:
        for text in (t for group in groups for t in group if t.strip()):
            f.write(json.dumps({"text": "".join("e" if rng.random() < 0.3 else c for c in text)}) + "\n")
    return path


def _config(tmp_path, human_file, name, *extra):
    return load_config("adversarial", [*TINY, f"adversarial.human_data={human_file}",
                                       f"output.dir={tmp_path}/runs", f"output.name={name}", *extra])


def _steps(run_dir):
    return [r for r in read_metrics(run_dir) if "reward/mean" in r]


def test_policy_acquires_the_human_property_and_fools_the_discriminator(tmp_path, human_file):
    result = run_pipeline(_config(tmp_path, human_file, "gan", "train.max_steps=40",
                                  f'reward.sources=[{{source: "{LETTER}", weight: 0}}]'))
    steps = _steps(result.run_dir)
    assert [r["step"] for r in steps] == list(range(1, 41))
    share = np.array([r[f"reward/{LETTER}"] for r in steps])
    acc_policy = np.array([r["discriminator/accuracy_policy"] for r in steps])
    fool = np.array([r["discriminator/fool_rate"] for r in steps])
    assert share[-5:].mean() > share[:5].mean() + 0.05, share  # more 'e' in the policy's samples
    assert acc_policy[-5:].mean() < acc_policy.max() - 0.2, acc_policy  # D's accuracy on G falls from its peak
    assert fool[-5:].mean() > fool[:5].mean() + 0.15, fool  # and G fools it more often
    for r in steps:
        assert math.isfinite(r["kl/seq_mean"]) and math.isfinite(r["discriminator/loss"])
        assert 0 <= r["response/distinct_2"] <= 1
        # D's reward is the only one with weight: the total is D's logit (generator_reward=logit).
        assert r["reward/mean"] == pytest.approx(r["reward/discriminator"], abs=1e-5)
    assert (tmp_path / "runs" / "gan" / "final" / "discriminator" / "config.json").exists()


def test_discriminator_mixes_with_vader_and_both_components_are_logged(tmp_path, human_file):
    result = run_pipeline(_config(tmp_path, human_file, "mix", "train.max_steps=3", "adversarial.weight=0.5",
                                  "reward.sources=[{source: lexicon:vader, weight: 2.0}]"))
    for r in _steps(result.run_dir):
        assert {"reward/lexicon:vader", "reward/discriminator"} <= set(r)
        expected = 2.0 * r["reward/lexicon:vader"] + 0.5 * r["reward/discriminator"]
        assert r["reward/mean"] == pytest.approx(expected, abs=1e-5)


class Interrupt(Exception):
    pass


def test_resume_restores_both_players(tmp_path, human_file):
    extra = ["train.max_steps=6", "output.save_every=3", "adversarial.warmup_steps=2", "adversarial.replay_size=16"]
    baseline = _steps(run_pipeline(_config(tmp_path, human_file, "full", *extra)).run_dir)

    def stop_after_4(step, metrics):
        if step == 4:
            raise Interrupt  # dies after the step-3 checkpoint, with step 4 logged but not saved

    config = _config(tmp_path, human_file, "resumed", *extra)
    with pytest.raises(Interrupt):
        run_pipeline(config, on_step=stop_after_4)
    result = run_pipeline(config, resume=True)
    resumed = _steps(result.run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    warmup = [r for r in read_metrics(result.run_dir) if "discriminator/warmup_loss" in r]
    assert [r["step"] for r in warmup] == [0, 0]  # D's two warm-up updates, before the policy moved
    keys = ["reward/mean", "discriminator/loss", "discriminator/accuracy_human", "discriminator/fool_rate",
            "discriminator/replay_size", "kl/seq_mean"]
    for a, b in zip(baseline, resumed, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_per_prefix_monte_carlo_rewards_run_with_a_token_level_generator(tmp_path, human_file):
    result = run_pipeline(_config(tmp_path, human_file, "seqgan", "train.max_steps=2", "adversarial.per_prefix=true",
                                  "adversarial.generator=reinforce_pp", "adversarial.mc_rollouts=2",
                                  "rollout.max_new_tokens=6", "rollout.n_samples=2", "rollout.prompts_per_step=8",
                                  "train.batch_size=16", "train.micro_batch_size=16"))
    steps = _steps(result.run_dir)
    assert len(steps) == 2 and all(math.isfinite(r["advantage/abs_mean"]) for r in steps)


def test_per_prefix_with_a_sequence_level_generator_is_a_config_error(tmp_path, human_file):
    from raylign.config import ConfigError

    with pytest.raises(ConfigError, match="reinforce_pp"):
        run_pipeline(_config(tmp_path, human_file, "bad", "adversarial.per_prefix=true"))


def test_missing_human_text_is_one_clear_error(tmp_path):
    from raylign.config import ConfigError

    config = load_config("adversarial", [*TINY, f"output.dir={tmp_path}/runs"])
    with pytest.raises(ConfigError, match="adversarial.human_data=FILE"):
        run_pipeline(config)
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_pairs_data_conditions_the_discriminator_on_the_prompts(tmp_path, human_file):
    """data.kind=pairs: the prompts are the pairs' prompts, the human side their chosen answers."""
    texts = [json.loads(line)["text"] for line in human_file.read_text().splitlines()][:40]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say something about item {i}.", "chosen": t, "rejected": "no"})
                             + "\n" for i, t in enumerate(texts)))
    config = load_config("adversarial", [*TINY, "data.kind=pairs", f"data.train={pairs}", "train.max_steps=2",
                                         f"output.dir={tmp_path}/runs", "output.name=pairs"])
    result = run_pipeline(config)
    steps = _steps(result.run_dir)
    assert len(steps) == 2 and all(0 <= r["discriminator/fool_rate"] <= 1 for r in steps)
    samples = [json.loads(line) for line in (tmp_path / "runs" / "pairs" / "samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"].startswith("Say something about item") for s in samples)
