"""Chunked prefill: how long a running stream waits between two tokens while long prompts arrive, with
the serving engine's chunked prefill off (every new prompt prefilled in one forward pass before the
next decode step) and on (`prefill_chunk` prompt tokens per decode step).

The engine (`raylign.serving.engine.Engine`, what each `raylign serve` replica runs) is driven in
process, without HTTP, so that only its scheduling differs between the two settings: one greedy
stream (a counting prompt, so that it runs without meeting EOS) decodes; after `--warm-tokens` of its
tokens, `--long` long prompts (`--prompt-tokens` tokens each, all different, no shared head) are
submitted at once as separate requests, each asking for `--long-tokens` tokens. Measured per run, over
the window from their arrival until the last of them has its first token: every gap between two
consecutive updates of the stream (its inter-token times), and the long prompts' times to first token.
Reported per setting over `--repeats` runs: p50/p99/max inter-token time in the window, the stream's
median inter-token time before the arrival (its plain decode step), and the long prompts' mean/max
time to first token (what chunking costs them).

    python bench/serve_chunked_prefill.py                        # SmolLM2-135M if cached, else tiny:llama
    python bench/serve_chunked_prefill.py --model tiny:llama --prompt-tokens 400 --chunk 64
    python bench/serve_chunked_prefill.py --threads 2 --repeats 3 --json chunked.json

On a machine shared with other work, check `uptime` first: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PREFERRED = "builtin:smollm2-135m-instruct"
FALLBACK = "tiny:llama"
PROMPTS = Path(__file__).resolve().parents[1] / "raylign" / "data" / "builtin" / "everyday_prompts.jsonl"
SERVING_DEFAULT_CHUNK = 256  # ServeSettings.prefill_chunk_tokens' default (raylign serve --prefill-chunk-tokens)


def default_model() -> str:
    from raylign.models.registry import list_models

    cached = {m["name"] for m in list_models() if m.get("cached")}
    return PREFERRED if PREFERRED in cached else FALLBACK


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics (numpy's default)."""
    import numpy as np

    return float(np.percentile(values, q))


def long_prompts(engine, count: int, tokens: int) -> list[list[int]]:
    """`count` different prompts of exactly `tokens` tokens, from the built-in everyday prompts, each
    starting at a different one (so no two share a head the engine would prefill once)."""
    texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    texts = [t if isinstance(t, str) else " ".join(m["content"] for m in t) for t in texts]
    out = []
    for i in range(count):
        ids: list[int] = []
        k = i * 7
        while len(ids) < tokens:
            ids += engine.encode_text(texts[k % len(texts)] + "\n")
            k += 1
        out.append(ids[:tokens])
    return out


def one_run(engine, args, prompts: list[list[int]], seed: int) -> dict:
    from raylign.serving.engine import Job, Sampling

    count = ", ".join(str(i) for i in range(1, 9)) + ","
    runner = Job([engine.encode_text(f"Count on: {count}")], Sampling(args.stream_tokens, temperature=0.0),
                 stream=True)
    times: list[float] = []
    warm = threading.Event()

    def on_runner(updates) -> None:
        times.append(time.perf_counter())
        if len(times) >= args.warm_tokens:
            warm.set()

    first: dict[int, float] = {}

    def on_long(i: int):
        def emit(updates) -> None:
            first.setdefault(i, time.perf_counter())
        return emit

    run = engine.submit([runner], emit=on_runner)
    if not warm.wait(600):
        raise RuntimeError("the stream did not start")
    arrival = time.perf_counter()
    futures = [engine.submit([Job([p], Sampling(args.long_tokens, temperature=0.0, seed=seed), stream=True)],
                             emit=on_long(i)) for i, p in enumerate(prompts)]
    for f in futures:
        f.result(600)
    result = run.result(600)
    last_first = max(first.values())
    if times[-1] < last_first:
        raise RuntimeError(f"the stream ended ({result.rows[0][0][2]}, {result.rows[0][0][1]} tokens) before the long "
                           "prompts had their first token: raise --stream-tokens")
    before = [b - a for a, b in zip(times, times[1:], strict=False) if b <= arrival]
    # gaps that end inside the window [arrival, last first token] (the one spanning the arrival included)
    window = [b - a for a, b in zip(times, times[1:], strict=False) if arrival < b and a <= last_first]
    return {"gaps": window, "before": before, "ttft": [first[i] - arrival for i in range(len(prompts))]}


def measure(engine, args, chunk: int) -> dict:
    engine.prefill_chunk = chunk
    prompts = long_prompts(engine, args.long, args.prompt_tokens)
    runs = []
    for r in range(args.repeats):
        engine._prefix = None  # no head kept from an earlier run
        runs.append(one_run(engine, args, prompts, seed=r))
    gaps = [g for run in runs for g in run["gaps"]]
    ttft = [t for run in runs for t in run["ttft"]]
    return {"prefill_chunk": chunk, "gaps": len(gaps), "p50_ms": 1000 * percentile(gaps, 50),
            "p99_ms": 1000 * percentile(gaps, 99), "max_ms": 1000 * max(gaps),
            "step_before_ms": 1000 * statistics.median([g for run in runs for g in run["before"]]),
            "ttft_mean_s": statistics.fmean(ttft), "ttft_max_s": max(ttft)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"default: {PREFERRED} if cached, else {FALLBACK}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--long", type=int, default=4, help="long prompts arriving at once (default 4)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="tokens of each long prompt (default 512)")
    parser.add_argument("--long-tokens", type=int, default=8, help="tokens each long prompt asks for (default 8)")
    parser.add_argument("--chunk", type=int, default=SERVING_DEFAULT_CHUNK,
                        help=f"prefill_chunk when on (default {SERVING_DEFAULT_CHUNK}, the serving default)")
    parser.add_argument("--stream-tokens", type=int, default=400, help="max_tokens of the running stream")
    parser.add_argument("--warm-tokens", type=int, default=8, help="stream tokens before the long prompts arrive")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (default 3)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from raylign.serving.engine import Engine

    torch.set_num_threads(args.threads)
    model = args.model or default_model()
    engine = Engine(model, max_rows=32)
    print(f"model {model}, {args.threads} threads, {args.long} prompts of {args.prompt_tokens} tokens arriving "
          f"while a stream decodes; load: {os.getloadavg()[0]:.2f}")
    warm = long_prompts(engine, 1, 64)  # first calls (allocations, kernels) outside the timing
    from raylign.serving.engine import Job, Sampling

    engine.generate([Job(warm, Sampling(4, temperature=0.0))])
    results = [measure(engine, args, 0), measure(engine, args, args.chunk)]
    for r in results:
        label = "off" if r["prefill_chunk"] == 0 else f"on ({r['prefill_chunk']} tokens/step)"
        print(f"chunked prefill {label:>22}: stream inter-token p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"max {r['max_ms']:7.1f} ms  ({r['gaps']} gaps; plain step {r['step_before_ms']:.1f} ms)  "
              f"long prompts' TTFT mean {r['ttft_mean_s']:.2f} s max {r['ttft_max_s']:.2f} s")
    off, on = results
    print(f"p99 inter-token time while the long prompts arrive: {off['p99_ms']:.0f} ms -> {on['p99_ms']:.0f} ms "
          f"({off['p99_ms'] / on['p99_ms']:.1f}x lower); load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "threads": args.threads, "args": vars(args),
                                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
