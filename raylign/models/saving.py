"""Saving models in Hugging Face format (safetensors), atomically, with LoRA merged when asked.

A saved directory is what checkpoints, `final/` and `raylign serve` consume, and what users hand to
other tools, so a merged save is a plain transformers directory: `AutoModelForCausalLM` (or
`AutoModelForSequenceClassification`) `.from_pretrained(dir)` loads it without peft or raylign.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedTokenizerBase

from raylign.models.cache import atomic_directory
from raylign.models.heads import ScalarHeadModel
from raylign.models.hf import as_hf
from raylign.models.lora import merged_copy


def save_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    merge_lora: bool = True,
) -> Path:
    """Write `model` (+ tokenizer) to `out_dir` via `<out_dir>.tmp` and a rename; returns `out_dir`.

    `merge_lora=True` folds LoRA adapters into the weights of a copy, so the live model keeps
    training unchanged; `merge_lora=False` writes only the adapter (`adapter_config.json` +
    `adapter_model.safetensors`), which `load_causal_lm(out_dir)` puts back on its base model.
    A `ScalarHeadModel` always saves merged (its backbone must load with plain `AutoModel`).
    An existing `out_dir` is replaced only once the new copy is complete.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module  # save the model, not its DDP wrapper
    out = Path(out_dir)
    with atomic_directory(out, replace=True, tmp=out.with_name(out.name + ".tmp")) as work:
        if isinstance(model, ScalarHeadModel):
            model.save_pretrained(work)
        else:
            as_hf(merged_copy(model) if merge_lora else model).save_pretrained(work)
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
    return out
