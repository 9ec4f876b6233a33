"""The five data kinds, their fields, and row validation with file:line error messages.

Every reader turns its file into `Record`s (a location string such as `data/pairs.jsonl:17` plus the
row's values). `validate_records` checks every record against the kind's fields, collects every
problem, and raises one `DataError` listing them before anything is returned. Training therefore
never starts on a file that would fail half-way through an epoch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

KINDS = ("prompts", "pairs", "unpaired", "ratings", "text")
ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 20

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


class DataError(ValueError):
    """A data file the user must fix; `errors` holds every problem, the message shows the first ones."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors if errors is not None else [message]


class Record(NamedTuple):
    """One row as read from a file: where it came from (for messages), its sort position, its values."""

    where: str
    pos: int
    values: dict[str, Any]


@dataclass
class RawData:
    """What a reader found: records plus the problems that kept some lines from becoming records.

    `typed` is False for CSV, whose cells are all strings and get converted per field; `table` keeps
    the original Arrow table of typed sources so extra columns keep their Arrow types.
    """

    source: str
    columns: list[str]
    records: list[Record]
    errors: list[tuple[int, str]] = field(default_factory=list)
    typed: bool = True
    table: Any = None


class ErrorLog:
    """Collects problems as `(position, "where: message")` so they can be shown in file order."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[tuple[int, str]] = []

    def add(self, pos: int, where: str, message: str) -> None:
        self.items.append((pos, f"{where}: {message}"))

    def extend(self, items: list[tuple[int, str]]) -> None:
        self.items.extend(items)

    def raise_if_any(self) -> None:
        if self.items:
            raise data_error(self.source, [msg for _, msg in sorted(self.items, key=lambda item: item[0])])


def data_error(source: str, errors: list[str], max_shown: int = MAX_ERRORS_SHOWN) -> DataError:
    """One DataError whose message lists the first `max_shown` problems and counts the rest."""
    noun = "problem" if len(errors) == 1 else "problems"
    lines = [f"{source}: {len(errors)} {noun} found; nothing was loaded (fix the file and rerun):"]
    lines += [f"  {msg}" for msg in errors[:max_shown]]
    if len(errors) > max_shown:
        lines.append(f"  ... and {len(errors) - max_shown} more")
    return DataError("\n".join(lines), errors)


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


def missing_column_message(kind: str, missing: list[str], columns: list[str]) -> str:
    names = ", ".join(repr(m) for m in missing)
    noun = "column" if len(missing) == 1 else "columns"
    has = ", ".join(columns) if columns else "no columns"
    return f"missing {noun} {names}: kind '{kind}' needs {KIND_NEEDS[kind]}; the file has {has}"


def check_row(values: dict[str, Any], fields: dict[str, str], strings: bool) -> tuple[dict, list[str]]:
    """Check one row's fields; returns the normalised row and its problems (`field 'x': ...`)."""
    row = dict(values)
    problems = []
    for name, checker in fields.items():
        if values.get(name) is None:
            problems.append(f"field '{name}': missing")
            continue
        try:
            row[name] = CHECKERS[checker](values[name], strings)
        except FieldError as exc:
            problems.append(f"field '{name}': {exc}")
    return row, problems


def validate_records(raw: RawData, kind: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """All rows normalised, and the fields checked; raises one DataError listing every problem."""
    check_kind(kind)
    log = ErrorLog(raw.source)
    log.extend(raw.errors)
    if not raw.records:
        if not raw.errors:
            log.add(-1, raw.source, "no rows")
        log.raise_if_any()
    missing = missing_columns(kind, raw.columns)
    if missing:
        # One file-level message instead of one per row: the whole column is absent.
        log.add(-1, raw.source, missing_column_message(kind, missing, raw.columns))
        log.raise_if_any()
    fields = fields_for(kind, raw.columns)
    rows = []
    for record in raw.records:
        row, problems = check_row(record.values, fields, strings=not raw.typed)
        for problem in problems:
            log.add(record.pos, record.where, problem)
        rows.append(row)
    log.raise_if_any()
    return rows, fields
