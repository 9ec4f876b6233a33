"""The annotations database: one SQLite file that loses nothing.

Durability. The file is in WAL mode with `synchronous=FULL`: a judgment is acknowledged (201, or the
page's redirect) only after its transaction committed and the WAL was synced, so a `kill -9` of the
server, or a power cut, never loses an acknowledged judgment. Writes are serialised (a process lock
plus `BEGIN IMMEDIATE`, a 30 s busy timeout for other processes such as `add-annotator` while the
server runs).

Tables:

  meta         key/value: schema version, the task's settings, the secret CSRF tokens are derived from
  items        the task's items (ordinal, item_id, kind, JSON record, fingerprint, gold flag); items are
               only ever added, and an item_id keeps its content (another content is another item)
  annotators   id, name, sha256 of the token (the token itself is never stored), created
  assignments  who was shown which item and when (claims) and whether they judged or skipped it:
               the queue's bookkeeping, rewritten as annotators work
  judgments    append-only (triggers refuse UPDATE and DELETE): annotator, item, shown_left (the
               answer shown on the left, "a" or "b"), choice, strength, ratings (JSON), reason,
               written_by (human-vs-model items: the answer the annotator thinks a person wrote, "a"
               or "b", or null when not answered), latency_ms, via (page | api), created (unix
               time), supersedes (the row it corrects)

A correction is a new row; the current judgment of (annotator, item) is its latest row (view
`current_judgments`). Retries never duplicate: every row has a `judgment_key`, UNIQUE per annotator:
the client's `idempotency_key` when it sends one (the pages put a fresh one in every form they
render, so a double-click or a re-sent form is one row), else one derived by the server from the
content and the row it supersedes; and a post equal to the annotator's current judgment of that item
adds nothing (it is answered with the current row, `replayed: true`).

Queue. Annotator `u` sees the items in the order of keys drawn from
`raylign.runtime.rng(seed, Purpose.ANNOTATE, step=u, index=ordinal)` (u = the annotator's id, >= 1;
step 0 of Purpose.ANNOTATE is `raylign data annotate`'s sampling, so the streams never meet); the
same draw decides which answer is shown on the left. The order is therefore fixed per annotator and
item, stable as items are added, and the same after a restart. An item is in u's queue until u
judged or skipped it, if it is gold (every annotator gets the attention checks), already claimed by
u, or held by fewer than `overlap` other annotators (a judgment holds an item for good, a skip does
not, a claim for `claim_minutes` after the item was first shown). The next item is u's earliest
claimed-but-unjudged item (so a reload shows the same item), else the first item of the queue, which u
then claims. A judgment's latency is the time since the item was shown: first shown, or reopened to
change the answer (`open_item`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raylign.annotation.errors import StoreError
from raylign.annotation.tasks import CHOICES, PAIR_KINDS, Task, TaskItem, TaskSettings, item_fingerprint
from raylign.runtime import Purpose, rng

SCHEMA_VERSION = 2  # 2: judgments.written_by (a version-1 file is upgraded in place when opened)
BUSY_TIMEOUT_MS = 30_000
NAME_MAX = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    ordinal INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    record TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    gold INTEGER NOT NULL DEFAULT 0,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    item_ordinal INTEGER NOT NULL REFERENCES items(ordinal),
    state TEXT NOT NULL CHECK (state IN ('claimed', 'judged', 'skipped')),
    claimed_at REAL NOT NULL,
    served_at REAL NOT NULL,
    PRIMARY KEY (annotator_id, item_ordinal)
);
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    item_id TEXT NOT NULL REFERENCES items(item_id),
    judgment_key TEXT NOT NULL,
    shown_left TEXT CHECK (shown_left IN ('a', 'b')),
    choice TEXT CHECK (choice IS NULL OR choice IN ('a', 'b', 'tie', 'skip')),
    strength INTEGER CHECK (strength IS NULL OR strength BETWEEN 1 AND 3),
    ratings TEXT,
    reason TEXT,
    written_by TEXT CHECK (written_by IS NULL OR written_by IN ('a', 'b')),
    latency_ms INTEGER,
    via TEXT NOT NULL CHECK (via IN ('page', 'api')),
    created REAL NOT NULL,
    supersedes INTEGER REFERENCES judgments(id),
    UNIQUE (annotator_id, judgment_key)
);
CREATE INDEX IF NOT EXISTS judgments_by_item ON judgments (annotator_id, item_id, id);
CREATE TRIGGER IF NOT EXISTS judgments_no_update BEFORE UPDATE ON judgments
BEGIN SELECT RAISE(ABORT, 'judgments are append-only: record a correction as a new row'); END;
CREATE TRIGGER IF NOT EXISTS judgments_no_delete BEFORE DELETE ON judgments
BEGIN SELECT RAISE(ABORT, 'judgments are append-only: record a correction as a new row'); END;
CREATE VIEW IF NOT EXISTS current_judgments AS
    SELECT j.* FROM judgments j
    WHERE j.id = (SELECT MAX(k.id) FROM judgments k WHERE k.annotator_id = j.annotator_id AND k.item_id = j.item_id);
"""


def iso_time(t: float) -> str:
    """Unix time as ISO 8601 UTC with milliseconds (`2025-01-31T12:00:00.123Z`)."""
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    token_sha256: str


@dataclass(frozen=True)
class StoredItem:
    ordinal: int
    item: TaskItem

    @property
    def item_id(self) -> str:
        return self.item.item_id


@dataclass(frozen=True)
class Judgment:
    """One row of the judgments table."""

    id: int
    annotator_id: int
    annotator: str
    item_id: str
    shown_left: str | None
    choice: str | None
    strength: int | None
    ratings: dict[str, int] | None
    reason: str | None
    written_by: str | None
    latency_ms: int | None
    via: str
    created: float
    supersedes: int | None
    judgment_key: str

    def content(self) -> tuple[Any, ...]:
        return (self.choice, self.strength, json.dumps(self.ratings, sort_keys=True), self.reason or None,
                self.written_by)


@dataclass(frozen=True)
class Progress:
    done: int
    remaining: int

    @property
    def total(self) -> int:
        return self.done + self.remaining


class NotFound(StoreError):
    """No such item."""


class NotAssigned(StoreError):
    """The item is not in this annotator's queue (it has its `overlap` annotators already)."""


class KeyReused(StoreError):
    """An idempotency key sent again with other content."""


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > NAME_MAX or any(ord(c) < 32 for c in name):
        raise StoreError(f"annotator name {name!r}: use 1-{NAME_MAX} printable characters")
    return name


class Store:
    """The annotations database at `path` (created with its schema if missing); safe to share across
    the threads of one server and with other processes (module docstring)."""

    def __init__(self, path: str | os.PathLike[str], create: bool = True):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise StoreError(f"--db {path} is a directory; give a file name such as {self.path / 'annotations.sqlite'}")
        if not self.path.exists():
            if not create:
                raise StoreError(f"annotations database {path} not found; `raylign annotate serve TASK.jsonl --db "
                                 f"{path}` creates it")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._order: dict[tuple[int, int], tuple[float, str]] = {}
        self._items: list[StoredItem] = []
        self._by_id: dict[str, StoredItem] = {}
        self._settings: TaskSettings | None = None
        try:
            conn = self._conn()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: SQLite could not switch the database to WAL mode (got {mode}); put it "
                                 "on a local file system")
            with self._lock:  # executescript commits first, so the script is its own transaction
                conn.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA + "\nCOMMIT;")
            with self.write() as c:
                version = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if version is None:
                    c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    c.execute("INSERT INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))
                elif int(version[0]) == 1:  # adding a nullable column keeps every row as it was
                    c.execute("ALTER TABLE judgments ADD COLUMN written_by TEXT "
                              "CHECK (written_by IS NULL OR written_by IN ('a', 'b'))")
                    c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                elif int(version[0]) != SCHEMA_VERSION:
                    raise StoreError(f"{path} has schema version {version[0]}; this raylign reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path} is not a usable annotations database ({exc})") from None
        self.secret = bytes.fromhex(self._meta("secret") or "")

    # ---- connections and transactions ----------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (serialised in this process, BEGIN IMMEDIATE across processes)."""
        with self._lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def read(self) -> sqlite3.Connection:
        return self._conn()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _meta(self, key: str) -> str | None:
        row = self.read().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # ---- the task --------------------------------------------------------------------------------

    def settings(self) -> TaskSettings | None:
        """The task's settings (read once; `load_task` in this process refreshes them)."""
        if self._settings is None:
            raw = self._meta("task")
            self._settings = None if raw is None else TaskSettings.model_validate_json(raw)
        return self._settings

    def require_settings(self) -> TaskSettings:
        settings = self.settings()
        if settings is None:
            raise StoreError(f"{self.path} holds no task yet: `raylign annotate serve TASK.jsonl --db {self.path}` "
                             "loads one")
        return settings

    def load_task(self, task: Task) -> dict[str, int]:
        """Add the task's items (and settings) to the database; returns {"added", "kept"}.

        Loading the same task again changes nothing; a grown task adds its new items; an item_id whose
        content changed, or another seed, is a `StoreError` (judgments name items and orders by them).
        """
        now = time.time()
        with self.write() as c:
            old = c.execute("SELECT value FROM meta WHERE key = 'task'").fetchone()
            if old is not None:
                previous = TaskSettings.model_validate_json(old[0])
                if previous.seed != task.settings.seed:
                    raise StoreError(f"{self.path} was made with task seed {previous.seed}, {task.source} says "
                                     f"{task.settings.seed}; the seed fixes every annotator's order. Keep the seed, or "
                                     "use a new --db")
            c.execute("INSERT OR REPLACE INTO meta VALUES ('task', ?)", (task.settings.model_dump_json(),))
            self._settings = None
            known = {row[0]: row[1] for row in c.execute("SELECT item_id, fingerprint FROM items")}
            changed = []
            added = 0
            for item in task.items:
                record = item.record()
                fp = item_fingerprint(record)
                if item.item_id in known:
                    if known[item.item_id] != fp:
                        changed.append(item.item_id)
                    continue
                c.execute("INSERT INTO items (item_id, kind, record, fingerprint, gold, added) VALUES (?, ?, ?, ?, ?, ?)",
                          (item.item_id, item.kind, json.dumps(record, ensure_ascii=False), fp, int(item.is_gold), now))
                added += 1
            if changed:
                shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
                raise StoreError(f"{task.source}: items {shown} differ from the items of the same id in {self.path}; "
                                 "an item's content cannot change once loaded (give changed items new item_ids, or "
                                 "use a new --db)")
        self._refresh_items()
        return {"added": added, "kept": len(known)}

    def _refresh_items(self) -> None:
        rows = self.read().execute("SELECT ordinal, record FROM items ORDER BY ordinal").fetchall()
        if len(rows) != len(self._items):
            items = [StoredItem(int(o), TaskItem.model_validate_json(r)) for o, r in rows]
            self._items, self._by_id = items, {s.item_id: s for s in items}

    def items(self) -> list[StoredItem]:
        self._refresh_items()
        return list(self._items)

    def item(self, item_id: str) -> StoredItem:
        if item_id not in self._by_id:
            self._refresh_items()
        if item_id not in self._by_id:
            raise NotFound(f"no item {item_id!r} in this task")
        return self._by_id[item_id]

    # ---- annotators ------------------------------------------------------------------------------

    def add_annotator(self, name: str, new_token: bool = False) -> tuple[Annotator, str]:
        """(annotator, token). The token is returned once and stored only as its sha256; an existing
        name is an error unless `new_token` (which replaces the old token)."""
        name = check_name(name)
        token = secrets.token_urlsafe(24)
        digest = hash_token(token)
        with self.write() as c:
            row = c.execute("SELECT id FROM annotators WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if not new_token:
                    raise StoreError(f"annotator {name!r} already exists in {self.path}; pass --new-token to give them "
                                     "a new link (the old one stops working)")
                c.execute("UPDATE annotators SET token_sha256 = ? WHERE id = ?", (digest, row[0]))
                annotator_id = int(row[0])
            else:
                cur = c.execute("INSERT INTO annotators (name, token_sha256, created) VALUES (?, ?, ?)",
                                (name, digest, time.time()))
                annotator_id = int(cur.lastrowid or 0)
        return Annotator(annotator_id, name, digest), token

    def annotator_by_token(self, token: str) -> Annotator | None:
        """The annotator whose token this is, or None; the digests are compared in constant time."""
        if not token or len(token) > 200:
            return None
        digest = hash_token(token)
        row = self.read().execute("SELECT id, name, token_sha256 FROM annotators WHERE token_sha256 = ?",
                                  (digest,)).fetchone()
        if row is None or not hmac.compare_digest(str(row[2]).encode(), digest.encode()):
            return None
        return Annotator(int(row[0]), str(row[1]), str(row[2]))

    def annotators(self) -> list[Annotator]:
        rows = self.read().execute("SELECT id, name, token_sha256 FROM annotators ORDER BY id").fetchall()
        return [Annotator(int(i), str(n), str(t)) for i, n, t in rows]

    def csrf_token(self, annotator: Annotator) -> str:
        """The token every form of this annotator carries: HMAC(secret, annotator id and token digest)."""
        return hmac.new(self.secret, f"csrf:{annotator.id}:{annotator.token_sha256}".encode(), "sha256").hexdigest()

    def check_csrf(self, annotator: Annotator, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf_token(annotator).encode(), str(given).encode())

    # ---- the queue -------------------------------------------------------------------------------

    def order(self, annotator_id: int, ordinal: int, seed: int) -> tuple[float, str]:
        """(queue key, answer shown on the left) of one annotator and item (module docstring)."""
        key = (annotator_id, ordinal)
        if key not in self._order:
            u = rng(seed, Purpose.ANNOTATE, step=annotator_id, index=ordinal).random(2)
            self._order[key] = (float(u[0]), "a" if u[1] < 0.5 else "b")
        return self._order[key]

    def shown_left(self, annotator: Annotator, item: StoredItem) -> str:
        """"a" or "b": which answer annotator sees on the left of this item (rating items: "a")."""
        if item.item.kind not in PAIR_KINDS:
            return "a"
        return self.order(annotator.id, item.ordinal, self.require_settings().seed)[1]

    def _queue(self, c: sqlite3.Connection, annotator: Annotator, now: float) -> tuple[list[StoredItem], list[StoredItem], int]:
        """(claimed-but-unjudged items, the rest of the queue, items done), each list in queue order."""
        settings = self.require_settings()
        self._refresh_items()
        cutoff = now - settings.claim_minutes * 60
        taken = dict(c.execute(
            "SELECT item_ordinal, COUNT(*) FROM assignments WHERE annotator_id != ? AND "
            "(state = 'judged' OR (state = 'claimed' AND served_at > ?)) GROUP BY item_ordinal",
            (annotator.id, cutoff)).fetchall())
        mine = dict(c.execute("SELECT item_ordinal, state FROM assignments WHERE annotator_id = ?",
                              (annotator.id,)).fetchall())
        claimed, rest = [], []
        done = 0
        for s in self._items:
            state = mine.get(s.ordinal)
            if state in ("judged", "skipped"):
                done += 1
            elif state == "claimed":
                claimed.append(s)
            elif s.item.is_gold or taken.get(s.ordinal, 0) < settings.overlap:
                rest.append(s)
        key = lambda s: self.order(annotator.id, s.ordinal, settings.seed)[0]  # noqa: E731
        return sorted(claimed, key=key), sorted(rest, key=key), done

    def next_item(self, annotator: Annotator) -> tuple[StoredItem | None, Progress]:
        """(the annotator's next item, claimed for them, or None when their queue is empty; their progress)."""
        now = time.time()
        with self.write() as c:
            claimed, rest, done = self._queue(c, annotator, now)
            progress = Progress(done=done, remaining=len(claimed) + len(rest))
            if not claimed and not rest:
                return None, progress
            if claimed:  # shown before and not judged yet: the same item again, nothing to write
                return claimed[0], progress
            chosen = rest[0]
            self._claim(c, annotator, chosen, now)
        return chosen, progress

    def _claim(self, c: sqlite3.Connection, annotator: Annotator, item: StoredItem, now: float) -> None:
        c.execute("INSERT INTO assignments (annotator_id, item_ordinal, state, claimed_at, served_at) "
                  "VALUES (?, ?, 'claimed', ?, ?) ON CONFLICT (annotator_id, item_ordinal) DO UPDATE SET served_at = ?",
                  (annotator.id, item.ordinal, now, now, now))

    def open_item(self, annotator: Annotator, item_id: str) -> StoredItem:
        """An item the annotator may judge (or correct), marked as shown now; `NotAssigned` if not theirs."""
        item = self.item(item_id)
        now = time.time()
        with self.write() as c:
            self._allowed(c, annotator, item, now)
            self._claim(c, annotator, item, now)
        return item

    def _allowed(self, c: sqlite3.Connection, annotator: Annotator, item: StoredItem, now: float) -> None:
        mine = c.execute("SELECT state FROM assignments WHERE annotator_id = ? AND item_ordinal = ?",
                         (annotator.id, item.ordinal)).fetchone()
        if mine is not None or item.item.is_gold:
            return
        settings = self.require_settings()
        taken = c.execute("SELECT COUNT(*) FROM assignments WHERE item_ordinal = ? AND annotator_id != ? AND "
                          "(state = 'judged' OR (state = 'claimed' AND served_at > ?))",
                          (item.ordinal, annotator.id, now - settings.claim_minutes * 60)).fetchone()[0]
        if taken >= settings.overlap:
            raise NotAssigned(f"item {item.item_id!r} already has its {settings.overlap} annotator(s); "
                              "GET /api/next gives your next item")

    def progress(self, annotator: Annotator) -> Progress:
        c = self.read()
        claimed, rest, done = self._queue(c, annotator, time.time())
        return Progress(done=done, remaining=len(claimed) + len(rest))

    # ---- judgments -------------------------------------------------------------------------------

    def record(self, annotator: Annotator, item_id: str, *, choice: str | None = None, strength: int | None = None,
               ratings: dict[str, int] | None = None, reason: str | None = None, latency_ms: int | None = None,
               shown_left: str | None = None, idempotency_key: str | None = None, written_by: str | None = None,
               via: str = "api") -> tuple[Judgment, bool]:
        """Append one judgment; returns (row, replayed). The body was validated by the caller
        (`raylign.annotation.app.JudgmentIn.check`); this checks the queue and the idempotency key."""
        if choice is not None and choice not in CHOICES:
            raise ValueError(f"choice {choice!r}")
        if written_by not in (None, "a", "b"):
            raise ValueError(f"written_by {written_by!r}")
        item = self.item(item_id)
        reason = reason or None
        ratings_json = json.dumps(ratings, sort_keys=True) if ratings is not None else None
        content = (choice, strength, json.dumps(ratings, sort_keys=True), reason, written_by)
        now = time.time()
        with self.write() as c:
            if idempotency_key is not None:
                same = self._row(c, "j.annotator_id = ? AND j.judgment_key = ?", (annotator.id, idempotency_key))
                if same is not None:
                    if same.item_id != item_id or same.content() != content:
                        raise KeyReused(f"idempotency_key {idempotency_key!r} was already used for another judgment; "
                                        "send a new key for a new judgment")
                    return same, True
            current = self._row(c, "j.annotator_id = ? AND j.item_id = ? ORDER BY j.id DESC LIMIT 1",
                                (annotator.id, item_id))
            if current is not None and current.content() == content:
                return current, True
            self._allowed(c, annotator, item, now)
            served = c.execute("SELECT served_at FROM assignments WHERE annotator_id = ? AND item_ordinal = ?",
                               (annotator.id, item.ordinal)).fetchone()
            if latency_ms is None and served is not None:
                latency_ms = max(0, int(round((now - float(served[0])) * 1000)))
            left = shown_left or self.shown_left(annotator, item)
            supersedes = current.id if current is not None else None
            key = idempotency_key or "auto:" + hashlib.sha256(json.dumps(
                [item_id, choice, strength, ratings_json, reason, supersedes]
                + ([written_by] if written_by else [])).encode()).hexdigest()  # version-1 keys stay the same
            cur = c.execute(
                "INSERT INTO judgments (annotator_id, item_id, judgment_key, shown_left, choice, strength, ratings, "
                "reason, written_by, latency_ms, via, created, supersedes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (annotator.id, item_id, key, left, choice, strength, ratings_json, reason, written_by, latency_ms,
                 via, now, supersedes))
            state = "skipped" if choice == "skip" else "judged"
            c.execute("INSERT INTO assignments (annotator_id, item_ordinal, state, claimed_at, served_at) "
                      "VALUES (?, ?, ?, ?, ?) ON CONFLICT (annotator_id, item_ordinal) DO UPDATE SET state = ?",
                      (annotator.id, item.ordinal, state, now, now, state))
            row = self._row(c, "j.id = ?", (cur.lastrowid,))
        assert row is not None
        return row, False

    _SELECT = ("SELECT j.id, j.annotator_id, a.name, j.item_id, j.shown_left, j.choice, j.strength, j.ratings, j.reason, "
               "j.written_by, j.latency_ms, j.via, j.created, j.supersedes, j.judgment_key FROM {table} j "
               "JOIN annotators a ON a.id = j.annotator_id")

    def _row(self, c: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> Judgment | None:
        row = c.execute(self._SELECT.format(table="judgments") + " WHERE " + where, args).fetchone()
        return None if row is None else _judgment(row)

    def current_judgments(self, annotator: Annotator | None = None) -> list[Judgment]:
        """The latest judgment of every (annotator, item), in the order they were made."""
        sql = self._SELECT.format(table="current_judgments")
        args: tuple[Any, ...] = ()
        if annotator is not None:
            sql += " WHERE j.annotator_id = ?"
            args = (annotator.id,)
        return [_judgment(r) for r in self.read().execute(sql + " ORDER BY j.id", args)]

    def all_judgments(self) -> list[Judgment]:
        """Every row ever written, corrections included, in order."""
        return [_judgment(r) for r in self.read().execute(self._SELECT.format(table="judgments") + " ORDER BY j.id")]


def _judgment(row: tuple[Any, ...]) -> Judgment:
    return Judgment(int(row[0]), int(row[1]), str(row[2]), str(row[3]), row[4], row[5], row[6],
                    json.loads(row[7]) if row[7] is not None else None, row[8], row[9], row[10], str(row[11]),
                    float(row[12]), row[13], str(row[14]))
