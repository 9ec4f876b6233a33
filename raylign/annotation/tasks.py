"""Annotation tasks: the TASK.jsonl format, reading it with line-numbered errors, and `annotate make`.

TASK.jsonl is JSON Lines. The first line may be a header with the assignment settings; every other
line is one item.

Header (optional; these are the defaults)::

    {"raylign_task": 1, "overlap": 1, "seed": 0, "claim_minutes": 30, "instructions": ""}

  raylign_task   format version (1); the key that makes a line the header
  overlap        k: every (non-gold) item goes to k different annotators
  seed           seeds each annotator's queue order and left/right order (`Store.order`)
  claim_minutes  an item shown to an annotator is held for them this long before another may take it
  instructions   text shown above every item (plain text, rendered escaped)

Item (one per line)::

    {"item_id": "q17", "kind": "pairwise", "prompt": "...", "response_a": "...", "response_b": "...",
     "source_a": "policy-step-400", "source_b": "reference", "gold": "a", "meta": {"category": "x"}}

  item_id     unique; letters, digits and . _ : - (it appears in URLs), at most 128 characters
  kind        pairwise        which of two answers is better (choices a, b, tie, skip)
              human-vs-model  the same, one answer written by a person: exactly one of source_a /
                              source_b is "human" (the report's human consistency score)
              rating          one answer (response_a) rated 1-7 on each of `criteria`
  prompt      text, or a chat: a list of {role: system|user|assistant, content} turns (rating
              items may have none: the text is rated by itself)
  response_a  text; response_b: text for pairwise and human-vs-model, absent for rating
  source_a/b  where each answer came from (a model, "human"); never shown to annotators
  criteria    rating only: the criteria names (default ["overall"]), at most 40 characters each
  gold        an attention check's known answer: "a" | "b" | "tie" (pairwise, human-vs-model) or
              {criterion: 1..7} (rating). Gold items go to every annotator, are mixed into each queue
              at random, are never marked as such on the page, and are left out of exports by default
  meta        any JSON object, kept with the item and copied into exports

Judgments always name the answers as the item does (`a` = response_a), whatever side a page showed
each answer on; the side is recorded with the judgment (`shown_left`).

`raylign annotate make --items F --kind K [--overlap k] [--gold G] --out TASK.jsonl` writes a task from
ready answers: F holds rows of the item's fields (item_id optional: `<kind>-<n>`), or for pairwise a
raylign pairs file {prompt, chosen, rejected} (chosen and rejected as A and B in an order drawn per
item, sources "chosen" / "rejected"), for human-vs-model rows {prompt, human, model[, model_name]}, for rating rows
{prompt, completion} or {text}. G holds gold items in the same shapes, each with `gold`. Any format
`raylign data validate` reads (JSONL, CSV, Parquet, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raylign.annotation.errors import TaskError, listing
from raylign.rundir import write_jsonl_atomic

TASK_FORMAT = 1
KINDS = ("pairwise", "human-vs-model", "rating")
PAIR_KINDS = ("pairwise", "human-vs-model")
ItemKind = Literal["pairwise", "human-vs-model", "rating"]
CHOICES = ("a", "b", "tie", "skip")
HUMAN = "human"
LIKERT_MIN, LIKERT_MAX = 1, 7
STRENGTH_MIN, STRENGTH_MAX = 1, 3
ITEM_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
CRITERION = re.compile(r"[^\x00-\x1f]{1,40}")
DEFAULT_CRITERIA = ("overall",)


class TaskSettings(BaseModel):
    """The header row of a task (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    raylign_task: int = Field(TASK_FORMAT, description="format version")
    overlap: int = Field(1, ge=1, le=1000, description="annotators per (non-gold) item")
    seed: int = Field(0, ge=0, description="seed of queue orders and left/right orders")
    claim_minutes: float = Field(30.0, gt=0, description="how long an item shown to someone is held for them")
    instructions: str = Field("", max_length=20_000, description="text shown above every item")

    @field_validator("raylign_task")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != TASK_FORMAT:
            raise ValueError(f"this raylign reads task format {TASK_FORMAT}, the file says {v}")
        return v


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class TaskItem(BaseModel):
    """One item of a task (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    item_id: str
    kind: ItemKind
    prompt: str | list[Turn] | None = None
    response_a: str
    response_b: str | None = None
    source_a: str | None = None
    source_b: str | None = None
    criteria: list[str] | None = None
    gold: str | dict[str, int] | None = None
    meta: dict[str, Any] | None = None

    @field_validator("item_id")
    @classmethod
    def _item_id(cls, v: str) -> str:
        if not ITEM_ID.fullmatch(v):
            raise ValueError("use 1-128 letters, digits and . _ : - (it appears in URLs)")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[Turn] | None) -> str | list[Turn] | None:
        if v is None:
            return v
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("empty text")
        elif not v:
            raise ValueError("empty message list")
        return v

    @model_validator(mode="after")
    def _shape(self) -> TaskItem:
        if not self.response_a.strip():
            raise ValueError("response_a: empty text")
        if self.kind in PAIR_KINDS:
            if self.prompt is None:
                raise ValueError(f"prompt: a {self.kind} item needs the prompt both answers reply to")
            if self.response_b is None or not self.response_b.strip():
                raise ValueError(f"response_b: a {self.kind} item needs a non-empty response_b")
            if self.criteria is not None:
                raise ValueError("criteria: only rating items have criteria")
            if self.gold is not None and self.gold not in ("a", "b", "tie"):
                raise ValueError(f"gold: a {self.kind} item's gold answer is \"a\", \"b\" or \"tie\", got {self.gold!r}")
            if self.kind == "human-vs-model" and [self.source_a, self.source_b].count(HUMAN) != 1:
                raise ValueError(f"source_a/source_b: exactly one of them must be \"{HUMAN}\" in a human-vs-model "
                                 f"item, got {self.source_a!r} and {self.source_b!r}")
        else:
            if self.response_b is not None:
                raise ValueError("response_b: a rating item rates one answer (response_a); drop response_b")
            if self.criteria is None:
                self.criteria = list(DEFAULT_CRITERIA)
            if not self.criteria or len(set(self.criteria)) != len(self.criteria):
                raise ValueError("criteria: give one or more distinct names")
            bad = [c for c in self.criteria if not CRITERION.fullmatch(c) or not c.strip()]
            if bad:
                raise ValueError(f"criteria: names must be 1-40 printable characters, got {bad[0]!r}")
            if self.gold is not None:
                if not isinstance(self.gold, dict) or set(self.gold) - set(self.criteria):
                    raise ValueError(f"gold: a rating item's gold answer is {{criterion: {LIKERT_MIN}..{LIKERT_MAX}}} "
                                     f"over its criteria {self.criteria}")
                if any(not LIKERT_MIN <= v <= LIKERT_MAX for v in self.gold.values()):
                    raise ValueError(f"gold: ratings are {LIKERT_MIN}..{LIKERT_MAX}")
        return self

    @property
    def is_gold(self) -> bool:
        return self.gold is not None

    def record(self) -> dict[str, Any]:
        """The item as one JSON-ready TASK.jsonl row (unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    def human_side(self) -> str | None:
        """"a" or "b": the answer a person wrote, for human-vs-model items."""
        if self.kind != "human-vs-model":
            return None
        return "a" if self.source_a == HUMAN else "b"


@dataclass(frozen=True)
class Task:
    settings: TaskSettings
    items: list[TaskItem]
    source: str


def _problems(exc: ValidationError) -> list[str]:
    out = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int) or len(e["loc"]) > 1)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        named = re.match(r"([a-z_/]+): (.*)", msg, re.S)
        if not loc and named:  # an item-level check names its field first
            loc, msg = named.group(1), named.group(2)
        out.append(f"field '{loc}': {msg}" if loc else msg)
    return out


def parse_item(values: dict[str, Any], where: str) -> tuple[TaskItem | None, list[str]]:
    """(item, []) or (None, ["where: field 'x': message", ...])."""
    try:
        return TaskItem.model_validate(values), []
    except ValidationError as exc:
        known = ", ".join(TaskItem.model_fields)
        problems = [f"{where}: {p}" for p in _problems(exc)]
        if any("unknown field" in p for p in problems):
            problems.append(f"{where}: (item fields are: {known})")
        return None, problems


def _check_unique(items: Iterable[tuple[str, TaskItem]], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for where, item in items:
        if item.item_id in seen:
            problems.append(f"{where}: item_id {item.item_id!r} is already used at {seen[item.item_id]}")
        else:
            seen[item.item_id] = where


def load_task(path: str | os.PathLike[str]) -> Task:
    """Read and check a TASK.jsonl; every problem is listed in one `TaskError` (file:line: field: what)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskError(f"task file {path} not found; write one with `raylign annotate make --items F --kind K "
                        "--out TASK.jsonl` (format: `raylign annotate make --help`)")
    settings = TaskSettings()
    items: list[tuple[str, TaskItem]] = []
    problems: list[str] = []
    seen_any = False
    with open(p, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                values = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                problems.append(f"{where}: not a JSON line ({exc})")
                continue
            if not isinstance(values, dict):
                problems.append(f"{where}: expected a JSON object, got {type(values).__name__}")
                continue
            first, seen_any = not seen_any, True
            if "raylign_task" in values:
                if not first:
                    problems.append(f"{where}: the header (the line with raylign_task) must be the first line")
                    continue
                try:
                    settings = TaskSettings.model_validate(values)
                except ValidationError as exc:
                    problems += [f"{where}: header {p}" for p in _problems(exc)]
                continue
            item, bad = parse_item(values, where)
            problems += bad
            if item is not None:
                items.append((where, item))
    _check_unique(items, problems)
    if problems:
        raise TaskError(listing(str(path), problems))
    if not items:
        raise TaskError(f"{path}: the task has no items")
    return Task(settings, [item for _, item in items], str(path))


def item_fingerprint(record: dict[str, Any]) -> str:
    """sha256 of an item's canonical JSON: the same item_id with other content is another item."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---- `raylign annotate make` ----------------------------------------------------------------------


def _assign_sides(row: dict[str, Any], first: tuple[str, str], second: tuple[str, str]) -> None:
    """Which answer is A, drawn per item from a hash of the two texts (so the same file always makes
    the same task). A pairs file's chosen answer must not always be A: choices over a/b would then
    have one category only, and Krippendorff's α and Fleiss' κ are 0 by construction however well
    people agree. `source_a`/`source_b` say which answer is which."""
    digest = hashlib.sha256(json.dumps([first[0], second[0]], ensure_ascii=False).encode()).digest()
    a, b = (second, first) if digest[0] & 1 else (first, second)
    row["response_a"], row["source_a"] = a
    row["response_b"], row["source_b"] = b


def _normalise(values: dict[str, Any], kind: str) -> dict[str, Any]:
    """An input row in one of the accepted shapes (module docstring) as item fields."""
    row = {k: v for k, v in values.items() if v is not None}
    row.setdefault("kind", kind)
    if kind == "pairwise" and "response_a" not in row and {"chosen", "rejected"} <= set(row):
        _assign_sides(row, (row.pop("chosen"), row.pop("source_a", "chosen")),
                      (row.pop("rejected"), row.pop("source_b", "rejected")))
    elif kind == "human-vs-model" and "response_a" not in row and {"human", "model"} <= set(row):
        _assign_sides(row, (row.pop("human"), HUMAN), (row.pop("model"), row.pop("model_name", None) or "model"))
    elif kind == "rating" and "response_a" not in row:
        if "completion" in row:
            row["response_a"] = row.pop("completion")
        elif "text" in row:
            row["response_a"] = row.pop("text")
    # Columns raylign's data files carry beside the item's own fields go to meta, not to errors.
    extra = {k: row.pop(k) for k in list(row) if k not in TaskItem.model_fields}
    if extra:
        row["meta"] = {**extra, **(row.get("meta") or {})}
    return row


def _read_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    from raylign.data.readers import read_path
    from raylign.data.schema import DataError

    if not Path(path).expanduser().exists():
        raise TaskError(f"items file {path} not found")
    try:
        reading = read_path(str(Path(path).expanduser()))
        out: list[tuple[str, dict[str, Any]]] = []
        problems: list[str] = []
        for batch in reading.batches:
            problems += [msg for _, msg in batch.errors]
            if batch.table is not None:
                first = batch.first_row
                out += [(f"{path}: row {first + i}", v) for i, v in enumerate(batch.table.to_pylist())]
            out += [(r.where, dict(r.values)) for r in batch.records]
    except DataError as exc:
        raise TaskError(str(exc)) from None
    if problems:
        raise TaskError(listing(path, problems))
    return out


def _prompt_from_csv(row: dict[str, Any]) -> None:
    p = row.get("prompt")
    if isinstance(p, str) and p.lstrip().startswith("[{"):
        try:
            parsed = json.loads(p)
        except json.JSONDecodeError:
            return
        if isinstance(parsed, list):
            row["prompt"] = parsed


def make_items(items_path: str, kind: str, gold_path: str | None = None,
               criteria: list[str] | None = None) -> list[TaskItem]:
    """The task items from an items file (and a gold file); all problems in one `TaskError`."""
    if kind not in KINDS:
        raise TaskError(f"unknown item kind {kind!r}; kinds: {', '.join(KINDS)}")
    problems: list[str] = []
    parsed: list[tuple[str, TaskItem]] = []
    sources = [(items_path, False)] + ([(gold_path, True)] if gold_path else [])
    number = 0
    for path, is_gold in sources:
        rows = _read_rows(path)
        if not rows:
            problems.append(f"{path}: no rows")
        for where, values in rows:
            number += 1
            row = _normalise(values, kind)
            _prompt_from_csv(row)
            row.setdefault("item_id", f"{kind}-{number:05d}")  # gold items too: ids are in URLs, and must not tell
            if kind == "rating" and criteria and "criteria" not in row:
                row["criteria"] = list(criteria)
            if is_gold and row.get("gold") is None:
                problems.append(f"{where}: a row of the --gold file needs its known answer in field 'gold'")
                continue
            if row.get("kind") != kind:
                problems.append(f"{where}: field 'kind' is {row.get('kind')!r} but --kind is {kind}")
                continue
            item, bad = parse_item(row, where)
            problems += bad
            if item is not None:
                parsed.append((where, item))
    _check_unique(parsed, problems)
    if problems:
        raise TaskError(listing(items_path, problems))
    return [item for _, item in parsed]


def write_task(settings: TaskSettings, items: list[TaskItem], out: str | os.PathLike[str]) -> Path:
    """Header + items to `out` (through `<out>.tmp`, synced and renamed: complete or untouched)."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise TaskError(f"--out {out} is a directory; give a file name such as {path / 'task.jsonl'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [settings.model_dump(mode="json"), *(item.record() for item in items)]
    write_jsonl_atomic(rows, path)
    return path




def prompt_turns(prompt: str | list[Turn] | list[dict[str, str]] | None) -> list[tuple[str, str]]:
    """A prompt as (role, content) turns; plain text is one user turn, no prompt none."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [("user", prompt)]
    return [(t.role, t.content) if isinstance(t, Turn) else (t["role"], t["content"]) for t in prompt]
