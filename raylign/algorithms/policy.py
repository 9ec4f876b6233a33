"""Policy-gradient losses for LMs: the clipped PPO surrogate (with clip-higher and dual clip), decoupled
PPO's behaviour weights for stale samples, the clipped value loss, token entropy, and the ways to
reduce per-token losses to a scalar.

Token tensors are [B, T] with a response mask [B, T]; masked-out positions never reach a loss or a
statistic (they may hold garbage). Statistics are detached 0-dim tensors (call `.item()` to log).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from raylign.algorithms.advantages import masked_mean, zero_outside_mask
from raylign.algorithms.kl import kl_estimate

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# Bound on |log π − log π_old| before exponentiating: e^20 ≈ 5e8 is finite in float32.
_MAX_LOG_RATIO = 20.0


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean"
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    - ``token-mean``: Σ_{b,t} m·ℓ / Σ_{b,t} m — every token weighs the same, so long sequences count
      more (DAPO, Yu et al. 2025).
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean — every sequence
      weighs the same (original GRPO, Shao et al. 2024).
    - ``seq-mean-token-sum``: mean over sequences of each sequence's token sum (no length
      normalisation, cf. Dr. GRPO, Liu et al. 2025).

    Sequences with no unmasked token are left out of the sequence means.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    if aggregation == "token-mean":
        return masked_mean(per_token, mask)
    has_tokens = mask.bool().any(dim=-1)
    if aggregation == "seq-mean-token-mean":
        per_seq = masked_mean(per_token, mask, dim=-1)
    else:
        per_seq = (zero_outside_mask(per_token, mask) * mask.to(per_token.dtype)).sum(dim=-1)
    return masked_mean(per_seq, has_tokens)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token, reduced by `aggregation` -> (loss, stats).

    ρ = exp(log π − log π_old);  ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))
    (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"). ε_low = `clip_eps`, ε_high =
    `clip_eps_high` (default: ε_low); ε_high > ε_low is DAPO's clip-higher (Yu et al. 2025), which
    leaves room for low-probability tokens to grow. The gradient is exactly zero where the clip binds:
    A > 0 with ρ > 1 + ε_high, and A < 0 with ρ < 1 − ε_low.

    Dual clip c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning"): for A < 0, ℓ = min(ℓ, −c·A), so a token with ρ ≫ 1 and A < 0 cannot produce an
    unbounded loss (its gradient is zero beyond ρ = c).

    `weights` (optional, per token, treated as constants) multiply ℓ before the reduction, e.g. the
    behaviour weights of decoupled PPO (`behavior_weights`).

    log ρ is clamped to ±20 before exponentiating. Stats: ``clip_fraction`` (share of tokens where
    the clipped term is the larger one), ``dual_clip_fraction``, ``approx_kl`` (k3 estimate of
    KL(π_old ‖ π), Schulman 2020), ``ratio_mean``; all masked means, detached.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if eps_high <= 0:
        raise ValueError(f"clip_eps_high must be > 0, got {eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    # Zero the padding first: garbage there (nan, ±inf) would otherwise turn gradients into nan.
    logp, old_logp, advantages = (
        zero_outside_mask(x, mask) for x in (logp, old_logp.detach(), advantages.detach())
    )
    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    stats = {"clip_fraction": masked_mean((clipped > unclipped).to(per_token.dtype), mask).detach()}
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (per_token > bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, bound), per_token)
        stats["dual_clip_fraction"] = masked_mean(dual.to(per_token.dtype), mask).detach()
    else:
        stats["dual_clip_fraction"] = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    if weights is not None:
        per_token = per_token * zero_outside_mask(weights.detach(), mask)
    loss = aggregate_loss(per_token, mask, aggregation)
    with torch.no_grad():
        kl = kl_estimate(old_logp, logp.detach(), "k3", clamp=_MAX_LOG_RATIO, mask=mask)
        stats["approx_kl"] = masked_mean(kl, mask)
        stats["ratio_mean"] = masked_mean(ratio.detach(), mask)
    return loss, stats


def behavior_weights(prox_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
                     cap: float) -> torch.Tensor:
    """Truncated importance weights of decoupled PPO, per token, detached:

        w = min(π_prox / π_behav, cap) = exp(min(log π_prox − log π_behav, log cap))

    When tokens were sampled by an older policy π_behav (asynchronous sampling, `rollout.overlap`),
    decoupled PPO takes the clipped ratio against the proximal policy π_prox (the policy as the step
    starts) and reweights each token's loss by w, so the update is corrected for the stale sampler
    without the clip zeroing the gradient of every token the last update moved (Hilton et al. 2021,
    "Batch size-invariance for policy optimization", §3; used for asynchronous RL by AReaL, Fu et al.
    2025). Truncation at `cap` bounds the variance, as V-trace's ρ̄ (Espeholt et al. 2018). 0 outside
    the mask.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    log_w = (prox_logp.detach() - behavior_logp.detach()).clamp(-_MAX_LOG_RATIO, math.log(cap))
    return zero_outside_mask(torch.exp(log_w), mask)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value-function loss -> (loss, stats).

    V_clip = V_old + clip(V − V_old, −ε, ε);  ℓ = ½·max((V − R)², (V_clip − R)²)
    (the value clipping of OpenAI baselines' PPO2, Schulman et al. 2017; see Andrychowicz et al. 2021,
    "What Matters In On-Policy Reinforcement Learning?"). Stats: ``value_clip_fraction`` (share of
    tokens where the clipped error is the larger), detached.
    """
    if clip_eps <= 0:
        raise ValueError(f"value clip_eps must be > 0, got {clip_eps}")
    values, old_values, returns = (
        zero_outside_mask(x, mask) for x in (values, old_values.detach(), returns.detach())
    )
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    err_unclipped = (values - returns).square()
    err_clipped = (v_clipped - returns).square()
    per_token = 0.5 * torch.maximum(err_unclipped, err_clipped)
    loss = aggregate_loss(per_token, mask, aggregation)
    frac = masked_mean((err_clipped > err_unclipped).to(per_token.dtype), mask).detach()
    return loss, {"value_clip_fraction": frac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis, [..., V] -> [...], in float32.

    H = −Σ_v p_v·log p_v = logsumexp(z) − Σ_v p_v·z_v with p = softmax(z), which never takes the log
    of a zero probability, on logits shifted by their max (H is shift-invariant); logits of −inf
    (masked vocabulary entries) are allowed.
    """
    logits = logits.float()
    # Shift by the max first: with logits near 1000, logsumexp(z) − Σ p·z would cancel in float32.
    top = logits.amax(dim=-1, keepdim=True)
    logits = logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.softmax(logits, dim=-1)
    # p·z with p = 0 contributes 0, also where z = −inf (a banned token), instead of 0·(−inf) = nan.
    p_z = torch.where(p > 0, p * logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=-1) - p_z.sum(dim=-1)


def rl_units(loss_mask: Any, aggregation: str) -> float:
    """Units an RL loss is averaged over: response tokens (token-mean) or responses (seq-mean-*).

    `loss_mask` [B, T] (numpy or torch) marks response tokens; column 0 is never one. The learner divides
    the summed loss by the global count of a whole optimizer step, so any sharding gives one batch's update.
    """
    mask = loss_mask[:, 1:]
    if aggregation == "token-mean":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())
