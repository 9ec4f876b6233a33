"""The annotations database: durability settings, hashed tokens, append-only judgments, the queue."""

from __future__ import annotations

import sqlite3
import time

import pytest

from raylign.annotation.errors import StoreError
from raylign.annotation.store import KeyReused, NotAssigned, NotFound, Store, hash_token
from raylign.annotation.tasks import Task, TaskItem, TaskSettings


def pair(i: int, **kw) -> TaskItem:
    return TaskItem(item_id=f"i{i}", kind="pairwise", prompt=f"prompt {i}", response_a=f"a{i}", response_b=f"b{i}", **kw)


def make_store(tmp_path, n: int = 4, name: str = "db.sqlite", **settings) -> Store:
    store = Store(tmp_path / name)
    store.load_task(Task(TaskSettings(**settings), [pair(i) for i in range(n)], "test"))
    return store


def test_wal_synchronous_full_and_append_only(tmp_path):
    store = make_store(tmp_path)
    conn = store.read()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    ann, _ = store.add_annotator("ann")
    store.record(ann, "i0", choice="a")
    raw = sqlite3.connect(tmp_path / "db.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("UPDATE judgments SET choice = 'b'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM judgments")
    assert raw.execute("SELECT choice FROM judgments").fetchall() == [("a",)]


def test_tokens_are_stored_only_as_sha256(tmp_path):
    store = make_store(tmp_path)
    ann, token = store.add_annotator("Ada")
    assert len(token) >= 32
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    stored = conn.execute("SELECT token_sha256 FROM annotators").fetchone()[0]
    assert stored == hash_token(token) and token not in stored
    store.close()
    conn.close()
    for path in tmp_path.glob("db.sqlite*"):
        assert token.encode() not in path.read_bytes()
    store = Store(tmp_path / "db.sqlite")
    assert store.annotator_by_token(token) == ann
    assert store.annotator_by_token(token + "x") is None and store.annotator_by_token("") is None
    with pytest.raises(StoreError, match="already exists.*--new-token"):
        store.add_annotator("Ada")
    _, new = store.add_annotator("Ada", new_token=True)
    assert store.annotator_by_token(token) is None and store.annotator_by_token(new).name == "Ada"


def test_a_correction_is_a_new_row_that_supersedes(tmp_path):
    store = make_store(tmp_path)
    ann, _ = store.add_annotator("ann")
    first, replayed = store.record(ann, "i1", choice="a", strength=2, reason="clearer")
    assert not replayed and first.shown_left in ("a", "b") and first.via == "api"
    second, _ = store.record(ann, "i1", choice="tie")
    assert second.supersedes == first.id
    assert [j.choice for j in store.all_judgments()] == ["a", "tie"]
    (current,) = store.current_judgments()
    assert current.id == second.id and current.choice == "tie"


def test_retries_never_duplicate(tmp_path):
    store = make_store(tmp_path)
    ann, _ = store.add_annotator("ann")
    row, replayed = store.record(ann, "i0", choice="b", idempotency_key="retry-key-1")
    again, replayed_again = store.record(ann, "i0", choice="b", idempotency_key="retry-key-1")
    assert not replayed and replayed_again and again.id == row.id
    with pytest.raises(KeyReused):
        store.record(ann, "i0", choice="a", idempotency_key="retry-key-1")
    # no key: a post equal to the current judgment is the same judgment
    same, replayed = store.record(ann, "i0", choice="b")
    assert replayed and same.id == row.id
    assert len(store.all_judgments()) == 1


def test_overlap_claims_and_skips(tmp_path):
    store = make_store(tmp_path, n=2, overlap=2)
    a, b, c = (store.add_annotator(n)[0] for n in "abc")
    for ann in (a, b):
        assert store.progress(ann).remaining == 2
        first, _ = store.next_item(ann)
        assert store.next_item(ann)[0] == first  # a reload shows the same item
        store.record(ann, first.item_id, choice="a")
        second, _ = store.next_item(ann)
        store.record(ann, second.item_id, choice="b")
        assert store.next_item(ann)[0] is None and store.progress(ann).done == 2
    # both items have their 2 annotators: nothing for c
    assert store.next_item(c) == (None, store.progress(c)) and store.progress(c).total == 0
    with pytest.raises(NotAssigned, match="already has its 2 annotator"):
        store.record(c, "i0", choice="a")
    with pytest.raises(NotFound):
        store.record(c, "nope", choice="a")
    # a skip gives the item back
    store.record(a, "i0", choice="skip")
    item, _ = store.next_item(c)
    assert item is not None and item.item_id == "i0"


def test_claims_expire(tmp_path):
    store = make_store(tmp_path, n=1, overlap=1, claim_minutes=0.01)  # 0.6 s
    a, b = store.add_annotator("a")[0], store.add_annotator("b")[0]
    assert store.next_item(a)[0] is not None
    assert store.next_item(b)[0] is None
    time.sleep(0.8)
    assert store.next_item(b)[0] is not None  # a's claim lapsed
    assert store.next_item(a)[0] is not None  # a keeps the item it was shown


def test_gold_items_go_to_everyone(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.load_task(Task(TaskSettings(overlap=1), [pair(0), pair(1, gold="a")], "t"))
    a, b = store.add_annotator("a")[0], store.add_annotator("b")[0]
    for item_id in ("i0", "i1"):
        store.record(a, item_id, choice="a")
    assert store.progress(b).total == 1 and store.next_item(b)[0].item_id == "i1"


def test_orders_are_seeded_per_annotator_and_item(tmp_path):
    store = make_store(tmp_path, n=200, seed=3)
    a, b = store.add_annotator("a")[0], store.add_annotator("b")[0]
    sides_a = [store.shown_left(a, s) for s in store.items()]
    sides_b = [store.shown_left(b, s) for s in store.items()]
    assert 70 < sides_a.count("a") < 130 and sides_a != sides_b
    again = Store(tmp_path / "db.sqlite")  # a restart draws the same
    assert [again.shown_left(a, s) for s in again.items()] == sides_a
    assert again.next_item(a)[0] == store.next_item(a)[0] != store.next_item(b)[0]
    other = make_store(tmp_path, n=200, seed=4, name="other.sqlite")
    other.add_annotator("a")
    assert [other.shown_left(a, s) for s in other.items()] != sides_a


def test_loading_tasks_again(tmp_path):
    store = make_store(tmp_path, n=2, seed=1)
    assert store.load_task(Task(TaskSettings(seed=1), [pair(0), pair(1), pair(2)], "t")) == {"added": 1, "kept": 2}
    changed = TaskItem(item_id="i0", kind="pairwise", prompt="other", response_a="x", response_b="y")
    with pytest.raises(StoreError, match="items i0 differ"):
        store.load_task(Task(TaskSettings(seed=1), [changed], "t2"))
    with pytest.raises(StoreError, match="task seed 1"):
        store.load_task(Task(TaskSettings(seed=2), [pair(0)], "t3"))
    assert len(store.items()) == 3
    with pytest.raises(StoreError, match="not found"):
        Store(tmp_path / "missing.sqlite", create=False)
    (tmp_path / "junk.sqlite").write_text("not a database at all" * 100)
    with pytest.raises(StoreError, match="not a usable annotations database"):
        Store(tmp_path / "junk.sqlite")


def test_a_version_1_database_is_upgraded_in_place_and_keeps_its_rows(tmp_path):
    store = make_store(tmp_path)
    ann, _ = store.add_annotator("u")
    store.record(ann, "i0", choice="a")
    store.close()
    # what a version-1 file looks like: no written_by column
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    conn.executescript("DROP VIEW current_judgments; DROP TRIGGER judgments_no_update; DROP TRIGGER judgments_no_delete;"
                       "ALTER TABLE judgments DROP COLUMN written_by; UPDATE meta SET value = '1' "
                       "WHERE key = 'schema_version';"
                       "CREATE VIEW current_judgments AS SELECT j.* FROM judgments j WHERE j.id = (SELECT MAX(k.id) "
                       "FROM judgments k WHERE k.annotator_id = j.annotator_id AND k.item_id = j.item_id);")
    conn.close()
    again = Store(tmp_path / "db.sqlite")
    (row,) = again.current_judgments()
    assert row.choice == "a" and row.written_by is None
    assert again._meta("schema_version") == "2"
    again.record(again.annotators()[0], "i1", choice="b")
    with pytest.raises(sqlite3.IntegrityError):
        with again.write() as c:
            c.execute("UPDATE judgments SET choice = 'b' WHERE item_id = 'i0'")


def test_written_by_is_part_of_the_judgment(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.load_task(Task(TaskSettings(), [TaskItem(item_id="h", kind="human-vs-model", prompt="p", response_a="x",
                                                   response_b="y", source_a="human", source_b="m")], "t"))
    ann, _ = store.add_annotator("u")
    first, _ = store.record(ann, "h", choice="a", written_by="b")
    again, replayed = store.record(ann, "h", choice="a", written_by="b")
    assert replayed and again.id == first.id and first.written_by == "b"
    changed, replayed = store.record(ann, "h", choice="a", written_by="a")
    assert not replayed and changed.supersedes == first.id and changed.written_by == "a"
    with pytest.raises(ValueError):
        store.record(ann, "h", choice="a", written_by="human")
