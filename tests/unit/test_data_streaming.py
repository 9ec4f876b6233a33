"""raylign.data at scale and at the edges: readers stream in batches, `limit=` reads only what it
needs, JSON arrays are decoded one element at a time, malformed CSV records and duplicate keys or
headers are reported by line, and data of a kind an algorithm cannot train on is one message."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylign.config import ALGORITHMS, DataConfig
from raylign.data import DataError, load_dataset, load_split, readers, summarize
from raylign.data import summary as summary_module
from raylign.data.schema import ALGORITHM_KINDS, KINDS, TASK_KINDS

# --------------------------------------------------------------------------------------------------
# Files of many rows
# --------------------------------------------------------------------------------------------------


def pair_row(i: int, width: int) -> dict:
    words = f"answer {i} " + "lorem ipsum dolor sit amet " * (width // 27)
    return {"prompt": f"question number {i}", "chosen": words, "rejected": words[::-1], "category": f"c{i % 7}"}


def write_rows(path: Path, rows: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    elif fmt == "json":
        with path.open("w", encoding="utf-8") as f:
            f.write("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")
    elif fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2000)
    return str(path)


def traced_peak(fn, warm_up):
    """(result, peak bytes of Python objects allocated while fn ran). Arrow buffers are not Python
    objects, so this is what loading holds besides the table's columns. `warm_up` runs first, so
    modules imported on first use are not counted."""
    warm_up()
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("fmt", "megabytes"), [("jsonl", 60), ("csv", 15), ("parquet", 15), ("json", 30)])
def test_loading_holds_one_batch_of_rows_not_the_file(tmp_path, monkeypatch, fmt, megabytes):
    monkeypatch.setattr(readers, "BATCH_ROWS", 128)
    monkeypatch.setattr(readers, "CHUNK_CHARS", 1 << 16)  # JSON arrays: the window of text decoded
    n = megabytes * 1000 // 2  # rows of about 2 KB
    rows = [pair_row(i, 1000) for i in range(n)]
    path = write_rows(tmp_path / f"big.{fmt}", rows, fmt)
    tiny = write_rows(tmp_path / f"tiny.{fmt}", rows[:3], fmt)
    first, last = rows[0], rows[-1]
    del rows
    table, peak = traced_peak(lambda: load_dataset(path, "pairs"), lambda: load_dataset(tiny, "pairs"))
    assert table.num_rows == n
    assert table.slice(0, 1).to_pylist() == [first] and table.slice(n - 1).to_pylist() == [last]
    # All rows as Python objects would be several times the table; one batch of 128 is ~0.7 MB.
    assert peak < table.nbytes / 10, f"peak {peak / 1e6:.1f} MB of Python objects, table {table.nbytes / 1e6:.0f} MB"


def test_validate_summary_streams_too(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 256)
    monkeypatch.setattr(summary_module, "SLICE_BYTES", 1 << 19)
    rows = [pair_row(i % 5000, 1000) for i in range(10_000)]  # every row twice
    path = write_rows(tmp_path / "big.jsonl", rows, "jsonl")
    tiny = write_rows(tmp_path / "tiny.jsonl", rows[:3], "jsonl")
    size = Path(path).stat().st_size
    summary, peak = traced_peak(lambda: summarize(path, "pairs"), lambda: summarize(tiny, "pairs"))
    assert summary["rows"] == 10_000 and summary["duplicates"] == {"rows": 5000, "prompts": 5000}
    assert summary["identical_pairs"] == 0
    assert peak < size / 10, f"peak {peak / 1e6:.1f} MB of Python objects for a {size / 1e6:.0f} MB file"


def test_rows_are_read_in_bounded_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 100)
    monkeypatch.setattr(readers, "BATCH_BYTES", 50_000)
    small = write_rows(tmp_path / "small.jsonl", [pair_row(i, 30) for i in range(1000)], "jsonl")
    sizes = [len(batch.records) for batch in readers.read_path(small).batches]
    assert sizes == [100] * 10
    wide = write_rows(tmp_path / "wide.jsonl", [pair_row(i, 5000) for i in range(100)], "jsonl")
    batches = list(readers.read_path(wide).batches)
    assert len(batches) > 5 and all(len(b.records) <= 6 for b in batches)  # ~10 KB rows: 50 KB a batch


def test_json_keys_first_seen_in_a_later_batch_become_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_ROWS", 2)
    rows = [{"text": "a", "n": 1}, {"text": "b"}, {"text": "c", "n": 2.5}, {"text": "d", "late": "x"}]
    rows.append({"text": "e", "n": "mixed"})  # 1 and "mixed" in one column: kept as JSON text
    table = load_dataset(write_rows(tmp_path / "t.jsonl", rows, "jsonl"), "text")
    assert table.column_names == ["text", "n", "late"]
    assert table.column("n").to_pylist() == ["1", None, "2.5", None, "mixed"]
    assert table.column("late").to_pylist() == [None, None, None, "x", None]
    chats = [{"prompt": "plain"}, {"prompt": "plain too"}, {"prompt": [{"role": "user", "content": "hi"}]}]
    table = load_dataset(write_rows(tmp_path / "p.jsonl", chats, "jsonl"), "prompts")
    assert table.column("prompt").to_pylist()[0] == [{"role": "user", "content": "plain"}]


def test_errors_are_capped_but_counted(tmp_path, monkeypatch):
    monkeypatch.setattr("raylign.data.schema.MAX_ERRORS_KEPT", 50)
    monkeypatch.setattr(readers, "BATCH_ROWS", 16)
    path = write_rows(tmp_path / "t.jsonl", [{"text": ""}] * 300, "jsonl")
    with pytest.raises(DataError) as err:
        load_dataset(path, "text")
    assert err.value.count == 300 and len(err.value.errors) == 50
    assert err.value.errors[0] == f"{path}:1: field 'text': empty text"
    assert err.value.errors[-1] == f"{path}:50: field 'text': empty text"
    assert str(err.value).startswith(f"{path}: 300 problems found")
    assert str(err.value).endswith("... and 280 more")


# --------------------------------------------------------------------------------------------------
# limit= reads only what it needs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_limit_stops_before_a_broken_tail(tmp_path, fmt):
    rows = [{"text": f"line {i}", "rating": float(i)} for i in range(2000)]
    path = Path(write_rows(tmp_path / f"r.{fmt}", rows, fmt))
    data = path.read_bytes()
    # Line ~1000 gets invalid UTF-8 and the end is cut off mid-row (a torn copy of a file).
    cut = data.index(b"line 1000")
    path.write_bytes(data[:cut] + b"caf\xe9 " + data[cut : len(data) - 25])
    table = load_dataset(str(path), "ratings", limit=10)
    assert table.column("text").to_pylist() == [f"line {i}" for i in range(10)]
    with pytest.raises(DataError, match="invalid UTF-8"):
        load_dataset(str(path), "ratings")


def test_parquet_limit_reads_only_the_first_row_groups(tmp_path):
    path = tmp_path / "p.parquet"
    rows = [{"text": f"row {i} " + "x" * 200, "rating": float(i)} for i in range(3000)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000, compression="none")
    meta = pq.ParquetFile(path).metadata
    last = meta.row_group(2).column(0)
    data = bytearray(path.read_bytes())
    start = last.data_page_offset
    data[start : start + 64] = b"\xff" * 64  # the last row group's page header is garbage
    path.write_bytes(bytes(data))
    assert load_dataset(str(path), "ratings", limit=10).num_rows == 10
    assert load_dataset(str(path), "ratings", limit=1500).num_rows == 1500


def test_limit_counts_rows_not_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    assert load_dataset(str(path), "text", limit=2).column("text").to_pylist() == ["a", "b"]


# --------------------------------------------------------------------------------------------------
# JSON arrays: one element at a time
# --------------------------------------------------------------------------------------------------


def counting_decoder(monkeypatch) -> list[int]:
    """Spy on every JSON decode: the number of characters each call parsed."""
    parsed: list[int] = []
    real = json.JSONDecoder.raw_decode

    def raw_decode(self, s, idx=0):
        try:
            value, end = real(self, s, idx)
        except json.JSONDecodeError as exc:
            parsed.append(exc.pos - idx)
            raise
        parsed.append(end - idx)
        return value, end

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", raw_decode)
    return parsed


def test_json_array_decodes_each_element_about_once(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_CHARS", 4096)  # many window boundaries, some inside elements
    rows = [{"text": f"row {i} " + "y" * (50 + (i * 37) % 9000), "rating": i} for i in range(3000)]
    path = write_rows(tmp_path / "a.json", rows, "json")
    size = Path(path).stat().st_size
    parsed = counting_decoder(monkeypatch)
    table = load_dataset(path, "ratings")
    assert table.num_rows == 3000 and table.column("rating").to_pylist()[-1] == 2999.0
    # Each element is parsed once, plus once more when the window cut it: linear in the file.
    assert sum(parsed) < 2 * size
    assert len(parsed) < 2 * len(rows)


def test_json_array_locates_elements_and_errors_across_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_CHARS", 1000)
    rows = [{"text": f"t{i}" + "z" * (i % 700), "rating": 1} for i in range(400)]
    rows[250]["rating"] = "high"
    path = tmp_path / "a.json"
    text = json.dumps(rows, indent=2)  # one element spans 4 lines + the opening bracket's line
    path.write_text(text[: text.rindex("}")] + "} oops]")  # invalid JSON after the last element
    with pytest.raises(DataError) as err:
        load_dataset(str(path), "ratings")
    last_line = text[: text.rindex("}")].count("\n") + 1
    col = len(text[: text.rindex("}")].rsplit("\n", 1)[1]) + 3
    assert err.value.errors == [
        f"{path}:{2 + 4 * 250}: field 'rating': expected a number, got string 'high'",
        f"{path}:{last_line}: invalid JSON: Expecting ',' delimiter (column {col})",
    ]


def test_json_array_structure_errors(tmp_path):
    cases = {
        '[{"text": "a"},]': "invalid JSON: Expecting value (column 16)",
        '[{"text": "a"} {"text": "b"}]': "invalid JSON: Expecting ',' delimiter (column 16)",
        '[{"text": "a"}': "invalid JSON: Expecting ',' delimiter (column 15)",
        '[{"text": "a"}] []': "invalid JSON: Expecting the end of the file after the array's ']' (column 17)",
        '[{"text": "a"}, {"text": "b}]': "invalid JSON: Unterminated string starting at (column 26)",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"a{i}.json"
        path.write_text(text)
        with pytest.raises(DataError) as err:
            load_dataset(str(path), "text")
        assert err.value.errors == [f"{path}:1: {message}"], text
    ok = tmp_path / "ok.json"
    ok.write_text('\ufeff [ ]\n')
    with pytest.raises(DataError, match="no rows"):
        load_dataset(str(ok), "text")
    numbers = tmp_path / "n.json"
    numbers.write_text("[" + ", ".join(["12345"] * 3) + "]")
    with pytest.raises(DataError) as err:
        load_dataset(str(numbers), "text")
    assert err.value.errors[0] == f"{numbers}:1: expected a JSON object {{...}}, got number 12345"


def test_json_array_invalid_utf8_is_located(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_CHARS", 64)
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n{"text": "a"},\n{"text": "b"},\n{"text": "caf\xe9"},\n{"text": "d"}\n]\n')
    with pytest.raises(DataError) as err:
        load_dataset(str(path), "text")
    assert err.value.errors == [f"{path}:4: invalid UTF-8 (byte 0xe9)"]


# --------------------------------------------------------------------------------------------------
# CSV: oversize cells, duplicate headers
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def small_field_limit():
    old = csv.field_size_limit(1000)
    yield 1000
    csv.field_size_limit(old)


def test_csv_oversize_cell_is_reported_and_the_rest_checked(tmp_path, small_field_limit):
    path = tmp_path / "r.csv"
    path.write_text(
        "text,rating\n"  # 1
        "fine,1\n"  # 2
        '"' + "long\n" * 300 + 'end",2\n'  # 3..303: a quoted cell of 1500+ characters over 301 lines
        "ok,high\n"  # 304: still checked
        + "x" * 1200 + ",3\n"  # 305: an unquoted cell over the limit
        + "also fine,4\n"  # 306
        + "last,low\n"  # 307
    )
    with pytest.raises(DataError) as err:
        load_dataset(str(path), "ratings")
    limit = (f"a cell is longer than the CSV field limit of {small_field_limit} characters "
             "(csv.field_size_limit()); shorten it, or use JSONL or Parquet for long texts")
    assert err.value.errors == [
        f"{path}:3: {limit}",
        f"{path}:304: field 'rating': expected a number, got string 'high'",
        f"{path}:305: {limit}",
        f"{path}:307: field 'rating': expected a number, got string 'low'",
    ]


def test_csv_duplicate_header_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,rating,text\nhello,1,world\nbad,x,y\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(path), "ratings")
    assert err.value.errors == [
        f"{path}:1: duplicate column 'text' in the header (columns 1 and 3); rename one",
        f"{path}:3: field 'rating': expected a number, got string 'x'",
    ]
    spaced = tmp_path / "s.tsv"
    spaced.write_text("text\t text \nhello\tworld\n")  # names are stripped, so these collide
    with pytest.raises(DataError, match="duplicate column 'text'"):
        load_dataset(str(spaced), "text")


def test_csv_header_with_missing_columns_is_reported_without_reading_on(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt,category\n" + b"hi,x\n" * 5000 + b"caf\xe9,x\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(path), "pairs")
    assert err.value.errors == [
        f"{path}: missing columns 'chosen', 'rejected': kind 'pairs' needs prompt, chosen, rejected; "
        "the file has prompt, category"
    ]


# --------------------------------------------------------------------------------------------------
# Duplicate JSON keys
# --------------------------------------------------------------------------------------------------


def test_duplicate_json_keys_are_errors(tmp_path):
    lines = [
        '{"prompt": "a", "chosen": "b", "rejected": "c"}',
        '{"prompt": "a", "chosen": "b", "rejected": "c", "chosen": "d"}',
        '{"prompt": [{"role": "user", "content": "x", "role": "system"}], "chosen": "b", "rejected": "c"}',
        '{"prompt": "a", "chosen": "", "rejected": "c"}',
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(jsonl), "pairs")
    dup = "invalid JSON: duplicate key {!r} in one object (each key may appear once)"
    assert err.value.errors == [
        f"{jsonl}:2: {dup.format('chosen')}",
        f"{jsonl}:3: {dup.format('role')}",
        f"{jsonl}:4: field 'chosen': empty text",
    ]
    array = tmp_path / "p.json"
    array.write_text("[\n" + ",\n".join(lines) + "\n]")
    with pytest.raises(DataError) as err:
        load_dataset(str(array), "pairs")
    assert err.value.errors == [
        f"{array}:3: {dup.format('chosen')}",
        f"{array}:4: {dup.format('role')}",
        f"{array}:5: field 'chosen': empty text",
    ]


# --------------------------------------------------------------------------------------------------
# Data an algorithm cannot train on
# --------------------------------------------------------------------------------------------------


def jsonl(tmp_path: Path, name: str, rows: list[dict]) -> str:
    return write_rows(tmp_path / name, rows, "jsonl")


def test_grpo_with_text_data_is_one_message(tmp_path):
    path = jsonl(tmp_path, "t.jsonl", [{"text": "hello world", "category": "greeting"}] * 20)
    with pytest.raises(DataError) as err:
        load_split(DataConfig(kind="text", train=path), algorithm="grpo")
    assert str(err.value) == (
        f"grpo needs data of kind prompts (columns: prompt); data.kind is 'text' and {path} has "
        "columns: text, category; use a file of kind prompts"
    )
    # A pairs file has prompts: only the kind is wrong.
    pairs = jsonl(tmp_path, "p.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 20)
    with pytest.raises(DataError, match=r"has columns: prompt, chosen, rejected; set data.kind=prompts$"):
        load_split(DataConfig(kind="pairs", train=pairs), algorithm="ppo")
    train, val = load_split(DataConfig(kind="prompts", train=pairs, val_fraction=0.1), algorithm="grpo")
    assert train.num_rows + val.num_rows == 20


def test_dpo_with_prompts_data_is_one_message(tmp_path):
    path = jsonl(tmp_path, "p.jsonl", [{"prompt": "how are you", "category": "chat"}] * 20)
    with pytest.raises(DataError) as err:
        load_split(DataConfig(kind="prompts", train=path), algorithm="dpo")
    assert str(err.value) == (
        f"dpo needs data of kind pairs (columns: prompt, chosen, rejected); data.kind is 'prompts' and "
        f"{path} has columns: prompt, category; use a file of kind pairs"
    )
    with pytest.raises(DataError) as err:  # the kind is right, the file is not
        load_split(DataConfig(kind="pairs", train=path), algorithm="dpo")
    assert err.value.errors == [
        f"{path}: missing columns 'chosen', 'rejected': dpo needs data of kind pairs (prompt, chosen, "
        "rejected); the file has prompt, category (data of kind prompts)"
    ]


def test_kind_messages_for_other_algorithms_and_builtins(tmp_path):
    with pytest.raises(DataError) as err:
        load_split(DataConfig(kind="prompts", train="builtin:everyday-prompts"), algorithm="sft")
    assert str(err.value).startswith(
        "sft needs data of kind text (columns: text), pairs (columns: prompt, chosen, rejected) or unpaired "
        "(columns: prompt, completion, label (true/false)); data.kind is 'prompts' and "
        "builtin:everyday-prompts has columns: prompt, category")
    text = jsonl(tmp_path, "t.jsonl", [{"text": "a"}] * 5)
    with pytest.raises(DataError, match="^a multitask preference task needs data of kind pairs"):
        load_split(DataConfig(kind="text", train=text), algorithm="multitask", task="preference")
    with pytest.raises(DataError) as err:  # an unreadable file: the kind is what to fix first
        load_split(DataConfig(kind="pairs", train=str(tmp_path / "missing.jsonl")), algorithm="kto")
    assert str(err.value) == (
        "kto needs data of kind unpaired (columns: prompt, completion, label (true/false)); data.kind is "
        "'pairs'; set data.kind=unpaired and point the data at such a file")


def test_every_algorithm_has_its_data_kinds():
    assert set(ALGORITHM_KINDS) | {"multitask"} == set(ALGORITHMS)
    assert all(set(kinds) <= set(KINDS) for kinds in [*ALGORITHM_KINDS.values(), *TASK_KINDS.values()])
