"""Preference losses against hand-computed values (math.log / math.exp written out here)."""

from __future__ import annotations

import math

import pytest
import torch

from raylign.algorithms.preference import (
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    pair_accuracy,
    simpo_loss,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _softplus(x: float) -> float:
    """−log σ(−x) = log(1 + e^x)."""
    return math.log(1 + math.exp(x))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Pair 0: policy prefers chosen more than the reference does.
#   chosen log ratio = -1 - (-2) = 1, rejected log ratio = -3 - (-2.5) = -0.5, h = 1.5, β·h = 0.75.
# Pair 1: policy moved towards the rejected answer.
#   chosen log ratio = -2.5 - (-2) = -0.5, rejected log ratio = -1 - (-2) = 1, h = -1.5, β·h = -0.75.
POLICY_C, POLICY_R = _t(-1.0, -2.5), _t(-3.0, -1.0)
REF_C, REF_R = _t(-2.0, -2.0), _t(-2.5, -2.0)
BETA = 0.5


def _dpo(**kwargs):
    return dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, BETA, **kwargs)


# --- DPO family -------------------------------------------------------------------------------------


def test_dpo_sigmoid_value_and_sign_conventions():
    losses, chosen_rewards, rejected_rewards = _dpo()
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (2,)
    # −log σ(0.75) = log(1 + e^−0.75); −log σ(−0.75) = log(1 + e^0.75)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.75)), rel=1e-12)
    assert losses[1].item() == pytest.approx(math.log(1 + math.exp(0.75)), rel=1e-12)
    assert losses[0].item() < math.log(2) < losses[1].item()
    # Rewards β·(log π − log π_ref): 0.5·1, 0.5·(−0.5) for pair 0.
    assert chosen_rewards.tolist() == pytest.approx([0.5, -0.25])
    assert rejected_rewards.tolist() == pytest.approx([-0.25, 0.5])
    assert chosen_rewards[0] > 0 > rejected_rewards[0]


def test_dpo_at_reference_is_log2():
    losses, chosen_rewards, rejected_rewards = dpo_loss(_t(-4.0), _t(-7.0), _t(-4.0), _t(-7.0), 0.1)
    assert losses.item() == pytest.approx(math.log(2))
    assert chosen_rewards.item() == 0.0 and rejected_rewards.item() == 0.0


def test_cdpo_label_smoothing():
    eps = 0.1
    losses, _, _ = _dpo(label_smoothing=eps)
    # −(1−ε)·log σ(βh) − ε·log σ(−βh) with βh = 0.75 and −0.75.
    expected0 = (1 - eps) * math.log(1 + math.exp(-0.75)) + eps * math.log(1 + math.exp(0.75))
    expected1 = (1 - eps) * math.log(1 + math.exp(0.75)) + eps * math.log(1 + math.exp(-0.75))
    assert losses.tolist() == pytest.approx([expected0, expected1], rel=1e-12)
    # Smoothing pulls the loss of a confidently-right pair up and of a wrong pair down.
    plain, _, _ = _dpo()
    assert losses[0] > plain[0] and losses[1] < plain[1]


def test_ipo():
    losses, chosen_rewards, _ = _dpo(loss_type="ipo")
    # (h − 1/(2β))² with 1/(2·0.5) = 1: (1.5 − 1)² = 0.25, (−1.5 − 1)² = 6.25.
    assert losses.tolist() == pytest.approx([0.25, 6.25])
    assert chosen_rewards.tolist() == pytest.approx([0.5, -0.25])


def test_hinge():
    losses, _, _ = _dpo(loss_type="hinge")
    # relu(1 − βh): 1 − 0.75 = 0.25, 1 + 0.75 = 1.75.
    assert losses.tolist() == pytest.approx([0.25, 1.75])
    # β·h = 0.5·3 = 1.5 > 1: no loss past the margin.
    past_margin, _, _ = dpo_loss(_t(0.0), _t(0.0), _t(-1.0), _t(2.0), BETA, loss_type="hinge")
    assert past_margin.item() == 0.0


def test_dpo_invalid_arguments():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        _dpo(loss_type="kto")
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            _dpo(label_smoothing=bad)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_gradient_raises_chosen_and_lowers_rejected(loss_type):
    policy_c = POLICY_C.clone().requires_grad_(True)
    policy_r = POLICY_R.clone().requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_c, policy_r, REF_C, REF_R, BETA, loss_type=loss_type
    )
    losses.sum().backward()
    # Pair 1 (h = −1.5) is inside the hinge margin and below IPO's target: raise chosen, lower rejected.
    assert policy_c.grad[1] < 0 < policy_r.grad[1]
    if loss_type == "ipo":
        # Pair 0 overshoots IPO's target h = 1/(2β) = 1 (h = 1.5): d/dπ_c = 2(h − 1) = 1 pulls it back.
        assert policy_c.grad[0].item() == pytest.approx(1.0)
        assert policy_r.grad[0].item() == pytest.approx(-1.0)
    else:
        assert policy_c.grad[0] < 0 < policy_r.grad[0]
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_sigmoid_gradient_value():
    policy_c = POLICY_C.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(policy_c, POLICY_R, REF_C, REF_R, BETA)
    losses.sum().backward()
    # d/dπ_c [−log σ(βh)] = −β·σ(−βh).
    expected = [-BETA * _sigmoid(-0.75), -BETA * _sigmoid(0.75)]
    assert policy_c.grad.tolist() == pytest.approx(expected, rel=1e-12)


# --- KTO --------------------------------------------------------------------------------------------


def test_kto_desirable_and_undesirable_branches():
    # r = −1 − (−2) = 1 for both; z0 = 0.25; β = 0.5.
    policy, ref = _t(-1.0, -1.0), _t(-2.0, -2.0)
    labels = torch.tensor([True, False])
    losses, rewards = kto_loss(
        policy, ref, labels, torch.tensor(0.25), 0.5, desirable_weight=2.0, undesirable_weight=3.0
    )
    desirable = 2.0 * (1 - 1 / (1 + math.exp(-0.5 * (1 - 0.25))))
    undesirable = 3.0 * (1 - 1 / (1 + math.exp(-0.5 * (0.25 - 1))))
    assert losses.tolist() == pytest.approx([desirable, undesirable], rel=1e-12)
    # A completion the policy likes more than the reference is cheap if desirable, costly if not.
    assert losses[0] / 2.0 < 0.5 < losses[1] / 3.0
    assert rewards.tolist() == pytest.approx([0.5, 0.5])
    assert not rewards.requires_grad


def test_kto_gradient_direction():
    policy = _t(-1.0, -1.0).requires_grad_(True)
    losses, _ = kto_loss(policy, _t(-2.0, -2.0), torch.tensor([True, False]), torch.tensor(0.0), 0.5)
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]


def test_kto_reference_point_clamps_and_detaches():
    policy_kl = _t(-1.0, -2.0).requires_grad_(True)
    # mean((−1 + 2), (−2 + 2.5)) = mean(1, 0.5) = 0.75
    z0 = kto_reference_point(policy_kl, _t(-2.0, -2.5))
    assert z0.item() == pytest.approx(0.75)
    assert z0.dim() == 0 and not z0.requires_grad
    # mean((−3 + 2), (−1 + 1)) = −0.5 -> clamped to 0
    assert kto_reference_point(_t(-3.0, -1.0), _t(-2.0, -1.0)).item() == 0.0


def test_kto_loss_clamps_negative_reference_point():
    policy, ref, labels = _t(-1.0, -1.0), _t(-2.0, -2.0), torch.tensor([True, False])
    negative, _ = kto_loss(policy, ref, labels, torch.tensor(-0.5), 0.5)
    # z0 = 0: 1 − σ(0.5·1) and 1 − σ(−0.5·1)
    expected = [1 - 1 / (1 + math.exp(-0.5)), 1 - 1 / (1 + math.exp(0.5))]
    assert negative.tolist() == pytest.approx(expected, rel=1e-12)


# --- ORPO -------------------------------------------------------------------------------------------


def test_orpo_log_odds_and_loss():
    # p_w = 0.5 -> log odds 0; p_l = 0.2 -> log odds = log(0.2/0.8) = log 0.25; ratio = log 4.
    chosen_avg = _t(math.log(0.5)).requires_grad_(True)
    rejected_avg = _t(math.log(0.2))
    nll, lam = _t(1.3), 0.1
    losses, log_odds_ratio = orpo_loss(nll, chosen_avg, rejected_avg, lam)
    assert log_odds_ratio.item() == pytest.approx(math.log(4), rel=1e-12)
    # −log σ(log 4) = log(1 + 1/4)
    assert losses.item() == pytest.approx(1.3 + 0.1 * math.log(1.25), rel=1e-12)
    assert not log_odds_ratio.requires_grad
    losses.sum().backward()
    assert chosen_avg.grad.item() < 0


def test_orpo_log_odds_stable_at_extremes():
    # Near p = 1 (avg logp −1e−4) and far from it (−50); exact log(1 − e^x) = log(−expm1(x)).
    x_near, x_far = -1e-4, -50.0
    expected = (x_near - math.log(-math.expm1(x_near))) - (x_far - math.log(-math.expm1(x_far)))
    _, log_odds_ratio = orpo_loss(_t(0.0), _t(x_near), _t(x_far), 1.0)
    assert log_odds_ratio.item() == pytest.approx(expected, rel=1e-9)
    # p = 1 exactly (avg logp 0) stays finite, in float32 too, with finite gradients.
    chosen = torch.tensor([0.0]).requires_grad_(True)
    losses, log_odds_ratio = orpo_loss(torch.tensor([0.0]), chosen, torch.tensor([-1.0]), 1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(log_odds_ratio).all()
    assert torch.isfinite(chosen.grad).all()


# --- SimPO ------------------------------------------------------------------------------------------


def test_simpo_with_gamma():
    # β = 2: rewards −1 and −2; margin −1 − (−2) − γ = 1 − 0.5 = 0.5.
    losses, chosen_rewards, rejected_rewards = simpo_loss(_t(-0.5), _t(-1.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-12)
    assert chosen_rewards.item() == pytest.approx(-1.0)
    assert rejected_rewards.item() == pytest.approx(-2.0)
    no_margin, _, _ = simpo_loss(_t(-0.5), _t(-1.0), beta=2.0, gamma=0.0)
    assert no_margin.item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-12)
    assert losses.item() > no_margin.item()


# --- Bradley-Terry ----------------------------------------------------------------------------------


def test_bradley_terry_without_and_with_margin():
    chosen, rejected = _t(2.0, 0.0), _t(1.0, 1.0)
    # −log σ(1) = log(1 + e^−1); −log σ(−1) = log(1 + e)
    plain = bradley_terry_loss(chosen, rejected)
    assert plain.tolist() == pytest.approx([_softplus(-1.0), _softplus(1.0)], rel=1e-12)
    # margins 0.5 and 0: −log σ(1 − 0.5) = log(1 + e^−0.5)
    with_margin = bradley_terry_loss(chosen, rejected, margin=_t(0.5, 0.0))
    assert with_margin.tolist() == pytest.approx([_softplus(-0.5), _softplus(1.0)], rel=1e-12)
    scalar_margin = bradley_terry_loss(chosen, rejected, margin=0.5)
    assert scalar_margin.tolist() == pytest.approx([_softplus(-0.5), _softplus(1.5)], rel=1e-12)


def test_bradley_terry_gradient_direction():
    chosen = _t(2.0, 0.0).requires_grad_(True)
    bradley_terry_loss(chosen, _t(1.0, 1.0)).sum().backward()
    assert (chosen.grad < 0).all()


# --- accuracy ---------------------------------------------------------------------------------------


def test_pair_accuracy_counts_ties_as_half():
    # win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4
    acc = pair_accuracy(_t(3.0, 1.0, 2.0, 0.0), _t(1.0, 2.0, 2.0, -1.0))
    assert acc.item() == pytest.approx(0.625)
