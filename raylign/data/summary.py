"""Dataset summaries for `raylign data validate FILE --kind KIND`.

A summary answers what a user needs before a run: does it load (validation errors are raised as
usual), how many rows, how long the texts are (so max_prompt_length / max_length can be chosen
knowing how much gets truncated), and how many rows or prompts are duplicated.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from raylign.data.dataset import load_dataset, table_kind, table_source
from raylign.data.schema import fields_for
from raylign.data.templates import format_prompt, prompt_plain_text

PERCENTILES = (50, 90, 99)


def percentiles(lengths: list[int]) -> dict[str, int]:
    """p50/p90/p99/max as actual lengths from the data (nearest rank), so they read as integers."""
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    arr = np.asarray(lengths)
    out = {f"p{q}": int(np.percentile(arr, q, method="nearest")) for q in PERCENTILES}
    out["max"] = int(arr.max())
    return out


def text_fields(table: pa.Table, kind: str) -> list[str]:
    """The kind's text-valued fields present in the table, in the kind's order."""
    fields = fields_for(kind, table.column_names)
    return [
        name
        for name, checker in fields.items()
        if checker in ("text", "prompt") and name in table.column_names
    ]


def token_lengths(values: list[Any], field: str, tokenizer: Any, apply_chat_template: bool) -> list[int]:
    """Token counts as the model will see them: prompts chat-formatted, other texts as they are."""
    if field == "prompt":
        texts = [format_prompt(v, tokenizer, apply_chat_template) for v in values]
    else:
        texts = list(values)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def count_duplicates(values: list[Any]) -> int:
    """Rows beyond the first occurrence of each distinct value."""
    keys = [json.dumps(v, sort_keys=True, default=str) for v in values]
    return len(keys) - len(set(keys))


def summarize_table(
    table: pa.Table, tokenizer: Any = None, apply_chat_template: bool = True
) -> dict[str, Any]:
    """Summary of a table returned by `load_dataset` (its kind comes from the schema metadata)."""
    kind = table_kind(table) or "text"
    rows = table.to_pylist()
    summary: dict[str, Any] = {
        "source": table_source(table),
        "kind": kind,
        "rows": table.num_rows,
        "columns": table.column_names,
        "lengths": {},
        "duplicates": {"rows": count_duplicates(rows)},
    }
    if "prompt" in table.column_names:
        summary["duplicates"]["prompts"] = count_duplicates(table.column("prompt").to_pylist())
    for field in text_fields(table, kind):
        values = table.column(field).to_pylist()
        chars = [len(prompt_plain_text(v)) if field == "prompt" else len(v) for v in values]
        summary["lengths"][field] = {"chars": percentiles(chars)}
        if tokenizer is not None:
            tokens = token_lengths(values, field, tokenizer, apply_chat_template)
            summary["lengths"][field]["tokens"] = percentiles(tokens)
    summary.update(kind_details(table, kind))
    return summary


def kind_details(table: pa.Table, kind: str) -> dict[str, Any]:
    """Counts that catch kind-specific mistakes: duplicated prompts, identical pairs, label balance."""
    out: dict[str, Any] = {}
    names = table.column_names
    if "prompt" in names:
        prompts = table.column("prompt").to_pylist()
        out["prompt_formats"] = {
            "text": sum(isinstance(p, str) for p in prompts),
            "chat": sum(not isinstance(p, str) for p in prompts),
        }
    if kind == "pairs":
        chosen, rejected = table.column("chosen").to_pylist(), table.column("rejected").to_pylist()
        out["identical_pairs"] = sum(c == r for c, r in zip(chosen, rejected, strict=True))
    if kind == "unpaired":
        labels = table.column("label").to_pylist()
        out["labels"] = {"true": sum(labels), "false": len(labels) - sum(labels)}
    if kind == "ratings":
        ratings = np.asarray(table.column("rating").to_pylist(), dtype=float)
        out["ratings"] = {
            "min": float(ratings.min()),
            "mean": float(ratings.mean()),
            "max": float(ratings.max()),
        }
    return out


def summarize(
    path: str,
    kind: str | None = None,
    tokenizer: Any = None,
    limit: int | None = None,
    apply_chat_template: bool = True,
) -> dict[str, Any]:
    """Load (and so validate) a dataset and summarise it; DataError propagates for the CLI to print."""
    table = load_dataset(path, kind, limit=limit)
    summary = summarize_table(table, tokenizer, apply_chat_template)
    summary["source"] = path
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable summary: header line, a length table, then duplicate and kind-specific counts."""
    lines = [f"{summary['source']}: {summary['rows']} rows of kind '{summary['kind']}' — valid"]
    lines.append(f"columns: {', '.join(summary['columns'])}")
    if summary["lengths"]:
        lines.append("")
        lines.append(f"{'field':<12}{'unit':<8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
        for field, units in summary["lengths"].items():
            for unit, stats in units.items():
                cells = "".join(f"{stats[k]:>8}" for k in ("p50", "p90", "p99", "max"))
                lines.append(f"{field:<12}{unit:<8}{cells}")
        lines.append("")
    dup = summary["duplicates"]
    dup_text = f"duplicates: {dup['rows']} rows"
    if "prompts" in dup:
        dup_text += f", {dup['prompts']} prompts"
    lines.append(dup_text)
    if "prompt_formats" in summary:
        formats = summary["prompt_formats"]
        lines.append(f"prompts: {formats['text']} text, {formats['chat']} chat")
    if "identical_pairs" in summary:
        lines.append(f"pairs with chosen == rejected: {summary['identical_pairs']}")
    if "labels" in summary:
        lines.append(f"labels: {summary['labels']['true']} true, {summary['labels']['false']} false")
    if "ratings" in summary:
        r = summary["ratings"]
        lines.append(f"ratings: min {r['min']:g}, mean {r['mean']:.3g}, max {r['max']:g}")
    return "\n".join(lines)
