"""The batch contract's metric sums, decoded by hand, and the pure `compute_advantages`."""

from __future__ import annotations

import math

import pytest
import torch

from raylign.algorithms.advantages import compute_advantages
from raylign.data.batches import combine_ranks, policy_sums, summarize_policy, summarize_sums


def test_ranks_sum_their_sums_but_not_grad_norm_or_lr():
    parts = [{"loss_sum": 1.0, "pairs": 2.0, "grad_norm": 0.5, "lr": 1e-3},
             {"loss_sum": 3.0, "pairs": 2.0, "grad_norm": 0.5, "lr": 1e-3}]
    assert combine_ranks(parts) == {"loss_sum": 4.0, "pairs": 4.0, "grad_norm": 0.5, "lr": 1e-3}


def test_policy_sums_decode_back_to_token_and_unit_means():
    # Two minibatches: 3 tokens/1 unit and 1 token/1 unit (seq-mean aggregation).
    a = policy_sums({"pg_loss": 2.0, "clip_fraction": 0.5, "approx_kl": 0.1, "logp_gap": 0.2, "entropy": 1.0}, 1, 3)
    b = policy_sums({"pg_loss": 4.0, "clip_fraction": 1.0, "approx_kl": 0.3, "logp_gap": 0.0, "entropy": 2.0}, 1, 1)
    out = summarize_policy([a | {"grad_norm": 1.0, "lr": 0.1}, b | {"grad_norm": 3.0, "lr": 0.2}])
    assert out["policy/loss"] == pytest.approx((2.0 + 4.0) / 2)  # a mean over units
    assert out["policy/clip_fraction"] == pytest.approx((0.5 * 3 + 1.0) / 4)  # a mean over tokens
    assert out["policy/entropy"] == pytest.approx((3.0 + 2.0) / 4)
    assert out["rollout/logp_gap"] == pytest.approx(0.6 / 4)
    assert out["policy/grad_norm"] == 2.0 and out["policy/lr"] == 0.2  # mean of steps; the last lr
    assert "policy/behavior_weight" not in out


def test_pair_sums_decode_to_accuracy_and_margin():
    sums = {"loss_sum": 2.0, "correct": 3.0, "margin_sum": 1.0, "chosen_sum": 4.0, "rejected_sum": 3.0, "pairs": 4.0}
    out = summarize_sums("dpo", sums, "train")
    assert out == {"train/loss": 0.5, "train/accuracy": 0.75, "train/margin": 0.25, "train/chosen_reward": 1.0,
                   "train/rejected_reward": 0.75}
    assert summarize_sums("sft", {"nll_sum": 6.0, "tokens": 3.0}, "eval") == {"eval/nll": 2.0, "eval/ppl": math.exp(2.0)}


def test_grpo_advantages_with_the_kl_in_the_reward_by_hand():
    """Two completions of one prompt, one response token each, KL (k1) 1 on the first: shaped scores
    1 − 0.5·1 = 0.5 and 0; group mean 0.25, sample std 0.3536 -> ±0.7071."""
    mask = torch.tensor([[1.0], [1.0]])
    logp, ref = torch.tensor([[0.0], [-1.0]]), torch.tensor([[-1.0], [-1.0]])
    adv, returns, metrics = compute_advantages(
        "grpo", torch.tensor([1.0, 0.0]), logp, ref, mask, [0, 0], kl_coef=0.5, kl_in_reward=True, kl_estimator="k1")
    assert adv[:, 0].tolist() == pytest.approx([0.7071, -0.7071], abs=1e-4)
    assert returns is None and metrics["kl/seq_mean"] == pytest.approx(0.5)


def test_ppo_needs_values_and_grpo_refuses_per_prefix_rewards():
    mask, zeros = torch.ones(1, 2), torch.zeros(1, 2)
    with pytest.raises(ValueError, match="critic's values"):
        compute_advantages("ppo", torch.zeros(1), zeros, zeros, mask, [0], kl_coef=0.0, kl_in_reward=False)
    with pytest.raises(ValueError, match="token-level algorithm"):
        compute_advantages("grpo", torch.zeros(1), zeros, zeros, mask, [0], kl_coef=0.0, kl_in_reward=False,
                           prefix_values=zeros)
