"""LoRA adapters through peft: attach them from a raylign `LoraConfig`, fold them in for saving."""

from __future__ import annotations

import copy

import peft
from torch import nn
from transformers.pytorch_utils import Conv1D

from raylign.config import LoraConfig


def apply_lora(model: nn.Module, lora: LoraConfig, task_type: str) -> peft.PeftModel:
    """Wrap `model` with fresh LoRA adapters; only adapter (and task head) weights stay trainable.

    `task_type` is peft's name for what the model does ("CAUSAL_LM", "SEQ_CLS",
    "FEATURE_EXTRACTION"); for "SEQ_CLS" peft also keeps the new classification head trainable.
    `target_modules="all-linear"` lets peft pick every linear layer except the LM output head.
    """
    targets = lora.target_modules
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if targets == "all-linear" else list(targets),
        task_type=task_type,
        fan_in_fan_out=uses_conv1d(model),
    )
    return peft.get_peft_model(model, config)


def uses_conv1d(model: nn.Module) -> bool:
    """GPT-2-style `Conv1D` layers store weights transposed; peft must be told (it warns otherwise)."""
    return any(isinstance(module, Conv1D) for module in model.modules())


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, peft.PeftModel)


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapters folded into the weights.

    Merging happens on a deep copy: `merge_and_unload` rewrites the weights and removes the adapter
    layers in place, and un-merging afterwards is not exact in low precision, so merging the live
    model would silently change (or end) the training that continues after a checkpoint. The copy
    costs one model's worth of memory for the duration of the save. Models without adapters are
    returned as they are.
    """
    if not is_peft_model(model):
        return model
    return copy.deepcopy(model).merge_and_unload()
