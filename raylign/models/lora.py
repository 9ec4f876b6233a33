"""LoRA adapters through peft: attach them from a raylign `LoraConfig`, fold them in for saving or
for generation on a plain model (`lora_merge_deltas`)."""

from __future__ import annotations

import copy
import re
from typing import TypeGuard

import peft
from torch import Tensor, nn
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


def is_peft_model(model: nn.Module) -> TypeGuard[peft.PeftModel]:
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


PEFT_PREFIX = "base_model.model."
_LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])\.(?P<adapter>[^.]+)\.weight$")


def plain_param_name(name: str) -> str:
    """A peft parameter name as the plain transformers model calls it: peft prefixes every name
    with `base_model.model.` and moves each adapted layer's own weight under `.base_layer`."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def is_lora_weight(name: str) -> bool:
    return _LORA_WEIGHT.match(name) is not None


def lora_merge_deltas(adapter: dict[str, Tensor], scaling: float, fan_in_fan_out: bool) -> dict[str, Tensor]:
    """Weight updates that fold LoRA adapters into a plain model: `{base weight name: ΔW}`.

    LoRA (Hu et al. 2021) adds a low-rank update to a frozen weight, W' = W + (α/r)·B·A with
    A ∈ R^{r×in}, B ∈ R^{out×r}; `scaling` is α/r. GPT-2's `Conv1D` stores W as [in, out]
    (`fan_in_fan_out`), so there ΔW = ((α/r)·B·A)ᵀ. `adapter` holds peft's `...<module>.lora_A.<name>.weight`
    and `lora_B` pairs (e.g. a peft model's trainable parameters); the deltas are float32.
    """
    halves: dict[str, dict[str, Tensor]] = {}
    adapters = set()
    for name, value in adapter.items():
        match = _LORA_WEIGHT.match(name)
        if match is None:
            raise ValueError(f"not a LoRA weight: {name!r}")
        adapters.add(match["adapter"])
        halves.setdefault(plain_param_name(match["module"] + ".weight"), {})[match["half"]] = value
    if len(adapters) > 1:
        raise ValueError(f"weights of several adapters ({sorted(adapters)}); pass one adapter's weights")
    deltas = {}
    for name, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA weights for {name!r} lack lora_{'B' if 'A' in pair else 'A'}")
        delta = scaling * (pair["B"].float() @ pair["A"].float())
        deltas[name] = delta.T if fan_in_fan_out else delta
    return deltas
