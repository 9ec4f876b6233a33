"""Inter-annotator agreement: percent agreement, Cohen's κ, Fleiss' κ, Krippendorff's α, annotator
quality, position bias and the human-vs-model scores of the annotation app. Pure numpy, no Ray.

Judgments are a reliability matrix X [n_annotators, n_items]: X[a, i] is the index (0..K−1) of the
category annotator a gave item i, NaN where a did not judge i (annotators do not judge every item).
`judgments_from_triples` builds it from database rows (annotator, item, value). Every statistic is a
function of the value counts n_ic = #{a : X[a, i] = c} [n_items, K], so the bootstrap resamples items
(the units sampled independently) by giving each item a weight w_i = how often it was drawn: every
statistic below is a ratio of weighted sums over items, and the point estimate is the same function
at w = 1. Intervals are percentile bootstrap 95% intervals (Efron & Tibshirani 1993, ch. 13) seeded
through `raylign.runtime.rng(seed, Purpose.BOOTSTRAP)`, so reports repeat run to run.

A statistic that is undefined on the data (no item judged twice, no variation, no items in common) is
NaN with a `reason` string in its dict, never an exception from deep inside.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from raylign.runtime import Purpose, rng

DEFAULT_BOOTSTRAP = 1000
LEVELS = ("nominal", "ordinal", "interval")
Level = Literal["nominal", "ordinal", "interval"]
NAN = float("nan")
_BOOTSTRAP_CELLS = 2_000_000  # weights drawn per chunk (n_boot × n_items), bounds the memory used


# ---- judgments ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Judgments:
    """A reliability matrix with its labels: rows are annotators, columns items, values category indices."""

    matrix: np.ndarray  # [n_annotators, n_items] float64: category index 0..K−1, NaN = not judged
    annotators: tuple[Hashable, ...]  # row labels
    items: tuple[Hashable, ...]  # column labels
    categories: tuple[Hashable, ...]  # category labels in order (the order "ordinal" uses)


def judgments_from_matrix(matrix: Any, categories: Sequence[Hashable] | None = None) -> Judgments:
    """Wrap a [n_annotators, n_items] matrix of category indices (NaN = missing) as `Judgments`.

    Annotators and items are labelled 0..n−1; categories default to 0..max index.
    """
    x = np.array(matrix, dtype=np.float64, ndmin=2)
    if x.ndim != 2:
        raise ValueError(f"judgments must be a [n_annotators, n_items] matrix, got shape {x.shape}")
    seen = x[~np.isnan(x)]
    if not np.all(np.isfinite(seen)) or np.any(seen < 0) or np.any(seen != np.round(seen)):
        raise ValueError("judgments must be category indices 0, 1, 2, ... (or NaN for not judged)")
    n_categories = len(categories) if categories is not None else int(seen.max()) + 1 if len(seen) else 0
    if len(seen) and seen.max() >= n_categories:
        raise ValueError(f"category index {int(seen.max())} but only {n_categories} categories")
    cats = tuple(categories) if categories is not None else tuple(range(n_categories))
    return Judgments(x, tuple(range(x.shape[0])), tuple(range(x.shape[1])), cats)


def judgments_from_triples(
    triples: Iterable[tuple[Hashable, Hashable, Hashable]],
    categories: Sequence[Hashable] | None = None,
    keep: Literal["error", "last"] = "error",
) -> Judgments:
    """Build `Judgments` from rows (annotator, item, value), e.g. straight from the judgments table.

    Annotators and items keep their first-seen order; a value of None is no judgment. `categories`
    gives the category labels in order (needed for ordinal data whose labels do not sort, e.g.
    "A much better" … "B much better"); by default the sorted distinct values. A second judgment by
    the same annotator of the same item is an error, or with keep="last" replaces the first (an
    append-only store records a revised judgment as a new row).
    """
    if keep not in ("error", "last"):
        raise ValueError(f"keep must be 'error' or 'last', got {keep!r}")
    cells: dict[tuple[Hashable, Hashable], Hashable] = {}
    annotators: dict[Hashable, int] = {}
    items: dict[Hashable, int] = {}
    for annotator, item, value in triples:
        annotators.setdefault(annotator, len(annotators))
        items.setdefault(item, len(items))
        if value is None:
            continue
        if keep == "error" and (annotator, item) in cells:
            raise ValueError(f"annotator {annotator!r} judged item {item!r} twice; pass keep='last' to keep "
                             "the latest judgment")
        cells[(annotator, item)] = value
    cats = _category_order(cells.values(), categories)
    index = {c: k for k, c in enumerate(cats)}
    x = np.full((len(annotators), len(items)), np.nan)
    for (annotator, item), value in cells.items():
        x[annotators[annotator], items[item]] = index[value]
    return Judgments(x, tuple(annotators), tuple(items), cats)


def _category_order(values: Iterable[Hashable], categories: Sequence[Hashable] | None) -> tuple[Hashable, ...]:
    distinct = set(values)
    if categories is None:
        try:
            return tuple(sorted(distinct))  # type: ignore[type-var]
        except TypeError:
            raise ValueError("judgment values of mixed types do not sort; pass categories=[...] in order") from None
    unknown = distinct - set(categories)
    if unknown:
        raise ValueError(f"judgment values {sorted(map(repr, unknown))} are not among categories {list(categories)}")
    return tuple(categories)


def _as_judgments(data: Judgments | Any) -> Judgments:
    return data if isinstance(data, Judgments) else judgments_from_matrix(data)


def value_counts(data: Judgments | Any) -> np.ndarray:
    """n_ic = number of annotators who put item i in category c: [n_items, K] int."""
    j = _as_judgments(data)
    n, k = j.matrix.shape[1], len(j.categories)
    _, item = np.nonzero(~np.isnan(j.matrix))  # one entry per judgment
    cat = j.matrix[~np.isnan(j.matrix)].astype(np.int64)  # same row-major order as np.nonzero
    return np.bincount(item * k + cat, minlength=n * k).reshape(n, k)


# ---- bootstrap over items -----------------------------------------------------------------------


def _weights(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n units as weight matrices W [b, n], W[r, i] = times unit i was drawn."""
    gen = rng(seed, Purpose.BOOTSTRAP)
    chunk = max(1, _BOOTSTRAP_CELLS // max(n, 1))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = gen.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _estimate(stat: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int, seed: int,
              confidence: float = 0.95) -> tuple[float, float, float]:
    """(point, ci_low, ci_high) of a statistic of unit weights: point = stat(1), interval = percentile
    interval of stat(W) over resamples; resamples where the statistic is undefined (NaN) are dropped."""
    if n == 0:
        return NAN, NAN, NAN
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(stat(np.ones((1, n)))[0])
        if n_boot <= 0 or not math.isfinite(point):
            return point, NAN, NAN
        stats = np.concatenate([stat(w) for w in _weights(n, n_boot, seed)])
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return point, NAN, NAN
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return point, float(lo), float(hi)


def _ratio(num: np.ndarray, den: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic Σ_i w_i num_i / Σ_i w_i den_i (a mean, or a ratio estimate over clusters)."""
    return lambda w: (w @ num) / (w @ den)


def _summary(name: str, point: float, lo: float, hi: float, reason: str | None, **counts: Any) -> dict[str, Any]:
    return {name: point, "ci_low": lo, "ci_high": hi, **counts, "reason": reason if not math.isfinite(point) else None}


# ---- percent agreement and Fleiss' κ ------------------------------------------------------------


_NOT_PAIRABLE = "no item was judged by two or more annotators: nothing to compare"


def _pairable(counts: np.ndarray) -> np.ndarray:
    """The items judged by at least two annotators (the only ones that say anything about agreement)."""
    return counts[counts.sum(axis=1) >= 2]


def _item_agreement(counts: np.ndarray) -> np.ndarray:
    """P_i = Σ_c n_ic (n_ic − 1) / (m_i (m_i − 1)), the share of agreeing annotator pairs on item i."""
    m = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (counts * (counts - 1)).sum(axis=1) / (m * (m - 1))


def item_agreement(data: Judgments | Any) -> dict[str, Any]:
    """Per item: judgments m_i, majority category (first in category order on a tie), its share
    max_c n_ic / m_i, and the pairwise agreement P_i (NaN for items judged fewer than twice)."""
    j = _as_judgments(data)
    counts = value_counts(j)
    m = counts.sum(axis=1)
    top = counts.argmax(axis=1) if counts.shape[1] else np.zeros(len(counts), dtype=int)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = counts.max(axis=1, initial=0) / m
    return {
        "items": list(j.items),
        "n_judgments": [int(v) for v in m],
        "majority": [j.categories[t] if mi else None for t, mi in zip(top, m, strict=True)],
        "majority_share": [float(s) for s in share],
        "agreement": [float(p) for p in _item_agreement(counts)],
    }


def percent_agreement(data: Judgments | Any, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Overall percent agreement P̄ = (1/N') Σ_i P_i over the N' items judged at least twice, P_i the
    share of agreeing pairs of annotators on item i (Fleiss 1971, eq. 2–3). With two annotators per item
    it is the share of items they agree on. Bootstrap 95% interval over items."""
    counts = _pairable(value_counts(data))
    p = _item_agreement(counts)
    point, lo, hi = _estimate(_ratio(p, np.ones_like(p)), len(p), n_boot, seed)
    return _summary("agreement", point, lo, hi, _NOT_PAIRABLE, n_items=len(p))


def _fleiss(counts: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """κ(w) for item weights w [b, N']: P̄ = Σ w_i P_i / Σ w_i, p_c = Σ w_i n_ic / Σ w_i m_i,
    P̄_e = Σ_c p_c², κ = (P̄ − P̄_e) / (1 − P̄_e), with 1 − P̄_e computed from counts so that a single
    category gives exactly 0 (κ = NaN)."""
    p_i = _item_agreement(counts)  # [N']

    def kappa(w: np.ndarray) -> np.ndarray:
        p_bar = (w @ p_i) / w.sum(axis=1)  # [b]
        totals = w @ counts  # [b, K]
        t = totals.sum(axis=1)  # [b] = Σ w_i m_i
        one_minus_pe = (t**2 - (totals**2).sum(axis=1)) / t**2
        return (p_bar - (1 - one_minus_pe)) / np.where(one_minus_pe == 0, np.nan, one_minus_pe)

    return kappa


def fleiss_kappa(data: Judgments | Any, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Fleiss' κ = (P̄ − P̄_e) / (1 − P̄_e) (Fleiss 1971, "Measuring nominal scale agreement among many
    raters", eq. 2–9): P̄ the mean pairwise agreement per item (`percent_agreement`), P̄_e = Σ_c p_c²
    the agreement expected by chance from the pooled category shares p_c = Σ_i n_ic / Σ_i m_i.

    Fleiss assumes every item has the same number m of judgments; with missing judgments this is the
    usual generalisation (P_i with each item's own m_i, items judged fewer than twice dropped), equal to
    Fleiss' κ when m_i is constant. NaN when a single category is ever used (P̄_e = 1).
    """
    counts = _pairable(value_counts(data))
    point, lo, hi = _estimate(_fleiss(counts), len(counts), n_boot, seed)
    reason = _NOT_PAIRABLE if not len(counts) else "only one category was used: chance agreement is 1, κ is 0/0"
    return _summary("kappa", point, lo, hi, reason, n_items=len(counts))


# ---- Krippendorff's α ---------------------------------------------------------------------------


def _item_coincidences(counts: np.ndarray) -> np.ndarray:
    """o_u,ck = (n_uc n_uk − [c = k] n_uc) / (m_u − 1): item u's pairs of values c–k, [N', K, K]
    (Krippendorff 2011, §C.3); items with m_u < 2 must be dropped first."""
    m = counts.sum(axis=1)
    pairs = counts[:, :, None] * counts[:, None, :] - counts[:, :, None] * np.eye(counts.shape[1])
    return pairs / (m - 1)[:, None, None]


def _squared_distances(level: str, n_c: np.ndarray, values: np.ndarray) -> np.ndarray:
    """δ²_ck [..., K, K] for marginals n_c [..., K] (Krippendorff 2011, §C.4 "metric differences"):
    nominal 1[c ≠ k]; interval (v_c − v_k)²; ordinal (Σ_{g=c}^{k} n_g − (n_c + n_k)/2)², which is
    (M_k − M_c)² with the mid-rank M_c = Σ_{g≤c} n_g − n_c/2, so it changes with each resample."""
    k = n_c.shape[-1]
    if level == "nominal":
        return 1.0 - np.eye(k)
    if level == "interval":
        return (values[:, None] - values[None, :]) ** 2
    mid = np.cumsum(n_c, axis=-1) - n_c / 2  # [..., K]
    return (mid[..., :, None] - mid[..., None, :]) ** 2


def _alpha(counts: np.ndarray, level: str, values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """α(w) for item weights w [b, N']: o_ck = Σ_u w_u o_u,ck, n_c = Σ_k o_ck, n = Σ_c n_c and
    α = 1 − D_o / D_e = 1 − (n − 1) Σ_ck o_ck δ²_ck / Σ_ck n_c n_k δ²_ck."""
    k = counts.shape[1]
    o_items = _item_coincidences(counts).reshape(len(counts), k * k)  # [N', K·K]

    def alpha(w: np.ndarray) -> np.ndarray:
        o = (w @ o_items).reshape(-1, k, k)  # [b, K, K]
        n_c = o.sum(axis=2)  # [b, K]
        n = n_c.sum(axis=1)  # [b]
        d2 = _squared_distances(level, n_c, values)  # [K, K] or [b, K, K]
        observed = (o * d2).sum(axis=(1, 2))
        expected = (n_c[:, :, None] * n_c[:, None, :] * d2).sum(axis=(1, 2))
        return 1 - (n - 1) * observed / np.where(expected == 0, np.nan, expected)

    return alpha


def _category_values(j: Judgments, values: Sequence[float] | None) -> np.ndarray:
    """Numeric value of each category for the interval metric: `values`, else the category labels when
    they are numbers (a Likert 1–5), else the indices 0..K−1."""
    if values is not None:
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (len(j.categories),) or not np.all(np.isfinite(v)):
            raise ValueError(f"values must be {len(j.categories)} finite numbers, one per category")
        return v
    numeric = all(isinstance(c, (int, float, np.number)) and not isinstance(c, bool) for c in j.categories)
    return np.asarray(j.categories if numeric else range(len(j.categories)), dtype=np.float64)


def krippendorff_alpha(
    data: Judgments | Any,
    level: Level = "nominal",
    values: Sequence[float] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Krippendorff's α = 1 − D_o / D_e (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability").

    From the coincidence matrix o_ck = Σ_u Σ_{a≠b} [x_ua = c][x_ub = k] / (m_u − 1) over the items u
    with m_u ≥ 2 judgments (missing judgments simply do not enter), n_c = Σ_k o_ck, n = Σ_c n_c:
      D_o = (1/n) Σ_ck o_ck δ²_ck,   D_e = (1/(n(n−1))) Σ_ck n_c n_k δ²_ck.
    δ² is the level's metric (`_squared_distances`): "nominal" for choices, "ordinal" for preference
    strengths and Likert ratings (only the order of the categories counts), "interval" when the
    distances between category `values` count (default: numeric category labels, else indices).
    α = 1 is perfect agreement, 0 agreement at chance, < 0 systematic disagreement. NaN when no item
    has two judgments, or when every pairable judgment is one category (D_e = 0, α = 0/0, which
    Krippendorff leaves undefined). Bootstrap 95% interval over items.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    j = _as_judgments(data)
    counts = _pairable(value_counts(j))
    stat = _alpha(counts, level, _category_values(j, values))
    point, lo, hi = _estimate(stat, len(counts), n_boot, seed)
    reason = _NOT_PAIRABLE if not len(counts) else "all pairable judgments are the same: no variation, α is 0/0"
    return {**_summary("alpha", point, lo, hi, reason, n_items=len(counts), n_values=int(counts.sum())),
            "level": level}


def implied_alpha(
    noise: float,
    true_distribution: Sequence[float],
    level: Level = "nominal",
    values: Sequence[float] | None = None,
) -> float:
    """The Krippendorff α expected (many items) from annotators who each, independently, give the true
    label with probability 1 − ε and a uniformly random one of the K categories with probability ε.

    Derivation. With true labels t ~ π, one annotator answers c with q_t(c) = (1 − ε)[c = t] + ε/K, and
    two annotators of one item answer independently given t. The coincidence matrix counts, for each
    item, all ordered pairs of its m_u(m_u − 1) annotator pairs divided by m_u − 1, so E[o_ck] / n =
    Σ_t π_t q_t(c) q_t(k) =: Q_ck whatever the m_u; its margin is the pooled share of category c,
    p_c = Σ_t π_t q_t(c) = (1 − ε) π_c + ε/K. As n → ∞ (n(n−1) ≈ n²):
      D_o → Σ_ck Q_ck δ²_ck,   D_e → Σ_ck p_c p_k δ²_ck,   α(ε) = 1 − D_o / D_e,
    δ² evaluated at the marginals p (the ordinal metric scales with n², which cancels). For nominal
    data Σ_c q_t(c)² = (1 − ε)² + (1 − (1 − ε)²)/K for every t, and with r = (1 − ε)²:
      α = r (1 − Σ_c π_c²) / (1 − r Σ_c π_c² − (1 − r)/K),
    so α = 1 at ε = 0, 0 at ε = 1, and α = (1 − ε)² for uniform true labels. Fleiss' κ has the same
    limit. NaN when D_e = 0 (a single true category and ε = 0).
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be a probability in [0, 1], got {noise}")
    pi = np.asarray(true_distribution, dtype=np.float64)
    if pi.ndim != 1 or len(pi) < 2 or np.any(pi < 0) or not np.isclose(pi.sum(), 1.0):
        raise ValueError("true_distribution must be K >= 2 non-negative shares that sum to 1")
    k = len(pi)
    q = (1 - noise) * np.eye(k) + noise / k  # [t, c] = q_t(c)
    joint = np.einsum("t,tc,tk->ck", pi, q, q)  # Q [K, K]
    p = pi @ q  # [K]
    v = np.arange(k, dtype=np.float64) if values is None else np.asarray(values, dtype=np.float64)
    d2 = _squared_distances(level, p, v)
    expected = float((np.outer(p, p) * d2).sum())
    return 1 - float((joint * d2).sum()) / expected if expected > 0 else NAN


# ---- Cohen's κ per pair of annotators -----------------------------------------------------------


def _disagreement_weights(weights: str | None, k: int) -> np.ndarray:
    i = np.arange(k, dtype=np.float64)
    if weights is None:
        return 1.0 - np.eye(k)
    if weights == "linear":
        return np.abs(i[:, None] - i[None, :])
    if weights == "quadratic":
        return (i[:, None] - i[None, :]) ** 2
    raise ValueError(f"unknown weights {weights!r}; choose None, 'linear' or 'quadratic'")


def _cohen(x: np.ndarray, y: np.ndarray, k: int, dis: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """κ(w) over the items both annotators judged, from the weighted confusion matrix C_ck = Σ_i w_i
    [x_i = c][y_i = k], row/column totals r, s and total N: κ = 1 − N Σ v_ck C_ck / Σ v_ck r_c s_k."""
    onehot = np.zeros((len(x), k * k))
    onehot[np.arange(len(x)), x * k + y] = 1.0  # [n, K·K]

    def kappa(w: np.ndarray) -> np.ndarray:
        c = (w @ onehot).reshape(-1, k, k)  # [b, K, K]
        r, s, n = c.sum(axis=2), c.sum(axis=1), c.sum(axis=(1, 2))
        expected = (r[:, :, None] * s[:, None, :] * dis).sum(axis=(1, 2))
        return 1 - n * (c * dis).sum(axis=(1, 2)) / np.where(expected == 0, np.nan, expected)

    return kappa


def cohen_kappa_pairs(
    data: Judgments | Any,
    weights: Literal["linear", "quadratic"] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Cohen's κ for every pair of annotators, on the items both judged (Cohen 1960, "A coefficient of
    agreement for nominal scales"): κ = (p_o − p_e) / (1 − p_e), p_o the share of those items they put
    in the same category, p_e = Σ_c p_a(c) p_b(c) from each annotator's own category shares.

    weights="linear" | "quadratic" gives weighted κ for ordered categories (Cohen 1968):
    κ_w = 1 − Σ v_ck p_ck / Σ v_ck p_a(c) p_b(k) with disagreement weights v = |c − k| or (c − k)² on
    category positions. Each pair has a bootstrap 95% interval over its common items; NaN (with a
    reason) for pairs with no common item or whose chance agreement is 1 (one category each, the same).
    `mean_kappa` averages the defined pairs (Light 1971).
    """
    j = _as_judgments(data)
    k = len(j.categories)
    dis = _disagreement_weights(weights, k)
    pairs = []
    for a, b in itertools.combinations(range(len(j.annotators)), 2):
        both = ~np.isnan(j.matrix[a]) & ~np.isnan(j.matrix[b])
        x, y = j.matrix[a, both].astype(int), j.matrix[b, both].astype(int)
        point, lo, hi = _estimate(_cohen(x, y, k, dis), len(x), n_boot, seed)
        reason = "no items judged by both" if not len(x) else "chance agreement is 1 (one category), κ is 0/0"
        pairs.append({"annotators": [j.annotators[a], j.annotators[b]],
                      **_summary("kappa", point, lo, hi, reason, n_items=len(x),
                                 agreement=float(np.mean(x == y)) if len(x) else NAN)})
    defined = [p["kappa"] for p in pairs if math.isfinite(p["kappa"])]
    return {"pairs": pairs, "mean_kappa": float(np.mean(defined)) if defined else NAN, "weights": weights}


# ---- annotators: agreement with the majority and accuracy on gold items -------------------------


def _majority_credit(counts_others: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1/|modes| when the annotator's label is one of the modal labels of the others, else 0."""
    top = counts_others.max(axis=1, keepdims=True, initial=0)
    modal = counts_others == top  # [n, K]
    return modal[np.arange(len(labels)), labels] / modal.sum(axis=1)


def _gold_indices(j: Judgments, gold: Mapping[Hashable, Hashable] | None) -> np.ndarray:
    """[n_items] gold category index per item, −1 where the item has no gold label."""
    out = np.full(len(j.items), -1)
    if not gold:
        return out
    cat = {c: k for k, c in enumerate(j.categories)}
    col = {item: i for i, item in enumerate(j.items)}
    for item, label in gold.items():
        if label not in cat:
            raise ValueError(f"gold label {label!r} of item {item!r} is not among categories {list(j.categories)}")
        if item in col:  # gold items nobody judged say nothing about anyone
            out[col[item]] = cat[label]
    return out


def annotator_quality(
    data: Judgments | Any,
    gold: Mapping[Hashable, Hashable] | None = None,
    majority_threshold: float = 0.6,
    gold_threshold: float = 0.7,
    min_items: int = 5,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Per annotator: agreement with the majority of the *other* annotators and accuracy on gold items.

    majority agreement = (1/n_a) Σ_i [x_ai ∈ modes_i] / |modes_i| over the n_a items a judged that
    someone else judged too, modes_i the most frequent categories among the others' judgments (leaving
    a out, so a cannot agree with itself; a tie among modes gives fractional credit, the chance of
    matching a majority picked at random among them). gold accuracy = share of a's judged gold items
    (`gold`: item → category label) a put in the gold category. Each with a bootstrap 95% interval
    over items. An annotator is flagged when an estimate on at least `min_items` items is below its
    threshold; `reasons` says which.
    """
    j = _as_judgments(data)
    counts = value_counts(j)
    gold_idx = _gold_indices(j, gold)
    rows = []
    for a, annotator in enumerate(j.annotators):
        judged = ~np.isnan(j.matrix[a])
        labels = np.nan_to_num(j.matrix[a]).astype(int)  # [N]; read only where judged
        others = counts - judged[:, None] * (labels[:, None] == np.arange(counts.shape[1]))  # [N, K]
        compared = judged & (others.sum(axis=1) > 0)
        credit = _majority_credit(others[compared], labels[compared])
        maj = _estimate(_ratio(credit, np.ones_like(credit)), len(credit), n_boot, seed)
        on_gold = judged & (gold_idx >= 0)
        correct = (labels[on_gold] == gold_idx[on_gold]).astype(np.float64)
        acc = _estimate(_ratio(correct, np.ones_like(correct)), len(correct), n_boot, seed)
        reasons = []
        if len(credit) >= min_items and maj[0] < majority_threshold:
            reasons.append(f"majority agreement {maj[0]:.2f} < {majority_threshold} on {len(credit)} items")
        if len(correct) >= min_items and acc[0] < gold_threshold:
            reasons.append(f"gold accuracy {acc[0]:.2f} < {gold_threshold} on {len(correct)} gold items")
        rows.append({
            "annotator": annotator, "n_judged": int(judged.sum()),
            "majority_agreement": maj[0], "majority_ci": [maj[1], maj[2]], "n_compared": len(credit),
            "gold_accuracy": acc[0], "gold_ci": [acc[1], acc[2]], "n_gold": len(correct),
            "flagged": bool(reasons), "reasons": reasons,
        })
    return {"annotators": rows, "flagged": [r["annotator"] for r in rows if r["flagged"]],
            "majority_threshold": majority_threshold, "gold_threshold": gold_threshold, "min_items": min_items}


# ---- judgments of pairs: position bias and human-vs-model scores --------------------------------


def _clustered(num: np.ndarray, den: np.ndarray, items: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    """Sum per-judgment numerators and denominators per item, so the bootstrap resamples items (the
    judgments of one item are not independent); without items each judgment is its own unit."""
    if items is None:
        return num, den
    if len(items) != len(num):
        raise ValueError(f"{len(items)} items for {len(num)} judgments")
    index: dict[Hashable, int] = {}
    unit = np.array([index.setdefault(i, len(index)) for i in items], dtype=np.int64)
    return (np.bincount(unit, weights=num, minlength=len(index)),
            np.bincount(unit, weights=den, minlength=len(index)))


def _share(name: str, num: np.ndarray, den: np.ndarray, items: Sequence[Hashable] | None,
           n_boot: int, seed: int, reason: str) -> dict[str, Any]:
    unit_num, unit_den = _clustered(num, den, items)
    point, lo, hi = _estimate(_ratio(unit_num, unit_den), len(unit_num), n_boot, seed)
    return _summary(name, point, lo, hi, reason, n=len(num), n_units=len(unit_num))


def position_bias(
    chose_left: Sequence[bool | None],
    items: Sequence[Hashable] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Share of pairwise judgments that chose the answer shown on the left.

    left_share = #left / (#left + #right) over the judgments that chose a side (None or NaN = a tie or
    no preference, counted apart). With the sides randomised, 0.5 means no position bias. Bootstrap
    95% interval over judgments, or over `items` (one id per judgment) when given.
    """
    tie = np.array([v is None or (isinstance(v, float) and math.isnan(v)) for v in chose_left], dtype=bool)
    left = np.array([bool(v) and not t for v, t in zip(chose_left, tie, strict=True)], dtype=np.float64)
    out = _share("left_share", left, (~tie).astype(np.float64), items, n_boot, seed, "no judgment chose a side")
    return {**out, "n_left": int(left.sum()), "n_right": int((~tie).sum() - left.sum()), "n_ties": int(tie.sum())}


PREFERENCES = ("model", "tie", "human")


def human_consistency_score(
    preferences: Sequence[str],
    items: Sequence[Hashable] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Human consistency score of a human-vs-model comparison: the share of judgments that prefer the
    model's answer or call it a tie, (#model + #tie) / n, each judgment one of "model", "tie", "human".

    0.5 or more means people find the model's answers at least as good as a person's about half the
    time or more. Bootstrap 95% interval over judgments, or over `items` when given; also the shares
    of each answer.
    """
    prefs = np.asarray([str(p).lower() for p in preferences], dtype=object)
    unknown = sorted(set(prefs) - set(PREFERENCES))
    if unknown:
        raise ValueError(f"preferences must be one of {', '.join(PREFERENCES)}; got {unknown}")
    ok = np.isin(prefs, ["model", "tie"]).astype(np.float64)
    out = _share("score", ok, np.ones(len(prefs)), items, n_boot, seed, "no judgments")
    shares = {f"{p}_share": float(np.mean(prefs == p)) if len(prefs) else NAN for p in PREFERENCES}
    return {**out, **shares}


def identification_accuracy(
    correct: Sequence[bool],
    items: Sequence[Hashable] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy of "which one did a person write?" judgments: the share answered correctly.

    0.5 means people cannot tell the model's text from a person's (chance with two answers); 1 means
    always told apart. Bootstrap 95% interval over judgments, or over `items` when given.
    """
    hits = np.asarray(correct, dtype=bool).reshape(-1).astype(np.float64)
    return _share("accuracy", hits, np.ones_like(hits), items, n_boot, seed, "no judgments")


# ---- everything at once -------------------------------------------------------------------------


def agreement_report(
    data: Judgments | Any,
    levels: Sequence[Level] = ("nominal",),
    values: Sequence[float] | None = None,
    gold: Mapping[Hashable, Hashable] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Overall and per-item agreement of one task's judgments, JSON-ready: counts, percent agreement,
    Fleiss' κ, Krippendorff's α at each of `levels`, Cohen's κ per annotator pair, each annotator's
    agreement with the majority and gold accuracy, and per-item agreement."""
    j = _as_judgments(data)
    return {
        "n_annotators": len(j.annotators),
        "n_items": len(j.items),
        "n_judgments": int((~np.isnan(j.matrix)).sum()),
        "categories": list(j.categories),
        "percent_agreement": percent_agreement(j, n_boot, seed),
        "fleiss_kappa": fleiss_kappa(j, n_boot, seed),
        "krippendorff_alpha": {lv: krippendorff_alpha(j, lv, values, n_boot, seed) for lv in levels},
        "cohen_kappa": cohen_kappa_pairs(j, n_boot=n_boot, seed=seed),
        "annotators": annotator_quality(j, gold, n_boot=n_boot, seed=seed),
        "per_item": item_agreement(j),
    }
