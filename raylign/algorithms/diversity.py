"""Diversity of generated text, and the reward-length correlation (signals of a collapsing or
reward-hacking policy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def distinct_n(sequences: Sequence[Sequence], n: int) -> float:
    """distinct-n = |unique n-grams| / |n-grams| over all sequences (Li et al. 2016, §4.2).

    Sequences are token ids or words; 1.0 means no n-gram repeats anywhere in the batch, values near
    0 mean the samples collapse onto a few phrases (the mode collapse GAN training is prone to).
    Returns 0.0 when no sequence is n items long.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson r = Σ(x−x̄)(y−ȳ) / √(Σ(x−x̄)² Σ(y−ȳ)²), e.g. of reward with response length (a reward-hacking
    signal, Singhal et al. 2023); None when either side is constant or there are fewer than 3 points."""
    xs, ys = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if xs.shape != ys.shape:
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    dx, dy = xs - xs.mean(), ys - ys.mean()
    denom = float((dx.square().sum() * dy.square().sum()).sqrt())
    if len(xs) < 3 or denom == 0.0:
        return None
    return float((dx * dy).sum()) / denom
