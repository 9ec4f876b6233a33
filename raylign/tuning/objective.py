"""The alignment objective every trainable reports as `objective`: a score that does not reward
drifting away from what humans wanted, so a sweep does not simply pick the most reward-hacked run.

- online RL (ppo, grpo, rloo, reinforce_pp, adversarial): held-out reward − c · KL(π ‖ π_ref)
  (`eval/reward`, `eval/kl`; the step's `reward/mean`, `kl/seq_mean` when no held-out score exists);
- DPO family and reward models: validation pair accuracy (agreement with the human preference labels);
- KTO: − validation loss;  SFT: − validation NLL;
- multitask: `eval/multitask_score`, the mean relative improvement of every task's validation loss,
  so no task may be sacrificed for another.
"""

from __future__ import annotations

import math
from typing import Any

ONLINE = {"ppo", "grpo", "rloo", "reinforce_pp", "adversarial"}
PAIR_ACCURACY = {"dpo", "ipo", "simpo", "orpo", "reward"}


def alignment_objective(algorithm: str, metrics: dict[str, Any], kl_penalty: float = 0.1) -> float | None:
    """The objective for `algorithm` from one report's metrics; None when they lack what it needs."""

    def get(*keys: str) -> float | None:
        for key in keys:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value)
        return None

    if algorithm in ONLINE:
        reward, kl = get("eval/reward", "reward/mean"), get("eval/kl", "kl/seq_mean")
        return None if reward is None else reward - kl_penalty * (kl or 0.0)
    if algorithm == "multitask":
        return get("eval/multitask_score")
    if algorithm in PAIR_ACCURACY:
        return get("eval/accuracy")
    if algorithm == "sft":
        nll = get("eval/nll")
        return None if nll is None else -nll
    loss = get("eval/loss")
    return None if loss is None else -loss
