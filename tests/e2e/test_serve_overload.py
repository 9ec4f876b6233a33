"""Overload through Serve's proxy, as clients see it: 400 concurrent requests against a replica that works
on 8 and queues 8, with `--timeout 10`. Every answer is a 200, a 429 (with Retry-After) or a
408, each with a valid OpenAI completion or error body; no answer took the replica longer than the
timeout (time queued included), read from its `Server-Timing` header, and the p99 latency a client
sees stays within the timeout (plus a second for Serve's proxy). Measured with a thin client (raw
asyncio HTTP/1.1, `bench/_common.raw_post`): httpx holding 400 connections costs this machine seconds. Also: a keyless
loopback server refuses a non-loopback Host header behind the proxy.

One Serve application (tiny:llama, keyless, loopback Host names only) for the whole module, on the
session's shared Ray; Serve is shut down at the end.
"""

from __future__ import annotations

import asyncio
import math
import socket

import pytest

pytestmark = pytest.mark.ray

MODEL = "tiny:llama"
TIMEOUT_S = 10.0  # the issue's `raylign serve --timeout 10` under 400 concurrent requests
REQUESTS = 400


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url(ray_session):
    from ray import serve

    from raylign.serving import ServeSettings, build_app
    from raylign.serving.deployment import APP_NAME
    from raylign.serving.settings import LOOPBACK_NAMES, PROXY_TIMEOUT_GRACE_S

    port = _free_port()
    settings = ServeSettings(model=MODEL, max_batch_size=8, batch_wait_ms=20, max_tokens_limit=32,
                             max_ongoing_requests=8, max_queued_requests=8, request_timeout_s=TIMEOUT_S,
                             allowed_hosts=LOOPBACK_NAMES, num_cpus=1)
    serve.start(http_options={"host": "127.0.0.1", "port": port,
                              "request_timeout_s": TIMEOUT_S + PROXY_TIMEOUT_GRACE_S})
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _replica_seconds(headers) -> float:
    """How long the replica held the request (its `Server-Timing: replica;dur=<ms>`)."""
    timing = dict(part.strip().split("=", 1) for part in headers["server-timing"].split(";")[1:])
    return float(timing["dur"]) / 1000


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def test_400_concurrent_requests_get_200_429_or_408_within_the_timeout(url):
    import httpx

    from bench._common import raw_post
    from raylign.serving.protocol import ChatCompletionResponse, CompletionResponse, ErrorResponse

    port = int(url.rsplit(":", 1)[1])

    def request(i: int) -> tuple[str, dict]:
        if i % 3 == 0:
            return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell me a story {i}"}],
                                            "max_tokens": 8 + i % 9, "temperature": 0.7}
        return "/v1/completions", {"prompt": f"Once upon a time {i}", "max_tokens": 8 + i % 9, "n": 1 + (i % 4 == 1)}

    async def run_all():
        # A thin client (raw asyncio HTTP/1.1): httpx holding 400 connections costs this 2-core machine
        # seconds per burst by itself, which would be measured as server latency.
        async def one(i):
            route, body = request(i)
            status, headers, payload, seconds = await raw_post("127.0.0.1", port, route, body)
            return route, status, headers, payload, seconds

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))

    answers = asyncio.run(run_all())
    statuses: dict[int, int] = {}
    for route, status, headers, payload, _ in answers:
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (200, 429, 408), (status, payload[:300])
        assert headers["content-type"].startswith("application/json"), payload[:300]
        if status == 200:
            kind = ChatCompletionResponse if route == "/v1/chat/completions" else CompletionResponse
            reply = kind.model_validate_json(payload)
            assert reply.choices and all(c.finish_reason in ("stop", "length") for c in reply.choices)
        else:
            error = ErrorResponse.model_validate_json(payload).error
            assert error.message and error.code == {429: "server_busy", 408: "timeout"}[status]
            if status == 429:
                assert int(headers["retry-after"]) >= 1
    assert statuses.get(200, 0) > 0 and statuses.get(429, 0) > 0, statuses
    # On the replica: a refusal takes only the replica's own event-loop lag; a 408 is sent at the deadline
    # (counted from arrival, queued time included) plus that lag; so nothing exceeds the timeout by more.
    on_replica = [_replica_seconds(headers) for _, _, headers, _, _ in answers]
    refused_on_replica = [t for t, (_, status, *_) in zip(on_replica, answers, strict=True) if status == 429]
    slack = 0.25 + 2 * max(refused_on_replica)
    assert max(on_replica) <= TIMEOUT_S + slack, (statuses, max(on_replica), slack)
    # As clients see it: within the timeout, plus that slack and a second for the trip through Serve's proxy.
    latencies = [seconds for *_, seconds in answers]
    assert _p(latencies, 0.99) <= TIMEOUT_S + slack + 1.0, (statuses, _p(latencies, 0.99), slack)
    # the server is not wedged: once the burst is over, a request is served
    after = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert after.status_code == 200, after.text


def test_a_keyless_loopback_server_refuses_other_host_names_behind_the_proxy(url):
    """Item 10 behind Serve's proxy: the Host header reaches the replica as the client sent it."""
    import httpx

    for host in ("evil.example", "evil.example:80", "192.168.1.20:8000"):
        r = httpx.get(url + "/v1/models", headers={"Host": host}, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", r.text
    ok = httpx.get(url + "/v1/models", timeout=30)
    assert ok.status_code == 200
    # the replica uses the request id Serve's proxy gave the request (one id, the one Serve logs)
    assert len(ok.headers.get_list("x-request-id")) == 1
    assert httpx.get(url.replace("127.0.0.1", "localhost") + "/health", timeout=30).status_code == 200
