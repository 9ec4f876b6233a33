"""Counterfactual bias evaluation: a scorer's gaps across groups on the filled templates of each axis.

The bias sets themselves (the packaged term lists and templates, a user file extending them) live
in `raylign.data.counterfactual`, where data augmentation and the counterfactual penalty also use
them; they are re-exported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raylign.data.counterfactual import BUILTIN, PLACEHOLDER, BiasSet, fill, load_bias_sets

__all__ = ["BUILTIN", "PLACEHOLDER", "BiasSet", "evaluate_bias", "fill", "load_bias_sets", "score_matrix"]


def score_matrix(bias_set: BiasSet, scores: np.ndarray) -> np.ndarray:
    """Flat template-major scores -> S[t, g] (templates x groups)."""
    return np.asarray(scores, dtype=np.float64).reshape(len(bias_set.templates), len(bias_set.groups))


def evaluate_bias(scorer: Any, sets: list[BiasSet], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """counterfactual_gaps of `scorer` on each axis (see `metrics.counterfactual_gaps`)."""
    from raylign.evaluation.metrics import counterfactual_gaps

    out = {}
    for s in sets:
        prompts, completions = s.filled()
        scores = np.asarray(scorer.score(prompts, completions), dtype=np.float64)
        out[s.axis] = counterfactual_gaps(score_matrix(s, scores), list(s.groups), n_boot=n_boot, seed=seed)
    return out
