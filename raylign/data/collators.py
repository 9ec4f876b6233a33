"""Tokenization with a loss mask, padding collators, and sequence packing (torch tensors out).

Conventions: `loss_mask` is 1 on tokens the model is trained to produce (the completion) and 0 on
the prompt and padding; `labels` equal `input_ids` with -100 wherever the loss mask is 0, unshifted
(HF causal-LM models shift labels themselves). Generation batches are padded on the left so every
row's last token is the real last prompt token; training batches are padded on the right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from raylign.data.templates import Prompt, format_prompt_completion

IGNORE_INDEX = -100
TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask", "labels", "position_ids")


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer: Any, prompt_text: str) -> list[int]:
    """Prompt ids with the tokenizer's usual special tokens (e.g. Llama's BOS), but never two BOS:
    chat templates often write the BOS text themselves and the tokenizer would add another."""
    ids = list(tokenizer(prompt_text, add_special_tokens=True)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Continuation ids: no special tokens added (EOS/end-of-turn are already in the text)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_left(ids: list[int], max_tokens: int, bos_id: int | None = None) -> list[int]:
    """Keep the last `max_tokens` ids (the end of a prompt is what the answer depends on), keeping a
    leading BOS so the model still sees the start-of-text marker it was trained with."""
    if len(ids) <= max_tokens:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and max_tokens >= 2:
        return [bos_id] + ids[len(ids) - max_tokens + 1 :]
    return ids[len(ids) - max_tokens :]


def tokenize_prompt(tokenizer: Any, prompt_text: str, max_prompt_length: int) -> list[int]:
    """Prompt ids for generation, truncated from the left."""
    ids = encode_prompt(tokenizer, prompt_text)
    return truncate_left(ids, max_prompt_length, getattr(tokenizer, "bos_token_id", None))


def tokenize_prompt_completion(
    tokenizer: Any, prompt_text: str, completion: str, max_prompt_length: int, max_length: int
) -> dict[str, Any]:
    """Ids of prompt + completion and a loss mask covering only the completion.

    `completion` is the completion *text* as from `format_completion` (end-of-turn/EOS included).
    The prompt is truncated from the left to `max_prompt_length` (and to max_length - 1, so at least
    one completion token always fits); the completion is cut on the right to fill `max_length`.
    Returns {input_ids, loss_mask, prompt_length}.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt_ids = tokenize_prompt(tokenizer, prompt_text, min(max_prompt_length, max_length - 1))
    completion_ids = encode_text(tokenizer, completion)[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + completion_ids,
        "loss_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
        "prompt_length": len(prompt_ids),
    }


def tokenize_example(
    tokenizer: Any,
    prompt: Prompt,
    completion: str,
    max_prompt_length: int,
    max_length: int,
    apply_chat_template: bool = True,
) -> dict[str, Any]:
    """Row -> training ids in one call: chat-format prompt and completion, then tokenize and mask."""
    prompt_text, completion_text = format_prompt_completion(
        prompt, completion, tokenizer, apply_chat_template
    )
    return tokenize_prompt_completion(tokenizer, prompt_text, completion_text, max_prompt_length, max_length)


# --------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------


def _ids(item: Any) -> list[int]:
    """Accept {"input_ids": ...} dicts, plain id lists and 1-D tensors alike."""
    ids = item["input_ids"] if isinstance(item, dict) else item
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _loss_mask(item: Any, length: int) -> list[int]:
    """An item without a loss mask is trained on every token (plain-text SFT)."""
    mask = item.get("loss_mask") if isinstance(item, dict) else None
    if mask is None:
        return [1] * length
    return mask.tolist() if isinstance(mask, torch.Tensor) else list(mask)


def _scalar_extras(batch: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Per-example numbers (rating, label, reward, ...) stacked into tensors alongside the ids."""
    if not batch or not isinstance(batch[0], dict):
        return {}
    out = {}
    for key, value in batch[0].items():
        if key not in TOKEN_KEYS and isinstance(value, (bool, int, float)):
            out[key] = torch.tensor([item[key] for item in batch])
    return out


def collate_left_pad(batch: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts for generation: {input_ids, attention_mask}, padded on the left."""
    seqs = [_ids(item) for item in batch]
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if seq:
            input_ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, width - len(seq) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **_scalar_extras(batch)}


def collate_right_pad(batch: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Training examples: {input_ids, attention_mask, loss_mask, labels}, padded on the right;
    labels are -100 on prompt and padding tokens. Numeric per-example fields are passed through."""
    seqs = [_ids(item) for item in batch]
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (item, seq) in enumerate(zip(batch, seqs, strict=True)):
        n = len(seq)
        input_ids[i, :n] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(_loss_mask(item, n), dtype=torch.long)
    labels = input_ids.masked_fill(loss_mask == 0, IGNORE_INDEX)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "labels": labels}
    return {**out, **_scalar_extras(batch)}


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def pack_sequences(batch: Sequence[Any], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate sequences into rows of `max_length` tokens to avoid training on padding.

    Sequences are placed in order; one that does not fit in the current row starts a new row, and
    one longer than `max_length` is cut on the right. `position_ids` restart at 0 for each sequence
    (what padding-free attention kernels use to find boundaries). The first token of each sequence
    gets label -100: predicting it from the previous sequence's last token would be noise.
    Without such a kernel, pass `block_causal_mask(position_ids)` so sequences cannot attend to
    each other. Returns {input_ids, attention_mask, position_ids, loss_mask, labels}.
    """
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for item in batch:
        full = _ids(item)
        ids, mask = full[:max_length], _loss_mask(item, len(full))[:max_length]
        if not ids:
            continue
        if used + len(ids) > max_length and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += len(ids)
    return _pack_rows([row for row in rows if row], max_length, pad_id)


def _pack_rows(
    rows: list[list[tuple[list[int], list[int]]]], width: int, pad_id: int
) -> dict[str, torch.Tensor]:
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.long)
    starts = torch.zeros(shape, dtype=torch.bool)
    for r, row in enumerate(rows):
        col = 0
        for ids, mask in row:
            n = len(ids)
            input_ids[r, col : col + n] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, col : col + n] = torch.arange(n)
            attention_mask[r, col : col + n] = 1
            loss_mask[r, col : col + n] = torch.tensor(mask, dtype=torch.long)
            starts[r, col] = True
            col += n
    labels = input_ids.masked_fill((loss_mask == 0) | starts, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "loss_mask": loss_mask,
        "labels": labels,
    }


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean mask (True = may attend): causal, and only within the same packed
    sequence, found from where position_ids restart at 0."""
    seq_index = torch.cumsum((position_ids == 0).long(), dim=-1)
    same_seq = seq_index.unsqueeze(-1) == seq_index.unsqueeze(-2)
    length = position_ids.shape[-1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=position_ids.device))
    return (same_seq & causal).unsqueeze(1)
