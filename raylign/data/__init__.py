"""Datasets for alignment: pyarrow-backed readers with strict validation, chat templates, collators.

Kinds (see DESIGN.md, Data contract): prompts {prompt} · pairs {prompt, chosen, rejected} ·
unpaired {prompt, completion, label} · ratings {text | prompt+completion, rating} · text {text}.
Files: JSONL/JSON, CSV/TSV, Parquet, Arrow, a `datasets.save_to_disk` directory, or `builtin:<name>`.

The collators need torch, which takes seconds to import; they load on first use so that reading
and validating data (`raylign data validate`) stays quick.
"""

import importlib
from typing import Any

from raylign.data.builtin import BUILTIN_DATASETS, BuiltinDataset, list_builtin
from raylign.data.dataset import (
    MESSAGES_TYPE,
    load_dataset,
    load_split,
    rows,
    split_train_val,
    table_kind,
    table_source,
)
from raylign.data.schema import KINDS, DataError, infer_kind
from raylign.data.summary import format_summary, summarize, summarize_table
from raylign.data.templates import (
    format_completion,
    format_prompt,
    format_prompt_completion,
    prompt_messages,
    prompt_plain_text,
)

__all__ = [
    "BUILTIN_DATASETS",
    "BuiltinDataset",
    "DataError",
    "IGNORE_INDEX",
    "KINDS",
    "MESSAGES_TYPE",
    "block_causal_mask",
    "collate_left_pad",
    "collate_right_pad",
    "format_completion",
    "format_prompt",
    "format_prompt_completion",
    "format_summary",
    "infer_kind",
    "list_builtin",
    "load_dataset",
    "load_split",
    "pack_sequences",
    "prompt_messages",
    "prompt_plain_text",
    "rows",
    "split_train_val",
    "summarize",
    "summarize_table",
    "table_kind",
    "table_source",
    "tokenize_example",
    "tokenize_prompt",
    "tokenize_prompt_completion",
]

_COLLATOR_NAMES = {
    "IGNORE_INDEX",
    "block_causal_mask",
    "collate_left_pad",
    "collate_right_pad",
    "pack_sequences",
    "tokenize_example",
    "tokenize_prompt",
    "tokenize_prompt_completion",
}


def __getattr__(name: str) -> Any:
    if name in _COLLATOR_NAMES:
        return getattr(importlib.import_module("raylign.data.collators"), name)
    raise AttributeError(f"module 'raylign.data' has no attribute {name!r}")
