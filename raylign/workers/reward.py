"""RewardWorker: one actor of the reward service, hosting the config's reward sources as a WeightedMix."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from raylign.config import RewardConfig, as_section
from raylign.runtime import cpu_threads
from raylign.storage import ActorInput, ActorOutput, Delivered, Handoff, Source


class RewardWorker:
    """Scores (prompt, completion) batches; sources are built once per actor (a reward model loads here).

    A trainable source (the discriminator of adversarial training) learns through `update`; every
    actor of the group receives the same update, so their copies stay identical.
    """

    def __init__(self, rank: int, world_size: int, num_cpus: float, reward: RewardConfig | dict[str, Any],
                 tokenizer: str | None = None, discriminator: dict[str, Any] | None = None):
        torch.set_num_threads(cpu_threads(num_cpus))
        from raylign.rewards import WeightedMix, build_reward

        self.rank = rank
        kwargs = {"tokenizer": tokenizer} if tokenizer else {}
        cfg = as_section(RewardConfig, reward)
        mix = build_reward(cfg, **kwargs) if cfg.sources else None
        self.discriminator = None
        if discriminator is not None:  # adversarial training: D joins the mix with its weight
            from raylign.rewards.discriminator import Discriminator

            weight = discriminator.pop("weight")
            self.discriminator = Discriminator(**discriminator)
            sources, weights = (mix.sources, mix.weights) if mix else ([], [])
            mix = WeightedMix([*sources, self.discriminator], [*weights, weight])
        if mix is None:
            mix = build_reward(cfg)  # raises the "reward.sources is empty" message
        self.mix = mix

    def name(self) -> str:
        return self.mix.name

    def score(self, prompts: list[Any], completions: list[str]) -> dict[str, Any]:
        """{"total": weighted sum [N], "components": {source name: its own scores [N]}, "seconds"}."""
        start = time.perf_counter()
        total, components = self.mix.score_with_components(prompts, completions)
        return {"total": total, "components": components, "seconds": time.perf_counter() - start}

    def update(self, prompts: list[Any], completions: list[str], **batch: Any) -> dict[str, float]:
        return self.mix.update(prompts, completions, **batch)

    def save_discriminator(self, path: str, handoff: Handoff | None = None) -> Delivered | None:
        """D into `path` on the driver's node: written there directly, or (this actor on another node)
        into a local temp dir that travels by `output.storage` or the object store (`storage.receive`)."""
        assert self.discriminator is not None, "this reward worker was built without a discriminator"
        writer = ActorOutput(handoff or Handoff(path))
        with writer as out:
            self.discriminator.save(out)
        return writer.delivered

    def load_discriminator(self, path: str, source: Source | None = None) -> None:
        """D from `path`, or from a local copy of it when `source` says it is on another node."""
        assert self.discriminator is not None, "this reward worker was built without a discriminator"
        with ActorInput(source or Source(path)) as src:
            self.discriminator.load(src)


def merge_scores(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the per-shard results of `RewardWorker.score`, in shard order."""
    return {
        "total": np.concatenate([p["total"] for p in parts]),
        "components": {k: np.concatenate([p["components"][k] for p in parts]) for k in parts[0]["components"]},
        "seconds": max(p["seconds"] for p in parts),
    }
