"""Alignment metrics: pure numpy/scipy functions, no models and no Ray.

Every function returns plain Python numbers (JSON-ready dicts) and gives its formula below. Intervals
are percentile bootstrap 95% intervals (Efron & Tibshirani 1993, ch. 13) over the units that were
sampled independently (pairs, prompts, templates), with a fixed seed so reports repeat run to run.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from raylign.algorithms.diversity import distinct_n
from raylign.runtime import Purpose, rng

DEFAULT_BOOTSTRAP = 1000


def _floats(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over the rows of `values`.

    Draw B resamples x*_b of the n rows with replacement, compute θ*_b = statistic(x*_b), and return
    the (α/2, 1 − α/2) quantiles of {θ*_b}, α = 1 − confidence. Its width shrinks like 1/√n. With one
    row (or none) the interval is the point itself (or NaN): there is nothing to resample.
    """
    arr = np.asarray(values, dtype=np.float64)
    n = len(arr)
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        point = float(statistic(arr))
        return point, point
    idx = rng(seed, Purpose.BOOTSTRAP).integers(0, n, size=(n_boot, n))
    if statistic is np.mean and arr.ndim == 1:  # vectorised fast path
        stats = arr[idx].mean(axis=1)
    else:
        stats = np.array([statistic(arr[i]) for i in idx])
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# ---- human consistency: pairwise agreement ------------------------------------------------------


def pair_outcomes(chosen_scores: Any, rejected_scores: Any, tie_tolerance: float = 0.0) -> np.ndarray:
    """Per pair o_i = 1 if s(chosen) − s(rejected) > tol, ½ if |difference| ≤ tol (a tie), else 0."""
    c, r = _floats(chosen_scores, "chosen scores"), _floats(rejected_scores, "rejected scores")
    if len(c) != len(r):
        raise ValueError(f"{len(c)} chosen scores but {len(r)} rejected scores")
    diff = c - r
    return np.where(diff > tie_tolerance, 1.0, np.where(diff < -tie_tolerance, 0.0, 0.5))


def _agreement_summary(outcomes: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    lo, hi = bootstrap_ci(outcomes, n_boot=n_boot, seed=seed)
    return {
        "agreement": float(outcomes.mean()) if len(outcomes) else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "n": int(len(outcomes)),
        "wins": int(np.sum(outcomes == 1.0)),
        "ties": int(np.sum(outcomes == 0.5)),
        "losses": int(np.sum(outcomes == 0.0)),
    }


def pairwise_agreement(
    chosen_scores: Any,
    rejected_scores: Any,
    categories: Sequence[Any] | None = None,
    tie_tolerance: float = 0.0,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Human consistency score on preference pairs: how often a scorer prefers what humans preferred.

    agreement = (1/n) Σ_i o_i with o_i = 1[s(c_i) > s(r_i)] + ½·1[s(c_i) = s(r_i)] (ties count half,
    so a scorer that cannot tell the answers apart scores 0.5, chance), equality meaning
    |s(c_i) − s(r_i)| ≤ `tie_tolerance`. Reported with a bootstrap 95% interval over pairs, the counts
    of wins/ties/losses, and the same per category when `categories` (one label per pair) is given.
    """
    outcomes = pair_outcomes(chosen_scores, rejected_scores, tie_tolerance)
    result = _agreement_summary(outcomes, n_boot, seed)
    if categories is not None:
        cats = list(categories)
        if len(cats) != len(outcomes):
            raise ValueError(f"{len(cats)} categories for {len(outcomes)} pairs")
        labels = np.array(["" if c is None else str(c) for c in cats], dtype=object)
        result["per_category"] = {
            cat: _agreement_summary(outcomes[labels == cat], n_boot, seed) for cat in sorted(set(labels))
        }
    return result


# ---- human consistency: rank correlation with ratings ------------------------------------------


def rank_correlation(scores: Any, ratings: Any, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Spearman ρ and Kendall τ-b between a scorer and human ratings (scipy.stats).

    ρ = Pearson correlation of the ranks (average ranks for ties); τ_b = (n_c − n_d) /
    √((n_0 − n_1)(n_0 − n_2)) over concordant/discordant pairs with tie corrections (Kendall 1945).
    Two-sided p-values from scipy, and a bootstrap 95% interval of each over the rated items.
    """
    from scipy import stats

    s, r = _floats(scores, "scores"), _floats(ratings, "ratings")
    if len(s) != len(r):
        raise ValueError(f"{len(s)} scores but {len(r)} ratings")
    if len(s) < 3:
        raise ValueError(f"rank correlation needs at least 3 rated items, got {len(s)}")
    rho, rho_p = stats.spearmanr(s, r)
    tau, tau_p = stats.kendalltau(s, r)
    both = np.stack([s, r], axis=1)

    def _stat(fn: Callable) -> Callable[[np.ndarray], float]:
        def value(rows: np.ndarray) -> float:
            with warnings.catch_warnings():  # resamples of few items are often constant
                warnings.simplefilter("ignore")
                v = fn(rows[:, 0], rows[:, 1])[0]
            return 0.0 if not np.isfinite(v) else float(v)  # a resample of constant scores has no rank order
        return value

    rho_ci = bootstrap_ci(both, _stat(stats.spearmanr), n_boot=min(n_boot, 300), seed=seed)
    tau_ci = bootstrap_ci(both, _stat(stats.kendalltau), n_boot=min(n_boot, 300), seed=seed)
    return {
        "spearman": _nan_to_none(rho), "spearman_p": _nan_to_none(rho_p),
        "spearman_ci": list(rho_ci),
        "kendall": _nan_to_none(tau), "kendall_p": _nan_to_none(tau_p),
        "kendall_ci": list(tau_ci),
        "n": int(len(s)),
    }


def _nan_to_none(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


# ---- bias: counterfactual gaps ------------------------------------------------------------------


def counterfactual_gaps(
    scores: Any, groups: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """Gap across groups in the score of the same template with only the group term swapped.

    `scores` is [T templates, G groups]: S[t, g] = score of template t filled with group g's term.
    For each pair of groups (a, b) the systematic gap is Δ_ab = (1/T) Σ_t (S[t, a] − S[t, b]), the
    same sentence differing only in the group term, so template difficulty cancels. Reported:
      mean_abs_gap = (2 / (G(G−1))) Σ_{a<b} |Δ_ab|   (0 for a scorer blind to the group term)
      worst_pair   = argmax_{a<b} |Δ_ab|, with its signed gap Δ (a favoured when > 0)
    each with a bootstrap 95% interval over templates (resampled rows of S). Note |·| makes the
    estimate of a truly unbiased but noisy scorer slightly positive; the interval shows by how much.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(groups):
        raise ValueError(f"scores must be [templates, {len(groups)} groups], got shape {s.shape}")
    if s.shape[1] < 2:
        raise ValueError("a counterfactual set needs at least two groups")
    if not np.all(np.isfinite(s)):
        raise ValueError("bias scores contain NaN or infinite values")
    pairs = list(itertools.combinations(range(len(groups)), 2))
    a_idx, b_idx = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def pair_gaps(rows: np.ndarray) -> np.ndarray:
        return rows[:, a_idx].mean(0) - rows[:, b_idx].mean(0)

    gaps = pair_gaps(s)
    worst = int(np.argmax(np.abs(gaps)))
    a, b = pairs[worst]
    mean_ci = bootstrap_ci(s, lambda rows: float(np.abs(pair_gaps(rows)).mean()), n_boot=n_boot, seed=seed)
    worst_ci = bootstrap_ci(s, lambda rows: float(rows[:, a].mean() - rows[:, b].mean()), n_boot=n_boot, seed=seed)
    return {
        "mean_abs_gap": float(np.abs(gaps).mean()),
        "mean_abs_gap_ci": list(mean_ci),
        "worst_pair": [groups[a], groups[b]],
        "worst_gap": float(gaps[worst]),
        "worst_gap_ci": list(worst_ci),
        "group_means": {g: float(m) for g, m in zip(groups, s.mean(0), strict=True)},
        "templates": int(s.shape[0]),
    }


# ---- drift and quality --------------------------------------------------------------------------


def kl_monte_carlo(policy_logps: Any, reference_logps: Any, tokens: Any = None,
                   n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """KL(π ‖ π_ref) on eval prompts, estimated from samples of the policy.

    For y_i ~ π(·|x_i), KL ≈ (1/n) Σ_i [log π(y_i|x_i) − log π_ref(y_i|x_i)] (sequence log-probs,
    nats per completion): the unbiased k1 estimator (Schulman 2020, "Approximating KL divergence").
    Individual terms can be negative; the mean is not in expectation. Also per token:
    Σ_i (log π − log π_ref) / Σ_i |y_i| when `tokens` (completion lengths) is given.
    """
    p, r = _floats(policy_logps, "policy log-probs"), _floats(reference_logps, "reference log-probs")
    if len(p) != len(r):
        raise ValueError(f"{len(p)} policy log-probs but {len(r)} reference log-probs")
    diff = p - r
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    out = {"kl": float(diff.mean()) if len(diff) else float("nan"), "kl_ci": [lo, hi], "n": int(len(diff))}
    if tokens is not None:
        total = float(np.sum(_floats(tokens, "tokens")))
        out["kl_per_token"] = float(diff.sum() / total) if total > 0 else float("nan")
    return out


def win_rate(policy_scores: Any, reference_scores: Any, tie_tolerance: float = 0.0,
             n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Win rate of the policy against the reference on the same prompts, judged by one scorer.

    win_rate = (wins + ½·ties) / n with win ⇔ s(policy_i) − s(reference_i) > tol and tie ⇔
    |difference| ≤ tol (0.5 = no better than the reference); bootstrap 95% interval over prompts.
    """
    summary = pairwise_agreement(policy_scores, reference_scores, tie_tolerance=tie_tolerance,
                                 n_boot=n_boot, seed=seed)
    summary["win_rate"] = summary.pop("agreement")
    return summary


def length_stats(lengths: Any) -> dict[str, Any]:
    """Response length distribution: mean, std, min, max and the 10/50/90th percentiles (tokens)."""
    x = _floats(lengths, "lengths")
    if not len(x):
        return {"n": 0}
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"n": int(len(x)), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "max": float(x.max()), "p10": float(p10), "p50": float(p50), "p90": float(p90)}


def reward_length_correlation(rewards: Any, lengths: Any) -> dict[str, Any]:
    """Correlation of reward with response length, a reward-hacking signal (Singhal et al. 2023).

    Pearson r = cov(R, L) / (σ_R σ_L) and Spearman ρ (rank version); None when either is constant.
    A strongly positive value means the reward can be gamed by writing more.
    """
    from scipy import stats

    r, n = _floats(rewards, "rewards"), _floats(lengths, "lengths")
    if len(r) != len(n):
        raise ValueError(f"{len(r)} rewards but {len(n)} lengths")
    if len(r) < 3 or np.ptp(r) == 0 or np.ptp(n) == 0:
        return {"pearson": None, "spearman": None, "n": int(len(r))}
    return {"pearson": _nan_to_none(stats.pearsonr(r, n)[0]),
            "spearman": _nan_to_none(stats.spearmanr(r, n)[0]), "n": int(len(r))}


def diversity(texts: Sequence[str]) -> dict[str, float]:
    """distinct-1 and distinct-2 over whitespace words of all texts (Li et al. 2016):
    |unique n-grams| / |n-grams| (see `raylign.algorithms.diversity.distinct_n`)."""
    words = [t.split() for t in texts]
    return {"distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2)}


# ---- agreement with human reference answers -----------------------------------------------------


def reference_similarity(generation_embeddings: Any, reference_embeddings: Any,
                         n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Agreement of generations with human reference answers by embedding cosine similarity.

    For prompt i with generation embedding u_i and human answer embedding v_i:
      cos_i = u_i·v_i / (‖u_i‖ ‖v_i‖),   mean_cosine = (1/n) Σ_i cos_i   (1 = same meaning/wording)
    with a bootstrap 95% interval over prompts. As a chance baseline, `mismatched_cosine` is the mean
    cosine of each generation with the *other* prompts' references, (1/(n(n−1))) Σ_{i≠j} cos(u_i, v_j):
    what similarity a generation gets from topic and style alone; agreement above it is answer-specific.
    Zero vectors (e.g. an empty text) have cosine 0 with everything.
    """
    u = np.asarray(generation_embeddings, dtype=np.float64)
    v = np.asarray(reference_embeddings, dtype=np.float64)
    if u.ndim != 2 or u.shape != v.shape:
        raise ValueError(f"embeddings must be two [n, d] arrays of one shape, got {u.shape} and {v.shape}")
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
        raise ValueError("embeddings contain NaN or infinite values")

    def unit(x: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)

    sims = unit(u) @ unit(v).T
    cos = np.clip(np.diag(sims), -1.0, 1.0)
    n = len(cos)
    lo, hi = bootstrap_ci(cos, n_boot=n_boot, seed=seed)
    mismatched = float((sims.sum() - np.trace(sims)) / (n * (n - 1))) if n > 1 else None
    return {"mean_cosine": float(cos.mean()) if n else float("nan"), "ci_low": lo, "ci_high": hi,
            "mismatched_cosine": mismatched, "n": int(n), "cosines": [float(c) for c in cos]}
