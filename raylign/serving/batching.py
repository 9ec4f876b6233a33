"""The asyncio side of a batch: submit a batch of jobs to the engine's running decode loop and hand
each job its rows' updates as they come.

`stream_batch` has the shape `@serve.batch` expects of a streaming batch handler: an async generator
that takes the list of jobs Serve collected and yields, again and again, one item per job: that
job's new `RowUpdate`s (possibly none) or `StopIteration` once all its rows have finished. Updates
that pile up while the event loop was busy are merged into one item, so a slow consumer costs
nothing but coarser chunks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from raylign.serving.engine import BatchResult, Engine, Job, RowUpdate

_DONE = object()


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
