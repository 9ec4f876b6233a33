"""Objectives: a model forward on one micro-batch turned into a summed loss and summed metrics.

Each objective returns `(loss_sum, sums)` where `loss_sum` is the loss *summed* over the micro-batch's
units (tokens for SFT) and `sums` are metric sums plus the unit count. The learner divides by the
global unit count of the whole optimizer step, so gradient accumulation and data parallelism give the
same update as one big batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raylign.algorithms.logprobs import sequence_logps

Batch = dict[str, torch.Tensor]
Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


def sft_objective(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative log-likelihood of the masked (completion) tokens, summed over tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    nll_sum = -logps.sum()
    tokens = batch["loss_mask"][:, 1:].sum()
    return nll_sum, {"nll_sum": nll_sum.item(), "tokens": tokens.item()}


OBJECTIVES: dict[str, Objective] = {"sft": sft_objective}
# What each objective's normaliser counts in a batch (the learner divides the loss sum by it).
UNIT_KEYS: dict[str, str] = {"sft": "tokens"}


def count_units(objective: str, batch: dict) -> float:
    """Global unit count of a step batch (numpy or torch), computed by the driver before sharding."""
    if objective == "sft":
        return float(batch["loss_mask"][:, 1:].sum())
    raise KeyError(objective)
