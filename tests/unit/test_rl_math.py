"""RL math (advantages, KL estimators and controllers, PPO losses) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from raylign.algorithms.advantages import (
    discounted_returns,
    gae,
    group_advantages,
    masked_mean,
    masked_whiten,
    token_rewards_with_kl,
)
from raylign.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate
from raylign.algorithms.policy import (
    aggregate_loss,
    behavior_weights,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
)

NAN = float("nan")


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_and_whiten_ignore_padding():
    x, mask = _t([1.0, 2.0, 3.0, NAN]), _t([1, 1, 1, 0])
    _close(masked_mean(x, mask), 2.0)
    _close(masked_mean(_t([1.0, 3.0], [5.0, NAN]), _t([1, 1], [1, 0]), dim=-1), [2.0, 5.0])
    _close(masked_mean(_t([NAN, NAN]), _t([0, 0])), 0.0)
    # mean 2, population variance ((−1)² + 0² + 1²)/3 = 2/3.
    s = math.sqrt(2 / 3)
    _close(masked_whiten(x, mask), [[-1 / s, 0.0, 1 / s, 0.0]], atol=1e-6)
    _close(masked_whiten(x, mask, shift_mean=False), [[2 - 1 / s, 2.0, 2 + 1 / s, 0.0]], atol=1e-6)


# ---------------------------------------------------------------- GAE and returns


def test_gae_hand_computed_four_tokens():
    # γ = 0.9, λ = 0.8, γλ = 0.72. Row 0, all four tokens in the response:
    #   δ3 = 1 + 0.9·0 − 0.8 = 0.2            A3 = 0.2
    #   δ2 = 0 + 0.9·0.8 − 0.7 = 0.02         A2 = 0.02 + 0.72·0.2 = 0.164
    #   δ1 = 0 + 0.9·0.7 − 0.6 = 0.03         A1 = 0.03 + 0.72·0.164 = 0.14808
    #   δ0 = 0 + 0.9·0.6 − 0.5 = 0.04         A0 = 0.04 + 0.72·0.14808 = 0.1466176
    #   returns = A + V = [0.6466176, 0.74808, 0.864, 1.0]
    # Row 1, a two-token response then padding holding garbage (nan, 5, 9):
    #   δ1 = 2 + 0 − 0.5 = 1.5                A1 = 1.5
    #   δ0 = 0 + 0.9·0.5 − 1.0 = −0.55        A0 = −0.55 + 0.72·1.5 = 0.53
    #   returns = [1.53, 2.0, 0, 0]
    rewards = _t([0.0, 0.0, 0.0, 1.0], [0.0, 2.0, 5.0, NAN])
    values = _t([0.5, 0.6, 0.7, 0.8], [1.0, 0.5, 9.0, NAN])
    mask = _t([1, 1, 1, 1], [1, 1, 0, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    _close(adv, [[0.1466176, 0.14808, 0.164, 0.2], [0.53, 1.5, 0.0, 0.0]])
    _close(ret, [[0.6466176, 0.74808, 0.864, 1.0], [1.53, 2.0, 0.0, 0.0]])


def test_gae_lambda_one_is_return_minus_value_and_skips_mask_holes():
    rewards, values = _t([0.0, 0.0, 0.0, 1.0]), _t([0.5, 0.6, 0.7, 0.8])
    adv, ret = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    _close(ret, [[1.0, 1.0, 1.0, 1.0]])
    _close(adv, [[0.5, 0.4, 0.3, 0.2]])
    # A hole in the mask (position 1) is skipped: same as the compacted 3-token sequence.
    holed_adv, holed_ret = gae(
        _t([0.0, 7.0, 0.0, 1.0]), _t([0.5, 9.0, 0.7, 0.8]), _t([1, 0, 1, 1]), gamma=0.9, lam=0.8
    )
    compact_adv, compact_ret = gae(_t([0.0, 0.0, 1.0]), _t([0.5, 0.7, 0.8]), torch.ones(1, 3), 0.9, 0.8)
    _close(holed_adv[:, [0, 2, 3]], compact_adv)
    _close(holed_ret[:, [0, 2, 3]], compact_ret)
    assert holed_adv[0, 1] == 0 and holed_ret[0, 1] == 0


def test_token_rewards_with_kl_and_discounted_returns():
    scores = _t(1.0, -2.0, 3.0)
    kl = _t([0.1, 0.2, 0.3, 9.0], [9.0, 0.4, 0.2, 9.0], [1.0, 1.0, 1.0, 1.0])
    # Row 0: response = tokens 0..2; row 1: prompt token 0 masked, response = tokens 1..2; row 2: empty.
    mask = _t([1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0])
    rewards = token_rewards_with_kl(scores, kl, mask, kl_coef=0.5)
    _close(
        rewards,
        [
            [-0.05, -0.1, -0.15 + 1.0, 0.0],
            [0.0, -0.2, -0.1 - 2.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ],
    )
    # γ = 0.5. Row 0: G2 = 0.85, G1 = −0.1 + 0.5·0.85 = 0.325, G0 = −0.05 + 0.5·0.325 = 0.1125.
    # Row 1: G2 = −2.1, G1 = −0.2 + 0.5·(−2.1) = −1.25, G0 = 0 (prompt).
    returns = discounted_returns(rewards, mask, gamma=0.5)
    _close(returns, [[0.1125, 0.325, 0.85, 0.0], [0.0, -1.25, -2.1, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # Reward-to-go is GAE with V = 0 and λ = 1.
    _close(returns, gae(rewards, torch.zeros_like(rewards), mask, gamma=0.5, lam=1.0)[0])


# ---------------------------------------------------------------- group advantages

# Groups interleaved in the batch: 10 → [1, 2, 3], 20 → [5] (one), 30 → [4, 4] (zero std), 40 → [0, 6].
SCORES = _t(1.0, 5.0, 0.0, 2.0, 4.0, 6.0, 3.0, 4.0)
GROUPS = [10, 20, 40, 10, 30, 40, 10, 30]


def test_grpo_advantages_hand_computed():
    # Group 10: mean 2, sample std √((1 + 0 + 1)/2) = 1 → [−1, 0, 1].
    # Group 40: mean 3, sample std √((9 + 9)/1) = √18 → ∓3/√18 = ∓1/√2.
    # Groups 20 (one member) and 30 (equal scores) → 0.
    h = 1 / math.sqrt(2)
    adv = group_advantages(SCORES, GROUPS, "grpo")
    _close(adv, [-1.0, 0.0, -h, 0.0, 0.0, h, 1.0, 0.0], atol=1e-5)
    # Dr. GRPO: no division by std.
    adv = group_advantages(SCORES, torch.tensor(GROUPS), "grpo", scale_std=False)
    _close(adv, [-1.0, 0.0, -3.0, 0.0, 0.0, 3.0, 1.0, 0.0])


def test_rloo_advantages_hand_computed():
    # Group 10: 1 − (2+3)/2 = −1.5, 2 − (1+3)/2 = 0, 3 − (1+2)/2 = 1.5. Group 40: 0 − 6 = −6, 6 − 0 = 6.
    # Group 20 has no other member → 0; group 30: 4 − 4 = 0.
    adv = group_advantages(SCORES, GROUPS, "rloo")
    _close(adv, [-1.5, 0.0, -6.0, 0.0, 0.0, 6.0, 1.5, 0.0])


def test_reinforce_pp_advantages_use_batch_statistics():
    # Batch [1, 2, 3, 6]: mean 3, deviations [−2, −1, 0, 3], sample std √((4 + 1 + 0 + 9)/3) = √(14/3).
    scores = _t(1.0, 2.0, 3.0, 6.0)
    s = math.sqrt(14 / 3)
    expected = [-2 / s, -1 / s, 0.0, 3 / s]
    _close(group_advantages(scores, None, "reinforce_pp"), expected, atol=1e-5)
    _close(group_advantages(scores, [0, 0, 1, 1], "reinforce_pp"), expected, atol=1e-5)  # ids ignored
    _close(group_advantages(_t(4.0), None, "reinforce_pp"), [0.0])


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="unknown advantage method"):
        group_advantages(SCORES, GROUPS, "ppo")
    with pytest.raises(ValueError, match="needs group_ids"):
        group_advantages(SCORES, None, "grpo")
    with pytest.raises(ValueError, match="does not match"):
        group_advantages(SCORES, [0, 1], "rloo")


# ---------------------------------------------------------------- KL estimators and controllers


def test_kl_estimators_hand_computed():
    logp, ref = _t(-1.0, -2.0, -0.5), _t(-1.5, -1.0, -0.5)
    # log r = ref − logp = [−0.5, 1, 0]
    _close(kl_estimate(logp, ref, "k1"), [0.5, -1.0, 0.0])
    _close(kl_estimate(logp, ref, "k2"), [0.5 * 0.25, 0.5 * 1.0, 0.0])
    _close(kl_estimate(logp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0.0])
    _close(kl_estimate(logp, ref, "k1", mask=_t(1, 0, 1)), [0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_k3_is_nonnegative_and_clamp_keeps_it_finite():
    gen = torch.Generator().manual_seed(0)
    logp, ref = -5 * torch.rand(1000, generator=gen), -5 * torch.rand(1000, generator=gen)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    # log r = 100 overflows float32 without a clamp; with clamp 10 it is e^10 − 1 − 10.
    logp, ref = torch.tensor([-100.0]), torch.tensor([0.0])
    assert torch.isinf(kl_estimate(logp, ref, "k3")).all()
    clamped = kl_estimate(logp, ref, "k3", clamp=10.0)
    torch.testing.assert_close(clamped, torch.tensor([math.exp(10) - 11]))
    assert (kl_estimate(torch.tensor([0.0]), torch.tensor([-100.0]), "k3", clamp=10.0) >= 0).all()


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    # KL = 12: e = clip(12/6 − 1, ±0.2) = 0.2 → β = 0.1·(1 + 0.2·256/10000) = 0.100512.
    assert ctl.update(12.0, n_steps=256) == pytest.approx(0.100512)
    assert ctl.value == pytest.approx(0.100512)
    # KL = 6.6: e = 0.1 → β ·= 1.00256.
    assert ctl.update(6.6, 256) == pytest.approx(0.100512 * 1.00256)
    # KL below target lowers β: KL = 3 → e = clip(−0.5) = −0.2 → β ·= 0.99488.
    before = ctl.value
    assert ctl.update(3.0, 256) == pytest.approx(before * 0.99488)
    assert ctl.value < before
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value and restored.target == 6.0 and restored.horizon == 10000

    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05


# ---------------------------------------------------------------- PPO policy loss


def _policy_case(ratios, advantages):
    old = _t(*[-1.0] * len(ratios))
    logp = (old + torch.log(_t(*ratios))).requires_grad_(True)
    return logp, old, _t(*advantages)


def test_clipped_loss_gradients_zero_outside_clip_range():
    # ε = 0.2. Per token: ℓ = max(−A·ρ, −A·clip(ρ, 0.8, 1.2)), dℓ/dlog ρ = −A·ρ where unclipped.
    #   A=+1 ρ=1.5: clipped → ℓ = −1.2, grad 0       A=−1 ρ=0.5: clipped → ℓ = 0.8, grad 0
    #   A=+1 ρ=1.1: inside → ℓ = −1.1, grad −1.1    A=−1 ρ=0.9: inside → ℓ = 0.9, grad 0.9
    #   A=+1 ρ=0.5: pessimistic side → ℓ = −0.5, grad −0.5
    #   A=−1 ρ=1.5: pessimistic side → ℓ = 1.5, grad 1.5
    logp, old, adv = _policy_case([1.5, 0.5, 1.1, 0.9, 0.5, 1.5], [1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(6, dtype=torch.float64)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    _close(loss, (-1.2 + 0.8 - 1.1 + 0.9 - 0.5 + 1.5) / 6)
    loss.backward()
    _close(logp.grad, [0.0, 0.0, -1.1 / 6, 0.9 / 6, -0.5 / 6, 1.5 / 6])
    assert logp.grad[0] == 0 and logp.grad[1] == 0  # exactly zero, not just small
    assert (logp.grad[2:] != 0).all()
    _close(stats["clip_fraction"], 2 / 6)
    assert not stats["approx_kl"].requires_grad and stats["approx_kl"] > 0


def test_decoupled_ppo_weights_are_truncated_prox_over_behaviour_ratios():
    # w = min(π_prox/π_behav, cap), cap = 2:  ratios 0.5, 1.5, 3.0 -> 0.5, 1.5, 2.0; masked -> 0
    behav = _t(-1.0, -1.0, -1.0, -1.0)
    prox = (behav + torch.log(_t(0.5, 1.5, 3.0, 1.0))).requires_grad_(True)
    mask = _t(1.0, 1.0, 1.0, 0.0)
    w = behavior_weights(prox, behav, mask, cap=2.0)
    _close(w, [0.5, 1.5, 2.0, 0.0])
    assert not w.requires_grad
    # The clip is taken against π_prox and each token's loss scaled by w (Hilton et al. 2021):
    #   ρ = π/π_prox = 1.1, 1.5, 0.9 with A = +1, −1, +1, ε = 0.2:
    #   ℓ = −1.1, 1.5 (pessimistic side), −0.9  ->  w·ℓ = −0.55, 2.25, −1.8;  token mean over 3
    logp = (prox.detach() + torch.log(_t(1.1, 1.5, 0.9, 1.0))).requires_grad_(True)
    adv = _t(1.0, -1.0, 1.0, 5.0)
    loss, _ = clipped_policy_loss(logp, prox.detach(), adv, mask, clip_eps=0.2, weights=w)
    _close(loss, (-0.55 + 2.25 - 1.8) / 3)
    loss.backward()
    _close(logp.grad, [-0.55 / 3, 2.25 / 3, -1.8 / 3, 0.0])  # dℓ/dlog π = w·(−A·ρ) inside the clip
    with pytest.raises(ValueError, match="cap"):
        behavior_weights(prox, behav, mask, cap=0.0)


def test_clip_higher_widens_the_upper_bound():
    # A = +1, ρ = 1.25: clipped with ε = 0.2, inside with ε_high = 0.28.
    logp, old, adv = _policy_case([1.25], [1.0])
    mask = torch.ones(1, dtype=torch.float64)
    clipped, _ = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad(clipped, logp)
    assert grad.item() == 0
    loss, _ = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    (grad,) = torch.autograd.grad(loss, logp)
    _close(loss, -1.25)
    _close(grad, [-1.25])


def test_dual_clip_caps_the_loss_for_negative_advantages():
    # c = 3, ε = 0.2. A=−2 ρ=5: PPO ℓ = max(10, 2.4) = 10, dual clip → min(10, −3·(−2)) = 6, grad 0.
    # A=−2 ρ=2: ℓ = max(4, 2.4) = 4 < 6 unchanged, grad −A·ρ = 4. A=+1 ρ=5: ℓ = −1.2 (no dual clip).
    logp, old, adv = _policy_case([5.0, 2.0, 5.0], [-2.0, -2.0, 1.0])
    mask = torch.ones(3, dtype=torch.float64)
    plain, _ = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    _close(plain, (10.0 + 4.0 - 1.2) / 3)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    _close(loss, (6.0 + 4.0 - 1.2) / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    _close(grad, [0.0, 4.0 / 3, 0.0])
    _close(stats["dual_clip_fraction"], 1 / 3)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=0.5)


# Per-token losses with padding (nan in a padded slot) and a row with no response token:
#   token-mean          (1 + 2 + 3 + 4) / 4 = 2.5
#   seq-mean-token-mean mean(6/3, 4/1) = 3
#   seq-mean-token-sum  mean(6, 4) = 5
LOSSES = _t([1.0, 2.0, 3.0, 99.0], [4.0, NAN, 99.0, 99.0], [7.0, 7.0, 7.0, 7.0])
LOSS_MASK = _t([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0])
EXPECTED = {"token-mean": 2.5, "seq-mean-token-mean": 3.0, "seq-mean-token-sum": 5.0}


@pytest.mark.parametrize("aggregation", sorted(EXPECTED))
def test_aggregation_modes(aggregation):
    _close(aggregate_loss(LOSSES, LOSS_MASK, aggregation), EXPECTED[aggregation])
    # Through the policy loss: ρ = 1 everywhere gives ℓ = −A.
    logp = torch.full_like(LOSSES, -1.0)
    loss, _ = clipped_policy_loss(logp, logp.clone(), -LOSSES, LOSS_MASK, 0.2, aggregation=aggregation)
    _close(loss, EXPECTED[aggregation])


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(LOSSES, LOSS_MASK, "sum")


def test_policy_loss_ignores_padded_tokens():
    gen = torch.Generator().manual_seed(1)
    logp_real = (-torch.rand(2, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    old_real = -torch.rand(2, 3, generator=gen, dtype=torch.float64)
    adv_real = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    ref_loss, ref_stats = clipped_policy_loss(logp_real, old_real, adv_real, torch.ones(2, 3), 0.2)
    (ref_grad,) = torch.autograd.grad(ref_loss, logp_real)

    pad = torch.tensor([[50.0, -math.inf], [NAN, 3.0]], dtype=torch.float64)
    logp = torch.cat([logp_real.detach(), pad], dim=1).requires_grad_(True)
    old = torch.cat([old_real, pad.flip(1)], dim=1)
    adv = torch.cat([adv_real, torch.tensor([[NAN, 1e6], [-1e6, NAN]], dtype=torch.float64)], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    for aggregation in EXPECTED:
        ref, _ = clipped_policy_loss(
            logp_real, old_real, adv_real, torch.ones(2, 3), 0.2, aggregation=aggregation
        )
        loss, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, aggregation=aggregation)
        _close(loss, ref.detach())
    loss, stats = clipped_policy_loss(logp, old, adv, mask, 0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    _close(grad[:, :3], ref_grad)
    assert (grad[:, 3:] == 0).all()
    for key, value in ref_stats.items():
        _close(stats[key], value)


# ---------------------------------------------------------------- value loss and entropy


def test_clipped_value_loss_hand_computed():
    # ε = 0.25, ℓ = ½·max((V − R)², (V_clip − R)²):
    #   V=1, V_old=0.5, R=1.25: V_clip = 0.75, errors 0.0625 vs 0.25 → ℓ = 0.125, clipped → grad 0
    #   V=1, V_old=0.5, R=0:    V_clip = 0.75, errors 1 vs 0.5625   → ℓ = 0.5, grad V − R = 1
    #   V=0.625, V_old=0.5, R=1: inside the clip, error 0.140625     → ℓ = 0.0703125, grad −0.375
    #   padded 4th token with garbage
    values = _t(1.0, 1.0, 0.625, NAN).requires_grad_(True)
    old, returns, mask = _t(0.5, 0.5, 0.5, 3.0), _t(1.25, 0.0, 1.0, NAN), _t(1, 1, 1, 0)
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_eps=0.25)
    _close(loss, (0.125 + 0.5 + 0.0703125) / 3)
    (grad,) = torch.autograd.grad(loss, values)
    _close(grad, [0.0, 1.0 / 3, -0.375 / 3, 0.0])
    _close(stats["value_clip_fraction"], 1 / 3)


def test_entropy_from_logits():
    logits = torch.zeros(2, 3, 7, dtype=torch.bfloat16)
    logits[1] = 3.7
    entropy = entropy_from_logits(logits)
    assert entropy.dtype == torch.float32 and entropy.shape == (2, 3)
    torch.testing.assert_close(entropy, torch.full((2, 3), math.log(7)))
    # p = [½, ¼, ¼]: H = ½·ln 2 + 2·¼·ln 4 = 1.5·ln 2. Large and −inf logits stay finite.
    torch.testing.assert_close(
        entropy_from_logits(torch.log(torch.tensor([0.5, 0.25, 0.25]))), torch.tensor(1.5 * math.log(2))
    )
    torch.testing.assert_close(
        entropy_from_logits(torch.tensor([[1000.0, 1000.0, -math.inf]])), torch.tensor([math.log(2)])
    )


def test_pearson_matches_scipy_and_is_none_when_constant():
    from scipy import stats

    from raylign.algorithms.diversity import pearson

    x, y = [1.0, 2.0, 4.0, 7.0], [2.0, 1.0, 5.0, 9.0]
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None and pearson([1.0, 2.0], [2.0, 1.0]) is None
