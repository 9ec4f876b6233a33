"""`raylign annotate export`: the current judgments as raylign data files.

Only current judgments count (a correction replaces the annotator's earlier judgment of the item).
Gold items (attention checks) are left out unless `include_gold`. Every row carries `item_id`,
`annotators` (the names whose judgments made the row) and `agreement` (below), plus the item's
`meta` when it has one; `raylign.data.load_dataset(out, kind)` reads every file written here.

  pairs      from pairwise and human-vs-model items: {prompt, chosen, rejected, item_id, item_kind,
             annotators, agreement, votes {a, b, tie}, n_judgments, source_chosen, source_rejected,
             strength}.
             --aggregate majority (default): one row per item whose most frequent answer among its
             a / b / tie judgments is a or b; agreement = that answer's share of them; strength = the
             mean strength the majority gave (null if none did). An item whose most frequent answer
             is tie, or where two answers are equally frequent (split), or with only skips, gives no
             row (counted in the summary).
             --aggregate all: one row per a or b judgment (tie and skip judgments give none);
             agreement = the share of the item's a / b / tie judgments that agree with it.
  unpaired   the pairs as KTO rows: {prompt, completion, label} with label true for the preferred
             answer and false for the other, two rows per pair, same extra columns.
  ratings    from rating items: {prompt, completion, rating, criterion, ...} ({text, rating, ...} when
             an item has no prompt), one row per item and criterion (`criterion` picks one).
             majority: rating = the median of the annotators' ratings; agreement = the share of them
             that gave the most frequent rating. all: one row per annotator's rating. Skips give none.
  judgments  every current judgment of every item, gold included, one JSONL row each:
             {item_id, annotator, choice, strength, ratings, shown_left, written_by, time, reason,
             latency_ms, via, kind, gold}. choice is a | b | tie | skip (null for a rated rating item);
             written_by (human-vs-model items) is the answer the annotator thinks a person wrote, a | b,
             or null when they did not say.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

from raylign.annotation.errors import AnnotationError
from raylign.annotation.store import Judgment, Store, StoredItem, iso_time
from raylign.annotation.tasks import PAIR_KINDS
from raylign.rundir import write_jsonl_atomic

EXPORT_KINDS = ("pairs", "ratings", "unpaired", "judgments")
AGGREGATES = ("majority", "all")
Aggregate = Literal["majority", "all"]


def _prompt(item: StoredItem) -> Any:
    p = item.item.prompt
    return p if isinstance(p, str) or p is None else [{"role": t.role, "content": t.content} for t in p]


def _extra(item: StoredItem) -> dict[str, Any]:
    return {"meta": item.item.meta} if item.item.meta else {}


def _by_item(store: Store) -> dict[str, list[Judgment]]:
    out: dict[str, list[Judgment]] = defaultdict(list)
    for j in store.current_judgments():
        out[j.item_id].append(j)
    return out


def _pair_row(stored: StoredItem, votes: Counter[str | None], winner: str, voters: list[Judgment], share: float,
              strengths: list[int]) -> dict[str, Any]:
    item = stored.item
    texts = {"a": item.response_a, "b": item.response_b}
    sources = {"a": item.source_a, "b": item.source_b}
    loser = "b" if winner == "a" else "a"
    return {"prompt": _prompt(stored), "chosen": texts[winner], "rejected": texts[loser], "item_id": item.item_id,
            "item_kind": item.kind, "annotators": sorted(v.annotator for v in voters), "agreement": share,
            "votes": {k: votes.get(k, 0) for k in ("a", "b", "tie")}, "n_judgments": sum(votes.values()),
            "source_chosen": sources[winner], "source_rejected": sources[loser],
            "strength": statistics.fmean(strengths) if strengths else None, **_extra(stored)}


def pair_rows(store: Store, aggregate: Aggregate = "majority", include_gold: bool = False
              ) -> tuple[list[dict[str, Any]], Counter[str]]:
    """(pairs rows, what was dropped and why) from the pair items' current judgments."""
    judged = _by_item(store)
    rows: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for stored in store.items():
        item = stored.item
        if item.kind not in PAIR_KINDS or (item.is_gold and not include_gold):
            continue
        js = judged.get(item.item_id, [])
        votes_list = [j for j in js if j.choice in ("a", "b", "tie")]
        votes = Counter(j.choice for j in votes_list)
        n = len(votes_list)
        if not js:
            dropped["unjudged"] += 1
            continue
        if not n:
            dropped["only_skips"] += 1
            continue
        if aggregate == "all":
            for j in votes_list:
                if j.choice == "tie":
                    dropped["tie_judgments"] += 1
                    continue
                assert j.choice is not None
                rows.append(_pair_row(stored, votes, j.choice, [j], votes[j.choice] / n, [j.strength] if j.strength else []))
            continue
        top = max(votes.values())
        leaders = [c for c in ("a", "b", "tie") if votes.get(c, 0) == top]
        if len(leaders) > 1:
            dropped["split"] += 1
        elif leaders[0] == "tie":
            dropped["tie"] += 1
        else:
            winner = leaders[0]
            voters = [j for j in votes_list if j.choice == winner]
            rows.append(_pair_row(stored, votes, winner, voters, top / n, [j.strength for j in voters if j.strength]))
    return rows, dropped


def unpaired_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in pairs:
        extra = {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")}
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True, **extra})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False, **extra})
    return out


def rating_rows(store: Store, aggregate: Aggregate = "majority", include_gold: bool = False,
                criterion: str | None = None) -> tuple[list[dict[str, Any]], Counter[str]]:
    judged = _by_item(store)
    items = [s for s in store.items() if s.item.kind == "rating" and (include_gold or not s.item.is_gold)]
    if criterion is not None and items and not any(criterion in (s.item.criteria or []) for s in items):
        known = sorted({c for s in items for c in (s.item.criteria or [])})
        raise AnnotationError(f"no rating item has criterion {criterion!r}; criteria: {', '.join(known)}")
    as_text = any(s.item.prompt is None for s in items)
    rows: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for stored in items:
        item = stored.item
        js = [j for j in judged.get(item.item_id, []) if j.ratings]
        if not judged.get(item.item_id):
            dropped["unjudged"] += 1
            continue
        if not js:
            dropped["only_skips"] += 1
            continue
        base = ({"text": item.response_a} if as_text else {"prompt": _prompt(stored), "completion": item.response_a})
        if as_text and item.prompt is not None:
            base["prompt"] = _prompt(stored)
        for c in item.criteria or []:
            if criterion is not None and c != criterion:
                continue
            given = [(j, j.ratings[c]) for j in js if j.ratings and c in j.ratings]
            if not given:
                continue
            values = [v for _, v in given]
            counts = Counter(values)
            modal_share = max(counts.values()) / len(values)
            if aggregate == "all":
                for j, v in given:
                    rows.append({**base, "rating": float(v), "criterion": c, "item_id": item.item_id,
                                 "annotators": [j.annotator], "agreement": counts[v] / len(values),
                                 "n_judgments": len(values), **_extra(stored)})
            else:
                rows.append({**base, "rating": float(statistics.median(values)), "criterion": c,
                             "item_id": item.item_id, "annotators": sorted(j.annotator for j, _ in given),
                             "agreement": modal_share, "n_judgments": len(values), **_extra(stored)})
    return rows, dropped


def judgment_rows(store: Store) -> list[dict[str, Any]]:
    items = {s.item_id: s.item for s in store.items()}
    return [{"item_id": j.item_id, "annotator": j.annotator, "choice": j.choice, "strength": j.strength,
             "ratings": j.ratings, "shown_left": j.shown_left, "written_by": j.written_by,
             "time": iso_time(j.created), "reason": j.reason,
             "latency_ms": j.latency_ms, "via": j.via, "kind": items[j.item_id].kind,
             "gold": items[j.item_id].is_gold} for j in store.current_judgments()]


def export(store: Store, kind: str, out: str, aggregate: str = "majority", include_gold: bool = False,
           criterion: str | None = None) -> dict[str, Any]:
    """Write one export (module docstring) to `out`, atomically; returns {kind, rows, dropped, out}."""
    if kind not in EXPORT_KINDS:
        raise AnnotationError(f"unknown export kind {kind!r}; kinds: {', '.join(EXPORT_KINDS)}")
    if aggregate not in AGGREGATES:
        raise AnnotationError(f"unknown --aggregate {aggregate!r}; choose majority or all")
    path = Path(out).expanduser()
    if path.is_dir():
        raise AnnotationError(f"--out {out} is a directory; give a file name such as {path / (kind + '.jsonl')}")
    agg: Aggregate = "all" if aggregate == "all" else "majority"
    dropped: Counter[str] = Counter()
    if kind == "judgments":
        rows = judgment_rows(store)
    elif kind == "ratings":
        rows, dropped = rating_rows(store, agg, include_gold, criterion)
    else:
        rows, dropped = pair_rows(store, agg, include_gold)
        if kind == "unpaired":
            rows = unpaired_rows(rows)
    if not rows:
        why = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(dropped.items())) or "no judgments yet"
        source = "rating" if kind == "ratings" else "pairwise or human-vs-model" if kind != "judgments" else "any"
        raise AnnotationError(f"nothing to export as {kind} from {store.path}: no {source} item gave a row ({why}); "
                              f"nothing was written to {out}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(rows, path)
    return {"kind": kind, "aggregate": agg, "rows": len(rows), "dropped": dict(dropped), "out": str(path)}


def human_majority(db: str) -> dict[str, Any]:
    """The majority pairs of an annotations database, as `export --kind pairs` writes them (`pair_rows`:
    gold items left out; an item whose most frequent answer is tie, or with two answers equally
    frequent, or only skips, gives none): {rows, dropped}, what `raylign eval --human DB` scores. A
    database without any such item is one clear error."""
    store = Store(db, create=False)
    try:
        rows, dropped = pair_rows(store, "majority")
    finally:
        store.close()
    if not rows:
        why = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(dropped.items())) or "no pairwise items"
        raise AnnotationError(f"--human {db}: no pairwise or human-vs-model item has a majority answer yet ({why}); "
                              "nothing to compare the scorer with")
    return {"rows": rows, "dropped": dict(dropped)}
