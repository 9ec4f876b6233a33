"""The output.storage layer (raylign/storage.py): whole directories put and got atomically, on a local
path and on a file:// URI; what an actor writes reaching the driver's path by each route."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raylign import storage
from raylign.config import ConfigError, load_config


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


FILES = {"model/config.json": b"{}", "trainable.safetensors": b"\x00" * 100, "learner.json": b'{"world_size": 1}'}


@pytest.mark.parametrize("as_uri", [False, True], ids=["local-path", "file-uri"])
def test_put_then_get_round_trips_a_directory(tmp_path, as_uri):
    src = _make(tmp_path / "src", FILES)
    base = tmp_path / "store"
    uri = f"file://{base}/run/checkpoints/step_1" if as_uri else str(base / "run/checkpoints/step_1")
    assert not storage.exists(uri)
    storage.put_dir(src, uri)
    assert storage.exists(uri)
    # The stored copy holds the files plus the completion marker, and no temporary sibling is left.
    stored = base / "run/checkpoints/step_1"
    assert _tree(stored) == FILES | {storage.COMPLETE_MARKER: b"ok\n"}
    assert sorted(p.name for p in stored.parent.iterdir()) == ["step_1"]
    out = storage.get_dir(uri, tmp_path / "back" / "step_1")
    assert _tree(out) == FILES  # the marker stays on storage
    assert sorted(p.name for p in out.parent.iterdir()) == ["step_1"]
    assert storage.list_complete(str(base / "run/checkpoints")) == ["step_1"]


def test_put_replaces_only_once_the_new_copy_is_complete(tmp_path, monkeypatch):
    uri = str(tmp_path / "store" / "final")
    storage.put_dir(_make(tmp_path / "v1", {"a.txt": b"one"}), uri)
    real_copy = pafs.copy_files

    def copy_then_fail(source, destination, **kwargs):
        real_copy(source, destination, **kwargs)  # half the work done: the files are in the temp copy
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pafs, "copy_files", copy_then_fail)
    with pytest.raises(OSError, match="No space"):
        storage.put_dir(_make(tmp_path / "v2", {"a.txt": b"two", "b.txt": b"new"}), uri)
    # The old copy is intact and complete, and the failed upload left nothing behind.
    assert _tree(Path(uri)) == {"a.txt": b"one", storage.COMPLETE_MARKER: b"ok\n"}
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["final"]
    monkeypatch.setattr(pafs, "copy_files", real_copy)
    storage.put_dir(tmp_path / "v2", uri)
    assert _tree(Path(uri)) == {"a.txt": b"two", "b.txt": b"new", storage.COMPLETE_MARKER: b"ok\n"}


def test_missing_or_incomplete_directories_are_one_clear_error(tmp_path):
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.get_dir(f"file://{tmp_path}/nothing/here", tmp_path / "out")
    half = _make(tmp_path / "half", {"a.txt": b"x"})  # files, no marker: an upload that never finished
    with pytest.raises(storage.StorageError, match="incomplete upload"):
        storage.get_dir(str(half), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert storage.list_complete(str(tmp_path / "absent")) == []
    with pytest.raises(storage.StorageError, match="not a directory"):
        storage.put_dir(tmp_path / "absent", str(tmp_path / "x"))
    with pytest.raises(storage.StorageError, match="pyarrow can open"):
        storage.resolve("nosuchscheme://bucket/x")


def test_output_storage_must_be_the_same_place_on_every_node():
    assert load_config("grpo", ["output.storage=s3://bucket/runs"]).output.storage == "s3://bucket/runs"
    assert load_config("grpo", ["output.storage=/mnt/nfs/runs"]).output.storage == "/mnt/nfs/runs"
    with pytest.raises(ConfigError, match="relative path"):
        load_config("grpo", ["output.storage=runs/shared"])


def test_unpack_refuses_paths_outside_its_directory(tmp_path):
    with pytest.raises(storage.StorageError, match="outside"):
        storage.unpack_dir({"../escape.txt": b"x"}, tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dest").exists()


@pytest.mark.parametrize("route", ["direct", "storage", "object"])
def test_an_actors_directory_reaches_the_drivers_path_by_each_route(tmp_path, monkeypatch, route):
    """Same node: the actor writes the driver's path itself. Another node: a node-local temp dir that
    travels through output.storage, or through the object store as bytes; `receive` puts it in place."""
    node = {"id": "driver"}
    monkeypatch.setattr(storage, "current_node_id", lambda: node["id"])
    dest = tmp_path / "run" / "checkpoints" / ".tmp_step_2"
    handoff = storage.Handoff.to(dest, str(tmp_path / "store" / "run") if route == "storage" else None)
    node["id"] = "driver" if route == "direct" else "worker"  # where the actor runs
    writer = storage.ActorOutput(handoff)
    with writer as out:
        _make(out, FILES)
        if route != "direct":
            assert not str(out).startswith(str(tmp_path / "run"))  # never the driver's path off its node
    assert writer.delivered is not None and writer.delivered.how == route
    node["id"] = "driver"
    storage.receive(handoff, writer.delivered)
    assert _tree(dest) == FILES
    # A checkpoint dir that already holds the driver's files gets the actor's beside them (merge).
    _make(dest, {"trainer_state.json": b"{}", "learner.json": b"stale"})
    merging = storage.Handoff.to(dest, handoff.storage_uri, merge=True)
    node["id"] = "driver" if route == "direct" else "worker"
    writer = storage.ActorOutput(merging)
    with writer as out:
        if route == "direct":  # the actor writes in place; nothing to merge
            (out / "learner.json").write_bytes(FILES["learner.json"])
        else:
            _make(out, FILES)
    node["id"] = "driver"
    storage.receive(merging, writer.delivered)
    assert _tree(dest) == FILES | {"trainer_state.json": b"{}"}
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temp sibling left
    if route == "storage":  # the staging copy is gone once the driver has it
        assert storage.list_complete(str(tmp_path / "store" / "run" / storage.STAGING_DIR)) == []


@pytest.mark.parametrize("route", ["storage", "object", "nowhere"])
def test_an_actor_off_the_drivers_node_reads_a_checkpoint_from_storage_or_shipped_files(tmp_path, monkeypatch, route):
    node = {"id": "driver"}
    monkeypatch.setattr(storage, "current_node_id", lambda: node["id"])
    ckpt = _make(tmp_path / "run" / "checkpoints" / "step_1", FILES)
    uri = None
    if route == "storage":
        uri = str(tmp_path / "store" / "step_1")
        storage.put_dir(ckpt, uri)
    source = storage.Source.of(ckpt, uri, ship=route == "object")
    node["id"] = "worker"
    if route == "nowhere":
        with pytest.raises(storage.StorageError, match="set output.storage"):
            with storage.ActorInput(source):
                pass
        return
    with storage.ActorInput(source) as src:
        assert src != ckpt and _tree(src) == FILES
        local = src
    assert not local.exists()  # the node-local copy is removed afterwards


@pytest.mark.parametrize("route", ["storage", "object"])
def test_two_sharded_learners_on_two_other_nodes_deliver_one_checkpoint_between_them(tmp_path, monkeypatch, route):
    """FSDP ranks on different nodes each deliver their own files of the same `sharded/` folder (rank 0
    also the index and the model dir); the driver's merges keep both ranks' shards, and a stale file of
    an older attempt is replaced, not kept beside."""
    node = {"id": "driver"}
    monkeypatch.setattr(storage, "current_node_id", lambda: node["id"])
    dest = tmp_path / "run" / "checkpoints" / ".tmp_step_3" / "policy"
    handoff = storage.Handoff.to(dest, str(tmp_path / "store" / "run") if route == "storage" else None, merge=True)
    ranks = {
        "node_b": {"sharded/__0_0.distcp": b"rank0", "sharded/.metadata": b"index", "model/config.json": b"{}"},
        "node_c": {"sharded/__1_0.distcp": b"rank1"},
    }
    _make(dest, {"sharded/__1_0.distcp": b"stale"})
    deliveries = []
    for where, files in ranks.items():
        node["id"] = where
        writer = storage.ActorOutput(handoff)
        with writer as out:
            _make(out, files)
        deliveries.append(writer.delivered)
    node["id"] = "driver"
    for delivered in deliveries:
        storage.receive(handoff, delivered)
    assert _tree(dest) == ranks["node_b"] | ranks["node_c"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["policy"]  # no temp sibling left


def test_an_actor_off_the_drivers_node_reads_its_part_of_a_stored_checkpoint(tmp_path, monkeypatch):
    """A checkpoint's `critic/` (or `discriminator/`) is read from the complete checkpoint on storage,
    whose marker vouches for it; the rest of the checkpoint is not copied to the actor's node."""
    node = {"id": "driver"}
    monkeypatch.setattr(storage, "current_node_id", lambda: node["id"])
    ckpt = _make(tmp_path / "run" / "checkpoints" / "step_1", {"trainer_state.json": b"{}",
                                                               **{f"critic/{k}": v for k, v in FILES.items()}})
    uri = storage.put_dir(ckpt, str(tmp_path / "store" / "step_1"))
    source = storage.Source.of(ckpt / "critic", uri, ship=True, part="critic")
    assert source.files is None  # storage is set: nothing rides the object store
    missing = storage.Source.of(ckpt / "discriminator", uri, part="discriminator")
    node["id"] = "worker"
    with storage.ActorInput(source) as src:
        assert _tree(src) == FILES
    with pytest.raises(storage.StorageError, match="holds no discriminator/"):
        with storage.ActorInput(missing):
            pass
