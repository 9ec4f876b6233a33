"""Pieces every `bench/*_vs_*.py` script shares: the peer's step timer, the alternating best-of-N
runs, and the endpoint comparison of two training curves against their step-to-step noise."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

LAST_K = 5  # a curve's final value = mean of its last K steps


def step_timer(log_key: str) -> Any:
    """A transformers `TrainerCallback` recording each step's begin/end time and the logged `log_key`
    values (`.begin`, `.end`, `.values`)."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []
            self.values: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and log_key in logs:
                self.values.append(float(logs[log_key]))

    return StepTimer()


def tail_mean(values: list[float]) -> tuple[float, float]:
    """(mean, sample sd) of the last LAST_K values."""
    tail = values[-LAST_K:]
    return statistics.fmean(tail), (statistics.stdev(tail) if len(tail) > 1 else 0.0)


def endpoints_agree(ours: list[float], peer: list[float]) -> tuple[int, float, bool]:
    """(k, noise, agree): the two curves' final means differ by less than twice the standard error of
    the two k-step means (+0.01). Only endpoints are compared: the sides see the same work in
    different random streams, so the curves differ step by step."""
    (m1, s1), (m2, s2) = tail_mean(ours), tail_mean(peer)
    k = min(LAST_K, len(ours))
    noise = 2 * math.sqrt((s1**2 + s2**2) / k) + 0.01
    return k, noise, abs(m1 - m2) <= noise


def alternate_runs(sides: list[str], repeat: int, run_side: Callable[[str, int], Any],
                   describe: Callable[[Any], str], rate: Callable[[Any], float]) -> tuple[dict[str, list], list]:
    """Run each side `repeat` times, alternating which goes first; -> (all runs per side, each side's
    fastest run). Outside load only ever slows a run down, so the fastest run is the best estimate."""
    runs: dict[str, list[Any]] = {s: [] for s in sides}
    for r in range(repeat):
        for side in sides if r % 2 == 0 else sides[::-1]:
            res = run_side(side, r)
            runs[side].append(res)
            print(describe(res), flush=True)
    best = [max(runs[s], key=rate) for s in sides]
    if repeat > 1:
        print(f"best of {repeat} runs per side:")
        for res in best:
            print(describe(res))
    return runs, best


async def raw_post(host: str, port: int, path: str, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, float]:
    """POST `body` as JSON over one fresh HTTP/1.1 connection (Connection: close) with asyncio streams:
    (status, headers lower-cased, body, seconds). A load generator this thin costs the server's machine
    almost nothing: `httpx.AsyncClient` holding 400 connections spends seconds per burst on a 2-core
    machine by itself (a trivial server answered 400 requests at p99 10 s through it, 0.2 s through this)."""
    import asyncio
    import json
    import time

    start = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Connection: close",
            *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    seconds = time.monotonic() - start
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if fields.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return status, fields, payload, seconds


def _dechunk(payload: bytes) -> bytes:
    out, rest = b"", payload
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out
