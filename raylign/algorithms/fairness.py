"""Counterfactual logit pairing: a penalty on score gaps between a text and its counterfactual copies.

Garg et al. 2019, "Counterfactual Fairness in Text Classification through Robustness" (AIES), §4:
train on L(x, y) + λ · E_{x' ∈ Φ(x)} d(g(x), g(x')), where Φ(x) are copies of x with an identity
term swapped (a woman -> a man) and g the logit. Garg et al. take d = |·|; here d is the squared gap
(as in the logit pairing of Kannan et al. 2018), smooth at 0 and the form `train.counterfactual_penalty`
documents.
"""

from __future__ import annotations

import torch


def counterfactual_pairing_penalty(scores: torch.Tensor, cf_scores: torch.Tensor,
                                   cf_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example penalty P_i = Σ_s (1/K_i) Σ_k v_ik (g_is − g'_iks)², K_i = max(Σ_k v_ik, 1).

    scores [B, S]: the score of each of an example's S texts (a pair: S = 2, chosen and rejected);
    cf_scores [B, K, S]: the scores of its K counterfactual copies (copy k swaps the same group term
    in all S texts); cf_valid [B, K]: 1 where copy k exists. An example without copies has P_i = 0.
    Gradients flow into both g and g' (the pairing pulls both). Returns (P [B], number of copies [B]).
    """
    valid = cf_valid.to(scores.dtype)  # [B, K]
    gaps = (scores.unsqueeze(1) - cf_scores) ** 2  # [B, K, S]
    copies = valid.sum(1)  # [B]
    penalty = (gaps.sum(-1) * valid).sum(1) / copies.clamp(min=1.0)  # [B]
    return penalty, copies
