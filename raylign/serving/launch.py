"""What `raylign serve` runs: check everything a user can get wrong, start (or join) Ray and Serve, deploy,
print how to call the endpoint, serve until Ctrl-C (or SIGTERM), then shut Serve down cleanly.

A Serve it starts gets a proxy request timeout a little longer than the app's (`PROXY_TIMEOUT_GRACE_S`):
the app answers 408 itself, the proxy only when a replica cannot answer at all. A keyless server on a
loopback address of its own Ray answers only requests whose Host is a loopback name (DNS rebinding).
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from raylign.serving.settings import (
    API_KEY_ENV,
    LOOPBACK_NAMES,
    PROXY_TIMEOUT_GRACE_S,
    ServeError,
    ServeSettings,
    is_local_host,
)


def check_before_start(settings: ServeSettings, host: str, port: int, attach: bool) -> None:
    """Fail with one clear message before Ray starts: unknown model or reward source, port taken."""
    from raylign.config import RewardConfig
    from raylign.models import resolve_model_path
    from raylign.rewards import check_reward_specs

    resolve_model_path(settings.model, settings.trust_remote_code)  # ModelNotFoundError names the fix
    if settings.reward_model:
        check_reward_specs(RewardConfig.model_validate({"sources": [{"source": settings.reward_model}]}))
    if not attach:  # a local Ray: Serve's proxy binds here, so the port must be free now
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None


def example_curl(url: str, model: str, with_key: bool, key_file: str | None = None) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Say something kind."}], "max_tokens": 48}
    key = f"$(cat {shlex.quote(key_file)})" if key_file else f"${API_KEY_ENV}"
    auth = f' -H "Authorization: Bearer {key}"' if with_key else ""
    return (f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(json.dumps(body))}")


def serve_forever(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
                  ray_address: str | None = None, echo: Callable[[str], Any] = print,
                  ready: Callable[[str], Any] | None = None) -> None:
    """Deploy `settings` on Ray Serve at http://host:port and block until interrupted."""
    import os

    import ray
    from ray import serve

    from raylign.runtime import ResourceError, init_ray
    from raylign.serving.deployment import APP_NAME, build_app

    attach = bool(ray_address or os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
    check_before_start(settings, host, port, attach)
    if not attach:  # replicas of our own Ray read what this process reads: a missing key fails here
        settings.resolved_api_key()
    with_key = bool(settings.api_key or settings.api_key_file or settings.api_key_env)
    if not with_key and not attach and settings.allowed_hosts is None and is_local_host(host):
        settings = settings.model_copy(update={"allowed_hosts": list(LOOPBACK_NAMES)})
    started_ray = not ray.is_initialized()
    init_ray(ray_address)
    # After ray.init, which installs its own SIGTERM handler: `kill`, container stops and Ctrl-C (even
    # when a shell started us in the background with SIGINT ignored) all shut down the same way.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        need = (settings.min_replicas if settings.min_replicas is not None else settings.num_replicas) * settings.num_cpus
        have = ray.cluster_resources().get("CPU", 0.0)
        if need > have:
            raise ResourceError(f"{need:g} CPUs are needed for the replicas but the Ray cluster has {have:g}; "
                                "lower --replicas or --cpus-per-replica")
        # On a Serve already running these options are its own (Serve keeps them and logs a warning).
        serve.start(http_options={"host": host, "port": port,
                                  "request_timeout_s": settings.request_timeout_s + PROXY_TIMEOUT_GRACE_S})
        echo(f"raylign: loading {settings.model} on {settings.num_replicas if settings.min_replicas is None else settings.min_replicas}"
             " replica(s) ...")
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown_host}:{port}"
        echo(f"raylign: serving {settings.name} at {url}/v1 (OpenAI-compatible; API docs at {url}/docs)")
        if host in ("0.0.0.0", "::"):
            echo(f"raylign: listening on all interfaces ({host}:{port})")
        echo("auth: " + _auth_line(settings, with_key))
        echo(f"limits: {settings.ongoing_requests()} requests at work and {settings.queued_requests()} queued per "
             f"replica (more get 429), {settings.request_timeout_s:g}s per request, queued time included (then 408)")
        echo(f"try:  {example_curl(url, settings.name, with_key, settings.api_key_file)}")
        echo("Ctrl-C to stop.")
        if ready is not None:
            ready(url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        echo("raylign: shutting down ...")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_ray and not attach:
            serve.shutdown()  # our own Ray: stop Serve (proxy, controller) and then Ray itself
            ray.shutdown()
        else:
            try:  # a shared cluster: remove only our application
                serve.delete(APP_NAME)
            except Exception:  # noqa: BLE001 - Serve may not have started
                pass
    echo("raylign: stopped.")


def _auth_line(settings: ServeSettings, with_key: bool) -> str:
    if with_key:
        source = (f"from {settings.api_key_file}" if settings.api_key_file else
                  f"from ${settings.api_key_env} on each replica" if settings.api_key_env else "in-process")
        return f"requests need 'Authorization: Bearer <key>' (key read {source})"
    if settings.allowed_hosts:
        return "off (no API key; only requests to " + ", ".join(settings.allowed_hosts) + " are answered)"
    return "off (no API key)"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
