"""The Ray Serve deployment: one replica = one `Engine` (+ an optional reward source) behind the FastAPI
app of `api.py`, with `@serve.batch` grouping concurrent requests into shared forward passes.

    build_app(ServeSettings(model="runs/quickstart/final"))   # -> a Serve Application for serve.run
    app_builder({"model": ..., ...})                          # the same, for `serve run`/`serve deploy`
                                                              # with a config YAML (cluster/serve.yaml)

Batching: `_generate_batch` is a streaming `@serve.batch` handler whose batch size is counted in rows
(prompts x n), up to `max_batch_size`, waiting at most `batch_wait_ms` for a batch to fill. Batches do
not wait for each other: each is submitted to the engine's decode thread, where it joins the rows
already being decoded (continuous batching, up to `max_batch_size` rows in all; see `engine.py`), so
the replica's event loop keeps accepting requests meanwhile. Every batch logs one
`raylign batch: requests=.. rows=.. peak_rows=..` line to the replica's Serve log. `/v1/score`
batches the same way, one batch at a time, scored a chunk of pairs at a time (a timed-out request's
pairs left unscored are skipped).

Overload: the app bounds each replica itself (`api.Admission`: requests at work plus a queue of
`max_queued_requests`; any more get an OpenAI-style 429 with `Retry-After`), so Serve's own
`max_ongoing_requests` leaves room above that bound for requests the replica only refuses, and Serve's
`max_queued_requests` (per proxy: 429 with `Retry-After` too, but with Serve's plain-text body) is only a
backstop, as wide as that room, for what waits at a proxy once every replica is past even that. Health: Serve calls `check_health`, which fails once the engine's decode thread has
died, and replaces the replica.

The API key never enters the deployment's arguments (Serve's app config): they name the file or the
environment variable each replica reads it from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import ray
from ray import serve

from raylign.serving.batching import ScoreJob, log_batch, score_jobs, stream_batch
from raylign.serving.engine import Job, RowUpdate
from raylign.serving.settings import RETRY_AFTER_S, ServeError, ServeSettings

DEPLOYMENT_NAME = "raylign"
APP_NAME = "raylign"
logger = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's log file
# Generation batches in flight at once per replica (their rows are capped by the engine's max_rows).
CONCURRENT_BATCHES = 64
# Requests Serve may hand a replica beyond those the app works on and queues, for the app to refuse
# itself (429 with an OpenAI body, no body read) instead of Serve queueing them at the proxy uncounted;
# and requests one proxy holds while it routes a burst (Serve counts every request not yet handed to a
# replica as queued): past that, Serve's proxy answers 429 + Retry-After itself (a plain-text body).
REFUSAL_HEADROOM = 512


def _rows(jobs: list[Job]) -> int:
    return sum(job.rows for job in jobs)


def _pairs(jobs: list[ScoreJob]) -> int:
    return sum(job.pairs for job in jobs)


# `serve.batch` for a streaming (async generator) method: Serve supports one, but its types have no
# overload for it, so the decorated method is typed by the one that calls it (`generate`).
_streaming_batch: Any = serve.batch


def _set_batching(handler: Any, max_batch_size: int, wait_s: float) -> None:
    """Resize a `@serve.batch` handler; ray types the handler as a plain callable, without the setters."""
    handler.set_max_batch_size(max_batch_size)
    handler.set_batch_wait_timeout_s(wait_s)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class RaylignServer:
    """A replica: loads the policy (and reward source), builds the HTTP app at start."""

    def __init__(self, settings: dict[str, Any]):
        import torch

        from raylign.runtime import cpu_threads, quiet_libraries
        from raylign.serving.engine import Engine

        self.settings = ServeSettings.model_validate(settings)
        # What Ray gave this replica, which a Serve config's ray_actor_options may have changed.
        assigned = ray.get_runtime_context().get_assigned_resources()
        torch.set_num_threads(cpu_threads(assigned.get("CPU", self.settings.num_cpus)))
        quiet_libraries()
        self.settings.resolved_api_key()  # fail at start, not at the first request, if a key is missing
        device = "cuda" if assigned.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
        self.engine = Engine(self.settings.model, dtype=self.settings.dtype,
                             trust_remote_code=self.settings.trust_remote_code,
                             merge_lora=self.settings.merge_lora, device=device,
                             max_rows=self.settings.max_batch_size,
                             prefill_chunk=self.settings.prefill_chunk_tokens)
        self.scorer = None
        self.reward_name = None
        if self.settings.reward_model:
            from raylign.rewards import build_reward_source

            self.scorer = build_reward_source(self.settings.reward_model, device=device,
                                              trust_remote_code=self.settings.trust_remote_code)
            self.reward_name = self.settings.reward_name
        # Generation runs on the engine's own decode thread; scoring beside it on this one.
        self.scoring_thread = ThreadPoolExecutor(1, thread_name_prefix="raylign-score")
        wait_s = self.settings.batch_wait_ms / 1000
        for method in (self._generate_batch, self._score_batch):
            _set_batching(method, self.settings.max_batch_size, wait_s)
        self._log_batch = log_batch(logger)
        logger.info("raylign: serving %s (context %d tokens, max batch %d rows, wait %g ms)", self.settings.name,
                    self.engine.context_length, self.settings.max_batch_size, self.settings.batch_wait_ms)

    def __serve_build_asgi_app__(self) -> Any:
        from raylign.serving.api import create_api

        return create_api(self.settings, self)

    # ---- the backend the routes call ------------------------------------------------------------
    def generate(self, job: Job) -> AsyncIterator[list[RowUpdate]]:
        return self._generate_batch(job)

    async def score(self, job: ScoreJob) -> list[float] | None:
        return await self._score_batch(job)

    def check_health(self) -> None:
        """Serve's health check: raises once the decode thread has died, so Serve replaces this replica."""
        self.engine.check_alive()

    # Batches run concurrently: each joins the engine's running batch as soon as there is room.
    @_streaming_batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_rows,
                      max_concurrent_batches=CONCURRENT_BATCHES)
    async def _generate_batch(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        async for out in stream_batch(self.engine, jobs, self._log_batch):
            yield out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_pairs)
    async def _score_batch(self, jobs: list[ScoreJob]) -> list[list[float] | None]:
        if self.scorer is None:  # the API offers /v1/score only with a reward model
            raise RuntimeError("this deployment has no reward model to score with")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.scoring_thread, score_jobs, self.scorer.score, jobs)


def deployment_options(settings: ServeSettings) -> dict[str, Any]:
    """Serve options of the deployment: replicas or autoscaling, CPUs/GPUs per replica, queue bounds."""
    from ray.serve.config import BackpressureConfig

    bound = settings.ongoing_requests() + settings.queued_requests()
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "max_ongoing_requests": bound + REFUSAL_HEADROOM,
        "max_queued_requests": REFUSAL_HEADROOM,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
    }
    if settings.min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": settings.min_replicas,
                                         "max_replicas": settings.max_replicas,
                                         "target_ongoing_requests": settings.max_batch_size}
    else:
        options["num_replicas"] = settings.num_replicas
    if settings.logs_dir:
        options["logging_config"] = {"logs_dir": settings.logs_dir}
    return options


def build_app(settings: ServeSettings) -> serve.Application:
    """The Serve application for `settings` (pass it to `serve.run`). An API key must come by file
    (`api_key_file`) or environment variable (`api_key_env`), read on each replica: the arguments
    become Serve's app config."""
    if settings.api_key:
        raise ServeError("api_key would be stored in Serve's application config (shown by its dashboard and "
                         "API): give api_key_file (a file every replica can read) or api_key_env instead")
    settings = _absolute_paths(settings)
    # `@serve.deployment` made the class a Deployment (mypy types a decorated class as the class).
    deployment = cast(serve.Deployment, RaylignServer)
    return deployment.options(**deployment_options(settings)).bind(settings.model_dump())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for Serve config files: `import_path: raylign.serving:app_builder`, `args:` the
    `ServeSettings` fields. Such a deployment is meant for a cluster, so it needs an API key
    (`api_key`, or `api_key_env` naming an environment variable of the replicas) unless the args
    say `require_api_key: false`."""
    return build_app(ServeSettings.model_validate({"require_api_key": True, **args}))


def _absolute_paths(settings: ServeSettings) -> ServeSettings:
    """Local model paths made absolute, since replicas do not run in the caller's directory."""
    update: dict[str, str | None] = {}
    for key in ("model", "reward_model"):
        value = getattr(settings, key)
        if value and Path(value).expanduser().exists():
            update[key] = str(Path(value).expanduser().resolve())
    if "model" in update and settings.served_model_name is None:
        update["served_model_name"] = settings.model
    if "reward_model" in update and settings.served_reward_name is None:
        update["served_reward_name"] = settings.reward_model
    return settings.model_copy(update=update)
