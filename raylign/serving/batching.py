"""The asyncio side of a batch: submit a batch of jobs to the engine's running decode loop and hand
each job its rows' updates as they come.

`stream_batch` has the shape `@serve.batch` expects of a streaming batch handler: an async generator
that takes the list of jobs Serve collected and yields, again and again, one item per job: that
job's new `RowUpdate`s (possibly none) or `StopIteration` once all its rows have finished. Updates
that pile up while the event loop was busy are merged into one item, so a slow consumer costs
nothing but coarser chunks.

`score_jobs` is the same for scoring: a batch of `/v1/score` requests (`ScoreJob`s) scored a chunk of
pairs at a time on the scoring thread, so a request that timed out costs no more work after the chunk
being scored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from raylign.serving.engine import BatchResult, Engine, Job, RowUpdate

_DONE = object()
# (prompt, completion) pairs per call of the reward source: between calls, requests gone are skipped.
SCORE_CHUNK = 16


async def stream_batch(engine: Engine, jobs: Sequence[Job],
                       on_done: Callable[[Sequence[Job], BatchResult], None] | None = None
                       ) -> AsyncIterator[list[Any]]:
    """Yield, per step, `[updates or StopIteration for each job]` until the batch is done.

    An exception in generation is raised from here after the updates already produced, so Serve
    passes it to every request of the batch that is still waiting (each answers with an error); the
    replica itself carries on with the next batch.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(updates: dict[int, list[RowUpdate]]) -> None:  # called in the generation thread
        loop.call_soon_threadsafe(queue.put_nowait, updates)

    future = asyncio.wrap_future(engine.submit(jobs, emit), loop=loop)
    future.add_done_callback(lambda _: queue.put_nowait(_DONE))  # done callbacks run on the loop
    open_rows = [job.rows for job in jobs]
    done = False
    while not done:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        done = _DONE in items
        merged: dict[int, list[RowUpdate]] = {}
        for item in items:
            if item is not _DONE:
                for j, updates in item.items():
                    merged.setdefault(j, []).extend(updates)
        if not merged:
            continue
        out: list[Any] = []
        for j in range(len(jobs)):
            if open_rows[j] == 0:
                out.append(StopIteration)
                continue
            updates = merged.get(j, [])
            open_rows[j] -= sum(u.finish_reason is not None for u in updates)
            out.append(updates)
        yield out
    result = await future  # raises what generation raised
    if on_done is not None:
        on_done(jobs, result)


def describe_batch(jobs: Sequence[Job], result: BatchResult) -> str:
    """The log line of one batch; tests and operators read batch sizes from it."""
    return (f"raylign batch: requests={len(jobs)} rows={sum(j.rows for j in jobs)} steps={result.steps} "
            f"seconds={result.seconds:.3f} peak_rows={result.peak_rows}")


def log_batch(logger: logging.Logger) -> Callable[[Sequence[Job], BatchResult], None]:
    return lambda jobs, result: logger.info(describe_batch(jobs, result))


@dataclass
class ScoreJob:
    """One /v1/score request: its pairs, when it times out (`time.monotonic()`), and its cancellation."""

    prompts: list[Any]
    completions: list[str]
    deadline: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def pairs(self) -> int:
        return len(self.completions)

    def cancel(self) -> None:
        self.cancelled.set()

    def gone(self, now: float) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and now >= self.deadline)


def score_jobs(score: Callable[[list[Any], list[str]], Iterable[float]], jobs: Sequence[ScoreJob],
               chunk: int = SCORE_CHUNK) -> list[list[float] | None]:
    """Every job's scores, `chunk` pairs per call of `score` (pairs of several jobs share a call); None
    for a job that was gone (cancelled, past its deadline) before all its pairs were scored: from then
    on none of its pairs is scored."""
    out: list[list[float] | None] = [[] for _ in jobs]
    waiting = deque((j, i) for j, job in enumerate(jobs) for i in range(job.pairs))
    while waiting:
        now = time.monotonic()
        for j, job in enumerate(jobs):
            if out[j] is not None and job.gone(now):
                out[j] = None
        take: list[tuple[int, int]] = []
        while waiting and len(take) < chunk:
            j, i = waiting.popleft()
            if out[j] is not None:
                take.append((j, i))
        if not take:
            break
        scores = score([jobs[j].prompts[i] for j, i in take], [jobs[j].completions[i] for j, i in take])
        for (j, _), value in zip(take, scores, strict=True):
            got = out[j]
            if got is not None:
                got.append(float(value))
    return out


class LocalBackend:
    """The backend `raylign.serving.api.create_api` needs, without Serve: each request is its own
    admission to the engine's running batch (so concurrent requests still decode together), for an app
    served in-process (tests, benchmarks, `uvicorn`). It has no reward model, so no /v1/score."""

    reward_name: str | None = None

    def __init__(self, engine: Engine):
        self.engine = engine

    async def generate(self, job: Job) -> AsyncIterator[list[RowUpdate]]:
        async for (item,) in stream_batch(self.engine, [job]):
            if item is StopIteration:
                return
            yield item

    async def score(self, job: ScoreJob) -> list[float] | None:
        raise RuntimeError("a LocalBackend has no reward model to score with")
