"""What one served model needs to know: the model, its limits, batching, auth. Shared by the CLI
(`raylign serve`), the Serve config YAML (`cluster/serve.yaml`, through `app_builder`) and tests.

Imports neither torch nor Ray, so the CLI can check a command line before anything starts.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylign.config import ConfigError, validate_settings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
API_KEY_ENV = "RAYLIGN_API_KEY"


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
    # limits
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a chat request that names none")
    max_n: int = Field(8, ge=1, description="largest n (choices per prompt)")
    max_prompts: int = Field(4, ge=1, description="largest list of prompts in one completions request")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(120.0, gt=0, description="a request still running after this gets 408")
    # auth: `api_key` or the env var named by `api_key_env` (read on the replica); `require_api_key`
    # refuses to start without one.
    api_key: str | None = Field(None, repr=False)
    api_key_env: str | None = None
    require_api_key: bool = False
    # resources
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0)
    num_replicas: int = Field(1, ge=1)
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    max_ongoing_requests: int | None = Field(None, ge=1, description="per replica; default 2 x max_batch_size")
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
        """The key requests must carry, or None when auth is off. Raises when one is required but unset."""
        key = self.api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None)
        if self.require_api_key and not key:
            where = f"the environment variable {self.api_key_env}" if self.api_key_env else "api_key"
            raise ServeError(f"an API key is required but {where} is empty: set it, or disable auth explicitly")
        return key or None

    def ongoing_requests(self) -> int:
        """Serve's max_ongoing_requests: a running batch plus a forming one fit on a replica."""
        return self.max_ongoing_requests or max(2 * self.max_batch_size, 8)


def is_local_host(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_policy(host: str, api_key: str | None, no_api_key: bool) -> tuple[str | None, bool]:
    """(key, required) for a server bound to `host`.

    Off by default on a loopback address; any other address needs a key (`--api-key` or
    $RAYLIGN_API_KEY) unless auth is switched off explicitly with `--no-api-key`.
    """
    key = api_key or os.environ.get(API_KEY_ENV) or None
    if no_api_key:
        if api_key:
            raise ServeError("--api-key and --no-api-key contradict each other; give one")
        return None, False
    if key is None and not is_local_host(host):
        raise ServeError(
            f"binding {host} exposes the model beyond this machine, so requests need an API key: pass "
            f"--api-key KEY (or set {API_KEY_ENV}), or --no-api-key to serve without auth on purpose"
        )
    return key, key is not None


def settings_from(values: dict) -> ServeSettings:
    """`ServeSettings` from CLI/config values; a bad value is one `ServeError` naming it."""
    return validate_settings(ServeSettings, values, ServeError)
