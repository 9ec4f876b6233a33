"""Preference losses on sequence log-probabilities: DPO/cDPO/IPO/SLiC, KTO, ORPO, SimPO, Bradley-Terry.

Every function takes per-example tensors of shape [B] (sums or means of token log-probabilities, see
`logprobs.sequence_logps`, or reward-model scores) and returns per-example losses of shape [B]; the
caller reduces them. Rewards returned for logging are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation and its variants -> (losses, chosen_rewards, rejected_rewards).

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), the difference of log ratios.

    - ``sigmoid``: −(1−ε)·log σ(β·h) − ε·log σ(−β·h). ε = 0 is DPO (Rafailov et al. 2023, "Direct
      Preference Optimization: Your Language Model is Secretly a Reward Model"); ε > 0 is conservative
      DPO, which assumes labels are flipped with probability ε (cDPO, Mitchell 2023).
    - ``ipo``: (h − 1/(2β))², regressing h to a fixed margin (IPO, Azar et al. 2023, "A General
      Theoretical Paradigm to Understand Learning from Human Preferences").
    - ``hinge``: relu(1 − β·h) (SLiC, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration
      with Human Feedback").

    Implicit rewards are β·(log π(y) − log π_ref(y)), detached.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x))), detached.

    Estimated on mismatched pairs (a completion y' scored under another example's prompt x) as a
    biased estimate of KL(π ‖ π_ref) (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization").
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_ref_point: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky optimisation on unpaired labels -> (losses, rewards).

    With r = log π(y|x) − log π_ref(y|x) and z0 the reference point (detached, clamped at ≥ 0):
    desirable (label True): w_d·(1 − σ(β·(r − z0))); undesirable (label False): w_u·(1 − σ(β·(z0 − r)))
    (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

    Rewards are β·r, detached.
    """
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps.dtype, device=policy_logps.device)
    z0 = z0.clamp(min=0).detach()
    r = policy_logps - ref_logps
    labels = labels.to(torch.bool)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(labels, desirable, undesirable), beta * r.detach()


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0: log(−expm1(x)) near 0, log1p(−exp(x)) below −log 2.

    Stable at both ends (Mächler 2012, "Accurately Computing log(1 − exp(−|a|))"). x is clamped just
    below 0 so that p = exp(x) = 1 gives a large negative value instead of −inf.
    """
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_nll: torch.Tensor,
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Odds-ratio preference optimisation -> (losses, log_odds_ratio).

    L = L_SFT(y_w) + λ·(−log σ(log odds(y_w) − log odds(y_l))), with log odds(y) = log p − log(1 − p)
    and p = exp(mean token log-probability of y) (Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model"). `chosen_nll` is the per-example SFT loss on y_w.

    The returned log odds ratio is detached (for logging).
    """
    log_odds = (chosen_avg_logps - _log1m_exp(chosen_avg_logps)) - (
        rejected_avg_logps - _log1m_exp(rejected_avg_logps)
    )
    return chosen_nll - lam * F.logsigmoid(log_odds), log_odds.detach()


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simple preference optimisation -> (losses, chosen_rewards, rejected_rewards).

    L = −log σ(β·avg log π(y_w) − β·avg log π(y_l) − γ), a reference-free DPO whose implicit reward
    is the length-normalised log-likelihood β·avg log π(y) and γ a target margin (Meng et al. 2024,
    "SimPO: Simple Preference Optimization with a Reference-Free Reward"). Rewards are detached.
    """
    chosen_rewards = beta * chosen_avg_logps
    rejected_rewards = beta * rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reward-model loss on preference pairs: −log σ(s_w − s_l − m) per pair.

    Bradley-Terry model P(y_w ≻ y_l) = σ(s_w − s_l) (Bradley & Terry 1952), as used for RLHF reward
    models (Ouyang et al. 2022, "Training language models to follow instructions with human
    feedback"); the optional margin m per pair is Llama 2's (Touvron et al. 2023).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with chosen > rejected (ties count 0.5), as a 0-dim float tensor."""
    chosen, rejected = chosen.detach(), rejected.detach()
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return wins.mean()
