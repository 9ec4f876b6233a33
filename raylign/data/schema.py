"""The five data kinds, their fields, which kinds each algorithm trains on, and the pieces of row
validation with file:line error messages.

Every reader turns its file into `Batch`es of `Record`s (a location string such as
`data/pairs.jsonl:17` plus the row's values); `raylign.data.dataset` checks every record of every
batch against the kind's fields, collects every problem, and raises one `DataError` listing them
before anything is returned. Training therefore never starts on a file that would fail half-way
through an epoch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from raylign.errors import UserError

KINDS = ("prompts", "pairs", "unpaired", "ratings", "text")
ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 20
# Problems kept (in file order) for `DataError.errors`; past this they are only counted, so a file
# that is wrong on every one of its million lines still takes bounded memory to report.
MAX_ERRORS_KEPT = 10_000

# Field name -> checker name, per kind. "ratings" has two shapes, resolved from the file's columns.
KIND_FIELDS: dict[str, dict[str, str]] = {
    "prompts": {"prompt": "prompt"},
    "pairs": {"prompt": "prompt", "chosen": "text", "rejected": "text"},
    "unpaired": {"prompt": "prompt", "completion": "text", "label": "bool"},
    "ratings": {"text": "text", "rating": "number"},
    "text": {"text": "text"},
}
RATINGS_PROMPT_FIELDS = {"prompt": "prompt", "completion": "text", "rating": "number"}
KIND_NEEDS = {
    "prompts": "prompt",
    "pairs": "prompt, chosen, rejected",
    "unpaired": "prompt, completion, label (true/false)",
    "ratings": "rating (a number) and either text or prompt + completion",
    "text": "text",
}


class DataError(UserError, ValueError):
    """A data file the user must fix; `errors` holds the problems in file order (all of them, up to
    MAX_ERRORS_KEPT), `count` how many there were; the message shows the first ones."""

    def __init__(self, message: str, errors: list[str] | None = None, count: int | None = None):
        super().__init__(message)
        self.errors = errors if errors is not None else [message]
        self.count = count if count is not None else len(self.errors)


class Record(NamedTuple):
    """One row as read from a file: where it came from (for messages), its sort position, its values."""

    where: str
    pos: int
    values: dict[str, Any]


@dataclass
class Batch:
    """A run of consecutive rows of a file, as a reader hands them over (at most a few thousand rows
    or a few MiB of text, so loading a file never holds more than one batch of raw rows).

    Text formats fill `records` (Python values, CSV cells all strings) and `errors` (lines that did
    not become records, as `(position, "where: message")`); typed sources (Parquet, Arrow) fill
    `table` instead, whose rows are `first_row`, `first_row + 1`, ... of the file, and the checker
    converts only the kind's fields to Python. `columns` are this batch's column names in file order
    (for JSON, the keys its rows have: a key may first appear in a later batch).
    """

    columns: list[str]
    records: list[Record] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    table: Any = None
    first_row: int = 0


@dataclass
class Reading:
    """A source being read: its name for messages, whether its values are typed (False for CSV,
    whose cells get converted per field), whether its first batch already names every column (a CSV
    header, an Arrow schema; not JSON, where a key may first appear on any line), and its rows as a
    lazy iterator of batches."""

    source: str
    batches: Iterator[Batch]
    typed: bool = True
    fixed_columns: bool = False


@dataclass
class RawData:
    """Records held in memory (the builtin datasets, which are small), readable like a file."""

    source: str
    columns: list[str]
    records: list[Record]
    errors: list[tuple[int, str]] = field(default_factory=list)
    typed: bool = True

    def reading(self) -> Reading:
        batch = Batch(self.columns, self.records, self.errors)
        return Reading(self.source, iter([batch]), self.typed, fixed_columns=True)


class ErrorLog:
    """Collects problems as `(position, "where: message")` so they can be shown in file order.

    Batches arrive in file order, so keeping the first MAX_ERRORS_KEPT problems of each (sorted)
    batch keeps the first ones of the file; the rest are counted. A row's `field 'x': missing` is kept
    apart under its field, because when no row at all has the column it becomes one file-level
    message instead (`drop_missing`).
    """

    def __init__(self, source: str, keep: int | None = None):
        self.source = source
        self.keep = MAX_ERRORS_KEPT if keep is None else keep
        self.items: list[tuple[int, str]] = []
        self.count = 0
        self.missing: dict[str, list[tuple[int, str]]] = {}
        self.missing_count: dict[str, int] = {}

    def add(self, pos: int, where: str, message: str) -> None:
        self.extend([(pos, f"{where}: {message}")])

    def extend(self, items: list[tuple[int, str]]) -> None:
        self.count += len(items)
        room = self.keep - len(self.items)  # file-level problems (position -1) are always kept
        ordered = sorted(items, key=lambda item: item[0])
        self.items.extend(item for i, item in enumerate(ordered) if i < room or item[0] < 0)

    def add_missing(self, name: str, pos: int, where: str) -> None:
        self.missing_count[name] = self.missing_count.get(name, 0) + 1
        kept = self.missing.setdefault(name, [])
        if len(kept) < self.keep:
            kept.append((pos, f"{where}: field '{name}': missing"))

    def drop_missing(self, names: list[str]) -> None:
        """The columns no row has: their per-row messages give way to one file-level message."""
        for name in names:
            self.missing.pop(name, None)
            self.missing_count.pop(name, None)

    def __bool__(self) -> bool:
        return bool(self.count or self.missing_count)

    def raise_if_any(self) -> None:
        if not self:
            return
        items = list(self.items)
        for kept in self.missing.values():
            items.extend(kept)
        items.sort(key=lambda item: item[0])
        total = self.count + sum(self.missing_count.values())
        raise data_error(self.source, [msg for _, msg in items[: self.keep]], total=total)


def data_error(source: str, errors: list[str], max_shown: int = MAX_ERRORS_SHOWN,
               total: int | None = None) -> DataError:
    """One DataError whose message lists the first `max_shown` problems and counts the rest
    (`total` when more problems were found than `errors` keeps)."""
    total = len(errors) if total is None else total
    noun = "problem" if total == 1 else "problems"
    lines = [f"{source}: {total} {noun} found; nothing was loaded (fix the file and rerun):"]
    lines += [f"  {msg}" for msg in errors[:max_shown]]
    if total > max_shown:
        lines.append(f"  ... and {total - max_shown} more")
    return DataError("\n".join(lines), errors, count=total)


class FieldError(Exception):
    """Raised by a checker; the text is the part of the message after `field 'x': `."""


# --------------------------------------------------------------------------------------------------
# Field checkers: return the normalised value or raise FieldError. `strings` is True for CSV cells.
# --------------------------------------------------------------------------------------------------


def describe(value: Any) -> str:
    """A value as the user wrote it, in JSON words (`number 3`, `string 'abc'`, `null`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 30 else value[:27] + "..."
        return f"string {shown!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def check_text(value: Any, strings: bool = False) -> str:
    """Non-empty text; whitespace is kept as written because it can matter to a tokenizer."""
    if not isinstance(value, str):
        raise FieldError(f"expected a string, got {describe(value)}")
    if not value.strip():
        raise FieldError("empty text")
    return value


def check_number(value: Any, strings: bool = False) -> float:
    """A finite number; CSV cells are parsed, JSON strings are not (a quoted number is a mistake)."""
    if strings and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise FieldError(f"expected a number, got {describe(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"expected a number, got {describe(value)}")
    if not math.isfinite(value):
        raise FieldError(f"expected a finite number, got {value}")
    return float(value)


def check_bool(value: Any, strings: bool = False) -> bool:
    """true/false; in CSV also 1/0 and any case, since CSV has no boolean type."""
    if strings and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
    if not isinstance(value, bool):
        raise FieldError(f"expected true or false, got {describe(value)}")
    return value


def check_messages(value: list) -> list[dict[str, str]]:
    """A chat: a non-empty list of {role, content}; only role and content are kept."""
    if not value:
        raise FieldError("empty message list")
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise FieldError(
                f"message {i}: expected an object with role and content, got {describe(message)}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise FieldError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise FieldError(f"message {i}: content: expected a string, got {describe(content)}")
        # An empty system prompt is a common, harmless export artefact; an empty turn is not.
        if role != "system" and not content.strip():
            raise FieldError(f"message {i}: empty text")
        messages.append({"role": role, "content": content})
    return messages


def check_prompt(value: Any, strings: bool = False) -> str | list[dict[str, str]]:
    """A prompt is text or a chat; a CSV cell holding a JSON list of messages is read as a chat."""
    if strings and isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            value = parsed
    if isinstance(value, (list, tuple)):
        return check_messages(list(value))
    if isinstance(value, str):
        return check_text(value)
    raise FieldError(f"expected a string or a list of {{role, content}} messages, got {describe(value)}")


CHECKERS = {"text": check_text, "number": check_number, "bool": check_bool, "prompt": check_prompt}


# --------------------------------------------------------------------------------------------------
# Kinds and whole-file validation
# --------------------------------------------------------------------------------------------------


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; kinds: {', '.join(KINDS)}")
    return kind


def infer_kind(columns: list[str]) -> str | None:
    """Guess the kind from column names, most specific first (a pairs file also has a prompt)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "pairs"
    if {"completion", "label"} <= cols:
        return "unpaired"
    if "rating" in cols:
        return "ratings"
    if "prompt" in cols:
        return "prompts"
    if "text" in cols:
        return "text"
    return None


def fields_for(kind: str, columns: list[str]) -> dict[str, str]:
    """The fields a kind checks in this file; ratings use text when present, else prompt+completion."""
    if kind == "ratings" and "text" not in columns and {"prompt", "completion"} & set(columns):
        return RATINGS_PROMPT_FIELDS
    return KIND_FIELDS[kind]


def missing_columns(kind: str, columns: list[str]) -> list[str]:
    return [name for name in fields_for(kind, columns) if name not in columns]


def missing_column_message(kind: str, missing: list[str], columns: list[str], needed_by: str | None = None) -> str:
    """`missing column 'x': kind 'k' needs ...; the file has ...`; with `needed_by` (an algorithm) the
    message says who needs the kind and, when the columns fit another kind, which kind the file is."""
    names = ", ".join(repr(m) for m in missing)
    noun = "column" if len(missing) == 1 else "columns"
    has = ", ".join(columns) if columns else "no columns"
    if needed_by is None:
        return f"missing {noun} {names}: kind '{kind}' needs {KIND_NEEDS[kind]}; the file has {has}"
    looks = infer_kind(columns)
    looks_as = f" (data of kind {looks})" if looks and looks != kind else ""
    return (f"missing {noun} {names}: {needed_by} needs data of kind {kind} ({KIND_NEEDS[kind]}); "
            f"the file has {has}{looks_as}")


def check_row(values: dict[str, Any], fields: dict[str, str], strings: bool) -> tuple[dict, list[tuple[str, str]]]:
    """Check one row's fields; returns the normalised row and its problems as (field, message), the
    message being `missing` for an absent or null value."""
    row = dict(values)
    problems = []
    for name, checker in fields.items():
        if values.get(name) is None:
            problems.append((name, "missing"))
            continue
        try:
            row[name] = CHECKERS[checker](values[name], strings)
        except FieldError as exc:
            problems.append((name, str(exc)))
    return row, problems


# --------------------------------------------------------------------------------------------------
# Which kinds each algorithm trains on
# --------------------------------------------------------------------------------------------------

# As the pipelines use the data: online RL samples from prompts (`pipelines/online.py`; the
# adversarial game also takes pairs, whose chosen answers are its human texts), the offline
# learners' encoders read these kinds (`pipelines/offline.py` OFFLINE_ALGORITHMS), and a multi-task
# run checks each task's kind by its type (`config.py` TaskConfig). A pairs or unpaired file also has
# a prompt column, so it can be read as kind prompts (its other columns are kept, not trained on).
ALGORITHM_KINDS: dict[str, tuple[str, ...]] = {
    "sft": ("text", "pairs", "unpaired"),
    "reward": ("pairs",),
    "dpo": ("pairs",),
    "simpo": ("pairs",),
    "orpo": ("pairs",),
    "kto": ("unpaired",),
    "ppo": ("prompts",),
    "grpo": ("prompts",),
    "rloo": ("prompts",),
    "reinforce_pp": ("prompts",),
    "adversarial": ("prompts", "pairs"),
    "dqn": ("prompts",),  # raylign.rllib: one episode per prompt
    "rllib_ppo": ("prompts",),
}
# A multi-task run (`algorithm: multitask`) needs, per task, the kinds of its type.
TASK_KINDS: dict[str, tuple[str, ...]] = {
    "imitation": ("text", "pairs", "unpaired"),
    "preference": ("pairs",),
    "rating": ("ratings",),
}


def accepted_kinds(algorithm: str, task: str | None = None) -> tuple[str, tuple[str, ...]]:
    """(who, kinds): the name messages use for the algorithm (or the multi-task task type) and the
    data kinds it trains on. A name not listed is a programming error, not a user's."""
    if algorithm == "multitask":
        if task not in TASK_KINDS:
            raise ValueError(f"multitask: pass the task type ({', '.join(TASK_KINDS)}), got {task!r}")
        return f"a multitask {task} task", TASK_KINDS[task]
    if algorithm not in ALGORITHM_KINDS:
        raise ValueError(f"no data kinds are known for algorithm {algorithm!r}")
    return algorithm, ALGORITHM_KINDS[algorithm]


def one_of(words: list[str]) -> str:
    """`a`, `a or b`, `a, b or c`."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def kinds_phrase(kinds: tuple[str, ...]) -> str:
    """`kind pairs (columns: prompt, chosen, rejected)`, or several joined with `or`."""
    return "kind " + one_of([f"{k} (columns: {KIND_NEEDS[k]})" for k in kinds])


def kind_mismatch_message(who: str, kinds: tuple[str, ...], kind: str, source: str,
                          columns: list[str] | None) -> str:
    """`grpo needs data of kind prompts (columns: prompt); data.kind is 'text' and t.jsonl has
    columns: text`, then what to change: only data.kind when the file's columns already fit."""
    message = f"{who} needs data of {kinds_phrase(kinds)}; data.kind is '{kind}'"
    if columns is None:
        return f"{message}; set data.kind={kinds[0]} and point the data at such a file"
    has = ", ".join(columns) if columns else "no columns"
    fits = [k for k in kinds if not missing_columns(k, columns)]
    todo = f"set data.kind={fits[0]}" if fits else f"use a file of kind {one_of(list(kinds))}"
    return f"{message} and {source} has columns: {has}; {todo}"
