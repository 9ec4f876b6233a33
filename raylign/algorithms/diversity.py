"""Diversity of generated text."""

from __future__ import annotations

from collections.abc import Sequence


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
