"""Lexicon rewards: valence from words rated by humans.

VADER (Hutto & Gilbert 2014) rates ~7,500 words and emoticons, each by 10 human raters on -4..+4;
its compound score combines them with rules for negation, intensifiers and punctuation and maps
the sum to [-1, 1] with x / sqrt(x² + 15).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class VaderReward:
    """`score(prompts, completions)` -> VADER compound valence of each completion, in [-1, 1]."""

    name = "lexicon:vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[object], completions: Sequence[str]) -> np.ndarray:
        return np.array(
            [self._analyzer.polarity_scores(text)["compound"] for text in completions], dtype=np.float32
        )
