"""Loading validated datasets as pyarrow Tables, and the deterministic train/validation split.

`load_dataset(path, kind)` is the one entry point: it reads any supported file or a `builtin:` name,
validates every row (raising one `DataError` that lists all problems), and returns a Table whose
known columns have fixed Arrow types and whose extra columns (e.g. `category`) are kept. The kind
and the source travel in the schema metadata so later steps (summaries, logs) can name them.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raylign.data.builtin import BUILTIN_PREFIX, read_builtin
from raylign.data.readers import read_path
from raylign.data.schema import DataError, RawData, check_kind, infer_kind, validate_records
from raylign.runtime import Purpose, rng

if TYPE_CHECKING:
    from raylign.config import DataConfig

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)
ARROW_TYPES = {"text": pa.string(), "number": pa.float64(), "bool": pa.bool_()}


def read_raw(path: str, limit: int | None = None) -> tuple[RawData, str | None]:
    """Records of a file or builtin, and the builtin's own kind (None for files)."""
    if path.startswith(BUILTIN_PREFIX):
        return read_builtin(path, limit)
    return read_path(path, limit), None


def load_dataset(path: str, kind: str | None = None, limit: int | None = None) -> pa.Table:
    """Read, validate and normalise a dataset; raises DataError before returning anything if a row is bad.

    `kind` may be omitted for a builtin (its own kind) or guessed from the column names of a file.
    `limit` keeps only the first N rows (and only those are validated), for quick trials.
    """
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be a positive number of rows, got {limit}")
    raw, builtin_kind = read_raw(path, limit)
    kind = kind or builtin_kind or infer_kind(raw.columns)
    if kind is None:
        raise DataError(
            f"{path}: cannot tell the data kind from columns {', '.join(raw.columns) or '(none)'}; "
            "pass a kind (prompts, pairs, unpaired, ratings, text)"
        )
    check_kind(kind)
    checked, fields = validate_records(raw, kind)
    return build_table(raw, checked, fields, kind)


def build_table(raw: RawData, checked: list[dict[str, Any]], fields: dict[str, str], kind: str) -> pa.Table:
    """Columns in the file's order: checked fields with fixed types, extra columns kept as they were."""
    arrays = {}
    for name in raw.columns:
        values = [row.get(name) for row in checked]
        if name == "prompt" and name in fields:
            arrays[name] = prompt_array([row[name] for row in checked])  # checked: every row has one
        elif name in fields:
            arrays[name] = pa.array(values, type=ARROW_TYPES[fields[name]])
        elif raw.table is not None:
            arrays[name] = raw.table.column(name)
        else:
            arrays[name] = extra_array(values)
    table = pa.table(arrays)
    return table.replace_schema_metadata({"raylign.kind": kind, "raylign.source": raw.source})


def prompt_array(prompts: list[str | list[dict[str, str]]]) -> pa.Array:
    """Text prompts stay a string column; if any prompt is a chat, every prompt becomes a chat
    (text -> one user turn), since one Arrow column holds one type and the change loses nothing."""
    if all(isinstance(p, str) for p in prompts):
        return pa.array(prompts, type=pa.string())
    chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    return pa.array(chats, type=MESSAGES_TYPE)


def extra_array(values: list[Any]) -> pa.Array:
    """An extra column from JSON/CSV; mixed types (3 in one row, "3" in another) are kept as JSON text
    rather than failing, since extra columns are bookkeeping and never trained on."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string()
        )


def table_kind(table: pa.Table) -> str | None:
    """The kind recorded by `load_dataset` in the table's schema metadata."""
    meta = table.schema.metadata or {}
    value = meta.get(b"raylign.kind")
    return value.decode() if value else None


def table_source(table: pa.Table) -> str | None:
    meta = table.schema.metadata or {}
    value = meta.get(b"raylign.source")
    return value.decode() if value else None


def rows(table: pa.Table) -> list[dict[str, Any]]:
    """The rows as Python dicts (chat prompts come back as lists of {role, content})."""
    return table.to_pylist()


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


def group_keys(table: pa.Table) -> list[str]:
    """What must not straddle train and validation: the prompt (several pairs often share one), else
    the text; rows with the same key go to the same side so validation measures generalisation."""
    column = "prompt" if "prompt" in table.column_names else "text" if "text" in table.column_names else None
    if column is None:
        return [str(i) for i in range(table.num_rows)]
    return [v if isinstance(v, str) else json.dumps(v) for v in table.column(column).to_pylist()]


def split_train_val(table: pa.Table, val_fraction: float, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """Deterministic split: the same table, fraction and seed always give the same rows.

    Prompt groups are shuffled with `raylign.runtime.rng(seed, Purpose.SPLIT)` and taken whole until the
    validation side holds round(n * val_fraction) rows (at least one when the fraction is positive
    and there are two or more groups). Both sides keep the file's row order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = table.num_rows
    target = round(n * val_fraction)
    keys = group_keys(table)
    sizes = Counter(keys)
    groups = list(sizes)
    if val_fraction > 0 and len(groups) >= 2:
        target = max(1, target)
    order = rng(seed, Purpose.SPLIT).permutation(len(groups))
    val_groups: set[str] = set()
    taken = 0
    for index in order:
        if taken >= target or len(val_groups) == len(groups) - 1:
            break
        val_groups.add(groups[index])
        taken += sizes[groups[index]]
    in_val = np.array([key in val_groups for key in keys], dtype=bool)
    return table.filter(pa.array(~in_val)), table.filter(pa.array(in_val))


def load_split(cfg: DataConfig) -> tuple[pa.Table, pa.Table]:
    """(train, validation) for a run: the validation file when one is configured, else a split of
    the training data. Both are fully validated before this returns."""
    train = load_dataset(cfg.train, cfg.kind, limit=cfg.limit)
    if cfg.validation:
        return train, load_dataset(cfg.validation, cfg.kind, limit=cfg.limit)
    return split_train_val(train, cfg.val_fraction, cfg.split_seed)
