"""Where raylign keeps the models it builds or converts, and how it writes directories safely.

Every model directory raylign writes (a cached `builtin:`/`tiny:` model, a checkpoint, a final model)
is first written to a temporary sibling and then renamed into place. A crash, a full disk or two Ray
actors pulling the same model at once can therefore never leave a half-written directory that a later
load would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER_FILE = "raylign_model.json"


def raylign_home() -> Path:
    """`$RAYLIGN_HOME`, default `~/.cache/raylign`; read on every call so tests can redirect it."""
    return Path(os.environ.get("RAYLIGN_HOME") or Path.home() / ".cache" / "raylign").expanduser()


def models_cache_dir() -> Path:
    """The directory holding one sub-directory per cached `builtin:`/`tiny:` model."""
    return raylign_home() / "models"


def read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The provenance record raylign writes into directories it built, or None if absent/corrupt."""
    try:
        return json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_marker(model_dir: Path, record: dict[str, Any]) -> None:
    """Record how a cached directory was made, so a stale build format can be detected and redone."""
    (model_dir / MARKER_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(dest: str | Path, *, replace: bool, tmp: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty directory to fill; on success it becomes `dest` by a rename.

    `tmp` defaults to a unique hidden sibling, so concurrent writers never share one. With
    `replace=False` a `dest` that appeared meanwhile (another process won the race) is kept and our
    copy discarded; with `replace=True` the old `dest` is swapped out and deleted. On error the
    temporary directory is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tmp) if tmp is not None else dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        yield work
        _publish(work, dest, replace=replace)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _publish(work: Path, dest: Path, *, replace: bool) -> None:
    """Rename `work` to `dest`; rename is atomic on one filesystem, a copy would not be."""
    if not dest.exists():
        try:
            os.replace(work, dest)
            return
        except OSError:
            if not dest.exists():
                raise
    if not replace:
        return  # someone else published a complete copy first; theirs is as good as ours
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dest, old)
    os.replace(work, dest)
    shutil.rmtree(old, ignore_errors=True)
