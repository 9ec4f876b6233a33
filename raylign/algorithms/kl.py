"""KL estimators between the policy and the frozen reference, and controllers for the KL coefficient.

All estimators work per token on log-probabilities of the sampled tokens (`logprobs.token_logps`),
with tokens sampled from the policy π: each is a single-sample estimate of a term of
KL(π ‖ π_ref) = E_π[log π − log π_ref]. The caller masks and reduces them.
"""

from __future__ import annotations

import math

import torch

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: str = "k1",
    clamp: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from x ~ π, with log π(x) = `logp`, log π_ref(x) = `ref_logp`.

    With r = π_ref(x) / π(x) = exp(ref_logp − logp) (Schulman 2020, "Approximating KL Divergence"):

    - ``k1``: −log r = logp − ref_logp. Unbiased, high variance, can be negative per token.
    - ``k2``: ½·(log r)² = ½·(logp − ref_logp)². Biased (low bias when π ≈ π_ref), low variance, ≥ 0.
    - ``k3``: (r − 1) − log r. Unbiased (E_π[r] = 1), low variance, ≥ 0 for every token since
      e^u − 1 − u ≥ 0; computed as expm1(u) − u with u = log r.

    `clamp` (k3 only): bound u = log r to [−clamp, clamp] before exponentiating. Where the reference
    gives a token far more mass than the policy (u ≫ 0), e^u explodes (u = 89 overflows float32) and a
    single token dominates the batch; clamping (e.g. 10 or 20) keeps the estimate finite at the cost of a
    small bias on those tokens, and keeps it ≥ 0. `mask`, when given, zeroes the estimate outside it
    (masked positions may hold −inf or garbage log-probs; they never reach the result).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_KINDS)}")
    if clamp is not None and clamp <= 0:
        raise ValueError(f"KL clamp must be > 0, got {clamp}")
    log_ratio = ref_logp - logp  # log r
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    if kind == "k1":
        kl = -log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio.square()
    else:
        if clamp is not None:
            log_ratio = log_ratio.clamp(-clamp, clamp)
        kl = torch.expm1(log_ratio) - log_ratio
    return kl


class FixedKLController:
    """A constant KL coefficient β, with the same interface as `AdaptiveKLController`."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"KL coefficient must be ≥ 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient that steers the observed KL towards `target`.

    e = clip(KL / target − 1, −0.2, 0.2);  β ← β·(1 + e·n_steps / horizon)
    (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2). KL above target
    raises β, below target lowers it; the clip bounds each change, `horizon` sets how many samples
    (`n_steps` is the number of samples, e.g. the batch size, seen since the last update) it takes to
    move β by a factor of about e.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if init_coef < 0:
            raise ValueError(f"KL coefficient must be ≥ 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"KL horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move β after observing `current_kl` over `n_steps` samples; returns the new β."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"observed KL must be finite, got {current_kl}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
