"""The annotation app's user-fixable errors: each is one `ConfigError` line the CLI prints as it is."""

from __future__ import annotations

from raylign.config import ConfigError


class AnnotationError(ConfigError):
    """A mistake in an annotation command, task file or database the user can fix; the message says how."""


class TaskError(AnnotationError):
    """A task file (TASK.jsonl) or an items file for `raylign annotate make` that is not valid."""


class StoreError(AnnotationError):
    """An annotations database that cannot be used as asked (another task's items, unknown annotator)."""


MAX_SHOWN = 20


def listing(source: str, problems: list[str], what: str = "problem") -> str:
    """`source: N problems found; nothing was written:` and the first MAX_SHOWN problems, one a line."""
    noun = what if len(problems) == 1 else what + "s"
    lines = [f"{source}: {len(problems)} {noun} found (fix the file and rerun):"]
    lines += [f"  {p}" for p in problems[:MAX_SHOWN]]
    if len(problems) > MAX_SHOWN:
        lines.append(f"  ... and {len(problems) - MAX_SHOWN} more")
    return "\n".join(lines)
