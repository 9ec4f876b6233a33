"""Inter-annotator agreement against hand-counted cases, `krippendorff` and `statsmodels.stats.inter_rater`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raylign.evaluation.agreement import (
    agreement_report,
    annotator_quality,
    cohen_kappa_pairs,
    fleiss_kappa,
    human_consistency_score,
    identification_accuracy,
    implied_alpha,
    item_agreement,
    judgments_from_matrix,
    judgments_from_triples,
    krippendorff_alpha,
    percent_agreement,
    position_bias,
    value_counts,
)
from raylign.runtime import Purpose, rng

try:  # reference implementations, from the dev extra; the hand-computed tests run without them
    import krippendorff
except ImportError:
    krippendorff = None
try:
    from statsmodels.stats import inter_rater
except ImportError:
    inter_rater = None
needs_krippendorff = pytest.mark.skipif(krippendorff is None, reason="needs `pip install krippendorff` (dev extra)")
needs_statsmodels = pytest.mark.skipif(inter_rater is None, reason="needs `pip install statsmodels` (dev extra)")

NAN = np.nan


def random_matrix(seed: int, annotators: int = 5, items: int = 40, k: int = 4, missing: float = 0.4) -> np.ndarray:
    gen = np.random.default_rng(seed)
    x = gen.integers(0, k, size=(annotators, items)).astype(np.float64)
    # a shared "true" label for half the cells so that agreement is above chance
    truth = gen.integers(0, k, size=items)
    x = np.where(gen.random(x.shape) < 0.5, truth, x)
    x[gen.random(x.shape) < missing] = NAN
    return x


# ---- building judgments ---------------------------------------------------------------------------


def test_triples_build_the_matrix_in_first_seen_order():
    rows = [("ann", "q1", "B"), ("bob", "q1", "A"), ("ann", "q2", "A"), ("cat", "q2", None)]
    j = judgments_from_triples(rows)
    assert j.annotators == ("ann", "bob", "cat") and j.items == ("q1", "q2") and j.categories == ("A", "B")
    np.testing.assert_array_equal(j.matrix, [[1, 0], [0, NAN], [NAN, NAN]])


def test_triples_duplicates_fail_or_keep_the_last():
    rows = [("ann", "q1", 1), ("ann", "q1", 3)]
    with pytest.raises(ValueError, match="judged item 'q1' twice"):
        judgments_from_triples(rows)
    j = judgments_from_triples(rows, categories=[1, 2, 3], keep="last")
    assert j.matrix[0, 0] == 2  # index of 3 in categories


def test_triples_categories_order_and_unknown_values():
    scale = ["A much better", "A better", "tie", "B better", "B much better"]
    j = judgments_from_triples([("a", 1, "tie"), ("b", 1, "A much better")], categories=scale)
    np.testing.assert_array_equal(j.matrix[:, 0], [2, 0])
    with pytest.raises(ValueError, match="not among categories"):
        judgments_from_triples([("a", 1, "meh")], categories=scale)
    with pytest.raises(ValueError, match="mixed types"):
        judgments_from_triples([("a", 1, "x"), ("b", 1, 2)])


def test_matrix_must_hold_category_indices():
    with pytest.raises(ValueError, match="category indices"):
        judgments_from_matrix([[0.5, 1]])
    with pytest.raises(ValueError, match="only 2 categories"):
        judgments_from_matrix([[0, 2]], categories=["a", "b"])


def test_value_counts_per_item():
    counts = value_counts([[0, 1, NAN], [0, 0, 2], [1, NAN, NAN]])
    np.testing.assert_array_equal(counts, [[2, 1, 0], [1, 1, 0], [0, 0, 1]])


# ---- hand-computed cases --------------------------------------------------------------------------

# Two annotators, three items: (0, 0), (0, 1), (1, 1).
TWO_BY_THREE = [[0, 0, 1], [0, 1, 1]]


def test_hand_computed_two_annotators():
    # percent agreement: items 1 and 3 agree -> 2/3
    assert percent_agreement(TWO_BY_THREE)["agreement"] == pytest.approx(2 / 3)
    # Fleiss: P̄ = 2/3, p = (3/6, 3/6), P̄_e = 1/2 -> κ = (2/3 − 1/2) / (1/2) = 1/3
    assert fleiss_kappa(TWO_BY_THREE)["kappa"] == pytest.approx(1 / 3)
    # Cohen: confusion [[1, 1], [0, 1]], p_o = 2/3, p_a = (2/3, 1/3), p_b = (1/3, 2/3),
    # p_e = 2/9 + 2/9 = 4/9 -> κ = (2/3 − 4/9) / (5/9) = 2/5
    pair = cohen_kappa_pairs(TWO_BY_THREE)["pairs"][0]
    assert pair["kappa"] == pytest.approx(0.4) and pair["agreement"] == pytest.approx(2 / 3)
    # Krippendorff: o = [[2, 1], [1, 2]], n_c = (3, 3), n = 6; D_o = 2/6, D_e = 2·3·3 / (6·5) = 0.6
    # -> α = 1 − (1/3) / 0.6 = 4/9
    assert krippendorff_alpha(TWO_BY_THREE)["alpha"] == pytest.approx(4 / 9)


def test_hand_computed_fleiss_three_raters():
    # counts [[3, 0], [3, 0], [2, 1], [0, 3]]: P_i = 1, 1, (2·1)/(3·2) = 1/3, 1 -> P̄ = 5/6;
    # p = (8/12, 4/12), P̄_e = 4/9 + 1/9 = 5/9 -> κ = (5/6 − 5/9) / (4/9) = 5/8
    x = [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert fleiss_kappa(x)["kappa"] == pytest.approx(5 / 8)
    assert percent_agreement(x)["agreement"] == pytest.approx(5 / 6)


# Items (0, 1), (1, 2), (0, 0), (2, 2) over categories 0 < 1 < 2.
ORDERED = [[0, 1, 0, 2], [1, 2, 0, 2]]


def test_hand_computed_ordinal_alpha():
    # o_01 = o_10 = o_12 = o_21 = 1, o_00 = o_22 = 2 -> n_c = (3, 2, 3), n = 8
    # mid-ranks M = (1.5, 4, 6.5): δ²_01 = δ²_12 = 2.5² = 6.25, δ²_02 = 5² = 25
    # Σ o δ² = 4·6.25 = 25; Σ n_c n_k δ² = 2·(3·2·6.25 + 2·3·6.25 + 3·3·25) = 600
    # α = 1 − (n − 1)·25/600 = 1 − 175/600 = 17/24
    assert krippendorff_alpha(ORDERED, "ordinal")["alpha"] == pytest.approx(17 / 24)


def test_hand_computed_interval_alpha_with_values():
    # values (0, 1, 5): δ²_01 = 1, δ²_12 = 16, δ²_02 = 25; Σ o δ² = 2·1 + 2·16 = 34;
    # Σ n_c n_k δ² = 2·(3·2·1 + 2·3·16 + 3·3·25) = 654 -> α = 1 − 7·34/654 = 208/327
    assert krippendorff_alpha(ORDERED, "interval", values=[0, 1, 5])["alpha"] == pytest.approx(208 / 327)
    # the same through numeric category labels
    j = judgments_from_matrix(ORDERED, categories=[0, 1, 5])
    assert krippendorff_alpha(j, "interval")["alpha"] == pytest.approx(208 / 327)


def test_item_agreement_hand_counted():
    out = item_agreement(judgments_from_matrix([[0, 1, NAN], [0, 0, NAN], [1, 0, 1]], categories=["x", "y"]))
    assert out["n_judgments"] == [3, 3, 1]
    assert out["majority"] == ["x", "x", "y"]
    np.testing.assert_allclose(out["majority_share"], [2 / 3, 2 / 3, 1.0])
    # item 1: counts (2, 1) -> 2·1 / (3·2) = 1/3; item 3 judged once -> NaN
    np.testing.assert_allclose(out["agreement"], [1 / 3, 1 / 3, NAN])


# ---- edge cases -----------------------------------------------------------------------------------


def test_all_agree_is_perfect():
    x = [[0, 1, 2, 1], [0, 1, 2, 1], [0, 1, NAN, 1]]
    for level in ("nominal", "ordinal", "interval"):
        out = krippendorff_alpha(x, level)
        assert out["alpha"] == pytest.approx(1.0) and out["reason"] is None
        assert out["ci_low"] == pytest.approx(1.0) and out["ci_high"] == pytest.approx(1.0)
    assert fleiss_kappa(x)["kappa"] == pytest.approx(1.0)
    assert percent_agreement(x)["agreement"] == 1.0
    assert all(p["kappa"] == pytest.approx(1.0) for p in cohen_kappa_pairs(x)["pairs"])


def test_one_annotator_per_item_is_undefined_not_an_error():
    x = [[0, NAN, NAN], [NAN, 1, NAN], [NAN, NAN, 0]]
    for out in (krippendorff_alpha(x), fleiss_kappa(x), percent_agreement(x)):
        value = next(iter(out.values()))
        assert math.isnan(value) and math.isnan(out["ci_low"]) and out["n_items"] == 0
        assert "two or more annotators" in out["reason"]
    pairs = cohen_kappa_pairs(x)["pairs"]
    assert all(math.isnan(p["kappa"]) and p["reason"] == "no items judged by both" for p in pairs)
    assert math.isnan(cohen_kappa_pairs(x)["mean_kappa"])
    # nothing judged at all: the whole report still comes back, NaN throughout
    empty = agreement_report(np.full((3, 4), NAN), levels=("nominal", "ordinal", "interval"), n_boot=10)
    assert all(math.isnan(a["alpha"]) for a in empty["krippendorff_alpha"].values())
    assert empty["per_item"]["majority"] == [None] * 4 and empty["annotators"]["flagged"] == []


def test_a_single_category_has_no_variation():
    x = [[1, 1, 1], [1, 1, NAN]]
    alpha = krippendorff_alpha(x)
    assert math.isnan(alpha["alpha"]) and "no variation" in alpha["reason"]
    assert math.isnan(fleiss_kappa(x)["kappa"]) and "one category" in fleiss_kappa(x)["reason"]
    assert math.isnan(cohen_kappa_pairs(x)["pairs"][0]["kappa"])
    assert percent_agreement(x)["agreement"] == 1.0  # agreement itself is well defined


def test_unknown_level_and_weights_fail_clearly():
    with pytest.raises(ValueError, match="unknown level"):
        krippendorff_alpha(TWO_BY_THREE, "ratio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown weights"):
        cohen_kappa_pairs(TWO_BY_THREE, weights="cubic")  # type: ignore[arg-type]


# ---- against reference implementations ------------------------------------------------------------


@needs_krippendorff
@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval"])
@pytest.mark.parametrize("seed", range(6))
def test_alpha_matches_krippendorff_package_with_missing_values(level, seed):
    x = random_matrix(seed, annotators=3 + seed % 4, items=30 + 10 * seed, k=2 + seed % 4)
    ours = krippendorff_alpha(x, level, n_boot=0)["alpha"]
    assert ours == pytest.approx(krippendorff.alpha(x, level_of_measurement=level), abs=1e-10)


@needs_krippendorff
def test_interval_alpha_uses_category_values_like_the_package():
    values = np.array([1.0, 2.0, 5.0, 10.0])
    x = random_matrix(11, k=4)
    j = judgments_from_matrix(x, categories=list(values))
    mapped = np.where(np.isnan(x), NAN, values[np.nan_to_num(x).astype(int)])
    expected = krippendorff.alpha(mapped, level_of_measurement="interval")
    assert krippendorff_alpha(j, "interval", n_boot=0)["alpha"] == pytest.approx(expected, abs=1e-10)


@needs_statsmodels
@pytest.mark.parametrize("seed", range(5))
def test_fleiss_matches_statsmodels_on_complete_data(seed):
    x = random_matrix(seed, annotators=2 + seed, items=50, k=3 + seed % 3, missing=0.0)
    table, _ = inter_rater.aggregate_raters(x.T.astype(int))  # [items, raters] -> [items, categories]
    assert fleiss_kappa(x, n_boot=0)["kappa"] == pytest.approx(inter_rater.fleiss_kappa(table), abs=1e-10)


@needs_statsmodels
@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
@pytest.mark.parametrize("seed", range(4))
def test_cohen_matches_statsmodels_on_common_items(weights, seed):
    k = 4
    x = random_matrix(seed, annotators=3, items=60, k=k, missing=0.3)
    out = cohen_kappa_pairs(x, weights=weights, n_boot=0)
    for pair in out["pairs"]:
        a, b = pair["annotators"]
        both = ~np.isnan(x[a]) & ~np.isnan(x[b])
        table = np.zeros((k, k))
        np.add.at(table, (x[a, both].astype(int), x[b, both].astype(int)), 1)
        expected = inter_rater.cohens_kappa(table, wt=weights, return_results=False)
        assert pair["kappa"] == pytest.approx(expected, abs=1e-10)
        assert pair["n_items"] == int(both.sum())
    assert out["mean_kappa"] == pytest.approx(np.mean([p["kappa"] for p in out["pairs"]]))


# ---- bootstrap ------------------------------------------------------------------------------------


@needs_krippendorff
def test_bootstrap_resamples_items_exactly():
    # the interval equals the percentiles of the package's α on resampled columns (pairable items only)
    x = random_matrix(3, annotators=4, items=25, missing=0.2)
    x = x[:, (~np.isnan(x)).sum(axis=0) >= 2]
    n_boot = 200
    out = krippendorff_alpha(x, "ordinal", n_boot=n_boot, seed=7)
    idx = rng(7, Purpose.BOOTSTRAP).integers(0, x.shape[1], size=(n_boot, x.shape[1]))
    ref = [krippendorff.alpha(x[:, i], level_of_measurement="ordinal") for i in idx]
    lo, hi = np.quantile(ref, [0.025, 0.975])
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((lo, hi), abs=1e-10)


def test_bootstrap_contains_the_estimate_and_is_deterministic():
    x = random_matrix(5, annotators=6, items=120)
    for fn in (percent_agreement, fleiss_kappa, krippendorff_alpha):
        first, again, other = fn(x, seed=1), fn(x, seed=1), fn(x, seed=2)
        value = next(iter(first.values()))
        assert first["ci_low"] <= value <= first["ci_high"]
        assert first == again
        assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"])
    pair = cohen_kappa_pairs(x, seed=1)["pairs"][0]
    assert pair["ci_low"] <= pair["kappa"] <= pair["ci_high"]
    no_boot = krippendorff_alpha(x, n_boot=0)
    assert math.isnan(no_boot["ci_low"]) and no_boot["reason"] is None


# ---- the α implied by a noise level ---------------------------------------------------------------


def simulate(noise: float, pi: list[float], items: int, annotators: int, missing: float, seed: int) -> np.ndarray:
    """Annotators who give the true label w.p. 1 − ε and a uniformly random category w.p. ε."""
    gen = np.random.default_rng(seed)
    k = len(pi)
    truth = gen.choice(k, size=items, p=pi)
    random_label = gen.integers(0, k, size=(annotators, items))
    x = np.where(gen.random((annotators, items)) < noise, random_label, truth).astype(np.float64)
    x[gen.random(x.shape) < missing] = NAN
    return x


@pytest.mark.parametrize(("level", "noise", "pi"), [
    ("nominal", 0.4, [0.4, 0.3, 0.2, 0.1]),
    ("nominal", 0.1, [0.7, 0.3]),
    ("ordinal", 0.3, [0.1, 0.2, 0.4, 0.2, 0.1]),
    ("interval", 0.5, [0.3, 0.1, 0.1, 0.2, 0.3]),
])
def test_implied_alpha_matches_simulation(level, noise, pi):
    x = simulate(noise, pi, items=50_000, annotators=4, missing=0.3, seed=0)  # SE of α ≈ 0.003
    observed = krippendorff_alpha(x, level, n_boot=0)["alpha"]
    assert observed == pytest.approx(implied_alpha(noise, pi, level), abs=0.012)
    if level == "nominal":  # Fleiss' κ has the same limit
        assert fleiss_kappa(x, n_boot=0)["kappa"] == pytest.approx(implied_alpha(noise, pi), abs=0.012)


def test_implied_alpha_closed_forms():
    pi = [0.5, 0.3, 0.2]
    for eps in (0.0, 0.25, 0.6, 1.0):
        r, s, k = (1 - eps) ** 2, sum(p * p for p in pi), len(pi)
        assert implied_alpha(eps, pi) == pytest.approx(r * (1 - s) / (1 - r * s - (1 - r) / k))
        assert implied_alpha(eps, [0.25] * 4) == pytest.approx((1 - eps) ** 2)  # uniform truth
    assert implied_alpha(0.0, pi, "ordinal") == pytest.approx(1.0)
    assert implied_alpha(1.0, pi, "interval") == pytest.approx(0.0)
    assert math.isnan(implied_alpha(0.0, [1.0, 0.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        implied_alpha(0.1, [0.5, 0.6])


# ---- annotators -----------------------------------------------------------------------------------


def test_annotator_quality_hand_counted():
    x = [[0, 0, 1, 1],
         [0, 1, 1, NAN],
         [0, 1, 0, 1]]
    out = annotator_quality(x, gold={0: 0, 2: 1, 9: 0}, majority_threshold=0.64, gold_threshold=0.7, min_items=2)
    rows = {r["annotator"]: r for r in out["annotators"]}
    # annotator 0 vs the others' modes: item 0 {0} ✓ 1; item 1 {1} ✗ 0; item 2 {0, 1} tie -> ½; item 3 {1} ✓ 1
    assert rows[0]["majority_agreement"] == pytest.approx(2.5 / 4)
    # annotator 1: item 0 ✓ 1; item 1 {0, 1} -> ½; item 2 {0, 1} -> ½ (item 3 not judged) -> 2/3
    assert rows[1]["majority_agreement"] == pytest.approx(2 / 3) and rows[1]["n_compared"] == 3
    # annotator 2: 1, ½, 0 (others both 1), 1 (only annotator 0 on item 3) -> 2.5/4
    assert rows[2]["majority_agreement"] == pytest.approx(2.5 / 4)
    # gold items 0 (label 0) and 2 (label 1); item 9 was never judged and is ignored
    assert [rows[a]["gold_accuracy"] for a in range(3)] == [1.0, 1.0, 0.5]
    assert out["flagged"] == [0, 2]
    assert len(rows[2]["reasons"]) == 2 and "gold accuracy 0.50" in rows[2]["reasons"][1]
    # too few items to judge anyone: reported but not flagged
    assert annotator_quality(x, gold={0: 0, 2: 1}, majority_threshold=0.9, min_items=5)["flagged"] == []


def test_gold_labels_must_be_categories():
    with pytest.raises(ValueError, match="gold label 'z'"):
        annotator_quality(judgments_from_matrix([[0, 1]], categories=["a", "b"]), gold={0: "z"})


# ---- position bias and human-vs-model scores ------------------------------------------------------


def test_position_bias_hand_counted_and_clustered():
    chose_left = [True, True, False, None, True, False]
    out = position_bias(chose_left)
    # 3 left, 2 right, 1 tie -> 3/5
    assert out["left_share"] == pytest.approx(0.6)
    assert (out["n_left"], out["n_right"], out["n_ties"], out["n"]) == (3, 2, 1, 6)
    assert out["ci_low"] <= 0.6 <= out["ci_high"]
    by_item = position_bias(chose_left, items=["a", "a", "b", "b", "c", "c"])
    # per item left/decided: a 2/2, b 0/1, c 1/2 -> (2 + 0 + 1) / (2 + 1 + 2) = 3/5 over 3 units
    assert by_item["left_share"] == pytest.approx(0.6) and by_item["n_units"] == 3
    assert math.isnan(position_bias([None, float("nan")])["left_share"])


def test_human_consistency_score_hand_counted():
    out = human_consistency_score(["model", "tie", "human", "human", "Model"])
    # model or tie: 2 + 1 of 5
    assert out["score"] == pytest.approx(0.6)
    assert (out["model_share"], out["tie_share"], out["human_share"]) == pytest.approx((0.4, 0.2, 0.4))
    assert out["ci_low"] <= out["score"] <= out["ci_high"]
    with pytest.raises(ValueError, match="one of model, tie, human"):
        human_consistency_score(["model", "left"])


def test_identification_accuracy_near_chance_when_indistinguishable():
    gen = np.random.default_rng(0)
    out = identification_accuracy(gen.random(2000) < 0.5)
    assert out["ci_low"] < 0.5 < out["ci_high"] and out["n"] == 2000
    assert identification_accuracy([True, True, False, True])["accuracy"] == pytest.approx(0.75)


def test_report_is_json_ready():
    j = judgments_from_triples([(f"a{a}", f"q{i}", int(v)) for a, row in enumerate(random_matrix(2, 3, 12))
                                for i, v in enumerate(row) if not np.isnan(v)])
    out = agreement_report(j, levels=("nominal", "ordinal"), gold={"q0": 1}, n_boot=50)
    json.dumps(out)
    assert out["n_annotators"] == 3 and set(out["krippendorff_alpha"]) == {"nominal", "ordinal"}
    assert len(out["cohen_kappa"]["pairs"]) == 3 and len(out["per_item"]["items"]) == out["n_items"]
