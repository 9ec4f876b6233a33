"""Overload against `raylign serve` as clients see it (issue 15 item 9): N concurrent requests against one
replica that works on 8 and queues 8, with `--timeout` T. Prints the answers by status, the client
latency p50/p99 against T, and the longest time a replica held a request (its `Server-Timing`).

    python bench/serve_overload.py --timeout 10 --requests 400

Every answer must be a 200, 429 or 408 with a valid body, and the client p99 within the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench._common` when run as a script


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def _burst(port: int, n: int) -> list[tuple[int, float, float, str]]:
    import json

    from bench._common import raw_post

    async def one(i: int):
        status, headers, body, seconds = await raw_post("127.0.0.1", port, "/v1/completions",
                                                        {"prompt": f"Once upon a time {i}", "max_tokens": 8 + i % 9})
        replica = float(headers.get("server-timing", "replica;dur=nan").split("dur=")[1]) / 1000
        code = json.loads(body).get("error", {}).get("code", "") if status != 200 else "ok"
        return status, seconds, replica, code

    return await asyncio.gather(*(one(i) for i in range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:llama")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ADDRESS", "")

    import ray
    from ray import serve

    from raylign.serving import ServeSettings, build_app
    from raylign.serving.deployment import APP_NAME
    from raylign.serving.settings import LOOPBACK_NAMES, PROXY_TIMEOUT_GRACE_S

    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = _free_port()
    settings = ServeSettings(model=args.model, max_batch_size=8, batch_wait_ms=20, max_tokens_limit=32,
                             max_ongoing_requests=8, max_queued_requests=8, request_timeout_s=args.timeout,
                             allowed_hosts=LOOPBACK_NAMES, num_cpus=1)
    serve.start(http_options={"host": "127.0.0.1", "port": port,
                              "request_timeout_s": args.timeout + PROXY_TIMEOUT_GRACE_S})
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        answers = asyncio.run(_burst(port, args.requests))
    finally:
        serve.shutdown()
        ray.shutdown()
    statuses: dict[int, int] = {}
    for status, *_ in answers:
        statuses[status] = statuses.get(status, 0) + 1
    latencies = [s for _, s, _, _ in answers]
    held = [r for _, _, r, _ in answers if math.isfinite(r)]
    valid = all(status in (200, 429, 408) for status in statuses)
    print(f"{args.requests} concurrent requests, --timeout {args.timeout:g} s, load {os.getloadavg()[0]:.2f}")
    print(f"  answers: {dict(sorted(statuses.items()))}  (all 200/429/408: {valid})")
    print(f"  client latency p50 {_p(latencies, 0.5):.2f} s, p99 {_p(latencies, 0.99):.2f} s, "
          f"max {max(latencies):.2f} s; p99 / timeout = {_p(latencies, 0.99) / args.timeout:.2f}")
    print(f"  longest time on the replica {max(held):.2f} s")


if __name__ == "__main__":
    main()
