"""Serving an aligned model with Ray Serve: OpenAI-compatible routes, dynamic batching, streaming, auth.

    raylign serve runs/quickstart/final                  # the CLI (raylign/cli.py)
    serve run cluster/serve.yaml                         # a Serve config file: raylign.serving:app_builder

    from raylign.serving import ServeSettings, build_app
    serve.run(build_app(ServeSettings(model="tiny:llama")), name="raylign", route_prefix="/")

Modules: `settings` (what a served model needs to know; no torch, no Ray), `protocol` (HTTP shapes),
`engine` (batched per-row generation, plain torch), `batching` (engine <-> asyncio), `api` (FastAPI
routes, auth, errors), `deployment` (the Serve deployment), `launch` (what `raylign serve` runs).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeSettings": "settings",
    "ServeError": "settings",
    "build_app": "deployment",
    "app_builder": "deployment",
    "create_api": "api",
    "Engine": "engine",
    "serve_forever": "launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raylign.serving' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"raylign.serving.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
