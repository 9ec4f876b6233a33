"""`output.storage`: where the directories a run's actors write (checkpoints, `final/`) meet the driver
on a cluster without a shared filesystem, the way Ray Train's `storage_path` works.

A storage location is a `pyarrow.fs` URI (`s3://bucket/prefix`, `gs://...`, `file:///mnt/nfs/runs`) or a
local/NFS path. Two operations move whole directories:

* `put_dir(local, uri)` uploads a node-local directory; readers never see half of it. On a local or NFS
  filesystem the copy goes to a temporary sibling renamed into place (atomic); on an object store, where
  a directory cannot be renamed, the files go in first and a `COMPLETE_MARKER` object last. Either way
  the marker is written, and only a directory holding it counts as present.
* `get_dir(uri, local)` downloads one into a temporary sibling of `local` and renames it into place.

An actor that writes a directory the driver needs uses `ActorOutput(handoff)` (a `Handoff` made by the
driver): on the driver's own node it writes the driver's path directly; on another node it writes a
node-local temp dir, which then travels through `output.storage` (when set) or back through the object
store as bytes (small directories), and the driver's `receive` puts it in place. This module is ground
floor: it imports pyarrow and, on the driver, Ray's runtime context only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs

from raylign.errors import UserError

COMPLETE_MARKER = "_RAYLIGN_COMPLETE"  # written last into every directory put_dir uploads
STAGING_DIR = ".staging"  # <storage>/<run>/.staging/<id>/: directories on their way to the driver


class StorageError(UserError, RuntimeError):
    """A storage URI that cannot be used or a directory that is not there; the message says what to do."""


# ---- URIs ------------------------------------------------------------------------------------------


def has_scheme(uri: str) -> bool:
    """`s3://x`, `file:///x`: a URI (one-letter schemes are Windows drives, not URIs)."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum()


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a local path (made absolute)."""
    target = uri if has_scheme(uri) else os.path.abspath(os.path.expanduser(uri))
    try:
        fs, path = pafs.FileSystem.from_uri(target)
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise StorageError(f"output.storage '{uri}' is not a storage location pyarrow can open ({exc}); use a "
                           "local/NFS path, file:///path, s3://bucket/prefix or gs://bucket/prefix") from None
    return fs, path.rstrip("/") or "/"


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended (a URI keeps its scheme)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def _is_local(fs: pafs.FileSystem) -> bool:
    base = fs.base_fs if isinstance(fs, pafs.SubTreeFileSystem) else fs
    return isinstance(base, pafs.LocalFileSystem)


def _kind(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


# ---- whole directories ------------------------------------------------------------------------------


def exists(uri: str) -> bool:
    """Whether `uri` holds a complete directory (one `put_dir` finished)."""
    fs, path = resolve(uri)
    return _kind(fs, f"{path}/{COMPLETE_MARKER}") == pafs.FileType.File


def put_dir(local: str | Path, uri: str) -> str:
    """Upload the directory `local` to `uri`, replacing what is there only once the new copy is
    complete (module docstring); returns `uri`."""
    local = Path(local)
    if not local.is_dir():
        raise StorageError(f"cannot upload {local}: not a directory")
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0] or "/"
    fs.create_dir(parent, recursive=True)
    if _is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs.create_dir(tmp, recursive=True)  # copy_files makes only the sub-directories it meets
            pafs.copy_files(str(local.resolve()), tmp, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            _write_marker(fs, tmp)
            _fsync_tree(fs, tmp)
            _replace_local(fs, tmp, path)
        finally:
            if _kind(fs, tmp) != pafs.FileType.NotFound:
                fs.delete_dir(tmp)
        return uri
    # An object store: no directory rename. The marker goes first out and last in.
    if _kind(fs, path) == pafs.FileType.Directory:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local.resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    _write_marker(fs, path)
    return uri


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished directory `tmp` to `dest`; an existing `dest` is moved aside first and
    removed after, so `dest` is at every moment either the old directory or the new one."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def get_dir(uri: str, local: str | Path, require_complete: bool = True, part: str = "") -> Path:
    """Download the complete directory at `uri` to `local` (via a temp sibling and a rename; an existing
    `local` is replaced only once the copy is complete). `require_complete=False` takes any directory
    (one not uploaded by `put_dir`, e.g. a model a user copied there). `part`: only that sub-directory
    of it (one learner's share of a checkpoint), which `uri`'s marker vouches for."""
    fs, path = resolve(uri)
    part = part.strip("/")
    if not require_complete and _kind(fs, path) != pafs.FileType.Directory:
        raise StorageError(f"{uri} is not a directory")
    if require_complete and not exists(uri):
        half = _kind(fs, path) == pafs.FileType.Directory
        raise StorageError(f"{uri} {'holds an incomplete upload (no ' + COMPLETE_MARKER + ')' if half else 'does not exist'}"
                           "; check output.storage and the run name, or start the run again")
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        source = f"{path}/{part}" if part else path
        if _kind(fs, source) != pafs.FileType.Directory:
            raise StorageError(f"{uri} holds no {part}/; check output.storage and the run name")
        pafs.copy_files(source, str(tmp.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        (tmp / COMPLETE_MARKER).unlink(missing_ok=True)
        _swap_into_place(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def delete_dir(uri: str) -> None:
    """Remove `uri` and everything under it; nothing there is not an error."""
    fs, path = resolve(uri)
    if _kind(fs, path) == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_complete(uri: str) -> list[str]:
    """Names of the complete directories directly under `uri` (sorted; none when `uri` is missing)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and exists(join(uri, i.base_name)))


def _write_marker(fs: pafs.FileSystem, path: str) -> None:
    with fs.open_output_stream(f"{path}/{COMPLETE_MARKER}") as out:
        out.write(b"ok\n")


def _fsync_tree(fs: pafs.FileSystem, path: str) -> None:
    """On a local filesystem: every file and directory under `path` flushed before the rename."""
    base = fs.base_fs if isinstance(fs, pafs.SubTreeFileSystem) else fs
    real = f"{fs.base_path.rstrip('/')}/{path.lstrip('/')}" if isinstance(fs, pafs.SubTreeFileSystem) else path
    if not isinstance(base, pafs.LocalFileSystem):
        return
    for root, _, files in os.walk(real):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_local(fs: pafs.FileSystem, tmp: str, path: str) -> None:
    """Rename `tmp` to `path`; an existing `path` is moved aside first and deleted after."""
    if _kind(fs, path) == pafs.FileType.NotFound:
        fs.move(tmp, path)
        return
    old = f"{path}.old-{uuid.uuid4().hex[:8]}"
    fs.move(path, old)
    fs.move(tmp, path)
    fs.delete_dir(old)


# ---- directories written by actors, wanted on the driver -------------------------------------------------


def pack_dir(path: str | Path) -> dict[str, bytes]:
    """Every file under `path` by its relative path (POSIX), for one trip through the object store."""
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def unpack_dir(files: dict[str, bytes], dest: str | Path) -> Path:
    """Write `pack_dir`'s files under `dest` (via a temp sibling and a rename); refuse paths leaving it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        root = tmp.resolve()
        for rel, data in files.items():
            target = (tmp / rel).resolve()
            if root not in target.parents:
                raise StorageError(f"refusing to write {rel!r} outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        tmp.mkdir(parents=True, exist_ok=True)
        _swap_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def current_node_id() -> str | None:
    """This process's Ray node id, or None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@dataclass(frozen=True)
class Handoff:
    """How a directory an actor writes reaches `path` on the driver's node: made on the driver
    (`Handoff.to(path, storage)`), passed to the actor, which writes through `ActorOutput`."""

    path: str
    driver_node_id: str | None = None  # None: not on Ray, the path is this process's own
    storage_uri: str | None = None  # off the driver's node: put there (else through the object store)
    merge: bool = False  # add to what `path` holds already (a checkpoint's other files) instead of replacing it

    @classmethod
    def to(cls, path: str | Path, storage_uri: str | None = None, merge: bool = False) -> Handoff:
        # Absolute: an actor's working directory is not the driver's (ray job submit unpacks one per node).
        return cls(str(Path(path).absolute()), current_node_id(), storage_uri, merge)


@dataclass(frozen=True)
class Delivered:
    """What an actor's `ActorOutput` did: wrote the path itself, put it on storage, or packed it."""

    how: Literal["direct", "storage", "object"]
    uri: str | None = None
    files: dict[str, bytes] | None = None


class ActorOutput:
    """`with ActorOutput(handoff) as out: <write files into out>`; then `.delivered` goes back to the
    driver, whose `receive(handoff, delivered)` finishes the trip (module docstring)."""

    def __init__(self, handoff: Handoff):
        self.handoff = handoff
        node = current_node_id()
        self.direct = handoff.driver_node_id is None or node == handoff.driver_node_id
        self.delivered: Delivered | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.direct:
            return Path(self.handoff.path)  # the writer creates it (or renames a complete copy onto it)
        # A node-local scratch dir (the node's TMPDIR), never a path of the driver's.
        self._tmp = Path(tempfile.mkdtemp(prefix="raylign-out-"))
        return self._tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is not None:
                return
            if self.direct:
                self.delivered = Delivered("direct")
            elif self.handoff.storage_uri:
                assert self._tmp is not None
                uri = join(self.handoff.storage_uri, STAGING_DIR, uuid.uuid4().hex)
                put_dir(self._tmp, uri)
                self.delivered = Delivered("storage", uri=uri)
            else:
                assert self._tmp is not None
                self.delivered = Delivered("object", files=pack_dir(self._tmp))
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)


def receive(handoff: Handoff, delivered: Delivered | None) -> None:
    """On the driver: put what an actor delivered at `handoff.path` (nothing to do when it wrote the
    path itself, or when the actor had nothing to write: `delivered` None)."""
    if delivered is None or delivered.how == "direct":
        return
    dest = Path(handoff.path)
    target = dest.with_name(f".{dest.name}.in-{uuid.uuid4().hex[:8]}") if handoff.merge and dest.exists() else dest
    try:
        if delivered.how == "storage":
            assert delivered.uri is not None
            get_dir(delivered.uri, target)
            delete_dir(delivered.uri)
        else:
            assert delivered.files is not None
            unpack_dir(delivered.files, target)
        if target != dest:
            _merge_into(target, dest)
    finally:
        if target != dest:
            shutil.rmtree(target, ignore_errors=True)


def _merge_into(src: Path, dest: Path) -> None:
    """Move `src`'s entries into `dest`: a folder both hold merges (two FSDP ranks on two nodes each
    deliver their own files of the same `sharded/`), any other entry replaces its namesake, and the
    rest of `dest` stays."""
    for entry in src.iterdir():
        old = dest / entry.name
        real_dir = old.is_dir() and not old.is_symlink()
        if entry.is_dir() and not entry.is_symlink() and real_dir:
            _merge_into(entry, old)
            continue
        if real_dir:
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
        os.replace(entry, old)


@dataclass(frozen=True)
class Source:
    """The mirror of `Handoff`: a directory on the driver's node that an actor must read (a checkpoint
    to resume from). `ActorInput(source)` gives the actor a local copy."""

    path: str
    driver_node_id: str | None = None
    storage_uri: str | None = None  # where the same directory lies on storage (read from there off-node)
    files: dict[str, bytes] | None = None  # off-node without storage: the files themselves
    part: str = ""  # the directory is this sub-directory of the complete one at storage_uri

    @classmethod
    def of(cls, path: str | Path, storage_uri: str | None = None, ship: bool = False, part: str = "") -> Source:
        """`ship`: pack the files too, for actors off the driver's node when there is no storage;
        `part`: `path` is that sub-directory of what `storage_uri` holds (a checkpoint's `critic/`)."""
        return cls(str(Path(path).absolute()), current_node_id(), storage_uri,
                   pack_dir(path) if ship and not storage_uri else None, part)


class ActorInput:
    """`with ActorInput(source) as src: <read files under src>`: the driver's path on its node, else
    a node-local copy from storage or from the shipped files, removed afterwards."""

    def __init__(self, source: Source):
        self.source = source
        self._tmp: Path | None = None

    def __enter__(self) -> Path:
        src = self.source
        if src.driver_node_id is None or current_node_id() == src.driver_node_id:
            return Path(src.path)
        self._tmp = Path(tempfile.mkdtemp(prefix="raylign-in-"))
        if src.storage_uri:
            return get_dir(src.storage_uri, self._tmp / "dir", part=src.part)
        if src.files is not None:
            return unpack_dir(src.files, self._tmp / "dir")
        raise StorageError(f"{src.path} is on the driver's node and this actor runs on another one: set "
                           "output.storage to a location every node can reach (a shared path, s3://, gs://)")

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
