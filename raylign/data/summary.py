"""Dataset summaries for `raylign data validate FILE --kind KIND`.

A summary answers what a user needs before a run: does it load (validation errors are raised as
usual), how many rows, how long the texts are (so max_prompt_length / max_length can be chosen
knowing how much gets truncated), and how many rows or prompts are duplicated.

It walks the table a slice at a time and keeps per row only what it counts (a length, a 16-byte
digest for duplicates), so summarising a large file adds little to the memory of loading it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylign.data.dataset import load_dataset, table_kind, table_source
from raylign.data.schema import fields_for
from raylign.data.templates import format_prompt, prompt_plain_text

PERCENTILES = (50, 90, 99)
SLICE_ROWS = 4096  # rows turned into Python objects at a time, fewer when rows are long:
SLICE_BYTES = 4 << 20  # about this many bytes of Arrow data per slice


def percentiles(lengths: list[int] | np.ndarray) -> dict[str, int]:
    """p50/p90/p99/max as actual lengths from the data (nearest rank), so they read as integers."""
    arr = np.asarray(lengths)
    if not arr.size:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
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


def slices(data: pa.Table | pa.ChunkedArray) -> Iterator[Any]:
    """A table's (or column's) rows as Python values, a slice of at most SLICE_ROWS rows and about
    SLICE_BYTES of data at a time."""
    rows = len(data)
    step = max(1, min(SLICE_ROWS, SLICE_BYTES * rows // max(data.nbytes, 1)))
    for start in range(0, rows, step):
        yield data.slice(start, step).to_pylist()


def token_lengths(values: list[Any], field: str, tokenizer: Any, apply_chat_template: bool) -> list[int]:
    """Token counts as the model will see them: prompts chat-formatted, other texts as they are."""
    if field == "prompt":
        texts = [format_prompt(v, tokenizer, apply_chat_template) for v in values]
    else:
        texts = list(values)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _digest(value: Any) -> bytes:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=16).digest()


def count_duplicates(values: list[Any] | Iterator[list[Any]]) -> int:
    """Rows beyond the first occurrence of each distinct value (a list, or an iterator of lists).
    Values are compared by a 128-bit digest of their JSON, so only 16 bytes per row are kept."""
    chunks = iter([values]) if isinstance(values, list) else values
    digests = bytearray()
    for chunk in chunks:
        for value in chunk:
            digests += _digest(value)
    if not digests:
        return 0
    keys = np.frombuffer(bytes(digests), dtype=np.uint64).reshape(-1, 2)
    return len(keys) - len(np.unique(keys, axis=0))


def char_lengths(column: pa.ChunkedArray, field: str) -> np.ndarray:
    """Characters per value; a chat prompt counts the text of its turns."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.utf8_length(column).to_numpy(zero_copy_only=False)
    texts = (len(prompt_plain_text(v)) if field == "prompt" else len(v) for chunk in slices(column) for v in chunk)
    return np.fromiter(texts, dtype=np.int64, count=len(column))


def summarize_table(
    table: pa.Table, tokenizer: Any = None, apply_chat_template: bool = True
) -> dict[str, Any]:
    """Summary of a table returned by `load_dataset` (its kind comes from the schema metadata)."""
    kind = table_kind(table) or "text"
    summary: dict[str, Any] = {
        "source": table_source(table),
        "kind": kind,
        "rows": table.num_rows,
        "columns": table.column_names,
        "lengths": {},
        "duplicates": {"rows": count_duplicates(slices(table))},
    }
    if "prompt" in table.column_names:
        summary["duplicates"]["prompts"] = count_duplicates(slices(table.column("prompt")))
    for field in text_fields(table, kind):
        column = table.column(field)
        summary["lengths"][field] = {"chars": percentiles(char_lengths(column, field))}
        if tokenizer is not None:
            tokens = [n for values in slices(column)
                      for n in token_lengths(values, field, tokenizer, apply_chat_template)]
            summary["lengths"][field]["tokens"] = percentiles(tokens)
    summary.update(kind_details(table, kind))
    return summary


def kind_details(table: pa.Table, kind: str) -> dict[str, Any]:
    """Counts that catch kind-specific mistakes: duplicated prompts, identical pairs, label balance."""
    out: dict[str, Any] = {}
    names = table.column_names
    if "prompt" in names:
        prompts = table.column("prompt")
        text = pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type)
        out["prompt_formats"] = {"text": len(prompts) if text else 0, "chat": 0 if text else len(prompts)}
    if kind == "pairs":
        same = pc.sum(pc.equal(table.column("chosen"), table.column("rejected"))).as_py()
        out["identical_pairs"] = int(same or 0)
    if kind == "unpaired":
        labels = table.column("label")
        true = int(pc.sum(labels).as_py() or 0)
        out["labels"] = {"true": true, "false": len(labels) - true}
    if kind == "ratings":
        ratings = table.column("rating")
        bounds = pc.min_max(ratings).as_py()
        out["ratings"] = {
            "min": float(bounds["min"]),
            "mean": float(pc.mean(ratings).as_py()),
            "max": float(bounds["max"]),
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
