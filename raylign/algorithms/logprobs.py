"""Log-probabilities of labels under a causal LM's logits: the building block of every loss."""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t] | prefix) = log_softmax(logits)[label], for logits[..., t, :] already aligned
    with labels (no shift here). Float32: half-precision log-softmax loses the small probabilities.

    One fused log_softmax + gather is faster on CPU than logit[label] − logsumexp(logits) (whose
    backward builds the same full-vocabulary softmax anyway).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Σ_t mask_t · log π(y_t | y_<t) per sequence (or the mean over masked tokens when `average`).

    `logits` is [B, T, V] straight from a causal LM on `input_ids`; `labels` [B, T] are those same
    input ids and `mask` [B, T] marks the tokens to score (e.g. the completion). The shift by one
    (logits at t predict token t+1) happens here, so callers pass unshifted tensors.
    """
    logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:].to(logits.dtype)
    # Masked-out labels may be padding ids outside the model's range (-100): gather a valid index.
    per_token = token_logps(logits, labels.clamp(min=0)) * mask
    total = per_token.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def response_start(loss_mask: torch.Tensor) -> int:
    """The first position where any row's response begins (>= 1): no logit before it is needed."""
    cols = loss_mask.bool().any(0).nonzero()
    return max(int(cols[0]), 1) if len(cols) else loss_mask.shape[1] - 1


def rl_logits(model: torch.nn.Module, input_ids: torch.Tensor, temperature: float, start: int) -> torch.Tensor:
    """Logits predicting tokens start..T-1, [B, T - start, V], divided by the sampling temperature so
    that log-probs are those of the distribution the rollout workers sampled from. `logits_to_keep`
    skips the LM head (a vocabulary-sized matmul per token) on the prompt positions."""
    keep = input_ids.shape[1] - start + 1
    return model(input_ids=input_ids, logits_to_keep=keep).logits[:, :-1].float() / temperature
