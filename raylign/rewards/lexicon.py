"""Lexicon rewards: valence from words rated by humans.

VADER (Hutto & Gilbert 2014) rates ~7,500 words and emoticons, each by 10 human raters on -4..+4;
its compound score combines them with rules for negation, intensifiers and punctuation and maps
the sum to [-1, 1] with x / sqrt(x² + 15).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raylign.rewards.base import RewardSource, check_batch


class VaderReward(RewardSource):
    """`score(prompts, completions)` -> VADER compound valence of each completion, in [-1, 1].

    Normalisation: VADER sums the (rule-adjusted) mean human ratings of the completion's words,
    s = Σ valence_i, each valence in about [-4, 4], and squashes the sum as
    compound = s / sqrt(s² + α) with α = 15. So one mildly positive word ("good", 1.9) gives +0.44,
    a few strongly positive words approach +1, and text without rated words scores exactly 0.0. The
    squashing is monotone but saturating: very long gushing text is barely better than short warm
    text, which limits how far a policy can push the reward by piling on adjectives. Scores are not
    re-centred or re-scaled further; the prompt is ignored (the completion's valence alone).
    """

    name = "lexicon:vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[object], completions: Sequence[str]) -> np.ndarray:
        check_batch(prompts, completions)
        return np.array(
            [self._analyzer.polarity_scores(text)["compound"] for text in completions], dtype=np.float32
        )


# `lexicon:<name>` -> class; each takes no arguments.
LEXICONS: dict[str, type[RewardSource]] = {"vader": VaderReward}
