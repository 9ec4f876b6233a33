"""raylign.data: readers for every kind and format, validation messages, templates, collators, builtins."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raylign.config import DataConfig
from raylign.data import (
    BUILTIN_DATASETS,
    IGNORE_INDEX,
    MESSAGES_TYPE,
    DataError,
    block_causal_mask,
    collate_left_pad,
    collate_right_pad,
    format_completion,
    format_prompt,
    format_summary,
    list_builtin,
    load_dataset,
    load_split,
    pack_sequences,
    split_train_val,
    summarize,
    table_kind,
    tokenize_example,
    tokenize_prompt_completion,
)

# --------------------------------------------------------------------------------------------------
# A tiny word-level tokenizer with a ChatML template, built in-process (no downloads)
# --------------------------------------------------------------------------------------------------

WORDS = (
    "hello world how are you i am fine thanks the cat sat on mat tell me a joke good bad "
    "user assistant system one two three four five six seven eight nine ten"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like Llama: the tokenizer itself prepends BOS when asked for special tokens.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------
# Writers for every format
# --------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def csv_cell(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return value


def write_csv(path: Path, rows: list[dict]) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_hf_dir(path: Path, rows: list[dict]) -> str:
    """The layout `datasets.Dataset.save_to_disk` writes: IPC-stream shard + state.json + info."""
    path.mkdir()
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}
    (path / "state.json").write_text(json.dumps(state))
    (path / "dataset_info.json").write_text("{}")
    return str(path)


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet, "hf": write_hf_dir}
SUFFIX = {"jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet", "hf": ""}


def write(tmp_path: Path, fmt: str, rows: list[dict], name: str = "data") -> str:
    return WRITERS[fmt](tmp_path / f"{name}{SUFFIX[fmt]}", rows)


KIND_ROWS = {
    "prompts": [
        {"prompt": "tell me a joke", "category": "fun"},
        {"prompt": "how are you", "category": "chat"},
    ],
    "pairs": [
        {"prompt": "how are you", "chosen": "i am fine thanks", "rejected": "bad", "category": "chat"},
        {"prompt": "tell me a joke", "chosen": "the cat sat on the mat", "rejected": "no", "category": "fun"},
    ],
    "unpaired": [
        {"prompt": "how are you", "completion": "i am fine", "label": True, "category": "chat"},
        {"prompt": "how are you", "completion": "go away", "label": False, "category": "chat"},
    ],
    "ratings": [
        {"text": "good", "rating": 2.5, "category": "word"},
        {"text": "bad", "rating": -2.0, "category": "word"},
    ],
    "text": [
        {"text": "the cat sat on the mat", "category": "story"},
        {"text": "hello world", "category": "greeting"},
    ],
}


# --------------------------------------------------------------------------------------------------
# Reading every kind from every format
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("kind", list(KIND_ROWS))
def test_every_kind_loads_from_every_format(tmp_path, kind, fmt):
    rows = KIND_ROWS[kind]
    table = load_dataset(write(tmp_path, fmt, rows), kind)
    assert table.to_pylist() == rows
    assert table.column_names == list(rows[0])  # extra column `category` kept, file order kept
    assert table_kind(table) == kind


def test_known_columns_get_fixed_types(tmp_path):
    rows = [{"prompt": "how are you", "completion": "fine", "label": True, "rating": 3}]
    table = load_dataset(write_jsonl(tmp_path / "u.jsonl", rows), "unpaired")
    assert table.schema.field("label").type == pa.bool_()
    ratings = load_dataset(write_jsonl(tmp_path / "r.jsonl", [{"text": "good", "rating": 3}]), "ratings")
    assert ratings.schema.field("rating").type == pa.float64()
    assert ratings.column("rating").to_pylist() == [3.0]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_ratings_with_prompt_and_completion(tmp_path, fmt):
    rows = [{"prompt": "how are you", "completion": "fine", "rating": 4.0}]
    assert load_dataset(write(tmp_path, fmt, rows), "ratings").to_pylist() == rows


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_chat_message_prompts(tmp_path, fmt):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    rows = [{"prompt": chat, "chosen": "hi", "rejected": "go away"}]
    table = load_dataset(write(tmp_path, fmt, rows), "pairs")
    assert table.schema.field("prompt").type == MESSAGES_TYPE
    assert table.column("prompt").to_pylist() == [chat]


def test_mixed_text_and_chat_prompts_become_chats(tmp_path):
    chat = [{"role": "user", "content": "hello"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "how are you"}, {"prompt": chat}])
    table = load_dataset(path, "prompts")
    assert table.column("prompt").to_pylist() == [[{"role": "user", "content": "how are you"}], chat]


def test_datasets_library_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = KIND_ROWS["pairs"]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_dataset(str(tmp_path / "dd"), "pairs").to_pylist() == rows  # the 'train' split
    assert load_dataset(str(tmp_path / "dd" / "test"), "pairs").to_pylist() == rows[:1]


def test_json_array_tsv_limit_and_inferred_kind(tmp_path):
    rows = KIND_ROWS["pairs"]
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps(rows, indent=2))
    assert load_dataset(str(array)).to_pylist() == rows  # kind inferred from the columns
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tcategory\nhello world\tgreeting\nthe cat\tanimal\n")
    assert load_dataset(str(tsv), "text").column("text").to_pylist() == ["hello world", "the cat"]
    assert load_dataset(str(tsv), "text", limit=1).num_rows == 1


def test_csv_quoted_newlines_keep_line_numbers(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('text,rating\n"two\nlines",1\nok,high\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_dataset(str(path), "ratings")
    assert err.value.errors == [f"{path}:4: field 'rating': expected a number, got string 'high'"]


# --------------------------------------------------------------------------------------------------
# Validation messages: file, line, field
# --------------------------------------------------------------------------------------------------


def test_every_bad_row_is_reported_with_file_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "ok", "chosen": "a", "rejected": "b"}
    lines = [
        json.dumps(good).encode(),  # 1
        json.dumps({**good, "chosen": "   "}).encode(),  # 2: empty text
        b"",  # 3: blank lines are skipped
        json.dumps({**good, "prompt": 5}).encode(),  # 4: wrong type
        b"{not json}",  # 5: invalid JSON
        b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',  # 6: invalid UTF-8 (latin-1 e-acute)
        json.dumps({"prompt": "ok", "chosen": "a"}).encode(),  # 7: missing field in this row
        b"[1, 2]",  # 8: not an object
        json.dumps({**good, "prompt": [{"role": "bot", "content": "hi"}]}).encode(),  # 9: bad role
        json.dumps({**good, "prompt": [{"role": "user", "content": ""}]}).encode(),  # 10: empty turn
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(path), "pairs")
    p = str(path)
    assert err.value.errors == [
        f"{p}:2: field 'chosen': empty text",
        f"{p}:4: field 'prompt': expected a string or a list of {{role, content}} messages, got number 5",
        f"{p}:5: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{p}:6: invalid UTF-8 (byte 0xe9 at column 16)",
        f"{p}:7: field 'rejected': missing",
        f"{p}:8: expected a JSON object {{...}}, got a list",
        f"{p}:9: field 'prompt': message 1: role 'bot' is not one of system, user, assistant",
        f"{p}:10: field 'prompt': message 1: empty text",
    ]
    message = str(err.value)
    assert message.startswith(f"{p}: 8 problems found; nothing was loaded")
    assert f"\n  {p}:2: field 'chosen': empty text" in message


def test_wrong_types_for_rating_and_label(tmp_path):
    ratings = write_jsonl(
        tmp_path / "r.jsonl", [{"text": "a", "rating": "high"}, {"text": "b", "rating": True}]
    )
    with pytest.raises(DataError) as err:
        load_dataset(ratings, "ratings")
    assert err.value.errors == [
        f"{ratings}:1: field 'rating': expected a number, got string 'high'",
        f"{ratings}:2: field 'rating': expected a number, got boolean true",
    ]
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(DataError) as err:
        load_dataset(unpaired, "unpaired")
    assert err.value.errors == [f"{unpaired}:1: field 'label': expected true or false, got string 'yes'"]


def test_missing_column_is_one_file_level_message(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "y", "category": "c"}] * 3)
    with pytest.raises(DataError) as err:
        load_dataset(path, "pairs")
    assert err.value.errors == [
        f"{path}: missing column 'rejected': kind 'pairs' needs prompt, chosen, rejected; "
        "the file has prompt, chosen, category"
    ]


def test_csv_errors_use_file_lines_and_invalid_utf8(tmp_path):
    path = tmp_path / "u.csv"
    path.write_bytes(
        b"prompt,completion,label\n"  # line 1: header
        b"hi,fine,true\n"  # 2
        b"hi,,false\n"  # 3: empty completion
        b"hi,fine,maybe\n"  # 4: bad label
        b"hi,caf\xe9,1\n"  # 5: invalid UTF-8
        b"hi,fine\n"  # 6: too few cells
    )
    with pytest.raises(DataError) as err:
        load_dataset(str(path), "unpaired")
    p = str(path)
    assert err.value.errors == [
        f"{p}:3: field 'completion': empty text",
        f"{p}:4: field 'label': expected true or false, got string 'maybe'",
        f"{p}:5: invalid UTF-8 (byte 0xe9 at column 7)",
        f"{p}:6: expected 3 cells (as in the header), got 2",
    ]


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_arrow_formats_report_rows(tmp_path, fmt):
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": " ", "rejected": "c"},
        {"prompt": "a", "chosen": "b", "rejected": None},
    ]
    path = write(tmp_path, fmt, rows)
    with pytest.raises(DataError) as err:
        load_dataset(path, "pairs")
    assert err.value.errors == [
        f"{path}: row 1: field 'chosen': empty text",
        f"{path}: row 2: field 'rejected': missing",
    ]


def test_error_list_is_capped_with_a_count(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}] * 25)
    with pytest.raises(DataError) as err:
        load_dataset(path, "text")
    assert len(err.value.errors) == 25
    message = str(err.value)
    assert message.count("field 'text': empty text") == 20
    assert message.endswith("  ... and 5 more")


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_dataset(str(tmp_path / "nope.jsonl"), "text")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_dataset(str(tmp_path / "x.txt"), "text")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(str(empty), "text")
    with pytest.raises(DataError, match="unknown data kind 'pair'"):
        load_dataset(write_jsonl(tmp_path / "k.jsonl", [{"text": "a"}]), "pair")


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


def prompt_table(tmp_path, n: int = 40) -> pa.Table:
    rows = [{"prompt": f"prompt {i // 2}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(n)]
    return load_dataset(write_jsonl(tmp_path / "u.jsonl", rows), "unpaired")


def test_split_is_deterministic_and_keeps_prompt_groups_together(tmp_path):
    table = prompt_table(tmp_path)
    train, val = split_train_val(table, 0.25, seed=7)
    again_train, again_val = split_train_val(table, 0.25, seed=7)
    assert train.to_pylist() == again_train.to_pylist() and val.to_pylist() == again_val.to_pylist()
    assert train.num_rows + val.num_rows == 40 and val.num_rows == 10
    assert not set(train.column("prompt").to_pylist()) & set(val.column("prompt").to_pylist())
    _, other_val = split_train_val(table, 0.25, seed=8)
    assert other_val.to_pylist() != val.to_pylist()
    assert table_kind(val) == "unpaired"


def test_split_edge_cases(tmp_path):
    table = prompt_table(tmp_path, 6)
    train, val = split_train_val(table, 0.0, seed=0)
    assert train.num_rows == 6 and val.num_rows == 0
    _, val = split_train_val(table, 0.01, seed=0)
    assert val.num_rows >= 1  # a positive fraction always yields some validation data
    with pytest.raises(ValueError):
        split_train_val(table, 1.0)


def test_load_split_uses_validation_file_or_splits(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"text": f"text {i}"} for i in range(20)])
    val_path = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out"}])
    train, val = load_split(DataConfig(kind="text", train=train_path, validation=val_path))
    assert (train.num_rows, val.column("text").to_pylist()) == (20, ["held out"])
    train, val = load_split(DataConfig(kind="text", train=train_path, val_fraction=0.2, split_seed=1))
    assert (train.num_rows, val.num_rows) == (16, 4)
    train, val = load_split(DataConfig(kind="text", train=train_path, val_fraction=0.0, limit=5))
    assert (train.num_rows, val.num_rows) == (5, 0)


# --------------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------------


def test_format_prompt(tok):
    assert format_prompt("hello", tok) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert format_prompt(chat, tok) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_prompt("hello", tok, apply_chat_template=False) == "hello"
    assert format_prompt("hello", make_tokenizer(chat_template=None)) == "hello"
    assert format_prompt(chat, None) == "be brief\n\nhi"


def test_format_completion_is_the_assistant_turn(tok):
    assert format_completion("hello", "i am fine", tok) == "i am fine<|im_end|>\n"
    prompt_text = format_prompt("hello", tok)
    full = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "i am fine"}], tokenize=False
    )
    assert prompt_text + format_completion("hello", "i am fine", tok) == full
    assert format_completion("hello", "i am fine", make_tokenizer(chat_template=None)) == "i am fine</s>"
    assert format_completion("hello", "i am fine", tok, apply_chat_template=False) == "i am fine</s>"


# --------------------------------------------------------------------------------------------------
# Tokenization, collators, packing
# --------------------------------------------------------------------------------------------------


def test_tokenize_masks_prompt_and_adds_bos_once(tok):
    out = tokenize_prompt_completion(tok, "hello world", "i am fine</s>", max_prompt_length=10, max_length=20)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert out["input_ids"] == [bos, *ids_of(tok, "hello world"), *ids_of(tok, "i am fine"), eos]
    assert out["loss_mask"] == [0, 0, 0, 1, 1, 1, 1]
    assert out["prompt_length"] == 3
    # A template that writes BOS itself must not end up with two.
    twice = tokenize_prompt_completion(tok, "<s> hello", "fine", max_prompt_length=10, max_length=20)
    assert twice["input_ids"][:2] == [bos, ids_of(tok, "hello")[0]]


def test_tokenize_truncates_prompt_left_and_completion_right(tok):
    prompt = "one two three four five six"
    out = tokenize_prompt_completion(tok, prompt, "seven eight nine ten", max_prompt_length=3, max_length=6)
    # BOS is kept, then the *last* prompt words; the completion keeps its *first* words.
    assert out["input_ids"] == [tok.bos_token_id, *ids_of(tok, "five six"), *ids_of(tok, "seven eight nine")]
    assert out["loss_mask"] == [0, 0, 0, 1, 1, 1]
    # The prompt never eats the whole budget: at least one completion token survives.
    short = tokenize_prompt_completion(tok, prompt, "seven", max_prompt_length=100, max_length=4)
    assert short["loss_mask"] == [0, 0, 0, 1]


def test_tokenize_example_with_chat_template(tok):
    out = tokenize_example(tok, "hello", "i am fine", max_prompt_length=32, max_length=64)
    completion_ids = ids_of(tok, "i am fine<|im_end|>\n")
    assert out["input_ids"][-len(completion_ids) :] == completion_ids
    assert sum(out["loss_mask"]) == len(completion_ids)


def test_collate_left_pad_for_generation():
    batch = collate_left_pad([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_right_pad_for_training():
    batch = collate_right_pad(
        [
            {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1], "rating": 1.5},
            {"input_ids": [8, 9], "loss_mask": [0, 1], "rating": -0.5},
        ],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch["rating"].tolist() == [1.5, -0.5]
    plain = collate_right_pad([[1, 2], [3]], pad_id=0)  # no loss mask: train on every real token
    assert plain["labels"].tolist() == [[1, 2], [3, IGNORE_INDEX]]


def test_pack_sequences():
    seqs = [
        {"input_ids": [1, 2, 3]},
        {"input_ids": [4, 5, 6, 7], "loss_mask": [0, 0, 1, 1]},
        {"input_ids": [8, 9]},
        {"input_ids": list(range(10, 20))},  # longer than a row: cut to 8
    ]
    packed = pack_sequences(seqs, max_length=8, pad_id=0)
    assert packed["input_ids"].tolist() == [
        [1, 2, 3, 4, 5, 6, 7, 0],
        [8, 9, 0, 0, 0, 0, 0, 0],
        [10, 11, 12, 13, 14, 15, 16, 17],
    ]
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert packed["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    # First token of every sequence, masked-out prompt tokens and padding get no loss.
    x = IGNORE_INDEX
    assert packed["labels"][0].tolist() == [x, 2, 3, x, x, 6, 7, x]


def test_block_causal_mask_separates_packed_sequences():
    mask = block_causal_mask(torch.tensor([[0, 1, 0, 1, 2]]))
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def test_summary_counts_lengths_and_duplicates(tmp_path, tok):
    rows = [
        {"prompt": "hello", "chosen": "good", "rejected": "bad"},
        {"prompt": "hello", "chosen": "good", "rejected": "bad"},  # exact duplicate row
        {"prompt": "hello", "chosen": "fine", "rejected": "fine"},  # duplicate prompt, identical pair
        {"prompt": "how are you", "chosen": "i am fine thanks", "rejected": "bad"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    summary = summarize(path, "pairs", tokenizer=tok)
    assert summary["rows"] == 4 and summary["kind"] == "pairs"
    assert summary["duplicates"] == {"rows": 1, "prompts": 2}
    assert summary["identical_pairs"] == 1
    assert summary["lengths"]["prompt"]["chars"] == {"p50": 5, "p90": 11, "p99": 11, "max": 11}
    assert summary["lengths"]["chosen"]["tokens"] == {"p50": 1, "p90": 4, "p99": 4, "max": 4}
    # chat-formatted prompt: <|im_start|> user hello <|im_end|> <|im_start|> assistant
    assert summary["lengths"]["prompt"]["tokens"]["p50"] == 6
    text = format_summary(summary)
    assert text.splitlines()[0] == f"{path}: 4 rows of kind 'pairs' — valid"
    assert "duplicates: 1 rows, 2 prompts" in text
    assert "chosen      chars          4      16      16      16" in text


def test_summary_of_builtin_ratings():
    summary = summarize("builtin:vader-ratings", "ratings")
    assert summary["ratings"]["min"] >= -4 and summary["ratings"]["max"] <= 4
    assert "ratings: min" in format_summary(summary)


# --------------------------------------------------------------------------------------------------
# Built-in datasets
# --------------------------------------------------------------------------------------------------


def test_builtin_everyday_prompts():
    table = load_dataset("builtin:everyday-prompts")
    prompts = table.column("prompt").to_pylist()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert table_kind(table) == "prompts"
    assert len(set(table.column("category").to_pylist())) >= 20
    assert load_dataset("builtin:everyday-prompts", "prompts", limit=10).num_rows == 10


def test_builtin_vader_ratings():
    table = load_dataset("builtin:vader-ratings", "ratings")
    assert 7000 <= table.num_rows <= 8000
    assert table.schema.field("rating").type == pa.float64()
    by_word = dict(zip(table.column("text").to_pylist(), table.column("rating").to_pylist(), strict=True))
    assert by_word["good"] > 1.0 and by_word["horrible"] < -1.0
    first = table.slice(0, 1).to_pylist()[0]
    assert len(first["ratings"]) == 10 and isinstance(first["std"], float)


def test_builtin_registry_and_errors():
    assert set(BUILTIN_DATASETS) == {"everyday-prompts", "vader-ratings"}
    assert list_builtin()["builtin:vader-ratings"][0] == "ratings"
    with pytest.raises(DataError, match="Did you mean 'builtin:everyday-prompts'"):
        load_dataset("builtin:everyday-prompt", "prompts")
    with pytest.raises(DataError, match="missing columns 'chosen', 'rejected'"):
        load_dataset("builtin:everyday-prompts", "pairs")
