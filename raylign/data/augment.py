"""`raylign data augment IN --counterfactual builtin|F --out OUT`: counterfactual data augmentation.

Every row that mentions a group term of a bias axis (the sets `raylign eval --bias` measures with,
`raylign.data.counterfactual`) is followed by its counterfactual copies: the same row with the group
term exchanged for each other group's in every text field at once (prompt, chosen and rejected
together, chat messages included). Labels stay as they are (a pair keeps its chosen side, an
unpaired row its label, a rating its value): the copies say "this judgment does not depend on the
group", which is counterfactual data augmentation (Lu et al. 2020, "Gender Bias in Neural Natural
Language Processing"; Garg et al. 2019). Copies carry `counterfactual` ("axis:from->to") and
`counterfactual_of` (the 0-based index of the original among the input's rows). The output is JSONL,
written atomically; rows are streamed through `raylign.data.readers`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from raylign.data.counterfactual import counterfactual_copies, load_bias_sets, select_axes
from raylign.data.dataset import peek_columns
from raylign.data.schema import DataError, ErrorLog, check_kind, fields_for, infer_kind
from raylign.data.scrub import checked_rows
from raylign.rundir import write_jsonl_atomic


def text_fields(kind: str, columns: list[str]) -> list[str]:
    """The kind's text fields (prompt, chosen, rejected, completion, text): those a swap rewrites."""
    return [name for name, checker in fields_for(kind, columns).items() if checker in ("text", "prompt")]


def augment_file(path: str, out: str, counterfactual: str = "builtin", kind: str | None = None,
                 axes: list[str] | None = None, max_per_axis: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Write `path`'s rows, each followed by its counterfactual copies, to `out`; returns counts."""
    if Path(out).suffix.lower() not in (".jsonl", ".ndjson"):
        raise DataError(f"--out {out}: the augmented file is written as JSON lines; name it *.jsonl")
    if Path(path).exists() and Path(out).exists() and Path(out).resolve() == Path(path).resolve():
        raise DataError("--out is the input file; write the augmented copy elsewhere")
    if max_per_axis is not None and max_per_axis < 1:
        raise DataError(f"--max-per-axis must be at least 1, got {max_per_axis}")
    sets = select_axes(load_bias_sets(counterfactual, require_templates=False), axes)
    columns = peek_columns(path)
    kind = check_kind(kind) if kind else infer_kind(columns)
    if kind is None:
        raise DataError(f"{path}: cannot tell the data kind from columns {', '.join(columns) or '(none)'}; pass --kind")
    fields = text_fields(kind, columns)
    counts: Counter[str] = Counter()
    state = {"rows": 0, "mentioning": 0, "copies": 0}
    log = ErrorLog(path)

    def rows() -> Iterator[dict[str, Any]]:
        for index, (_, row) in enumerate(tqdm(checked_rows(path, kind, log), desc="augmenting", unit="row",
                                              disable=not progress)):
            state["rows"] += 1
            yield row
            copies = counterfactual_copies(row, fields, sets, max_per_axis)
            state["mentioning"] += bool(copies)
            for swap, copy in copies:
                counts[swap.axis] += 1
                state["copies"] += 1
                yield {**copy, "counterfactual": swap.describe(), "counterfactual_of": index}
        log.raise_if_any()

    write_jsonl_atomic(rows(), Path(out))
    return {"input": path, "output": out, "kind": kind, "rows": state["rows"], "rows_mentioning": state["mentioning"],
            "copies": state["copies"], "copies_per_axis": dict(counts), "axes": [s.axis for s in sets]}


def format_augment(summary: dict[str, Any]) -> str:
    per_axis = ", ".join(f"{a} {n}" for a, n in summary["copies_per_axis"].items()) or "none"
    return (f"augmented {summary['rows']} {summary['kind']} rows -> {summary['output']}: "
            f"{summary['rows_mentioning']} mention a group term, {summary['copies']} counterfactual copies "
            f"added ({per_axis}); {summary['rows'] + summary['copies']} rows in all")


def run_augment_command(args: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    axes = [a.strip() for a in args.axes.split(",") if a.strip()] if args.axes else None
    summary = augment_file(args.file, args.out, args.counterfactual, args.kind, axes, args.max_per_axis,
                           progress=not args.no_progress)
    echo(format_augment(summary))
    return summary
