"""Loaders for every role a model plays in raylign: policy/reference, critic, reward model, classifier.

All take a `ModelConfig` or a bare model name and return `(model, tokenizer)`. They resolve the name
through `resolve_model_path` (so `builtin:`/`tiny:`/local/Hub names all work), pass
`trust_remote_code` only from the config (default False), keep the model's pad id equal to the
tokenizer's, and then apply gradient checkpointing and LoRA when the config asks for them.

Which class holds a scalar score:
* per-token values (critic): `ScalarHeadModel` over `AutoModel`, for every architecture;
* per-sequence score (reward model): `AutoModelForSequenceClassification(num_labels=1)` whenever
  transformers has one for the architecture (Llama, Qwen2, GPT-2, BERT, ... ); causal models then
  read the last non-pad token, encoders their pooled [CLS]. It saves in plain HF format that any
  tool can load. Architectures without such a class fall back to `ScalarHeadModel`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import cast

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from raylign.config import ModelConfig
from raylign.models.heads import ScalarHeadModel, has_scalar_head
from raylign.models.hf import DTypeLike, as_hf, dtype_kwargs, enable_gradient_checkpointing
from raylign.models.lora import apply_lora
from raylign.models.registry import resolve_model_path

log = logging.getLogger(__name__)

ModelLike = ModelConfig | str


def as_model_config(model: ModelLike) -> ModelConfig:
    """Accept a bare name wherever a `ModelConfig` is expected (defaults for everything else)."""
    return model if isinstance(model, ModelConfig) else ModelConfig(path=model)


def _resolve(model: ModelLike) -> tuple[ModelConfig, str]:
    """Config and local directory, resolved once per load (a Hub id costs a network round trip)."""
    cfg = as_model_config(model)
    return cfg, resolve_model_path(cfg.path, cfg.trust_remote_code)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def load_tokenizer(model: ModelLike, padding_side: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, always with a pad token; `padding_side` "left" (generation) or "right".

    `padding_side=None` keeps the tokenizer's own setting.
    """
    cfg, path = _resolve(model)
    return _tokenizer_at(path, cfg, padding_side)


def context_length(model: ModelLike) -> int | None:
    """How many positions the model attends over (prompt + completion), from its config; None if it
    names none (then nothing can be checked ahead of time)."""
    cfg, path = _resolve(model)
    hf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(hf, key, None) or getattr(getattr(hf, "text_config", None), key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _tokenizer_at(path: str, cfg: ModelConfig, padding_side: str | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(path), trust_remote_code=cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tokenizer.padding_side = padding_side
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad token; reuse eos (or unk) like most recipes, add `<pad>` as a last resort.

    Attention masks, not pad ids, must decide what is padding: with pad == eos a pad-id test would
    also hide real end-of-sequence tokens.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})


def _tokenizer_dir(path: str) -> str:
    """A LoRA adapter directory saved without a tokenizer borrows its base model's."""
    has_tokenizer = any((Path(path) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    base = adapter_base_model(path)
    return resolve_model_path(base) if base and not has_tokenizer else path


# --------------------------------------------------------------------------------------------------
# Causal LM (policy, reference, SFT/DPO model)
# --------------------------------------------------------------------------------------------------


def load_causal_lm(model: ModelLike, dtype: DTypeLike = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`AutoModelForCausalLM` + tokenizer, with LoRA/checkpointing applied as the config says.

    `dtype` overrides `cfg.dtype`. A directory holding a saved LoRA adapter (from
    `save_model(..., merge_lora=False)`) loads its base model and the adapter, trainable.
    """
    cfg, path = _resolve(model)
    tokenizer = _tokenizer_at(path, cfg)
    kwargs = {"trust_remote_code": cfg.trust_remote_code, **dtype_kwargs(dtype or cfg.dtype)}
    base_name = adapter_base_model(path)
    if base_name is not None:
        return _load_adapter(path, base_name, cfg, tokenizer, kwargs), tokenizer
    net = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    sync_special_tokens(net, tokenizer)
    return _prepare_for_training(net, cfg, "CAUSAL_LM"), tokenizer


def _load_adapter(path: str, base_name: str, cfg: ModelConfig, tokenizer, kwargs) -> nn.Module:
    """Base model + a saved adapter, trainable so that training can resume on it."""
    import peft

    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(base_name, cfg.trust_remote_code), **kwargs
    )
    sync_special_tokens(base, tokenizer)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    if cfg.lora is not None:
        log.info("%s already holds a LoRA adapter; continuing it instead of adding a new one", path)
    return peft.PeftModel.from_pretrained(base, path, is_trainable=True)


def adapter_base_model(path: str) -> str | None:
    """The base model a LoRA adapter directory was trained on, or None for a full model directory."""
    adapter_config = Path(path) / "adapter_config.json"
    if (Path(path) / "config.json").is_file() or not adapter_config.is_file():
        return None
    return json.loads(adapter_config.read_text()).get("base_model_name_or_path")


# --------------------------------------------------------------------------------------------------
# Scalar models (critic, reward model) and classifiers (discriminator, rating heads)
# --------------------------------------------------------------------------------------------------


def load_backbone(model: ModelLike, dtype: DTypeLike = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`AutoModel` (hidden states, no head) + tokenizer, e.g. to embed text with an encoder."""
    cfg, path = _resolve(model)
    tokenizer = _tokenizer_at(path, cfg)
    net = AutoModel.from_pretrained(
        path, trust_remote_code=cfg.trust_remote_code, **dtype_kwargs(dtype or cfg.dtype)
    )
    sync_special_tokens(net, tokenizer)
    return _prepare_for_training(net, cfg, "FEATURE_EXTRACTION"), tokenizer


def load_value_model(
    model: ModelLike, dtype: DTypeLike = None
) -> tuple[ScalarHeadModel, PreTrainedTokenizerBase]:
    """PPO critic: backbone + a value per token (`.values`, shape batch x seq).

    From a directory saved by `ScalarHeadModel` the trained head is restored; from any other model
    (e.g. the policy's) the backbone is reused and the head starts at zero.
    """
    cfg, path = _resolve(model)
    tokenizer = _tokenizer_at(path, cfg)
    return _scalar_head_model(path, cfg, tokenizer, dtype), tokenizer


def load_scalar_model(model: ModelLike, dtype: DTypeLike = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Reward model: one score per sequence, read as `model(**batch).logits[:, 0]`.

    A `...ForSequenceClassification(num_labels=1)` where transformers has one for the architecture
    (saved reward models reload as themselves), else a `ScalarHeadModel` (score at the last
    attended token).
    """
    cfg, path = _resolve(model)
    tokenizer = _tokenizer_at(path, cfg)
    if has_scalar_head(path) or not supports_sequence_classification(path, cfg.trust_remote_code):
        return _scalar_head_model(path, cfg, tokenizer, dtype), tokenizer
    return _classifier_at(path, cfg, tokenizer, 1, dtype), tokenizer


def load_classifier(
    model: ModelLike, num_labels: int, dtype: DTypeLike = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`AutoModelForSequenceClassification` with `num_labels` outputs (new head unless saved with one)."""
    cfg, path = _resolve(model)
    if not supports_sequence_classification(path, cfg.trust_remote_code):
        kind = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code).model_type
        raise ValueError(
            f"'{cfg.path}' ({kind}) has no sequence-classification class in transformers; "
            "use load_scalar_model for a one-output head, or another backbone."
        )
    tokenizer = _tokenizer_at(path, cfg)
    return _classifier_at(path, cfg, tokenizer, num_labels, dtype), tokenizer


def _classifier_at(path: str, cfg: ModelConfig, tokenizer, num_labels: int, dtype: DTypeLike) -> nn.Module:
    net = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=cfg.trust_remote_code,
        **dtype_kwargs(dtype or cfg.dtype),
    )
    sync_special_tokens(net, tokenizer)
    return _prepare_for_training(net, cfg, "SEQ_CLS")


def supports_sequence_classification(path: str, trust_remote_code: bool = False) -> bool:
    """Whether transformers (or the model's own remote code) offers `...ForSequenceClassification`."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    remote = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    return config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES or (
        trust_remote_code and remote
    )


def _scalar_head_model(path: str, cfg: ModelConfig, tokenizer, dtype: DTypeLike) -> ScalarHeadModel:
    net = ScalarHeadModel.from_pretrained(
        path, dtype=dtype or cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    sync_special_tokens(net.backbone, tokenizer)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(net.backbone)
    if cfg.lora is not None:
        net.backbone = apply_lora(net.backbone, cfg.lora, "FEATURE_EXTRACTION")
    return net


# --------------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------------


def sync_special_tokens(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow embeddings for tokens the tokenizer added, and make the model's pad id the tokenizer's.

    Sequence classifiers find the last real token through `config.pad_token_id`, and `generate`
    pads finished rows with it, so it must match what the tokenizer pads with.
    """
    hf = as_hf(model)
    embeddings = hf.get_input_embeddings()  # typed nn.Module; an nn.Embedding or one shaped like it
    if embeddings is not None and len(tokenizer) > cast(int, embeddings.num_embeddings):
        hf.resize_token_embeddings(len(tokenizer))
    hf.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _prepare_for_training(net: nn.Module, cfg: ModelConfig, task_type: str) -> nn.Module:
    """Checkpointing first (peft then wraps the checkpointed model), LoRA last."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(net)
    if cfg.lora is not None:
        net = apply_lora(net, cfg.lora, task_type)
    return net
