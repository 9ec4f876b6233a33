"""File readers: JSONL / JSON, CSV / TSV, Parquet, Arrow, and local HF `datasets` directories.

Each reader returns `RawData` (records with their locations), never raising on a bad line: it logs
the problem so the user sees every bad line of the file in one message. JSONL and CSV are read as
bytes, one physical line at a time, because only then can invalid UTF-8 and invalid JSON be pinned
to a line number (pyarrow's own JSON/CSV readers report byte offsets of whole blocks at best).
Locations are 1-based file lines for text formats and 0-based `row N` (what `table[N]` / `ds[N]`
would show) for Parquet and Arrow.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raylign.data.schema import DataError, RawData, Record, describe

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED = ".jsonl, .json, .ndjson, .csv, .tsv, .parquet, .arrow, or a saved `datasets` directory"


def read_path(path: str, limit: int | None = None) -> RawData:
    """Read any supported file or directory into records (at most `limit` of them)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if p.is_dir():
        return read_hf_dir(path, limit)
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path, limit)
    if suffix == ".json":
        return read_json_array(path, limit) if _starts_with_bracket(p) else read_jsonl(path, limit)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, limit, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix in (".parquet", ".pq"):
        return from_table(path, pq.read_table(p), limit)
    if suffix == ".arrow":
        return from_table(path, read_arrow_file(p), limit)
    raise DataError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; use {SUPPORTED}")


def _starts_with_bracket(p: Path) -> bool:
    """A .json file is either JSON lines or one JSON array; the first non-space byte tells which."""
    with p.open("rb") as f:
        head = f.read(4096).lstrip(codecs.BOM_UTF8).lstrip()
    return head.startswith(b"[")


# --------------------------------------------------------------------------------------------------
# JSON lines and JSON arrays
# --------------------------------------------------------------------------------------------------


def decode_line(raw: bytes) -> str:
    """UTF-8 decode, raising ValueError with the offending byte and its position on the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without the line ending), BOM removed from line 1."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            yield lineno, raw.rstrip(b"\r\n")


def parse_json_object(text: str) -> dict[str, Any]:
    """One JSONL line -> dict, or ValueError saying what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object {{...}}, got {describe(obj)}")
    return obj


def read_jsonl(path: str, limit: int | None = None) -> RawData:
    """One JSON object per line; blank lines are skipped; each bad line is logged with its number."""
    records: list[Record] = []
    errors: list[tuple[int, str]] = []
    columns: dict[str, None] = {}  # insertion-ordered set of keys seen
    for lineno, raw in iter_lines(path):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = parse_json_object(decode_line(raw))
        except ValueError as exc:
            errors.append((lineno, f"{where}: {exc}"))
            continue
        columns.update(dict.fromkeys(obj))
        records.append(Record(where, lineno, obj))
        if limit is not None and len(records) >= limit:
            break
    return RawData(path, list(columns), records, errors)


def read_json_array(path: str, limit: int | None = None) -> RawData:
    """A file holding one JSON array of objects; each element is located by the line it starts on."""
    data = Path(path).read_bytes().lstrip(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte 0x{data[exc.start]:02x})") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    starts = _array_item_lines(text)
    records, errors, columns = [], [], {}
    for index, item in enumerate(items[:limit] if limit else items):
        lineno = starts[index]
        where = f"{path}:{lineno}"
        if not isinstance(item, dict):
            errors.append((lineno, f"{where}: expected a JSON object {{...}}, got {describe(item)}"))
            continue
        columns.update(dict.fromkeys(item))
        records.append(Record(where, lineno, item))
    return RawData(path, list(columns), records, errors)


def _array_item_lines(text: str) -> list[int]:
    """Line on which each top-level array element starts (the text is known to be valid JSON)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    lines: list[int] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)


# --------------------------------------------------------------------------------------------------
# CSV / TSV
# --------------------------------------------------------------------------------------------------


def _decoded_lines(path: str, errors: list[tuple[int, str]]) -> tuple[list[str], set[int]]:
    """All lines as text (bad UTF-8 replaced, so parsing can go on) and the numbers of the bad ones."""
    lines, bad = [], set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                lines.append(decode_line(raw))
            except ValueError as exc:
                errors.append((lineno, f"{path}:{lineno}: {exc}"))
                bad.add(lineno)
                lines.append(raw.decode("utf-8", errors="replace"))
    return lines, bad


def read_csv(path: str, limit: int | None = None, delimiter: str = ",") -> RawData:
    """A header row then one record per row; quoted cells may span lines, so each record is located
    by its first line (the header is line 1). All values stay strings: checkers convert per field."""
    errors: list[tuple[int, str]] = []
    lines, bad = _decoded_lines(path, errors)
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    records: list[Record] = []
    start = 1
    for cells in _csv_rows(reader, path, errors):
        first, start = start, reader.line_num + 1
        if not cells or bad.intersection(range(first, reader.line_num + 1)):
            continue  # blank line, or already reported as invalid UTF-8
        if header is None:
            header = [name.strip() for name in cells]
            continue
        where = f"{path}:{first}"
        if len(cells) != len(header):
            hint = " (a quote left open?)" if any("\n" in cell for cell in cells) else ""
            message = f"{where}: expected {len(header)} cells (as in the header), got {len(cells)}{hint}"
            errors.append((first, message))
            continue
        records.append(Record(where, first, dict(zip(header, cells, strict=True))))
        if limit is not None and len(records) >= limit:
            break
    return RawData(path, header or [], records, errors, typed=False)


def _csv_rows(reader: Any, path: str, errors: list[tuple[int, str]]) -> Iterator[list[str]]:
    """The reader's rows; a malformed file (e.g. an unclosed quote) is logged and ends the reading."""
    try:
        yield from reader
    except csv.Error as exc:
        errors.append((reader.line_num, f"{path}:{reader.line_num}: invalid CSV: {exc}"))


# --------------------------------------------------------------------------------------------------
# Arrow tables: Parquet, .arrow files, `datasets.save_to_disk` directories
# --------------------------------------------------------------------------------------------------


def from_table(source: str, table: pa.Table, limit: int | None = None) -> RawData:
    """Records from an Arrow table, located as `row N` (0-based, like `table[N]`)."""
    if limit is not None:
        table = table.slice(0, limit)
    rows = table.to_pylist()
    records = [Record(f"{source}: row {i}", i, row) for i, row in enumerate(rows)]
    return RawData(source, list(table.column_names), records, table=table)


def read_arrow_file(path: Path) -> pa.Table:
    """An Arrow IPC file: `datasets` writes the stream format; plain `.arrow` files may be either."""
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def hf_split_dir(path: str) -> Path:
    """A DatasetDict directory resolves to its 'train' split (or its only split); a split dir to itself."""
    p = Path(path)
    dict_file = p / "dataset_dict.json"
    if not dict_file.is_file():
        return p
    splits = json.loads(dict_file.read_text()).get("splits", [])
    if "train" in splits:
        return p / "train"
    if len(splits) == 1:
        return p / splits[0]
    raise DataError(
        f"{path}: a DatasetDict with splits {', '.join(splits)} and no 'train'; "
        f"pass one split's directory, e.g. {p / splits[0]}"
    )


def hf_arrow_files(split_dir: Path) -> list[Path]:
    """Shard files in order: as listed in state.json, else every data-*.arrow sorted by name."""
    state = split_dir / "state.json"
    if state.is_file():
        names = [entry["filename"] for entry in json.loads(state.read_text()).get("_data_files", [])]
        if names:
            return [split_dir / name for name in names]
    return sorted(split_dir.glob("data-*.arrow"))


def read_hf_dir(path: str, limit: int | None = None) -> RawData:
    """A directory written by `datasets`' `save_to_disk`, read with pyarrow alone (no `datasets`)."""
    split_dir = hf_split_dir(path)
    files = hf_arrow_files(split_dir)
    if not files:
        raise DataError(
            f"{path}: a directory, but not one written by `datasets.save_to_disk` "
            f"(no data-*.arrow files); use {SUPPORTED}"
        )
    table = pa.concat_tables([read_arrow_file(f) for f in files])
    return from_table(str(split_dir) if split_dir != Path(path) else path, table, limit)
