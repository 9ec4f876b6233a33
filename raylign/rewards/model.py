"""A trained reward model as the reward: one scalar per (prompt, completion).

The model is what `raylign train reward` writes to `runs/<name>/final` (or any one-output sequence
classifier / `ScalarHeadModel` directory, Hub id, `builtin:`/`tiny:` name), loaded with
`raylign.models.load_scalar_model`. Texts are built exactly as the reward learner built them in
training: the prompt through the tokenizer's chat template as a user turn (when it has one), the
completion as the assistant turn (`raylign.data.format_prompt_completion`), prompt truncated from
the left, completion cut on the right to `max_length` tokens, batches padded on the right. The
score is the model's output at the last real token: `model(**batch).logits[:, 0]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from raylign.rewards.base import RewardSource, check_batch


class RewardModelSource(RewardSource):
    """Batched, no-grad scoring with a frozen scalar model in eval mode.

    Sequences are scored longest-first in batches of `batch_size` (less padding; results come back
    in input order). `max_length` bounds prompt + completion tokens, `max_prompt_length` the prompt.
    A prompt of None scores the completion text alone.
    """

    def __init__(
        self,
        model: str,
        batch_size: int = 32,
        max_length: int = 512,
        max_prompt_length: int = 256,
        apply_chat_template: bool = True,
        device: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        name: str | None = None,
    ):
        import torch

        from raylign.config import ModelConfig
        from raylign.models import load_scalar_model

        if batch_size < 1 or max_length < 2 or max_prompt_length < 1:
            raise ValueError("batch_size must be >= 1, max_length >= 2 and max_prompt_length >= 1")
        cfg = ModelConfig(path=model, trust_remote_code=trust_remote_code)
        self.model, self.tokenizer = load_scalar_model(cfg, dtype=dtype)
        self.tokenizer.padding_side = "right"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_prompt_length = min(max_prompt_length, max_length - 1)
        self.apply_chat_template = apply_chat_template
        self.name = name or f"rm:{model}"

    def encode(self, prompt: Any, completion: str) -> list[int]:
        """The token ids the model scores for one (prompt, completion), as in reward training."""
        from raylign.data import format_prompt_completion
        from raylign.data.collators import encode_text, tokenize_prompt_completion

        if prompt is None:
            ids = encode_text(self.tokenizer, completion)[: self.max_length]
        else:
            prompt_text, completion_text = format_prompt_completion(
                prompt, completion, self.tokenizer, self.apply_chat_template
            )
            ids = tokenize_prompt_completion(
                self.tokenizer, prompt_text, completion_text, self.max_prompt_length, self.max_length
            )["input_ids"]
        if not ids:  # empty text: score the end-of-text token rather than an all-padding row
            eos = self.tokenizer.eos_token_id
            ids = [eos if eos is not None else self.tokenizer.pad_token_id]
        return ids

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        import torch

        from raylign.data import collate_right_pad

        prompts = check_batch(prompts, completions)
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        scores = np.zeros(len(encoded), dtype=np.float32)
        pad_id = self.tokenizer.pad_token_id
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = collate_right_pad([{"input_ids": encoded[i]} for i in idx], pad_id)
                out = self.model(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                )
                scores[idx] = out.logits[:, 0].float().cpu().numpy()
        return scores
