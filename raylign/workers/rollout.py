"""RolloutWorker: holds a policy copy and samples completions in batches (KV cache, left padding)."""

from __future__ import annotations

from typing import Any

import torch

from raylign.config import ModelConfig, RolloutConfig
from raylign.workers.group import cpu_threads, quiet_libraries


class RolloutWorker:
    def __init__(self, rank: int, world_size: int, num_cpus: float, model: dict[str, Any], seed: int = 0,
                 apply_chat_template: bool = True):
        torch.set_num_threads(cpu_threads(num_cpus))
        quiet_libraries()
        from raylign.models import load_causal_lm

        self.rank = rank
        self.seed = seed
        self.apply_chat_template = apply_chat_template
        self.model, self.tokenizer = load_causal_lm(ModelConfig.model_validate(model))
        self.model.eval()
        self.tokenizer.padding_side = "left"  # generation continues from the right edge of every row

    @torch.no_grad()
    def generate(self, prompts: list[Any], sampling: dict[str, Any], seed: int | None = None) -> list[list[str]]:
        """For each prompt (string or chat messages) return `n_samples` completions (texts)."""
        from raylign.data import format_prompt

        cfg = RolloutConfig.model_validate(sampling)
        texts = [format_prompt(p, self.tokenizer, self.apply_chat_template) for p in prompts]
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        out: list[list[str]] = []
        for start in range(0, len(texts), cfg.batch_size):
            chunk = texts[start : start + cfg.batch_size]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            # Seed per chunk from our generator: results do not depend on what ran before in this process.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            do_sample = cfg.temperature > 0
            ids = self.model.generate(
                **enc,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=do_sample,
                temperature=cfg.temperature if do_sample else None,
                top_p=cfg.top_p if do_sample else None,
                top_k=cfg.top_k if do_sample else None,
                num_return_sequences=cfg.n_samples,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            completions = self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i in range(len(chunk)):
                out.append([c.strip() for c in completions[i * cfg.n_samples : (i + 1) * cfg.n_samples]])
        return out
