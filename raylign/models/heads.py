"""`ScalarHeadModel`: any transformers backbone plus one linear layer giving a scalar per token.

It is the critic of PPO (a value for every position) and the fallback reward model for backbones
that transformers has no `...ForSequenceClassification` class for (a score per sequence, read at the
last non-pad token). It saves as the backbone's ordinary HF directory plus `score_head.safetensors`
and `score_head.json`, so the backbone part stays loadable by plain transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel

from raylign.models.hf import DTypeLike, as_hf, dtype_kwargs, enable_gradient_checkpointing
from raylign.models.lora import merged_copy

HEAD_WEIGHTS = "score_head.safetensors"
HEAD_CONFIG = "score_head.json"


@dataclass
class ScalarHeadOutput:
    """`values`: (batch, seq) one scalar per token; `logits`: (batch, 1) the one at the last real token.

    `logits` has the shape of a one-label sequence classifier's, so reward code can read
    `model(**batch).logits.squeeze(-1)` whichever kind of scalar model it was given.
    """

    values: torch.Tensor
    logits: torch.Tensor


def last_token_index(attention_mask: torch.Tensor | None, seq_len: int, batch: int) -> torch.Tensor:
    """Index of the rightmost attended token per row; correct for both left and right padding.

    The attention mask, not the pad id, decides: pad may equal eos, and then a pad-id test would skip
    a genuine final end-of-turn token.
    """
    if attention_mask is None:
        return torch.full((batch,), seq_len - 1, dtype=torch.long)
    positions = torch.arange(seq_len, device=attention_mask.device)
    return (positions * attention_mask.to(torch.long)).argmax(dim=-1)


def has_scalar_head(model_dir: str | Path) -> bool:
    """Whether `model_dir` was written by `ScalarHeadModel.save_pretrained`."""
    return (Path(model_dir) / HEAD_CONFIG).is_file()


class ScalarHeadModel(nn.Module):
    """Backbone (`AutoModel`, no LM head) + `nn.Linear(hidden, 1)`.

    A fresh head starts at zero (weight and bias), so a new critic predicts 0 for every state and
    its first outputs do not depend on any random seed.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = as_hf(backbone).config.get_text_config().hidden_size
        dtype = next(backbone.parameters()).dtype
        self.score = nn.Linear(hidden, 1, dtype=dtype)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> ScalarHeadOutput:
        kwargs.setdefault("use_cache", False)  # a KV cache is useless when scoring whole sequences
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        values = self.score(out.last_hidden_state).squeeze(-1)
        batch, seq_len = values.shape
        index = last_token_index(attention_mask, seq_len, batch).to(values.device)
        logits = values[torch.arange(batch, device=values.device), index].unsqueeze(-1)
        return ScalarHeadOutput(values=values, logits=logits)

    def gradient_checkpointing_enable(self) -> None:
        enable_gradient_checkpointing(self.backbone)

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Backbone in HF format (LoRA merged in) + the head as safetensors + a small JSON record."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        as_hf(merged_copy(self.backbone)).save_pretrained(out)
        head = {name: t.detach().contiguous().cpu() for name, t in self.score.state_dict().items()}
        save_file(head, str(out / HEAD_WEIGHTS))
        record = {"kind": "scalar_head", "hidden_size": self.score.in_features, "format": 1}
        (out / HEAD_CONFIG).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, dtype: DTypeLike = None, trust_remote_code: bool = False
    ) -> ScalarHeadModel:
        """Load a directory written by `save_pretrained`, or put a fresh head on any HF backbone dir."""
        backbone = AutoModel.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code, **dtype_kwargs(dtype)
        )
        model = cls(backbone)
        if has_scalar_head(model_dir):
            head = load_file(str(Path(model_dir) / HEAD_WEIGHTS))
            model.score.load_state_dict({k: v.to(model.score.weight.dtype) for k, v in head.items()})
        return model
