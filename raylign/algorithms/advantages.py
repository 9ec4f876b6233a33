"""Advantage estimators for policy-gradient RL on LMs: GAE (PPO), group baselines (GRPO, RLOO),
REINFORCE++, and the masked statistics they share.

Token tensors are [B, T] with a response mask [B, T] (1 on the tokens the policy generated, 0 on the
prompt and padding); results are zero outside the mask and carry no gradient. Sequence scores are [B].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

GROUP_ADVANTAGE_METHODS = ("grpo", "rloo", "reinforce_pp")


def zero_outside_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask, 0 elsewhere (safe when masked-out entries are nan/inf, unlike x · mask)."""
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ mask·x / Σ mask over `dim` (all elements when None); 0 where the mask is empty.

    Entries outside the mask never reach the result, even if they are nan or inf.
    """
    weights = mask.to(x.dtype)
    x = zero_outside_mask(x, mask) * weights
    if dim is None:
        return x.sum() / weights.sum().clamp(min=1e-8)
    return x.sum(dim) / weights.sum(dim).clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of the masked entries of x (over all elements): Σ mask·(x − μ)² / n, or /(n − 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x − μ) / √(σ² + eps) over the masked entries (μ, σ² the masked mean and population variance).

    With `shift_mean=False` the mean is added back: only the scale is normalised (as for PPO rewards,
    whose sign carries meaning). Zero outside the mask.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_outside_mask(whitened, mask)


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation -> (advantages, returns), both [B, T].

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  returns_t = A_t + V_t
    computed right to left (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation"). Past the last response token V = A = 0 (the episode ends).
    Masked-out positions are skipped: t+1 means the next position inside the mask, so a hole in the
    mask (e.g. tool output inside a response) does not break the recursion. Zero outside the mask.
    """
    rewards, values = rewards.detach(), values.detach().to(rewards.dtype)
    m = mask.to(rewards.dtype)
    rewards, values = zero_outside_mask(rewards, mask), zero_outside_mask(values, mask)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv
        # Inside the mask, this step becomes "next"; outside, carry the later step through.
        next_value = m[:, t] * values[:, t] + (1 - m[:, t]) * next_value
        next_adv = m[:, t] * adv + (1 - m[:, t]) * next_adv
    advantages = zero_outside_mask(advantages, mask)
    returns = zero_outside_mask(advantages + values, mask)
    return advantages, returns


@torch.no_grad()
def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Per-token reward-to-go G_t = r_t + γ·G_{t+1}, right to left, [B, T]; zero outside the mask.

    REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
    Models") uses G_t over `token_rewards_with_kl` rewards as the advantage, normalised over the whole
    batch with `masked_whiten(G, mask)`. Masked-out positions are skipped as in `gae`.
    """
    token_rewards = token_rewards.detach()
    m = mask.to(token_rewards.dtype)
    rewards = zero_outside_mask(token_rewards, mask)
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        g = rewards[:, t] + gamma * running
        returns[:, t] = g
        running = m[:, t] * g + (1 - m[:, t]) * running
    return zero_outside_mask(returns, mask)


@torch.no_grad()
def token_rewards_with_kl(
    scores: torch.Tensor, kl_per_token: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards [B, T]: r_t = −β·KL_t on every response token, plus the score on the last one.

    r_t = −β·KL_t + 1[t = last response token]·score — the KL-shaped reward of RLHF (Ziegler et al.
    2019; Ouyang et al. 2022), fed to `gae` (PPO) or `discounted_returns` (REINFORCE++). `kl_per_token`
    comes from `kl.kl_estimate`; it is detached (the reward is a constant for the policy gradient).
    A row whose mask is empty gets no reward. Zero outside the mask.
    """
    mask_b = mask.bool()
    rewards = zero_outside_mask(-kl_coef * kl_per_token.detach(), mask_b)
    t_idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask_b)
    last = torch.where(mask_b, t_idx, torch.full_like(t_idx, -1)).amax(dim=1)  # [B]
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores.detach().to(rewards.dtype)[has_tokens]
    return rewards


@torch.no_grad()
def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor | Sequence[int] | None,
    method: str = "grpo",
    scale_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Sequence-level advantages [N] from scores [N] of completions grouped by prompt (`group_ids` [N]).

    - ``grpo``: A_i = (r_i − mean_g) / (std_g + eps), the mean and (sample, n − 1) standard deviation
      over the completions of i's group (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
      Mathematical Reasoning in Open Language Models"). ``scale_std=False`` drops the division:
      A_i = r_i − mean_g (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
      Perspective"). A group of one has std 0 and A = 0; so does any group with equal scores.
    - ``rloo``: A_i = r_i − (Σ_{j∈g, j≠i} r_j) / (n_g − 1), the leave-one-out baseline (Ahmadian et al.
      2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
      in LLMs"). A group of one has no baseline: A = 0.
    - ``reinforce_pp``: A_i = (r_i − mean) / (std + eps) over the whole batch, `group_ids` ignored
      (REINFORCE++, Hu 2025). The KL penalty belongs in the reward (`token_rewards_with_kl`); for
      per-token returns use `masked_whiten(discounted_returns(...), mask)` instead.
    """
    if method not in GROUP_ADVANTAGE_METHODS:
        raise ValueError(
            f"unknown advantage method {method!r}; choose one of {', '.join(GROUP_ADVANTAGE_METHODS)}"
        )
    scores = scores.detach()
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    work = scores.to(torch.float64)
    if method == "reinforce_pp":
        if work.numel() < 2:
            return torch.zeros_like(scores)
        return ((work - work.mean()) / (work.std() + eps)).to(scores.dtype)

    if group_ids is None:
        raise ValueError(f"method {method!r} needs group_ids (one id per score, equal for one prompt)")
    ids = torch.as_tensor(group_ids, device=scores.device)
    if ids.shape != scores.shape:
        raise ValueError(f"group_ids shape {tuple(ids.shape)} does not match scores {tuple(scores.shape)}")
    _, inverse = torch.unique(ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(n_groups, dtype=work.dtype, device=work.device).index_add_(
        0, inverse, torch.ones_like(work)
    )
    sums = torch.zeros(n_groups, dtype=work.dtype, device=work.device).index_add_(0, inverse, work)
    n = counts[inverse]
    if method == "rloo":
        baseline = (sums[inverse] - work) / (n - 1).clamp(min=1)
        adv = torch.where(n > 1, work - baseline, torch.zeros_like(work))
        return adv.to(scores.dtype)
    # grpo
    centred = work - (sums / counts)[inverse]
    if scale_std:
        sq = torch.zeros(n_groups, dtype=work.dtype, device=work.device).index_add_(
            0, inverse, centred.square()
        )
        std = (sq / (counts - 1).clamp(min=1)).sqrt()[inverse]
        centred = centred / (std + eps)
    return centred.to(scores.dtype)


def compute_advantages(
    algorithm: str,
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    group_ids: Any,
    *,
    kl_coef: float,
    kl_in_reward: bool,
    kl_estimator: str = "k3",
    scale_rewards: bool = True,
    whiten: bool = True,
    gamma: float = 1.0,
    lam: float = 0.95,
    values: torch.Tensor | None = None,
    prefix_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Advantages of one RL batch: (advantages [B, T], returns [B, T] for PPO's critic or None, metrics).

    Token tensors are [B, T] over the predicted tokens (the caller drops column 0 of its
    input-aligned arrays): `logp` the sampling log-probs, `ref_logp` the reference's, `mask` 1 on
    response tokens, `values` V(s_t) (PPO); `scores` [B] one reward per completion; `group_ids` [B]
    which prompt each completion answers (GRPO, RLOO).

    KL_t is `kl_estimate(logp, ref_logp, kl_estimator)` clamped at 10. When `kl_in_reward` the penalty
    β·KL (β = kl_coef) enters the reward: per token for PPO and REINFORCE++ (r_t = −β·KL_t, the score
    added on the last token), per sequence (score − β·Σ_t KL_t) for GRPO and RLOO. Then
      - grpo / rloo: group-relative advantages of the shaped sequence rewards (Shao et al. 2024;
        Ahmadian et al. 2024), broadcast to every response token;
      - reinforce_pp: whitened discounted returns (REINFORCE++, Hu 2025);
      - ppo (named "gae"): GAE(γ, λ) against the critic's values (Schulman et al. 2016), whitened when
        `whiten`; returns = advantages + values are the critic's targets.
    `prefix_values` [B, T] (Monte-Carlo Q_t per response prefix, SeqGAN) replace the score on the last
    token by r_t = Q_t − Q_{t−1} on every token (token-level algorithms only).
    """
    from raylign.algorithms.adversarial import prefix_token_rewards
    from raylign.algorithms.kl import kl_estimate

    kl = kl_estimate(logp, ref_logp, kl_estimator, clamp=10.0, mask=mask)  # [B, T]
    beta = kl_coef if kl_in_reward else 0.0
    returns = None

    def token_rewards() -> torch.Tensor:  # [B, T]
        if prefix_values is None:
            return token_rewards_with_kl(scores, kl, mask, beta)
        return prefix_token_rewards(prefix_values, mask) - beta * kl.detach() * mask

    if prefix_values is not None and algorithm in ("grpo", "rloo"):
        raise ValueError(f"per-prefix rewards need a token-level algorithm (ppo, reinforce_pp), not {algorithm}")
    if algorithm in ("grpo", "rloo"):
        shaped = scores - beta * (kl * mask).sum(-1)  # [B]
        adv = group_advantages(shaped, group_ids, algorithm, scale_std=scale_rewards)[:, None] * mask
    elif algorithm == "reinforce_pp":
        adv = masked_whiten(discounted_returns(token_rewards(), mask, gamma), mask)
    elif algorithm in ("ppo", "gae"):
        if values is None:
            raise ValueError("PPO's advantages need the critic's values")
        adv, returns = gae(token_rewards(), values, mask, gamma, lam)
        if whiten:
            adv = masked_whiten(adv, mask)
    else:
        raise ValueError(f"no advantage estimator for algorithm '{algorithm}'")
    adv = adv.float()
    metrics = {"kl/seq_mean": float((kl * mask).sum(-1).mean()), "kl/token_mean": float(masked_mean(kl, mask)),
               "advantage/mean": float(masked_mean(adv, mask)),
               "advantage/abs_mean": float(masked_mean(adv.abs(), mask))}
    return adv, returns, metrics
