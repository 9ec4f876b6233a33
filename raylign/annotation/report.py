"""`raylign annotate report`: agreement statistics of an annotations database, as JSON, markdown and PNG.

The statistics are those of `raylign.evaluation.agreement`, over current judgments (corrections
replace what they correct):

  choices   pair items (pairwise and human-vs-model), each judgment one of the categories a, tie, b
            (skips are no judgment). Top-level: krippendorff_alpha (nominal) and its bootstrap 95%
            interval krippendorff_alpha_ci, krippendorff_alpha_ordinal (a < tie < b), fleiss_kappa and
            fleiss_kappa_ci, percent_agreement, cohen_kappa_mean (over annotator pairs), counts; then
            strength (ordinal α over the signed strengths a3 < a2 < a1 < tie < b1 < b2 < b3, from the
            judgments that gave one), position_bias (share of a/b judgments that chose the answer shown
            on the left; 0.5 = none), human_consistency (human-vs-model items: share of judgments
            preferring the model's answer or calling a tie), identification (human-vs-model items:
            accuracy of the "which one did a person write?" answers; 0.5 = indistinguishable),
            annotators (majority agreement, gold accuracy, flags), per_item (each item's pairwise
            agreement P_i and majority share, the least agreed items first) and the full
            `agreement_report` under details.
  ratings   rating items, per criterion: Krippendorff's α interval and ordinal over the 1-7 ratings,
            mean rating, counts.

  time      time per item: median, 90th percentile and mean of the judgments' latency (from the item
            being shown to the answer), overall and per annotator.

Undefined statistics (too few judgments, no variation) are null in JSON, with the reason in details.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np

from raylign.annotation.errors import AnnotationError
from raylign.annotation.store import Judgment, Store
from raylign.annotation.tasks import LIKERT_MAX, LIKERT_MIN, PAIR_KINDS
from raylign.evaluation import agreement as ag

CHOICE_CATEGORIES = ("a", "tie", "b")
# Signed strength: "a, 3 = much better" ... "tie" ... "b, 3": one ordinal scale for the strength α.
SIGNED_STRENGTHS = (-3, -2, -1, 0, 1, 2, 3)
LEAST_AGREED = 10  # items listed in report.md's disagreement table


def signed_strength(choice: str | None, strength: int | None) -> int | None:
    """a with strength s -> -s, b -> +s, tie -> 0; None for a / b without a strength, and skips."""
    if choice == "tie":
        return 0
    if choice in ("a", "b") and strength is not None:
        return -strength if choice == "a" else strength
    return None


def per_item(details: dict[str, Any]) -> dict[str, Any]:
    """Per-item agreement from `agreement_report`'s per_item: the items judged at least twice, least
    agreed first, and the distribution of P_i over them."""
    pi = details["per_item"]
    rows = [{"item_id": i, "n_judgments": n, "majority": m, "majority_share": sh, "agreement": p}
            for i, n, m, sh, p in zip(pi["items"], pi["n_judgments"], pi["majority"], pi["majority_share"],
                                      pi["agreement"], strict=True) if n >= 2]
    rows.sort(key=lambda r: (r["agreement"], r["majority_share"], str(r["item_id"])))
    values = np.array([r["agreement"] for r in rows], dtype=np.float64)
    return {"n_items": len(rows), "mean": float(values.mean()) if len(values) else None,
            "quantiles": {q: float(np.quantile(values, float(q))) if len(values) else None
                          for q in ("0.1", "0.25", "0.5", "0.75", "0.9")},
            "unanimous_share": float(np.mean(values == 1.0)) if len(values) else None, "items": rows}


def time_statistics(judgments: list[Judgment]) -> dict[str, Any]:
    """Time per item from the judgments' latency_ms, overall and per annotator (module docstring)."""
    def summary(ms: list[int]) -> dict[str, Any]:
        v = np.asarray(ms, dtype=np.float64) / 1000.0
        return {"n": len(ms), "median_s": float(np.median(v)), "p90_s": float(np.quantile(v, 0.9)),
                "mean_s": float(v.mean())}
    by: dict[str, list[int]] = {}
    for j in judgments:
        if j.latency_ms is not None:
            by.setdefault(j.annotator, []).append(j.latency_ms)
    every = [ms for v in by.values() for ms in v]
    return {"overall": summary(every) if every else None, "annotators": {a: summary(v) for a, v in by.items()}}


def clean(value: Any) -> Any:
    """JSON-ready: NaN and infinities become null, numpy scalars Python numbers, tuples lists."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def choice_triples(judgments: list[Judgment], item_ids: set[str]) -> list[tuple[Hashable, Hashable, Hashable]]:
    """(annotator, item, choice) of every a / tie / b judgment of the given items (skips left out)."""
    return [(j.annotator, j.item_id, j.choice) for j in judgments
            if j.item_id in item_ids and j.choice in CHOICE_CATEGORIES]


def choice_statistics(store: Store, n_boot: int = ag.DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    items = {s.item_id: s.item for s in store.items() if s.item.kind in PAIR_KINDS}
    current = [j for j in store.current_judgments() if j.item_id in items]
    triples = choice_triples(current, set(items))
    votes = Counter(j.choice for j in current)
    base: dict[str, Any] = {"n_items": len({t[1] for t in triples}), "n_annotators": len({t[0] for t in triples}),
                            "n_judgments": len(triples), "votes": {c: votes.get(c, 0) for c in (*CHOICE_CATEGORIES, "skip")}}
    if not triples:
        return {**base, "krippendorff_alpha": None, "fleiss_kappa": None, "reason": "no a / tie / b judgments yet"}
    data = ag.judgments_from_triples(triples, categories=CHOICE_CATEGORIES)
    gold: dict[Hashable, Hashable] = {i: it.gold for i, it in items.items() if isinstance(it.gold, str)}
    details = ag.agreement_report(data, levels=("nominal", "ordinal"), gold=gold, n_boot=n_boot, seed=seed)
    alpha, alpha_ord = details["krippendorff_alpha"]["nominal"], details["krippendorff_alpha"]["ordinal"]
    kappa = details["fleiss_kappa"]
    left = [None if j.choice == "tie" else j.choice == j.shown_left for j in current if j.choice in CHOICE_CATEGORIES]
    position = ag.position_bias(left, items=[t[1] for t in triples], n_boot=n_boot, seed=seed)
    out = {
        **base,
        "krippendorff_alpha": alpha["alpha"], "krippendorff_alpha_ci": [alpha["ci_low"], alpha["ci_high"]],
        "krippendorff_alpha_ordinal": alpha_ord["alpha"],
        "fleiss_kappa": kappa["kappa"], "fleiss_kappa_ci": [kappa["ci_low"], kappa["ci_high"]],
        "percent_agreement": details["percent_agreement"]["agreement"],
        "cohen_kappa_mean": details["cohen_kappa"]["mean_kappa"],
        "position_bias": position,
        "annotators": details["annotators"]["annotators"],
        "flagged_annotators": details["annotators"]["flagged"],
    }
    strengths = [(j.annotator, j.item_id, signed_strength(j.choice, j.strength)) for j in current]
    strengths = [t for t in strengths if t[2] is not None]
    if any(t[2] != 0 for t in strengths):
        st = ag.krippendorff_alpha(ag.judgments_from_triples(strengths, categories=SIGNED_STRENGTHS), "ordinal",
                                   n_boot=n_boot, seed=seed)
        out["strength"] = {"krippendorff_alpha_ordinal": st["alpha"],
                           "krippendorff_alpha_ordinal_ci": [st["ci_low"], st["ci_high"]],
                           "n_judgments": len(strengths), "reason": st["reason"]}
    hvm = [(j, items[j.item_id].human_side()) for j in current if items[j.item_id].kind == "human-vs-model"]
    rated = [(j, side) for j, side in hvm if j.choice in CHOICE_CATEGORIES]
    if rated:
        prefs = ["tie" if j.choice == "tie" else "human" if j.choice == side else "model" for j, side in rated]
        out["human_consistency"] = ag.human_consistency_score(prefs, items=[j.item_id for j, _ in rated],
                                                              n_boot=n_boot, seed=seed)
    said = [(j, side) for j, side in hvm if j.written_by is not None]
    if said:
        out["identification"] = {**ag.identification_accuracy([j.written_by == side for j, side in said],
                                                              items=[j.item_id for j, _ in said],
                                                              n_boot=n_boot, seed=seed),
                                 "n_judgments": len(said)}
    out["per_item"] = per_item(details)
    out["details"] = details
    return out


def rating_statistics(store: Store, n_boot: int = ag.DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    items = [s.item for s in store.items() if s.item.kind == "rating"]
    ids = {it.item_id for it in items}
    current = [j for j in store.current_judgments() if j.item_id in ids and j.ratings]
    criteria = list(dict.fromkeys(c for it in items for c in (it.criteria or [])))
    out: dict[str, Any] = {}
    scale = tuple(range(LIKERT_MIN, LIKERT_MAX + 1))
    for c in criteria:
        triples: list[tuple[Hashable, Hashable, Hashable]] = [
            (j.annotator, j.item_id, j.ratings[c]) for j in current if j.ratings and c in j.ratings]
        if not triples:
            continue
        data = ag.judgments_from_triples(triples, categories=scale)
        interval = ag.krippendorff_alpha(data, "interval", n_boot=n_boot, seed=seed)
        ordinal = ag.krippendorff_alpha(data, "ordinal", n_boot=n_boot, seed=seed)
        values = [float(t[2]) for t in triples]  # type: ignore[arg-type]
        out[c] = {"krippendorff_alpha_interval": interval["alpha"],
                  "krippendorff_alpha_interval_ci": [interval["ci_low"], interval["ci_high"]],
                  "krippendorff_alpha_ordinal": ordinal["alpha"], "mean_rating": float(np.mean(values)),
                  "n_items": len({t[1] for t in triples}), "n_judgments": len(triples),
                  "histogram": {str(v): values.count(float(v)) for v in scale},
                  "reason": interval["reason"]}
    return out


def build_report(store: Store, n_boot: int = ag.DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Every statistic of the module docstring, JSON-ready."""
    store.require_settings()
    judgments = store.current_judgments()
    report = {
        "db": str(store.path),
        "items": len(store.items()),
        "annotators": [a.name for a in store.annotators()],
        "judgments": len(judgments),
        "corrections": len(store.all_judgments()) - len(judgments),
        "time": time_statistics(judgments),
        "choices": choice_statistics(store, n_boot, seed),
        "ratings": rating_statistics(store, n_boot, seed),
    }
    return clean(report)


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _plots(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ch = report["choices"]
    if ch.get("n_judgments"):
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        votes = ch["votes"]
        axes[0].bar(list(votes), list(votes.values()), color=["#1f77b4", "#999999", "#ff7f0e", "#cccccc"])
        axes[0].set_title("current judgments of pair items")
        rows = ch.get("annotators", [])
        names = [str(r["annotator"]) for r in rows]
        x = np.arange(len(names))
        maj = [r["majority_agreement"] if r["majority_agreement"] is not None else 0.0 for r in rows]
        axes[1].bar(x - 0.2, maj, width=0.4, label="agreement with the others' majority")
        if any(r["gold_accuracy"] is not None for r in rows):
            gold = [r["gold_accuracy"] if r["gold_accuracy"] is not None else 0.0 for r in rows]
            axes[1].bar(x + 0.2, gold, width=0.4, label="gold accuracy")
        axes[1].set_xticks(x, names, rotation=30, ha="right")
        axes[1].set_ylim(0, 1)
        axes[1].set_title(f"annotators (α = {_fmt(ch.get('krippendorff_alpha'))})")
        axes[1].legend(fontsize=8, loc="lower right")
        agreements = [r["agreement"] for r in ch["per_item"]["items"]]
        axes[2].hist(agreements, bins=np.linspace(0, 1, 11), color="#1f77b4")
        axes[2].set_xlabel("pairwise agreement P_i of an item")
        axes[2].set_ylabel("items")
        axes[2].set_title(f"per item ({len(agreements)} judged twice or more)")
        fig.tight_layout()
        fig.savefig(out / "choices.png")
        plt.close(fig)
        written.append("choices.png")
    if report["ratings"]:
        crit = report["ratings"]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        scale = list(range(LIKERT_MIN, LIKERT_MAX + 1))
        width = 0.8 / len(crit)
        for k, (name, stats) in enumerate(crit.items()):
            ax.bar(np.array(scale) + k * width - 0.4 + width / 2, [stats["histogram"][str(v)] for v in scale],
                   width=width, label=name)
        ax.set_xticks(scale)
        ax.set_title("ratings")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ratings.png")
        plt.close(fig)
        written.append("ratings.png")
    return written


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    ch = report["choices"]
    lines = ["# Annotation report", "", f"Database `{report['db']}`: {report['items']} items, "
             f"{len(report['annotators'])} annotators, {report['judgments']} current judgments "
             f"({report['corrections']} corrected).", ""]
    if ch.get("n_judgments"):
        ci = ch["krippendorff_alpha_ci"]
        kci = ch["fleiss_kappa_ci"]
        pb = ch["position_bias"]
        lines += ["## Pair items", "", "| statistic | value | 95% interval |", "|---|---|---|",
                  f"| Krippendorff's α (nominal) | {_fmt(ch['krippendorff_alpha'])} | {_fmt(ci[0])} – {_fmt(ci[1])} |",
                  f"| Krippendorff's α (ordinal a < tie < b) | {_fmt(ch['krippendorff_alpha_ordinal'])} | |",
                  f"| Fleiss' κ | {_fmt(ch['fleiss_kappa'])} | {_fmt(kci[0])} – {_fmt(kci[1])} |",
                  f"| percent agreement | {_fmt(ch['percent_agreement'])} | |",
                  f"| mean Cohen's κ over annotator pairs | {_fmt(ch['cohen_kappa_mean'])} | |",
                  f"| left-side share (position bias; 0.5 = none) | {_fmt(pb['left_share'])} | "
                  f"{_fmt(pb['ci_low'])} – {_fmt(pb['ci_high'])} |"]
        if "strength" in ch:
            st = ch["strength"]
            sci = st["krippendorff_alpha_ordinal_ci"]
            lines.append(f"| Krippendorff's α of strengths (ordinal a3 < … < tie < … < b3) | "
                         f"{_fmt(st['krippendorff_alpha_ordinal'])} | {_fmt(sci[0])} – {_fmt(sci[1])} |")
        if "human_consistency" in ch:
            hc = ch["human_consistency"]
            lines.append(f"| human consistency score (model preferred or tie) | {_fmt(hc['score'])} | "
                         f"{_fmt(hc['ci_low'])} – {_fmt(hc['ci_high'])} |")
        if "identification" in ch:
            ident = ch["identification"]
            lines.append(f"| identification accuracy (which one a person wrote; 0.5 = indistinguishable) | "
                         f"{_fmt(ident['accuracy'])} | {_fmt(ident['ci_low'])} – {_fmt(ident['ci_high'])} |")
        votes = ", ".join(f"{k} {v}" for k, v in ch["votes"].items())
        lines += ["", f"{ch['n_judgments']} judgments of {ch['n_items']} items by {ch['n_annotators']} annotators "
                  f"(votes: {votes}).", "", "| annotator | judged | majority agreement | gold accuracy | flagged |",
                  "|---|---|---|---|---|"]
        for r in ch["annotators"]:
            lines.append(f"| {r['annotator']} | {r['n_judged']} | {_fmt(r['majority_agreement'])} | "
                         f"{_fmt(r['gold_accuracy'])} | {'; '.join(r['reasons']) or 'no'} |")
        lines.append("")
        pi = ch["per_item"]
        if pi["n_items"]:
            q = pi["quantiles"]
            lines += ["### Per item", "", f"Pairwise agreement P_i over the {pi['n_items']} items judged at least "
                      f"twice: mean {_fmt(pi['mean'])}, quartiles {_fmt(q['0.25'])} / {_fmt(q['0.5'])} / "
                      f"{_fmt(q['0.75'])}, unanimous {_fmt(pi['unanimous_share'])}. The least agreed:", "",
                      "| item | judgments | majority | majority share | P_i |", "|---|---|---|---|---|"]
            for r in pi["items"][:LEAST_AGREED]:
                lines.append(f"| {r['item_id']} | {r['n_judgments']} | {r['majority']} | "
                             f"{_fmt(r['majority_share'])} | {_fmt(r['agreement'])} |")
            lines.append("")
    for name, stats in report["ratings"].items():
        ci = stats["krippendorff_alpha_interval_ci"]
        lines += [f"## Ratings: {name}", "", f"α (interval) {_fmt(stats['krippendorff_alpha_interval'])} "
                  f"({_fmt(ci[0])} – {_fmt(ci[1])}), α (ordinal) {_fmt(stats['krippendorff_alpha_ordinal'])}, "
                  f"mean rating {_fmt(stats['mean_rating'], 2)} over {stats['n_judgments']} ratings of "
                  f"{stats['n_items']} items.", ""]
    t = report["time"]
    if t["overall"]:
        o = t["overall"]
        per = ", ".join(f"{a} {_duration(v['median_s'])}" for a, v in t["annotators"].items())
        lines += ["## Time per item", "", f"Median {_duration(o['median_s'])}, 90th percentile "
                  f"{_duration(o['p90_s'])}, mean {_duration(o['mean_s'])} over {o['n']} judgments; median per "
                  f"annotator: {per}.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(store: Store, out_dir: str, n_boot: int = ag.DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """report.json, report.md and PNG plots in `out_dir`; returns {report, paths}."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise AnnotationError(f"--out {out_dir} is a file; give a directory for report.md, report.json and plots")
    report = build_report(store, n_boot, seed)
    if not report["judgments"]:
        raise AnnotationError(f"{store.path} has no judgments yet: nothing to report")
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report, plots), encoding="utf-8")
    return {"report": report, "paths": [str(out / "report.md"), str(out / "report.json"), *(str(out / p) for p in plots)]}
