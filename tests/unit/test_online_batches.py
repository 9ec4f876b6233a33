"""Driver-side pieces of the online-RL loop: batch assembly, advantages with KL, shape checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylign.config import ConfigError, load_config
from raylign.pipelines.online import (
    batch_advantages,
    check_online_config,
    merge_rollouts,
    training_batch,
)
from raylign.workers.group import shard_batch
from raylign.workers.objectives import make_objective, rl_units


def _worker_result():
    # Two prompts (3 and 2 tokens), two samples each; responses of 2, 1, 3 and 0 tokens.
    return {
        "prompt_ids": [np.array([5, 6, 7]), np.array([5, 6, 7]), np.array([8, 9]), np.array([8, 9])],
        "response_ids": [np.array([10, 11]), np.array([12]), np.array([13, 14, 15]), np.array([], dtype=np.int64)],
        "logprobs": [np.array([-1.0, -2.0]), np.array([-0.5]), np.array([-1.0, -1.0, -1.0]), np.array([])],
        "texts": ["a b", "c", "d e f", ""], "finished": np.array([True, False, True, True]),
        "prompt_index": np.array([0, 0, 1, 1]), "version": 3, "seconds": 1.0, "tokens": 6,
    }


def _rollouts():
    return merge_rollouts([_worker_result()], [0])


def test_training_batch_right_pads_and_aligns_sampling_logprobs():
    batch = training_batch(_rollouts(), pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 10, 11], [5, 6, 7, 12, 0], [8, 9, 13, 14, 15], [8, 9, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert batch["attention_mask"].sum(-1).tolist() == [5, 4, 5, 2]
    assert batch["old_logps"][0].tolist() == [0, 0, 0, -1.0, -2.0]
    assert "ref_logps" not in batch  # the learners compute them


def test_reference_logprobs_from_the_rollout_workers_align_like_sampling_logprobs():
    part = _worker_result()
    part["ref_logps"] = [np.array([-3.0, -4.0]), np.array([-5.0]), np.array([-6.0, -7.0, -8.0]), np.array([])]
    merged = merge_rollouts([part, _worker_result()], [0, 2])
    assert "ref_logps" not in merged  # only when every worker sent them
    batch = training_batch(merge_rollouts([part], [0]), pad_id=0)
    assert batch["ref_logps"].tolist() == [[0, 0, 0, -3, -4], [0, 0, 0, -5, 0], [0, 0, -6, -7, -8], [0] * 5]


def test_merge_rollouts_offsets_group_ids_per_worker():
    merged = merge_rollouts([_worker_result(), _worker_result()], [0, 2])
    assert merged["group_ids"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(merged["texts"]) == 8


def test_grpo_advantages_are_group_normalised_and_broadcast_over_response_tokens():
    config = load_config("grpo", ["rl.kl_in=loss"])
    batch = training_batch(_rollouts(), pad_id=0)
    batch["ref_logps"] = batch["old_logps"].copy()
    adv, returns, metrics = batch_advantages("grpo", config, batch, np.array([1.0, 0.0, 2.0, 2.0]),
                                               np.array([0, 0, 1, 1]), kl_coef=0.1)
    # Group 0: scores (1, 0): mean 0.5, sample std 0.7071 -> ±0.7071; group 1 has equal scores -> 0.
    a = 0.5 / np.sqrt(0.5)
    assert adv[0].tolist() == pytest.approx([0, 0, 0, a, a], abs=1e-5)
    assert adv[1].tolist() == pytest.approx([0, 0, 0, -a, 0], abs=1e-5)
    assert np.all(adv[2:] == 0)
    assert returns is None and metrics["kl/seq_mean"] == 0.0


def test_rloo_subtracts_the_sequence_kl_from_the_reward_when_kl_is_in_the_reward():
    config = load_config("rloo", ["rl.kl_in=reward", "rl.kl_estimator=k1"])
    batch = training_batch(_rollouts(), pad_id=0)
    batch["ref_logps"] = batch["old_logps"].copy()
    batch["ref_logps"][0, 3:5] -= 1.0  # row 0: log π − log π_ref = 1 on both tokens -> Σ KL = 2
    adv, _, metrics = batch_advantages("rloo", config, batch, np.array([1.0, 0.0, 2.0, 2.0]),
                                         np.array([0, 0, 1, 1]), kl_coef=0.25)
    # Shaped scores: 1 − 0.25·2 = 0.5 and 0; leave-one-out: 0.5 − 0 = 0.5, 0 − 0.5 = −0.5.
    assert adv[0, 3] == pytest.approx(0.5) and adv[1, 3] == pytest.approx(-0.5)
    assert metrics["kl/seq_mean"] == pytest.approx(0.5)  # (2 + 0 + 0 + 0) / 4


def test_ppo_returns_are_gae_targets_for_the_critic():
    config = load_config("ppo", ["rl.kl_coef=0", "rl.gamma=1", "rl.lam=1", "rl.whiten_advantages=false"])
    batch = training_batch(_rollouts(), pad_id=0)
    batch["ref_logps"] = batch["old_logps"].copy()
    values = np.zeros_like(batch["old_logps"])
    values[0, 3:5] = [0.25, 0.5]
    adv, returns, _ = batch_advantages("ppo", config, batch, np.array([1.0, 0.0, 2.0, 2.0]),
                                         np.array([0, 1, 2, 3]), kl_coef=0.0, values=values)
    # γ = λ = 1, reward 1 on the last token: returns are 1 on every response token, A = 1 − V.
    assert returns[0].tolist() == pytest.approx([0, 0, 0, 1, 1])
    assert adv[0].tolist() == pytest.approx([0, 0, 0, 0.75, 0.5])


def test_policy_objective_is_the_clipped_loss_times_its_units():
    """At ratio 1 the clipped surrogate is −mean(A); the objective returns it summed over tokens."""
    config = load_config("grpo", ["model.path=tiny:llama", "rl.kl_coef=0"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20))

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input_ids, logits_to_keep=0):
            logits = self.net(input_ids)
            return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()

    wrapped = Wrapped()
    batch = {k: torch.as_tensor(v) for k, v in training_batch(_rollouts(), pad_id=0).items()}
    with torch.no_grad():
        logits = wrapped(batch["input_ids"]).logits[:, :-1].float() / config.rollout.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    old = torch.zeros_like(batch["old_logps"])
    old[:, 1:] = logp
    adv = torch.zeros_like(old)
    adv[:, 1:] = torch.arange(1.0, 5.0)[:, None] * batch["loss_mask"][:, 1:]
    batch.update(old_logps=old, advantages=adv)
    loss_sum, sums = make_objective("policy", config)(wrapped, batch, None, kl_coef=0.0)
    tokens = batch["loss_mask"].sum()
    assert rl_units(batch["loss_mask"], "token-mean") == tokens == 6
    expected = -(adv[:, 1:] * batch["loss_mask"][:, 1:]).sum()  # Σ −A over response tokens
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sums["clip_fraction_sum"] == 0 and sums["tokens"] == 6


def test_online_config_errors_are_one_clear_message():
    with pytest.raises(ConfigError, match="rollout.n_samples must be >= 2"):
        check_online_config(load_config("grpo", ["rollout.n_samples=1"]), 100)
    with pytest.raises(ConfigError, match="must divide the 64 completions"):
        check_online_config(load_config("grpo", ["train.batch_size=48", "train.micro_batch_size=16"]), 100)
    with pytest.raises(ConfigError, match="data.kind=prompts"):
        check_online_config(load_config("grpo", ["data.kind=pairs"]), 100)
    with pytest.raises(ConfigError, match="fewer than rollout.prompts_per_step=16"):
        check_online_config(load_config("grpo"), 10)


def test_shard_batch_splits_lists_contiguously_and_covers_everything():
    assert [s["x"] for s in shard_batch({"x": list(range(5))}, 2)] == [[0, 1, 2], [3, 4]]
    assert [s["x"] for s in shard_batch({"x": [1]}, 3)] == [[1], [], []]


def test_pending_rollouts_survive_a_checkpoint_round_trip(tmp_path):
    from raylign.pipelines.online import load_pending_rollouts, save_pending_rollouts

    rollouts = _rollouts()
    save_pending_rollouts(rollouts, tmp_path)
    restored = load_pending_rollouts(tmp_path)
    for key in ("prompt_ids", "response_ids", "logprobs"):
        assert [a.tolist() for a in restored[key]] == [np.asarray(a).tolist() for a in rollouts[key]]
    assert restored["texts"] == rollouts["texts"] and restored["group_ids"].tolist() == [0, 0, 1, 1]
    assert training_batch(restored, 0)["old_logps"].tolist() == training_batch(rollouts, 0)["old_logps"].tolist()
    assert "ref_logps" not in restored
    assert load_pending_rollouts(tmp_path / "none") is None
    part = _worker_result()
    part["ref_logps"] = [np.array([-3.0, -4.0]), np.array([-5.0]), np.array([-6.0, -7.0, -8.0]), np.array([])]
    save_pending_rollouts(merge_rollouts([part], [0]), tmp_path)
    assert [a.tolist() for a in load_pending_rollouts(tmp_path)["ref_logps"]] == [[-3, -4], [-5], [-6, -7, -8], []]
