"""The discriminator of adversarial training: a reward source that also learns.

D is a scalar classifier, D(x) = σ(ℓ(x)), on any backbone the reward-model loader accepts
(`builtin:minilm-l6`, a causal LM with a scalar head, `tiny:<arch>`, a local or Hub model). Texts are
encoded as reward models encode them (the prompt as a user turn, the completion as the assistant
turn) when D is `conditioned` on prompts, else (or for a prompt of None) the text alone. `score` returns the
generator's reward `generator_reward(ℓ)`; `update` takes k_D AdamW steps on
`discriminator_loss(human, policy)` (+ an optional R1 gradient penalty) and reports D's accuracy and
fool rate as they were before the update, i.e. for the D that scored this step's samples.

D always runs in eval mode (no dropout), so every reward actor given the same updates holds the same
weights; `save`/`load` carry weights and optimizer state for checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from raylign.algorithms.adversarial import (
    discriminator_loss,
    discriminator_metrics,
    generator_reward,
    gradient_penalty,
)
from raylign.models.hf import as_hf
from raylign.rewards.base import check_batch
from raylign.rewards.model import RewardModelSource

OPTIMIZER_FILE = "discriminator_optimizer.pt"


class Discriminator(RewardModelSource):
    trainable = True

    def __init__(self, model: str, reward: str = "logit", lr: float = 1e-4, label_smoothing: float = 0.0,
                 gradient_penalty: float = 0.0, batch_size: int = 32, max_length: int = 512,
                 max_prompt_length: int = 256, apply_chat_template: bool = True, seed: int = 0,
                 conditioned: bool = True, name: str = "discriminator", **model_kwargs: Any):
        torch.manual_seed(seed)  # a fresh classification head starts the same on every actor
        super().__init__(model, batch_size=batch_size, max_length=max_length, max_prompt_length=max_prompt_length,
                         apply_chat_template=apply_chat_template, name=name, **model_kwargs)
        generator_reward(torch.zeros(1), reward)  # an unknown kind fails here, before any training
        self.reward_kind = reward
        self.conditioned = conditioned  # False: D judges the completion alone, whatever prompt it is given
        self.label_smoothing = label_smoothing
        self.gp_weight = gradient_penalty
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.updates = 0

    # ---- scoring -------------------------------------------------------------------------------
    def _logits(self, encoded: list[list[int]], penalty: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ℓ for a batch of token id lists (one forward, right padded); with `penalty`, also R1."""
        from raylign.data import collate_right_pad

        batch = collate_right_pad([{"input_ids": ids} for ids in encoded], self.tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if not penalty:
            return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float(), None
        embeds = as_hf(self.model).get_input_embeddings()(ids).detach().requires_grad_(True)
        # R1 differentiates a gradient: the fused attention kernels have no double backward, the math one has.
        with sdpa_kernel(SDPBackend.MATH):
            logits = self.model(inputs_embeds=embeds, attention_mask=mask).logits[:, 0].float()
        return logits, gradient_penalty(logits, embeds)

    @torch.no_grad()
    def logits(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        """ℓ(x) per (prompt, completion): log D − log(1 − D)."""
        prompts = check_batch(prompts if self.conditioned else None, completions)
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        out = np.zeros(len(encoded), dtype=np.float32)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # less padding
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            out[idx] = self._logits([encoded[i] for i in idx])[0].cpu().numpy()
        return out

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        return generator_reward(torch.from_numpy(self.logits(prompts, completions)), self.reward_kind).numpy()

    # ---- training ------------------------------------------------------------------------------
    def update(self, prompts: Sequence[Any], completions: Sequence[str], *, human_prompts: Sequence[Any] | None = None,
               human_texts: Sequence[str] = (), steps: int = 1, fresh: int | None = None,
               max_accuracy: float = 1.0, **_: Any) -> dict[str, float]:
        """k_D = `steps` full-batch AdamW steps on human (label 1) vs policy (label 0) samples.

        `completions` are the policy's samples, the first `fresh` of them from this step (the rest
        replayed from earlier steps); accuracy and fool rate are measured on the fresh ones and on the
        human texts with the D of before the update. When that D's mean accuracy over the two sides is
        above `max_accuracy` the update is skipped (`paused` = 1): a D that wins outright gives the
        generator no gradient to follow.
        """
        prompts = check_batch(prompts if self.conditioned else None, completions)
        human_prompts = check_batch(human_prompts if self.conditioned else None, human_texts)
        if not len(human_texts) or not len(completions):
            raise ValueError("a discriminator update needs both human texts and policy samples")
        fresh = len(completions) if fresh is None else fresh
        human = [self.encode(p, t) for p, t in zip(human_prompts, human_texts, strict=True)]
        policy = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]

        def forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            h, penalty = self._logits(human, penalty=self.gp_weight > 0)
            return h, self._logits(policy)[0], penalty

        # The first update's forward pass is also the measurement of the D before the update.
        h, p, penalty = forward()
        metrics = discriminator_metrics(h.detach(), p.detach()[:fresh])
        metrics["loss"] = discriminator_loss(h.detach(), p.detach(), self.label_smoothing).item()
        accuracy = (metrics["accuracy_human"] + metrics["accuracy_policy"]) / 2
        paused = accuracy > max_accuracy
        for step in range(0 if paused else steps):
            if step:
                h, p, penalty = forward()
            self.optimizer.zero_grad(set_to_none=True)
            loss = discriminator_loss(h, p, self.label_smoothing)
            if penalty is not None:
                loss = loss + self.gp_weight * penalty
                metrics["gradient_penalty"] = penalty.item()
            loss.backward()
            self.optimizer.step()
            self.updates += 1
        metrics["paused"] = float(paused)
        metrics["updates"] = float(self.updates)
        return metrics

    def save(self, path: str | Path) -> None:
        """D as a loadable model directory (safetensors; `raylign serve --reward-model` takes it) plus its
        optimizer state and update count."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        as_hf(self.model).save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        torch.save({"optimizer": self.optimizer.state_dict(), "updates": self.updates}, path / OPTIMIZER_FILE)

    def load(self, path: str | Path) -> None:
        """Restore what `save` wrote: weights, optimizer state, update count."""
        from raylign.config import ModelConfig
        from raylign.models import load_scalar_model

        saved, _ = load_scalar_model(ModelConfig(path=str(path)))
        self.model.load_state_dict(saved.state_dict())
        state = torch.load(Path(path) / OPTIMIZER_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
