"""Loading validated datasets as pyarrow Tables, and the deterministic train/validation split.

`load_dataset(path, kind)` is the one entry point: it reads any supported file or a `builtin:` name,
validates every row (raising one `DataError` that lists all problems), and returns a Table whose
known columns have fixed Arrow types and whose extra columns (e.g. `category`) are kept. The kind
and the source travel in the schema metadata so later steps (summaries, logs) can name them.

The file is read in batches (`raylign.data.readers`): each batch's rows are checked, and as long as no
row has failed its columns are appended as Arrow arrays, so loading holds one batch of Python rows
plus the Arrow columns of the table being built; once a row fails, the rest is only checked.
`load_split(cfg, algorithm=...)` also checks that the data is of a kind the algorithm trains on.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raylign.data.builtin import BUILTIN_PREFIX, read_builtin
from raylign.data.readers import read_path
from raylign.data.schema import (
    Batch,
    DataError,
    ErrorLog,
    Reading,
    Record,
    accepted_kinds,
    check_kind,
    check_row,
    fields_for,
    infer_kind,
    kind_mismatch_message,
    missing_column_message,
    missing_columns,
)
from raylign.runtime import Purpose, rng

if TYPE_CHECKING:
    from raylign.config import DataConfig

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)
ARROW_TYPES = {"text": pa.string(), "number": pa.float64(), "bool": pa.bool_()}
# The table's chunks come from the system allocator: with pyarrow's default (mimalloc) the many
# multi-MiB buffers that per-batch conversion grows by doubling left fragments worth a good part of
# the table (peak RSS of loading 0.3 GB of JSONL in-process: 1.45x the table with mimalloc, 1.26x
# with the chunks from malloc).
BUILD_POOL = pa.system_memory_pool()


def read_source(path: str, limit: int | None = None) -> tuple[Reading, str | None]:
    """A file or builtin opened for reading in batches, and the builtin's own kind (None for files)."""
    if path.startswith(BUILTIN_PREFIX):
        return read_builtin(path, limit)
    return read_path(path, limit), None


def peek_columns(path: str) -> list[str]:
    """The columns of a file's first row (a CSV header, an Arrow schema), reading nothing more."""
    reading, _ = read_source(path, limit=1)
    for batch in reading.batches:
        if batch.columns:
            return batch.columns
    return []


def load_dataset(path: str, kind: str | None = None, limit: int | None = None,
                 needed_by: str | None = None) -> pa.Table:
    """Read, validate and normalise a dataset; raises DataError before returning anything if a row is bad.

    `kind` may be omitted for a builtin (its own kind) or guessed from the column names of a file
    (those of its first batch of rows). `limit` keeps only the first N rows (only those are read and
    validated), for quick trials. `needed_by` names the algorithm in a missing-column message.
    """
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be a positive number of rows, got {limit}")
    if kind is not None:
        check_kind(kind)
    reading, builtin_kind = read_source(path, limit)
    checker = Checker(reading, kind or builtin_kind, needed_by, label=path)
    for batch in reading.batches:
        checker.feed(batch)
    return checker.finish()


class Checker:
    """Validates a source batch by batch and builds its table from the kept columns.

    Every problem of every batch goes to one `ErrorLog`; the fields to check are fixed by the first
    batch that has columns (a ratings file's text or prompt+completion shape, an inferred kind). While
    no problem has been found, each batch's normalised rows become Arrow arrays (one chunk per batch
    and column) and the Python rows are dropped; `finish` joins the chunks into the table.
    """

    def __init__(self, reading: Reading, kind: str | None, needed_by: str | None = None,
                 label: str | None = None):
        self.source, self.typed, self.fixed = reading.source, reading.typed, reading.fixed_columns
        self.label = label or reading.source  # the path as the user gave it (builtins: its name)
        self.kind, self.needed_by = kind, needed_by
        self.log = ErrorLog(reading.source)
        self.columns: dict[str, None] = {}  # every column seen, in file order
        self.fields: dict[str, str] | None = None
        self.chunks: dict[str, list[tuple[int, Any]]] = {}  # column -> [(batch number, array)]
        self.lengths: list[int] = []  # rows of each kept batch
        self.rows = 0

    def feed(self, batch: Batch) -> None:
        self.columns.update(dict.fromkeys(batch.columns))
        self.log.extend(batch.errors)
        if self.fields is None:
            if not self.columns:
                return  # only bad lines so far: nothing tells the columns yet
            self._decide()
        assert self.fields is not None and self.kind is not None
        records = batch.records if batch.table is None else self._typed_records(batch)
        if self.fixed and records and self.rows == 0:
            missing = missing_columns(self.kind, list(self.columns))
            if missing:  # known from the header / schema: no need to read on
                self._raise_missing(missing)
        self.rows += len(records)
        problems: list[tuple[int, str]] = []
        checked = []
        strings = not self.typed
        for record in records:
            row, row_problems = check_row(record.values, self.fields, strings)
            for name, message in row_problems:
                if message == "missing":
                    self.log.add_missing(name, record.pos, record.where)
                else:
                    problems.append((record.pos, f"{record.where}: field '{name}': {message}"))
            checked.append(row)
        self.log.extend(problems)
        if self.log:
            self.chunks.clear()  # the load fails: stop building, only check the rest
            self.lengths.clear()
        else:
            self._keep(batch, checked)

    def _decide(self) -> None:
        columns = list(self.columns)
        if self.kind is None:
            self.kind = infer_kind(columns)
            if self.kind is None:
                raise DataError(
                    f"{self.label}: cannot tell the data kind from columns {', '.join(columns) or '(none)'}; "
                    "pass a kind (prompts, pairs, unpaired, ratings, text)"
                )
        self.fields = fields_for(self.kind, columns)

    def _typed_records(self, batch: Batch) -> list[Record]:
        """An Arrow batch's rows with only the kind's fields converted to Python."""
        assert self.fields is not None
        present = [name for name in self.fields if name in batch.table.column_names]
        values = batch.table.select(present).to_pylist() if present else [{}] * batch.table.num_rows
        first = batch.first_row
        return [Record(f"{self.source}: row {first + i}", first + i, v) for i, v in enumerate(values)]

    def _keep(self, batch: Batch, checked: list[dict[str, Any]]) -> None:
        assert self.fields is not None
        number = len(self.lengths)
        self.lengths.append(len(checked))
        for name in dict.fromkeys(batch.columns):
            if name == "prompt" and name in self.fields:
                array = prompt_array([row[name] for row in checked], pool=BUILD_POOL)  # every row has one
            elif name in self.fields:
                array = pa.array([row.get(name) for row in checked], type=ARROW_TYPES[self.fields[name]],
                                 memory_pool=BUILD_POOL)
            elif batch.table is not None:
                array = batch.table.column(name)
            else:
                array = extra_array([row.get(name) for row in checked], pool=BUILD_POOL)
            self.chunks.setdefault(name, []).append((number, array))

    def _raise_missing(self, missing: list[str]) -> None:
        assert self.kind is not None
        columns = list(self.columns)
        self.log.drop_missing(missing)
        self.log.add(-1, self.source, missing_column_message(self.kind, missing, columns, self.needed_by))
        self.log.raise_if_any()

    def finish(self) -> pa.Table:
        if not self.rows:
            if not self.log:
                self.log.add(-1, self.source, "no rows")
            self.log.raise_if_any()
        assert self.kind is not None and self.fields is not None
        missing = missing_columns(self.kind, list(self.columns))
        if missing:  # One file-level message instead of one per row: the whole column is absent.
            self._raise_missing(missing)
        self.log.raise_if_any()
        arrays = {name: self._column(name) for name in self.columns}
        table = pa.table(arrays) if arrays else pa.table({})
        return table.replace_schema_metadata({"raylign.kind": self.kind, "raylign.source": self.source})

    def _column(self, name: str) -> pa.ChunkedArray:
        """One column from its batch chunks; a batch without it (a JSON key first seen later) gets nulls."""
        by_batch = dict(self.chunks.get(name, []))
        pieces = [by_batch.get(i, pa.nulls(n)) for i, n in enumerate(self.lengths)]
        chunks = [c for p in pieces for c in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])]
        types = {c.type for c in chunks}
        if len(types) <= 1:
            return pa.chunked_array(chunks, types.pop() if types else pa.null())
        assert self.fields is not None
        if name == "prompt" and name in self.fields:  # a chat in some batch: every prompt a chat
            return pa.chunked_array([c if c.type == MESSAGES_TYPE else prompt_array(c.to_pylist(), True, BUILD_POOL)
                                     for c in chunks], MESSAGES_TYPE)
        try:  # e.g. int64 in one batch, double or null in another: the type that holds both
            tables = [pa.table({name: c}) for c in chunks]
            return pa.concat_tables(tables, promote_options="permissive").column(name)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return pa.chunked_array([json_text(c.to_pylist(), BUILD_POOL) for c in chunks], pa.string())


def prompt_array(prompts: list[str | list[dict[str, str]]], chat: bool = False, pool: Any = None) -> pa.Array:
    """Text prompts stay a string column; if any prompt is a chat (or `chat`), every prompt becomes a
    chat (text -> one user turn), since one Arrow column holds one type and the change loses nothing."""
    if not chat and all(isinstance(p, str) for p in prompts):
        return pa.array(prompts, type=pa.string(), memory_pool=pool)
    chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    return pa.array(chats, type=MESSAGES_TYPE, memory_pool=pool)


def extra_array(values: list[Any], pool: Any = None) -> pa.Array:
    """An extra column from JSON/CSV; mixed types (3 in one row, "3" in another) are kept as JSON text
    rather than failing, since extra columns are bookkeeping and never trained on."""
    try:
        return pa.array(values, memory_pool=pool)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return json_text(values, pool)


def json_text(values: list[Any], pool: Any = None) -> pa.Array:
    """Strings kept, other values as their JSON text."""
    texts = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
    return pa.array(texts, pa.string(), memory_pool=pool)


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


def load_split(cfg: DataConfig, algorithm: str | None = None, task: str | None = None) -> tuple[pa.Table, pa.Table]:
    """(train, validation) for a run: the validation file when one is configured, else a split of
    the training data. Both are fully validated before this returns.

    With `algorithm` (and for `multitask` the `task` type), data of a kind it cannot train on is one
    DataError naming the kinds it needs and the file's columns, before the file is read.
    """
    needed_by = None
    if algorithm is not None:
        needed_by, kinds = accepted_kinds(algorithm, task)
        if cfg.kind not in kinds:
            try:
                columns: list[str] | None = peek_columns(cfg.train)
            except DataError:
                columns = None  # unreadable: the kind is what to fix first
            raise DataError(kind_mismatch_message(needed_by, kinds, cfg.kind, cfg.train, columns))
    train = load_dataset(cfg.train, cfg.kind, limit=cfg.limit, needed_by=needed_by)
    if cfg.validation:
        return train, load_dataset(cfg.validation, cfg.kind, limit=cfg.limit, needed_by=needed_by)
    return split_train_val(train, cfg.val_fraction, cfg.split_seed)
