"""What one served model needs to know: the model, its limits, batching, auth. Shared by the CLI
(`raylign serve`), the Serve config YAML (`cluster/serve.yaml`, through `app_builder`) and tests.

Imports neither torch nor Ray, so the CLI can check a command line before anything starts.

The API key itself is never a setting that travels: settings name where a replica reads it (a file,
`api_key_file`, or an environment variable, `api_key_env`), so it is in neither the process list nor
Serve's application config. `api_key` holds a key only for an app built in this process (tests,
`create_api`); `build_app` refuses it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylign.config import ConfigError, validate_settings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# The Host names a keyless server on loopback answers to (any other is a DNS-rebinding attempt).
LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]
API_KEY_ENV = "RAYLIGN_API_KEY"
# Seconds a refused (429) client is told to wait before it retries (`Retry-After`).
RETRY_AFTER_S = 1
# Serve's proxy times a request out this long after the app would have (the app answers 408 itself;
# the proxy's own 408, plain text, is the backstop for a replica that cannot answer at all).
PROXY_TIMEOUT_GRACE_S = 5.0


class ServeError(ConfigError):
    """A serving setting the user must fix (one line, no traceback)."""


class ServeSettings(BaseModel):
    """Settings of one raylign Serve application (`raylign serve --help` documents each)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="policy: run dir's final/, local HF dir, HF id, builtin:<name>, tiny:<arch>")
    served_model_name: str | None = Field(None, description="the `model` clients name (default: `model`)")
    reward_model: str | None = Field(None, description="reward source for /v1/score (any reward spec)")
    served_reward_name: str | None = Field(None, description="its name for clients (default: `reward_model`)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    merge_lora: bool = Field(True, description="fold a LoRA adapter into the weights at load (else apply it)")
    # batching
    max_batch_size: int = Field(32, ge=1, le=4096, description="rows (prompts x n) per forward pass")
    batch_wait_ms: float = Field(10.0, ge=0, le=10_000, description="how long a batch waits to fill up")
    prefill_chunk_tokens: int = Field(256, ge=0, description="while rows are decoding, a new prompt longer than "
                                      "this is prefilled this many tokens per decode step, so running streams "
                                      "keep going (chunked prefill); 0: every prompt at once")
    # limits
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a chat request that names none")
    max_n: int = Field(8, ge=1, description="largest n (choices per prompt)")
    max_prompts: int = Field(4, ge=1, description="largest list of prompts in one completions request")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_request_tokens: int = Field(65_536, ge=1, description="prompt tokens x n + max_tokens x n of one "
                                    "request (what it makes the replica prefill and decode); more get 400")
    request_timeout_s: float = Field(120.0, gt=0, description="a request not answered this long after it "
                                     "reached the replica (queued time included) gets 408")
    # auth: the key is read on the replica from `api_key_file` or the env var named by `api_key_env`;
    # `require_api_key` refuses to start without one. `api_key` only for an app built in-process.
    api_key: str | None = Field(None, repr=False, exclude=True)
    api_key_file: str | None = Field(None, description="file holding the API key (read on the replica)")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (on the replica)")
    require_api_key: bool = False
    allowed_hosts: list[str] | None = Field(None, description="Host header names requests may carry "
                                            "(a DNS-rebinding guard for keyless local servers); None: any")
    # resources
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0)
    num_replicas: int = Field(1, ge=1)
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    max_ongoing_requests: int | None = Field(None, ge=1, description="requests a replica works on at once; "
                                             "default 2 x max_batch_size")
    max_queued_requests: int | None = Field(None, ge=0, description="requests a replica holds waiting beyond "
                                            "those; more get 429 (default: max_ongoing_requests)")
    logs_dir: str | None = Field(None, description="where replica logs go (default: Ray's session dir)")

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        # A request's rows (prompts x n) always fit one batch.
        self.max_n = min(self.max_n, self.max_batch_size)
        self.max_prompts = max(1, min(self.max_prompts, self.max_batch_size // self.max_n))
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_limit)
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas for autoscaling, or neither")
        if (self.min_replicas is not None and self.max_replicas is not None
                and self.max_replicas < max(self.min_replicas, 1)):
            raise ValueError("max_replicas must be >= min_replicas and >= 1")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least "
                             f"max_batch_size ({self.max_batch_size}), or batches never fill")
        return self

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def reward_name(self) -> str | None:
        return (self.served_reward_name or self.reward_model) if self.reward_model else None

    def resolved_api_key(self) -> str | None:
        """The key requests must carry, or None when auth is off: `api_key`, else the content of
        `api_key_file`, else `$api_key_env`. Raises when a named file cannot be read or a required key
        is missing."""
        key = self.api_key or None
        if key is None and self.api_key_file:
            key = read_key_file(self.api_key_file)
        if key is None and self.api_key_env:
            key = os.environ.get(self.api_key_env, "").strip() or None
        if self.require_api_key and not key:
            where = f"the environment variable {self.api_key_env}" if self.api_key_env else "no key source"
            raise ServeError(f"an API key is required but {where} is empty here (replicas read it from their "
                             "own environment): set it, give api_key_file, or disable auth explicitly")
        return key

    def ongoing_requests(self) -> int:
        """Requests a replica works on at once: a running batch plus a forming one."""
        return self.max_ongoing_requests or max(2 * self.max_batch_size, 8)

    def queued_requests(self) -> int:
        """Requests a replica holds waiting for one of those places; any more are answered 429."""
        return self.ongoing_requests() if self.max_queued_requests is None else self.max_queued_requests


def read_key_file(path: str) -> str:
    """The API key in `path` (surrounding whitespace and the final newline dropped); one `ServeError`
    when it cannot be read or is empty."""
    try:
        key = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeError(f"cannot read the API key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not key:
        raise ServeError(f"the API key file {path} is empty")
    return key


def is_local_host(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    """Whether a request's `Host` header (name or address, optional port) names one of `allowed`."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6 address]:port
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".") in {name.lower() for name in allowed}


def auth_settings(host: str, *, api_key_file: str | None = None, no_api_key: bool = False,
                  attach: bool = False) -> dict[str, Any]:
    """The auth fields of `ServeSettings` for `raylign serve` bound to `host`.

    The key comes from `--api-key-file` or $RAYLIGN_API_KEY; the settings name its source, never the
    key. Without one a server may run only on a loopback address of a Ray it starts itself: any other
    address, and an existing Ray/Serve (`attach`, whose proxy may listen on every interface), needs a key
    unless auth is switched off explicitly with `--no-api-key`. A keyless local server answers only
    requests whose Host is a loopback name (DNS rebinding).
    """
    guard = None if attach or not is_local_host(host) else list(LOOPBACK_NAMES)
    if no_api_key:
        if api_key_file:
            raise ServeError("--api-key-file and --no-api-key contradict each other; give one")
        return {"require_api_key": False, "allowed_hosts": guard}
    if api_key_file:
        path = Path(api_key_file).expanduser().resolve()
        read_key_file(str(path))  # fail now, not on the replica
        return {"api_key_file": str(path), "require_api_key": True}
    if os.environ.get(API_KEY_ENV, "").strip():
        return {"api_key_env": API_KEY_ENV, "require_api_key": True}
    fix = f"pass --api-key-file PATH (or set {API_KEY_ENV}), or --no-api-key to serve without auth on purpose"
    if attach:
        raise ServeError("attaching to an existing Ray (--ray-address or $RAY_ADDRESS), whose Serve proxy may "
                         f"listen on every interface, so requests need an API key: {fix}")
    if not is_local_host(host):
        raise ServeError(f"binding {host} exposes the model beyond this machine, so requests need an API key: {fix}")
    return {"require_api_key": False, "allowed_hosts": guard}


def settings_from(values: dict) -> ServeSettings:
    """`ServeSettings` from CLI/config values; a bad value is one `ServeError` naming it."""
    return validate_settings(ServeSettings, values, ServeError)
