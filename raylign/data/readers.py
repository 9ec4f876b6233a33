"""File readers: JSONL / JSON, CSV / TSV, Parquet, Arrow, and local HF `datasets` directories.

Every reader streams: `read_path` returns a `Reading` whose batches are read lazily, a few thousand
rows at a time, so checking a file of any size holds one batch of raw rows, and `limit=N` stops
reading once N rows are in hand. A reader never raises on a bad line: it puts the problem in the
batch so the user sees every bad line of the file in one message.

JSONL and CSV are read as bytes, one physical line at a time, because only then can invalid UTF-8,
invalid JSON and malformed CSV be pinned to a line number (pyarrow's own JSON/CSV readers report byte
offsets of whole blocks at best); a JSON array is decoded one element at a time from a sliding
window of the file. Parquet and Arrow files are read with pyarrow's batch readers, and only the
kind's fields are ever converted to Python. Locations are 1-based file lines for text formats and
0-based `row N` (what `table[N]` / `ds[N]` would show) for Parquet and Arrow.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from raylign.data.schema import Batch, DataError, Reading, Record, describe

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED = ".jsonl, .json, .ndjson, .csv, .tsv, .parquet, .arrow, or a saved `datasets` directory"
# A batch ends at whichever comes first. Rows of a few KiB make BATCH_ROWS the bound; the byte bound
# keeps a file of very long rows (documents) from holding thousands of them at once.
BATCH_ROWS = 4096
BATCH_BYTES = 4 << 20
CHUNK_CHARS = 1 << 20  # JSON arrays: text decoded per read


def read_path(path: str, limit: int | None = None) -> Reading:
    """Open any supported file or directory for reading in batches (at most `limit` rows)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if p.is_dir():
        return read_hf_dir(path, limit)
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return Reading(path, read_jsonl(path, limit))
    if suffix == ".json":
        return Reading(path, read_json_array(path, limit) if _starts_with_bracket(p) else read_jsonl(path, limit))
    if suffix in (".csv", ".tsv"):
        return Reading(path, read_csv(path, limit, delimiter="\t" if suffix == ".tsv" else ","), typed=False,
                       fixed_columns=True)
    if suffix in (".parquet", ".pq"):
        return Reading(path, table_batches(path, read_parquet_batches(p), limit), fixed_columns=True)
    if suffix == ".arrow":
        return Reading(path, table_batches(path, read_arrow_batches(p), limit), fixed_columns=True)
    raise DataError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; use {SUPPORTED}")


def _starts_with_bracket(p: Path) -> bool:
    """A .json file is either JSON lines or one JSON array; the first non-space byte tells which."""
    with p.open("rb") as f:
        head = f.read(4096).lstrip(codecs.BOM_UTF8).lstrip()
    return head.startswith(b"[")


class _Batcher:
    """Gathers records and errors into batches of at most BATCH_ROWS rows / BATCH_BYTES bytes."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.rows = 0  # records so far, over all batches
        self._new()

    def _new(self) -> None:
        self.records: list[Record] = []
        self.errors: list[tuple[int, str]] = []
        self.columns: dict[str, None] = {}  # insertion-ordered set of keys seen
        self.size = 0

    def add(self, record: Record, size: int, columns: Iterable[str]) -> None:
        self.records.append(record)
        self.columns.update(dict.fromkeys(columns))
        self.size += size
        self.rows += 1

    def error(self, pos: int, message: str) -> None:
        self.errors.append((pos, message))
        self.size += len(message)

    @property
    def done(self) -> bool:
        """`limit` rows read: the reader stops here and reads no further."""
        return self.limit is not None and self.rows >= self.limit

    @property
    def full(self) -> bool:
        return len(self.records) + len(self.errors) >= BATCH_ROWS or self.size >= BATCH_BYTES

    def take(self) -> Batch:
        batch = Batch(list(self.columns), self.records, self.errors)
        self._new()
        return batch

    def __bool__(self) -> bool:
        return bool(self.records or self.errors)


# --------------------------------------------------------------------------------------------------
# JSON lines and JSON arrays
# --------------------------------------------------------------------------------------------------


class DuplicateKey(ValueError):
    """One JSON object names the same key twice (json keeps the last silently; we refuse)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(f"invalid JSON: duplicate key {key!r} in one object (each key may appear once)")
            seen.add(key)
    return obj


STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)
PLAIN_JSON = json.JSONDecoder()


def decode_line(raw: bytes) -> str:
    """UTF-8 decode, raising ValueError with the offending byte and its position on the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None


def parse_json_object(text: str) -> dict[str, Any]:
    """One JSONL line -> dict, or ValueError saying what is wrong with it."""
    try:
        obj = STRICT_JSON.decode(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object {{...}}, got {describe(obj)}")
    return obj


def read_jsonl(path: str, limit: int | None = None) -> Iterator[Batch]:
    """One JSON object per line; blank lines are skipped; each bad line is reported with its number."""
    batcher = _Batcher(limit)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = parse_json_object(decode_line(raw))
            except ValueError as exc:
                batcher.error(lineno, f"{where}: {exc}")
            else:
                batcher.add(Record(where, lineno, obj), len(raw), obj)
                if batcher.done:
                    break
            if batcher.full:
                yield batcher.take()
    if batcher:
        yield batcher.take()


_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _JsonText:
    """A JSON file's text as a sliding window: `buf[pos:]` is what is not consumed yet; `line` and
    `col` locate `buf[pos]` in the file. Text is decoded in chunks as the parser asks for more, and
    consumed text is dropped, so the window holds about one element plus one chunk."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.base = 0  # offset in the file's text of buf[0]
        self.line, self.col = 1, 1
        self.eof = False
        self.utf8_error: tuple[int, int] | None = None  # (line, byte) of invalid UTF-8, ending the text
        self.first = True

    def more(self, chars: int = CHUNK_CHARS) -> bool:
        """Append about `chars` more characters; False when the file has nothing more to give."""
        if self.eof:
            return False
        if self.pos > len(self.buf) // 2:  # drop consumed text: each character is copied O(1) times
            self.buf, self.base, self.pos = self.buf[self.pos :], self.base + self.pos, 0
        data = self.f.read(chars)
        if self.first:
            data, self.first = data.removeprefix(codecs.BOM_UTF8), False
        try:
            self.buf += self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            good = exc.object[: exc.start].decode("utf-8")
            line = self.line + self.buf.count("\n", self.pos) + good.count("\n")
            self.utf8_error = (line, exc.object[exc.start])
            self.buf += good
            self.eof = True
            return bool(good)
        if not data:
            self.eof = True
        return bool(data)

    def consume(self, end: int) -> None:
        """Move `pos` to `end`, keeping `line` and `col` in step."""
        newlines = self.buf.count("\n", self.pos, end)
        if newlines:
            self.line += newlines
            self.col = end - self.buf.rfind("\n", self.pos, end)
        else:
            self.col += end - self.pos
        self.pos = end

    def where(self, index: int) -> tuple[int, int]:
        """(line, column) of `buf[index]`, index >= pos."""
        newlines = self.buf.count("\n", self.pos, index)
        if newlines:
            return self.line + newlines, index - self.buf.rfind("\n", self.pos, index)
        return self.line, self.col + index - self.pos

    def skip_space(self) -> str:
        """Skip whitespace (reading on as needed); the next character, or '' at the end."""
        while True:
            match = _WHITESPACE.match(self.buf, self.pos)
            assert match is not None  # the pattern matches the empty string
            self.consume(match.end())
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""


class _JsonSyntax(Exception):
    """The array cannot be read past this point: (line, message)."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


def _decode_value(text: _JsonText, decoder: json.JSONDecoder) -> tuple[Any, int]:
    """Decode the JSON value at `text.pos`, reading more text while it may be cut by the window.

    An error is final at the end of the file, or when it comes back at the same place after more text
    was read (an unterminated string only at the end of the file: a string may be longer than any
    chunk). The reads grow with the element, so a value is decoded O(1) times on average.
    """
    last: tuple[str, int] | None = None
    while True:
        try:
            value, end = decoder.raw_decode(text.buf, text.pos)
            if end < len(text.buf) or text.eof:  # a number at the window's edge may go on
                return value, end
        except json.JSONDecodeError as exc:
            error = (exc.msg, text.base + exc.pos)
            final = text.eof or (error == last and not exc.msg.startswith("Unterminated string"))
            if final:
                line, col = text.where(exc.pos)
                # Text cut by invalid UTF-8 fails to decode at the cut; a JSON string cannot span
                # lines, so an error on an earlier line is the JSON's own.
                if text.utf8_error and line >= text.utf8_error[0]:
                    raise _utf8_syntax(text) from None
                raise _JsonSyntax(line, f"invalid JSON: {exc.msg} (column {col})") from None
            last = error
        text.more(max(CHUNK_CHARS, len(text.buf) - text.pos))


def _utf8_syntax(text: _JsonText) -> _JsonSyntax:
    assert text.utf8_error is not None
    line, byte = text.utf8_error
    return _JsonSyntax(line, f"invalid UTF-8 (byte 0x{byte:02x})")


def _expected(text: _JsonText, what: str) -> _JsonSyntax:
    if text.utf8_error and text.pos >= len(text.buf):
        return _utf8_syntax(text)
    line, col = text.where(text.pos)
    return _JsonSyntax(line, f"invalid JSON: Expecting {what} (column {col})")


def read_json_array(path: str, limit: int | None = None) -> Iterator[Batch]:
    """A file holding one JSON array of objects, decoded one element at a time (time linear in the
    file, memory about one element); each element is located by the line it starts on. Invalid JSON
    or UTF-8 ends the reading there (the array cannot be resynchronised), reported with its line."""
    batcher = _Batcher(limit)
    with open(path, "rb") as f:
        text = _JsonText(f)
        try:
            if text.skip_space() != "[":
                raise _expected(text, "'['")
            text.consume(text.pos + 1)
            nxt = text.skip_space()
            while nxt != "]":
                lineno = text.line
                where = f"{path}:{lineno}"
                try:
                    item, end = _decode_value(text, STRICT_JSON)
                except DuplicateKey as exc:
                    batcher.error(lineno, f"{where}: {exc}")
                    _, end = _decode_value(text, PLAIN_JSON)
                else:
                    if isinstance(item, dict):
                        batcher.add(Record(where, lineno, item), end - text.pos, item)
                    else:
                        batcher.error(lineno, f"{where}: expected a JSON object {{...}}, got {describe(item)}")
                text.consume(end)
                if batcher.done:
                    break
                if batcher.full:
                    yield batcher.take()
                nxt = text.skip_space()
                if nxt == ",":
                    text.consume(text.pos + 1)
                    if text.skip_space() in ("]", ""):
                        raise _expected(text, "value")
                elif nxt != "]":
                    raise _expected(text, "',' delimiter")
            else:
                text.consume(text.pos + 1)
                if text.skip_space():
                    raise _expected(text, "the end of the file after the array's ']'")
        except _JsonSyntax as exc:
            batcher.error(exc.line, f"{path}:{exc.line}: {exc.message}")
    if batcher:
        yield batcher.take()


# --------------------------------------------------------------------------------------------------
# CSV / TSV
# --------------------------------------------------------------------------------------------------


class _CsvLines:
    """The file's physical lines as text for `csv.reader` (line endings kept, so quoted cells keep
    their newlines). Counts lines, reports undecodable ones (replaced, so parsing goes on) and counts
    quote characters, which tells after a parse error whether a quoted cell is still open."""

    def __init__(self, f: IO[bytes], path: str, errors: Any):
        self.f, self.path, self.errors = f, path, errors
        self.lineno = 0
        self.last_bad = 0  # last line with invalid UTF-8
        self.quotes = 0  # '"' seen since the caller last reset it

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        raw = next(self.f)
        self.lineno += 1
        if self.lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            text = decode_line(raw)
        except ValueError as exc:
            self.errors(self.lineno, f"{self.path}:{self.lineno}: {exc}")
            self.last_bad = self.lineno
            text = raw.decode("utf-8", errors="replace")
        self.quotes += text.count('"')
        return text


def read_csv(path: str, limit: int | None = None, delimiter: str = ",") -> Iterator[Batch]:
    """A header row then one record per row; quoted cells may span lines, so each record is located
    by its first line (the header is line 1). All values stay strings: checkers convert per field.

    A malformed record (a cell over `csv.field_size_limit()`, ...) is reported at its first line and
    skipped, to the end of its quoted cell when one is open, and the rest of the file is checked."""
    batcher = _Batcher(limit)
    header: list[str] | None = None
    with open(path, "rb") as f:
        lines = _CsvLines(f, path, batcher.error)
        reader = csv.reader(lines, delimiter=delimiter)
        while True:
            first = lines.lineno + 1
            lines.quotes = 0
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                batcher.error(first, f"{path}:{first}: {_csv_problem(exc)}")
                while lines.quotes % 2:  # inside a quoted cell: skip to the line that closes it
                    if next(lines, None) is None:
                        break
                reader = csv.reader(lines, delimiter=delimiter)  # a fresh parser for what follows
                continue
            if not cells or lines.last_bad >= first:
                continue  # blank line, or already reported as invalid UTF-8
            if header is None:
                header = [name.strip() for name in cells]
                _check_header(header, f"{path}:{first}", first, batcher)
                batcher.columns.update(dict.fromkeys(header))
                continue
            where = f"{path}:{first}"
            if len(cells) != len(header):
                hint = " (a quote left open?)" if any("\n" in cell for cell in cells) else ""
                batcher.error(first, f"{where}: expected {len(header)} cells (as in the header), got {len(cells)}{hint}")
            else:
                batcher.add(Record(where, first, dict(zip(header, cells, strict=True))), sum(map(len, cells)), ())
                if batcher.done:
                    break
            if batcher.full:
                yield batcher.take()
                batcher.columns.update(dict.fromkeys(header))
    if batcher or header is not None:
        batch = batcher.take()
        batch.columns = header or []
        yield batch


def _csv_problem(exc: csv.Error) -> str:
    text = str(exc)
    if text.startswith("field larger than field limit"):
        limit = csv.field_size_limit()
        return (f"a cell is longer than the CSV field limit of {limit} characters "
                f"(csv.field_size_limit()); shorten it, or use JSONL or Parquet for long texts")
    return f"invalid CSV: {text}"


def _check_header(header: list[str], where: str, lineno: int, batcher: _Batcher) -> None:
    """Two columns of one name cannot both be read (a row would keep only the last): an error."""
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        if name in seen:
            batcher.error(lineno, f"{where}: duplicate column {name!r} in the header "
                                  f"(columns {seen[name]} and {i}); rename one")
        else:
            seen[name] = i


# --------------------------------------------------------------------------------------------------
# Arrow tables: Parquet, .arrow files, `datasets.save_to_disk` directories
# --------------------------------------------------------------------------------------------------


def table_batches(source: str, batches: Iterator[pa.RecordBatch], limit: int | None = None) -> Iterator[Batch]:
    """Batches of an Arrow source, located as `row N` (0-based, like `table[N]`); reading stops at
    `limit` rows."""
    row = 0
    for record_batch in batches:
        for offset in range(0, max(record_batch.num_rows, 1), BATCH_ROWS):
            piece = record_batch.slice(offset, BATCH_ROWS)
            if limit is not None:
                piece = piece.slice(0, limit - row)
            yield Batch(piece.schema.names, table=pa.Table.from_batches([piece]), first_row=row)
            row += piece.num_rows
            if limit is not None and row >= limit:
                return


def read_parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """A Parquet file one row group at a time, in batches (one reader over all row groups would read
    ahead into groups a `limit` never needs). An empty file still gives its schema."""
    parquet = pq.ParquetFile(path)
    yield pa.RecordBatch.from_pylist([], schema=parquet.schema_arrow)
    for group in range(parquet.num_row_groups):
        yield from parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], use_threads=False)


def read_arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """An Arrow IPC file, memory-mapped: `datasets` writes the stream format; plain `.arrow` files may
    be either."""
    with pa.memory_map(str(path)) as source:
        try:
            reader: Any = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            for i in range(file_reader.num_record_batches):
                yield file_reader.get_batch(i)
            if not file_reader.num_record_batches:
                yield pa.RecordBatch.from_pylist([], schema=file_reader.schema)
            return
        empty = True
        for batch in reader:
            empty = False
            yield batch
        if empty:
            yield pa.RecordBatch.from_pylist([], schema=reader.schema)


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


def read_hf_dir(path: str, limit: int | None = None) -> Reading:
    """A directory written by `datasets`' `save_to_disk`, read with pyarrow alone (no `datasets`)."""
    split_dir = hf_split_dir(path)
    files = hf_arrow_files(split_dir)
    if not files:
        raise DataError(
            f"{path}: a directory, but not one written by `datasets.save_to_disk` "
            f"(no data-*.arrow files); use {SUPPORTED}"
        )
    source = str(split_dir) if split_dir != Path(path) else path
    shards = (batch for file in files for batch in read_arrow_batches(file))
    return Reading(source, table_batches(source, shards, limit), fixed_columns=True)
