"""Generation over large prompt sets with Ray Data: `map_batches` over an actor pool of generators.

    ray.data.from_items(rows) -> map_batches(Generator, compute=ActorPoolStrategy(size=N), num_cpus=c, ...)

Each `Generator` actor loads the policy once (a `RolloutWorker`, so sampling is the exact KV-cache
loop training uses) and, when a reference model is given, scores its own samples under the
reference too (log π_ref of the sampled token ids, for the Monte-Carlo KL). Batch i is sampled with a
seed derived from (seed, its first row's index), so results depend on the inputs only, not on which
actor ran them or in which order. Rows come back in prompt order with the actor that produced them,
so callers can see how the work was spread.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np


class Generator:
    """A Ray Data callable class: one RolloutWorker (+ optional reference LM) per actor."""

    def __init__(self, model: str, sampling: dict[str, Any], seed: int, num_cpus: float,
                 reference: str | None = None, apply_chat_template: bool = True):
        from raylign.workers.rollout import RolloutWorker

        self.worker = RolloutWorker(0, 1, num_cpus, {"path": model}, seed=seed,
                                    apply_chat_template=apply_chat_template)
        self.reference = None
        if reference is not None:
            from raylign.evaluation.scorers import LogLikelihood

            self.reference = LogLikelihood(reference, apply_chat_template=apply_chat_template)
        self.sampling = {**sampling, "n_samples": 1}
        self.seed = seed
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from raylign.workers.rollout import chunk_seed

        prompts = [json.loads(p) for p in batch["prompt_json"]]
        index = batch["index"]
        out = self.worker.generate(prompts, self.sampling, seed=chunk_seed(self.seed, int(index[0])))
        lengths = np.array([len(r) for r in out["response_ids"]], dtype=np.int64)
        result = {
            "index": np.asarray(index, dtype=np.int64),
            "completion": np.array(out["texts"], dtype=object),
            "tokens": lengths,
            "logp": np.array([float(np.sum(lp)) for lp in out["logprobs"]], dtype=np.float64),
            "finished": out["finished"],
            "actor": np.array([self.actor] * len(prompts), dtype=object),
        }
        if self.reference is not None:
            ref, _ = self.reference.logps_ids(out["prompt_ids"], out["response_ids"])
            result["ref_logp"] = ref
        return result


def generate_with_ray_data(
    prompts: list[Any],
    model: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    batch_size: int = 16,
    reference: str | None = None,
    apply_chat_template: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """One sample per prompt from `model` on `actors` Ray Data actors (temperature T, no top-k/top-p,
    so with T = 1 the samples' log-probs are log π and the KL estimate is unbiased).

    Returns {completions, tokens, logp, ref_logp (with a reference), finished, actors (distinct actor
    ids that produced rows), seconds, generations_per_second}, lists in prompt order.
    """
    import ray

    from raylign.models import resolve_model_path
    from raylign.workers.group import init_ray

    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    resolve_model_path(model)  # build tiny:/builtin: models once here, not in every actor
    if reference is not None:
        resolve_model_path(reference)
    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.verbose_stats_logs = False
    items = [{"index": i, "prompt_json": json.dumps(p)} for i, p in enumerate(prompts)]
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "batch_size": batch_size}
    start = time.perf_counter()
    ds = ray.data.from_items(items, override_num_blocks=max(actors, min(len(items) // batch_size, 64) or 1))
    ds = ds.map_batches(
        Generator,
        fn_constructor_kwargs={"model": model, "sampling": sampling, "seed": seed, "num_cpus": cpus_per_actor,
                               "reference": reference, "apply_chat_template": apply_chat_template},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        batch_format="numpy",
    )
    rows = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    seconds = time.perf_counter() - start
    if len(rows) != len(prompts):
        raise RuntimeError(f"Ray Data returned {len(rows)} generations for {len(prompts)} prompts")
    out: dict[str, Any] = {
        "completions": [str(r["completion"]) for r in rows],
        "tokens": [int(r["tokens"]) for r in rows],
        "logp": [float(r["logp"]) for r in rows],
        "finished": [bool(r["finished"]) for r in rows],
        "actors": sorted({str(r["actor"]) for r in rows}),
        "seconds": seconds,
        "generations_per_second": len(rows) / seconds if seconds > 0 else float("inf"),
    }
    if reference is not None:
        out["ref_logp"] = [float(r["ref_logp"]) for r in rows]
    return out
