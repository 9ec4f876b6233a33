"""Length of the completion as a reward term: with a negative weight in a mix, a length penalty.

RL on a learned or lexicon reward tends to lengthen answers (more words, more chances to score);
`-0.01 * length` in the mix counters it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from raylign.rewards.base import RewardSource, check_batch


class LengthReward(RewardSource):
    """Completion length: tokens when a tokenizer is given (no special tokens added), else whitespace
    words. `tokenizer` may be a tokenizer object or a model name/path whose tokenizer is loaded."""

    name = "length"

    def __init__(self, tokenizer: Any = None):
        if isinstance(tokenizer, str):
            from raylign.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.unit = "tokens" if tokenizer is not None else "words"

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        check_batch(prompts, completions)
        if not completions:
            return np.zeros(0, dtype=np.float32)
        if self.tokenizer is None:
            return np.array([len(c.split()) for c in completions], dtype=np.float32)
        ids = self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        return np.array([len(x) for x in ids], dtype=np.float32)
