"""Adversarial alignment math: the discriminator's loss, the generator's reward from D, and the
Monte-Carlo per-prefix reward (SeqGAN) for token-level credit.

D(x) = σ(ℓ(x)) is the discriminator's probability that text x is human-written; every function takes
the logit ℓ, never the probability, so that log D = log σ(ℓ) and log(1 − D) = log σ(−ℓ) stay finite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

GENERATOR_REWARDS = ("logit", "log_d", "minus_log_one_minus_d")


def discriminator_loss(human_logits: torch.Tensor, policy_logits: torch.Tensor,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """L_D = −E_human[log D(x)] − E_policy[log(1 − D(G(z)))]  (Goodfellow et al. 2014, eq. 1).

    With one-sided label smoothing ε (Salimans et al. 2016, §3.4) the human target is 1 − ε instead of
    1: −E_human[(1 − ε)·log D + ε·log(1 − D)]; the policy side keeps its target 0. Each expectation is
    the mean over its own batch, so the two classes weigh the same whatever their batch sizes.
    """
    human_target = torch.full_like(human_logits, 1.0 - label_smoothing)
    human = F.binary_cross_entropy_with_logits(human_logits, human_target)
    policy = F.binary_cross_entropy_with_logits(policy_logits, torch.zeros_like(policy_logits))
    return human + policy


def gradient_penalty(human_logits: torch.Tensor, human_inputs: torch.Tensor) -> torch.Tensor:
    """R1 = ½·E_human[‖∇_x ℓ(x)‖²]  (Mescheder et al. 2018, eq. 9), x the input embeddings.

    Text is discrete, so the gradient is taken with respect to the embedded tokens (`human_inputs`,
    [B, T, H], part of the graph that produced `human_logits`); the penalty keeps D smooth around the
    human data, which is what stops it from saturating. Returns a differentiable scalar.
    """
    (grad,) = torch.autograd.grad(human_logits.sum(), human_inputs, create_graph=True)
    return 0.5 * grad.pow(2).flatten(1).sum(-1).mean()


def generator_reward(d_logits: torch.Tensor, kind: str = "logit") -> torch.Tensor:
    """The policy's reward for a sample that D scores with logit ℓ (D = σ(ℓ)):

    - ``logit``: log D − log(1 − D) = ℓ, the log density ratio p_human / p_policy at the optimal D
      (the reward of f-GAN/AIRL-style imitation; unbounded both ways);
    - ``log_d``: log D = log σ(ℓ) ≤ 0, the non-saturating generator objective (Goodfellow et al. 2014);
    - ``minus_log_one_minus_d``: −log(1 − D) = −log σ(−ℓ) ≥ 0, the original minimax objective's
      (GAIL, Ho & Ermon 2016, uses its negative as the cost).
    """
    if kind == "logit":
        return d_logits
    if kind == "log_d":
        return F.logsigmoid(d_logits)
    if kind == "minus_log_one_minus_d":
        return -F.logsigmoid(-d_logits)
    raise ValueError(f"unknown generator reward '{kind}'; choose one of {', '.join(GENERATOR_REWARDS)}")


def discriminator_metrics(human_logits: torch.Tensor, policy_logits: torch.Tensor) -> dict[str, float]:
    """D's accuracy on each class (D > ½ means "human") and the fool rate: the share of policy samples
    D calls human (= 1 − its accuracy on policy samples)."""
    human_acc = (human_logits > 0).float().mean().item() if human_logits.numel() else float("nan")
    fooled = (policy_logits > 0).float().mean().item() if policy_logits.numel() else float("nan")
    return {"accuracy_human": human_acc, "accuracy_policy": 1.0 - fooled, "fool_rate": fooled}


def prefix_token_rewards(prefix_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards r_t = Q_t − Q_{t−1} (Q_0 = 0) from per-prefix values Q_t [B, T].

    Q_t estimates the sequence reward expected after the first t response tokens (SeqGAN's
    Q(y_{1:t}), Yu et al. 2017, eq. 4; Q at the last token is the reward itself). Spreading it this
    way is potential-based shaping (Ng et al. 1999) with Q as the potential: the rewards of a row sum
    to its sequence reward, so returns, the KL penalty and the optimal policy are unchanged, and each
    token is credited with how much it moved the expected reward. Positions outside `mask` (one row's
    response tokens, contiguous) are zero there and ignored.
    """
    mask = mask.bool()
    q = torch.where(mask, prefix_values, torch.zeros_like(prefix_values))
    previous = torch.cat([torch.zeros_like(q[:, :1]), q[:, :-1]], dim=1)
    return torch.where(mask, q - previous, torch.zeros_like(q))


def mc_prefix_values(
    responses: Sequence[Sequence[int]],
    final_rewards: Sequence[float],
    rollout_rewards: Callable[[list[tuple[int, int]], int], Sequence[Sequence[float]]],
    n_rollouts: int,
) -> list[torch.Tensor]:
    """Monte-Carlo per-prefix values (SeqGAN, Yu et al. 2017, eq. 4):

        Q(y_{1:t}) = (1/N)·Σ_n R(y_{1:t} ⊕ Y^n),  Y^n ~ π(· | prompt, y_{1:t})   for t < T
        Q(y_{1:T}) = R(y_{1:T})                                                   (the sample's own reward)

    `rollout_rewards(prefixes, n)` gets (row, t) pairs, each meaning "response `row` cut after its first
    t tokens", completes each n times with the policy and returns the n rewards per pair; it is called
    once for all prefixes (one batched generation). Returns one [T_row] tensor of Q values per row.
    """
    if n_rollouts < 1:
        raise ValueError("n_rollouts must be >= 1")
    prefixes = [(row, t) for row, response in enumerate(responses) for t in range(1, len(response))]
    sampled = rollout_rewards(prefixes, n_rollouts) if prefixes else []
    if len(sampled) != len(prefixes):
        raise ValueError(f"rollout_rewards returned {len(sampled)} results for {len(prefixes)} prefixes")
    values = [torch.zeros(len(r)) for r in responses]
    for (row, t), rewards in zip(prefixes, sampled, strict=True):
        if len(rewards) != n_rollouts:
            raise ValueError(f"rollout_rewards returned {len(rewards)} rewards for a prefix, expected {n_rollouts}")
        values[row][t - 1] = float(sum(rewards)) / n_rollouts
    for row, response in enumerate(responses):
        if len(response):
            values[row][-1] = float(final_rewards[row])
    return values
