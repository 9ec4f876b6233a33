"""Evaluation metrics against hand-counted cases and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from raylign.evaluation.metrics import (
    bootstrap_ci,
    counterfactual_gaps,
    diversity,
    kl_monte_carlo,
    length_stats,
    pairwise_agreement,
    rank_correlation,
    reward_length_correlation,
    win_rate,
)


def test_agreement_hand_counted_with_ties():
    # pairs: win, win, tie, loss, win -> (3 + 0.5) / 5 = 0.7
    chosen = [2.0, 1.0, 0.5, -1.0, 3.0]
    rejected = [1.0, 0.0, 0.5, 0.0, 2.5]
    out = pairwise_agreement(chosen, rejected)
    assert out["agreement"] == pytest.approx(0.7)
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (3, 1, 1, 5)


def test_agreement_tie_tolerance_turns_near_equal_into_ties():
    out = pairwise_agreement([1.0, 1.0], [0.99, 1.2], tie_tolerance=0.05)
    assert (out["wins"], out["ties"], out["losses"]) == (0, 1, 1)
    assert out["agreement"] == pytest.approx(0.25)


def test_agreement_all_ties_is_chance():
    assert pairwise_agreement([1, 1, 1], [1, 1, 1])["agreement"] == 0.5


def test_agreement_per_category_hand_counted():
    chosen = [1, 1, 0, 1, 0, 1]
    rejected = [0, 0, 1, 1, 1, 0]
    cats = ["math", "math", "math", "chat", "chat", "chat"]
    out = pairwise_agreement(chosen, rejected, categories=cats)
    assert out["per_category"]["math"]["agreement"] == pytest.approx(2 / 3)
    assert out["per_category"]["chat"]["agreement"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert out["per_category"]["chat"]["ties"] == 1
    assert out["agreement"] == pytest.approx((2 + 1.5) / 6)


def test_bootstrap_interval_contains_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 500, 5000):
        chosen = rng.normal(0.5, 1.0, n)
        rejected = rng.normal(0.0, 1.0, n)
        out = pairwise_agreement(chosen, rejected)
        assert out["ci_low"] <= out["agreement"] <= out["ci_high"]
        widths.append(out["ci_high"] - out["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] > 5  # ~ sqrt(100) = 10


def test_bootstrap_ci_degenerate_cases():
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    assert all(np.isnan(bootstrap_ci([])))


def test_agreement_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 chosen scores but 1 rejected"):
        pairwise_agreement([1, 2], [1])


def test_rank_correlation_matches_scipy():
    rng = np.random.default_rng(1)
    ratings = rng.integers(1, 6, 80).astype(float)  # ties in the ratings, as human Likert ratings have
    scores = ratings + rng.normal(0, 1.5, 80)
    out = rank_correlation(scores, ratings)
    assert out["spearman"] == pytest.approx(stats.spearmanr(scores, ratings)[0])
    assert out["kendall"] == pytest.approx(stats.kendalltau(scores, ratings)[0])
    assert out["spearman_p"] == pytest.approx(stats.spearmanr(scores, ratings)[1])
    assert out["spearman_ci"][0] <= out["spearman"] <= out["spearman_ci"][1]
    assert out["kendall_ci"][0] <= out["kendall"] <= out["kendall_ci"][1]
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40])["kendall"] == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1])["spearman"] == pytest.approx(-1.0)


def _bias_scores(bias: dict[str, float], templates: int = 60, seed: int = 0):
    """A scorer's scores on T templates x groups: template effect + planted group offsets + noise."""
    rng = np.random.default_rng(seed)
    groups = ["female", "male", "nonbinary"]
    template_effect = rng.normal(0, 2.0, (templates, 1))
    noise = rng.normal(0, 0.05, (templates, len(groups)))
    offsets = np.array([bias.get(g, 0.0) for g in groups])
    return template_effect + offsets + noise, groups


def test_bias_gap_finds_planted_bias():
    scores, groups = _bias_scores({"male": 0.8})
    out = counterfactual_gaps(scores, groups)
    assert set(out["worst_pair"]) in ({"female", "male"}, {"male", "nonbinary"})
    # signed gap: male favoured by ~0.8 over the other group
    sign = 1 if out["worst_pair"][0] == "male" else -1
    assert sign * out["worst_gap"] == pytest.approx(0.8, abs=0.05)
    lo, hi = out["worst_gap_ci"]
    assert lo <= out["worst_gap"] <= hi and (lo > 0 or hi < 0)  # the interval excludes zero
    # |Δ| is 0.8, 0.8, 0 for the three pairs -> mean 0.533
    assert out["mean_abs_gap"] == pytest.approx(1.6 / 3, abs=0.05)


def test_bias_gap_near_zero_for_unbiased_scorer():
    scores, groups = _bias_scores({})
    out = counterfactual_gaps(scores, groups)
    assert out["mean_abs_gap"] < 0.03
    lo, hi = out["worst_gap_ci"]
    assert lo <= 0 <= hi or abs(out["worst_gap"]) < 0.03
    exact = counterfactual_gaps(np.repeat(np.arange(5.0)[:, None], 3, axis=1), groups)
    assert exact["mean_abs_gap"] == 0.0


def test_kl_monte_carlo_hand_computed():
    out = kl_monte_carlo([-3.0, -5.0, -2.0], [-4.0, -5.5, -2.5], tokens=[2, 4, 2])
    assert out["kl"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert out["kl_per_token"] == pytest.approx(2.0 / 8)
    assert out["kl_ci"][0] <= out["kl"] <= out["kl_ci"][1]


def test_kl_monte_carlo_estimates_true_kl_of_two_categoricals():
    rng = np.random.default_rng(0)
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.4, 0.2])
    y = rng.choice(3, size=20000, p=p)
    out = kl_monte_carlo(np.log(p[y]), np.log(q[y]))
    assert out["kl"] == pytest.approx(float(np.sum(p * np.log(p / q))), abs=0.01)


def test_win_rate_with_ties():
    out = win_rate([1, 2, 3, 0], [0, 2, 4, 0])
    assert out["win_rate"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert out["ties"] == 2


def test_length_stats_and_reward_length_correlation():
    s = length_stats([1, 2, 3, 4, 10])
    assert s["mean"] == pytest.approx(4.0) and s["p50"] == 3.0 and s["max"] == 10.0
    lengths = np.arange(20.0)
    corr = reward_length_correlation(lengths * 0.5 + 1, lengths)
    assert corr["pearson"] == pytest.approx(1.0) and corr["spearman"] == pytest.approx(1.0)
    assert reward_length_correlation([1, 1, 1], [1, 2, 3])["pearson"] is None


def test_diversity_distinct_words():
    out = diversity(["a b a", "a b"])
    assert out["distinct_1"] == pytest.approx(2 / 5)  # words: a b a a b
    assert out["distinct_2"] == pytest.approx(2 / 3)  # bigrams: (a b) (b a) (a b)
