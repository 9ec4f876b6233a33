"""Generation over large prompt sets with Ray Data: `map_batches` over an actor pool of generators.

    ray.data.from_items(rows) -> map_batches(Generator, compute=ActorPoolStrategy(size=N), num_cpus=c, ...)

Each `Generator` actor loads the policy once (a `RolloutWorker`, so sampling is the exact KV-cache
loop training uses) and, when a reference model is given, scores its own samples under the
reference too (log π_ref of the sampled token ids, for the Monte-Carlo KL). A batch is sampled with
the seed key (seed, Purpose.GENERATE, step 0, its first prompt's index) of `raylign.runtime`'s one
seeding scheme, so results depend on the inputs only, not on which actor ran them or in which order.
Rows come back in prompt order with the actor that produced them, so callers can see how the work
was spread.

`generate_checkpoints_with_ray_data` does the same for several models (a run's checkpoints) in one
pass: rows carry a model index, each actor loads the models it is sent (keeping the two most recent),
and one reference scores every model's samples, so the pool starts once for all checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from raylign.config import RolloutConfig
from raylign.runtime import Purpose


class Generator:
    """A Ray Data callable class over rows of one or several models (`model` column = index into
    `models`): a RolloutWorker per model (+ an optional reference LM) per actor.

    A batch may straddle two models: its rows are split by model and each part is sampled by that
    model's RolloutWorker, seeded by (seed, Purpose.GENERATE, step 0, the part's first prompt index), so
    results depend on the inputs, not on which actor ran them; where batches line up with the models'
    rows (the prompt count a multiple of the batch size) every model meets the same prompts with the
    same seeds."""

    CACHE = 2  # models kept loaded per actor; rows arrive ordered by model, so reloads are rare

    def __init__(self, models: list[str], sampling: RolloutConfig, seed: int, num_cpus: float,
                 reference: str | None = None, apply_chat_template: bool = True):
        self.models = models
        self.num_cpus = num_cpus
        self.apply_chat_template = apply_chat_template
        self.workers: dict[int, Any] = {}
        self.reference = None
        if reference is not None:
            from raylign.evaluation.scorers import LogLikelihood

            self.reference = LogLikelihood(reference, apply_chat_template=apply_chat_template)
        self.sampling = sampling.model_copy(update={"n_samples": 1})
        self.seed = seed
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def _worker(self, m: int) -> Any:
        from raylign.workers.rollout import RolloutWorker

        if m not in self.workers:
            while len(self.workers) >= self.CACHE:
                self.workers.pop(next(iter(self.workers)))
            self.workers[m] = RolloutWorker(0, 1, self.num_cpus, {"path": self.models[m]}, seed=self.seed,
                                            apply_chat_template=self.apply_chat_template)
        return self.workers[m]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        model_idx = np.asarray(batch["model"], dtype=np.int64)
        parts = []
        for m in dict.fromkeys(model_idx.tolist()):  # models in order of appearance
            rows = np.flatnonzero(model_idx == m)
            prompts = [json.loads(batch["prompt_json"][i]) for i in rows]
            part = self.sample(self._worker(m), prompts, np.asarray(batch["index"])[rows],
                               int(batch["prompt_index"][rows[0]]))
            part["model"] = np.full(len(rows), m, dtype=np.int64)
            parts.append(part)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def sample(self, worker: Any, prompts: list[Any], index: Any, seed_index: int) -> dict[str, Any]:
        """Sample `prompts` with `worker` (the first of them is prompt `seed_index` of the call's prompts, so
        its seed key is (seed, Purpose.GENERATE, 0, seed_index)), score them under the reference."""
        out = worker.generate(prompts, self.sampling, seed=self.seed, purpose=Purpose.GENERATE,
                              first_index=seed_index)
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


def _run_pool(items: list[dict[str, Any]], cls: type, ctor: dict[str, Any], actors: int, cpus_per_actor: float,
              batch_size: int, progress: bool) -> tuple[list[dict[str, Any]], float]:
    """map_batches(cls) over `items` on an actor pool; rows sorted by `index`, and the seconds taken."""
    import ray

    from raylign.runtime import init_ray

    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.verbose_stats_logs = False
    start = time.perf_counter()
    source = ray.data.from_items(items, override_num_blocks=max(actors, min(len(items) // batch_size, 64) or 1))
    ds = source.map_batches(cls, fn_constructor_kwargs=ctor, batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                        batch_format="numpy")
    rows = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    seconds = time.perf_counter() - start
    if len(rows) != len(items):
        raise RuntimeError(f"Ray Data returned {len(rows)} generations for {len(items)} prompts")
    return rows, seconds


def _columns(rows: list[dict[str, Any]], reference: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "completions": [str(r["completion"]) for r in rows],
        "tokens": [int(r["tokens"]) for r in rows],
        "logp": [float(r["logp"]) for r in rows],
        "finished": [bool(r["finished"]) for r in rows],
    }
    if reference:
        out["ref_logp"] = [float(r["ref_logp"]) for r in rows]
    return out


def generate_checkpoints_with_ray_data(
    prompts: list[Any],
    models: list[str],
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
    """One sample per prompt from each of `models` in a single Ray Data pass (module docstring).

    Returns {per_model: [the `generate_with_ray_data` columns for each model, in `models` order],
    actors, seconds, generations_per_second}.
    """
    from raylign.models import resolve_model_path

    if not models:
        raise ValueError("no models to generate with")
    for m in [*models, *([reference] if reference else [])]:
        resolve_model_path(m)
    items = [{"index": k * len(prompts) + i, "model": k, "prompt_index": i, "prompt_json": json.dumps(p)}
             for k in range(len(models)) for i, p in enumerate(prompts)]
    sampling = RolloutConfig.model_validate({"max_new_tokens": max_new_tokens, "temperature": temperature,
                                             "batch_size": batch_size})
    ctor = {"models": list(models), "sampling": sampling, "seed": seed, "num_cpus": cpus_per_actor,
            "reference": reference, "apply_chat_template": apply_chat_template}
    rows, seconds = _run_pool(items, Generator, ctor, actors, cpus_per_actor, batch_size, progress)
    n = len(prompts)
    return {
        "per_model": [_columns(rows[k * n : (k + 1) * n], reference is not None) for k in range(len(models))],
        "actors": sorted({str(r["actor"]) for r in rows}),
        "seconds": seconds,
        "generations_per_second": len(rows) / seconds if seconds > 0 else float("inf"),
    }


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
    gen = generate_checkpoints_with_ray_data(
        prompts, [model], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, actors=actors,
        cpus_per_actor=cpus_per_actor, batch_size=batch_size, reference=reference,
        apply_chat_template=apply_chat_template, progress=progress)
    return {**gen.pop("per_model")[0], **gen}
