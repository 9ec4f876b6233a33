"""What `raylign serve` runs: check everything a user can get wrong, start (or join) Ray and Serve, deploy,
print how to call the endpoint, serve until Ctrl-C (or SIGTERM), then shut Serve down cleanly."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from raylign.serving.settings import ServeError, ServeSettings


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


def example_curl(url: str, model: str, with_key: bool) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Say something kind."}], "max_tokens": 48}
    auth = ' -H "Authorization: Bearer $RAYLIGN_API_KEY"' if with_key else ""
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
        serve.start(http_options={"host": host, "port": port})
        echo(f"raylign: loading {settings.model} on {settings.num_replicas if settings.min_replicas is None else settings.min_replicas}"
             " replica(s) ...")
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown_host}:{port}"
        with_key = settings.resolved_api_key() is not None
        echo(f"raylign: serving {settings.name} at {url}/v1 (OpenAI-compatible; API docs at {url}/docs)")
        if host in ("0.0.0.0", "::"):
            echo(f"raylign: listening on all interfaces ({host}:{port})")
        echo("auth: " + ("requests need 'Authorization: Bearer <key>'" if with_key else "off (no API key)"))
        echo(f"try:  {example_curl(url, settings.name, with_key)}")
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


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
