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
