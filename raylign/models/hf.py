"""Small shims over transformers APIs that were renamed between the 4.x and 5.x releases we support."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, cast

import torch
import transformers
from packaging.version import Version
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTypeLike = str | torch.dtype | None

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# `torch_dtype=` became `dtype=` in transformers 4.56; the old name warns in 5.x.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def to_torch_dtype(dtype: DTypeLike) -> torch.dtype | None:
    """A dtype name or torch.dtype -> torch.dtype; None stays None (the checkpoint decides)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPES)}") from None


def dtype_kwargs(dtype: DTypeLike) -> dict[str, Any]:
    """The keyword `from_pretrained` wants for a dtype, or nothing when the dtype is left open."""
    resolved = to_torch_dtype(dtype)
    return {} if resolved is None else {_DTYPE_KWARG: resolved}


def as_hf(model: nn.Module) -> PreTrainedModel:
    """`model` typed as the transformers model it is, or as the one a peft wrapper forwards to.

    `nn.Module.__getattr__` types every attribute a class does not declare (`config`,
    `save_pretrained`, `get_input_embeddings`, ...) as `Tensor | Module`. Only a cast: nothing is
    checked or converted at run time.
    """
    return cast("PreTrainedModel", model)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward to save memory; non-reentrant, so LoRA needs no input grads."""
    kwargs = {"use_reentrant": False}
    hf = as_hf(model)
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 (old name warns)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def cache_argument(model: Any) -> str:
    """The forward argument that takes the KV cache: `cache` in recent transformers, `past_key_values`
    before (and in models with their own forward)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
