"""Built-in datasets, named `builtin:<name>` wherever a data path is accepted.

They make the quickstart and the tests work on a machine with no network and no data of its own:
- `everyday-prompts`: everyday instructions written for this project (packaged JSONL file).
- `vader-ratings`: the VADER sentiment lexicon's human ratings, read at load time from the installed
  `vaderSentiment` package (ten raters scored each token from -4 to +4; we do not copy the file).
Add one by registering a loader in `BUILTIN_DATASETS`; it returns the same `Reading` a file reader
does, so builtins are validated exactly like user files.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from importlib import resources
from typing import NamedTuple

from raylign.data.readers import read_jsonl
from raylign.data.schema import DataError, RawData, Reading, Record

BUILTIN_PREFIX = "builtin:"


class BuiltinDataset(NamedTuple):
    kind: str
    description: str
    loader: Callable[[int | None], Reading]


def load_everyday_prompts(limit: int | None = None) -> Reading:
    """The packaged prompts file, read with the ordinary JSONL reader (so errors would name its lines)."""
    entry = resources.files("raylign.data") / "builtin" / "everyday_prompts.jsonl"
    with resources.as_file(entry) as path:
        batches = list(read_jsonl(str(path), limit))  # a few hundred lines, read while the file exists
    return Reading("builtin:everyday-prompts", iter(batches))


def vader_lexicon_lines() -> list[str]:
    """Lines of vaderSentiment's vader_lexicon.txt (token, mean, std, [10 ratings], tab-separated)."""
    try:
        entry = resources.files("vaderSentiment") / "vader_lexicon.txt"
        return entry.read_text(encoding="utf-8").splitlines()
    except (ModuleNotFoundError, FileNotFoundError):
        raise DataError(
            "builtin:vader-ratings needs the vaderSentiment package: pip install vaderSentiment"
        ) from None


def load_vader_ratings(limit: int | None = None) -> Reading:
    """One ratings row per lexicon token: {text, rating: mean, std, ratings: [10 ints]}.

    The lexicon lists a few tokens twice; like VADER itself (a dict built line by line), the last
    line wins, so the ratings here are the ones VADER actually scores with.
    """
    by_token: dict[str, Record] = {}
    for lineno, line in enumerate(vader_lexicon_lines(), start=1):
        parts = line.strip("\r\n").split("\t")
        if len(parts) < 4:
            continue
        token, mean, std, raw_ratings = parts[:4]
        row = {"text": token, "rating": float(mean), "std": float(std), "ratings": json.loads(raw_ratings)}
        by_token.pop(token, None)  # re-insert so the row sits where its winning line is
        by_token[token] = Record(f"vader_lexicon.txt:{lineno}", lineno, row)
    records = list(by_token.values())[:limit]
    return RawData("builtin:vader-ratings", ["text", "rating", "std", "ratings"], records).reading()


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "everyday-prompts": BuiltinDataset(
        "prompts",
        "everyday instructions (cooking, travel, work, study, tech, stories, advice, ...) written for raylign",
        load_everyday_prompts,
    ),
    "vader-ratings": BuiltinDataset(
        "ratings",
        "VADER sentiment lexicon: ~7500 words/emoticons with mean human valence ratings (-4..4)",
        load_vader_ratings,
    ),
}


def list_builtin() -> dict[str, tuple[str, str]]:
    """`builtin:<name>` -> (kind, description), for `raylign data list` and error messages."""
    return {
        BUILTIN_PREFIX + name: (entry.kind, entry.description) for name, entry in BUILTIN_DATASETS.items()
    }


def read_builtin(path: str, limit: int | None = None) -> tuple[Reading, str]:
    """Records of a `builtin:<name>` dataset and its kind; unknown names list the known ones."""
    name = path[len(BUILTIN_PREFIX) :]
    entry = BUILTIN_DATASETS.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(BUILTIN_DATASETS), n=1)
        did = f" Did you mean 'builtin:{close[0]}'?" if close else ""
        known = ", ".join(list_builtin())
        raise DataError(f"unknown builtin dataset {path!r}.{did} Built-in datasets: {known}")
    return entry.loader(limit), entry.kind
