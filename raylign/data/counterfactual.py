"""Counterfactual bias sets and group-term swaps: what `raylign eval --bias` measures with, what
`raylign data augment --counterfactual` adds copies by, and what `train.counterfactual_penalty` pairs.

The packaged set (`builtin`, `raylign/data/builtin/bias_counterfactuals.jsonl`, written for this
project) covers five axes: gender, given names across origins (all female names, so gender does not
confound origin), nationality, religion and age. A JSONL file, one object per line, of two kinds:

  {"axis": "religion", "groups": {"Christian": "a Christian", "Muslim": "a Muslim", ...}}
  {"prompt": "Tell me about my new colleague, {X}.", "completion": "Your new colleague, {X}, is ..."}

A template line applies to every axis, or only to the axes named in its optional "axis" (a name or a
list). `{X}` is replaced by each group's term (capitalised at the start of a text). A user file
extends the packaged set: its axes are added (an axis of the same name replaces the packaged one's
groups) and its templates are added.

Swaps. A text mentions group g of an axis where g's term occurs as a whole phrase (not inside a
longer word; its first letter in either case, so "A woman" at a sentence start counts). The
counterfactual copy of a row for groups (a, b) applies the transposition a ↔ b to every text field at
once: each mention of a's term becomes b's and each of b's becomes a's, capitalisation of the first
letter kept. A row's copies on an axis are the transpositions of the first group it mentions with
each other group (Garg et al. 2019, "Counterfactual Fairness in Text Classification through
Robustness": counterfactual examples by substituting identity tokens).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from raylign.data.schema import DataError

PLACEHOLDER = "{X}"
BUILTIN = "builtin"


@dataclass
class BiasSet:
    axis: str
    groups: dict[str, str]  # group name -> term substituted for {X}
    templates: list[dict[str, str]] = field(default_factory=list)  # {prompt, completion}

    def filled(self) -> tuple[list[str], list[str]]:
        """Prompts and completions for every (template, group), template-major: row t·G + g."""
        prompts, completions = [], []
        for t in self.templates:
            for term in self.groups.values():
                prompts.append(fill(t["prompt"], term))
                completions.append(fill(t["completion"], term))
        return prompts, completions

    @cached_property
    def patterns(self) -> dict[str, re.Pattern[str]]:
        return {g: term_pattern(term) for g, term in self.groups.items()}

    def mentioned(self, text: str) -> list[str]:
        """The groups whose term occurs in `text`, in order of first occurrence."""
        first = {g: m.start() for g, p in self.patterns.items() if (m := p.search(text))}
        return sorted(first, key=first.__getitem__)

    def swap(self, text: str, a: str, b: str) -> str:
        """`text` with groups a and b exchanged (a's term -> b's, b's -> a's), in one pass."""
        terms = {self.groups[a]: self.groups[b], self.groups[b]: self.groups[a]}
        pattern = re.compile("|".join(f"(?:{term_pattern(t).pattern})" for t in sorted(terms, key=len, reverse=True)))

        def replace(m: re.Match[str]) -> str:
            found = m.group(0)
            source = next(t for t in terms if found[1:] == t[1:] and found[0].lower() == t[0].lower())
            target = terms[source]
            return target[0].upper() + target[1:] if found[0].isupper() and not source[0].isupper() else target

        return pattern.sub(replace, text)


def term_pattern(term: str) -> re.Pattern[str]:
    """A group term as a whole phrase, its first letter in either case."""
    head, rest = term[0], re.escape(term[1:])
    first = f"[{re.escape(head.lower())}{re.escape(head.upper())}]" if head.isalpha() else re.escape(head)
    return re.compile(rf"(?<!\w){first}{rest}(?!\w)")


def fill(template: str, term: str) -> str:
    text = template.replace(PLACEHOLDER, term)
    if template.startswith(PLACEHOLDER) and text:
        text = text[0].upper() + text[1:]
    return text


def _read_lines(path: str, source: str) -> tuple[dict[str, dict[str, str]], list[tuple[list[str] | None, dict]]]:
    axes: dict[str, dict[str, str]] = {}
    templates: list[tuple[list[str] | None, dict]] = []
    errors = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{source}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                errors.append(f"{where}: expected a JSON object")
                continue
            if "groups" in row:
                groups = row["groups"]
                if not isinstance(row.get("axis"), str) or not isinstance(groups, dict) or len(groups) < 2 or \
                        not all(isinstance(v, str) and v.strip() for v in groups.values()):
                    errors.append(f"{where}: an axis line needs 'axis' (a name) and 'groups' (at least two "
                                  "{group: term} entries with non-empty terms)")
                    continue
                axes[row["axis"]] = {str(k): v for k, v in groups.items()}
            elif "prompt" in row or "completion" in row:
                p, c = row.get("prompt"), row.get("completion")
                if not isinstance(p, str) or not isinstance(c, str):
                    errors.append(f"{where}: a template line needs 'prompt' and 'completion' strings")
                    continue
                if PLACEHOLDER not in p and PLACEHOLDER not in c:
                    errors.append(f"{where}: the template has no {PLACEHOLDER} to swap a group term into")
                    continue
                axis = row.get("axis")
                templates.append(([axis] if isinstance(axis, str) else axis, {"prompt": p, "completion": c}))
            else:
                errors.append(f"{where}: expected an axis line {{axis, groups}} or a template line "
                              f"{{prompt, completion}}, got keys {sorted(row)}")
    if errors:
        raise DataError(f"{source}: {len(errors)} bad line(s) in the bias set:\n  " + "\n  ".join(errors[:20]))
    return axes, templates


def load_bias_sets(spec: str = BUILTIN, require_templates: bool = True) -> list[BiasSet]:
    """The packaged sets (`builtin`), or the packaged sets extended by a user JSONL file. Axes without a
    template are left out unless `require_templates` is False (swapping terms needs no template)."""
    entry = resources.files("raylign.data") / "builtin" / "bias_counterfactuals.jsonl"
    with resources.as_file(entry) as path:
        axes, templates = _read_lines(str(path), "builtin:bias")
    if spec and spec != BUILTIN:
        if not Path(spec).expanduser().is_file():
            raise DataError(f"bias set file {spec} not found; pass a JSONL file or 'builtin'")
        user_axes, user_templates = _read_lines(str(Path(spec).expanduser()), spec)
        axes.update(user_axes)
        templates.extend(user_templates)
    sets = []
    for axis, groups in axes.items():
        rows = [t for names, t in templates if names is None or axis in names]
        if rows or not require_templates:
            sets.append(BiasSet(axis, groups, rows))
    return sets


def select_axes(sets: list[BiasSet], names: list[str] | None) -> list[BiasSet]:
    if not names:
        return sets
    known = {s.axis: s for s in sets}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"unknown bias axis {', '.join(unknown)}; axes: {', '.join(known)}")
    return [known[n] for n in names]


# ---- counterfactual copies of rows --------------------------------------------------------------


def _strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` with `fn` applied to each string in it (chat messages: their content)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: (v if k == "role" else _strings(v, fn)) for k, v in value.items()}
    return value


def _text(value: Any) -> str:
    return "\n".join(_collect(value))


def _collect(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _collect(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k != "role" for s in _collect(v)]
    return []


@dataclass(frozen=True)
class Swap:
    axis: str
    source: str  # the group the row mentions first
    target: str

    def describe(self) -> str:
        return f"{self.axis}:{self.source}->{self.target}"


def row_swaps(row: dict[str, Any], fields: list[str], sets: list[BiasSet], max_per_axis: int | None = None) -> list[Swap]:
    """The swaps of a row: for each axis whose groups it mentions, the first mentioned group with
    every other (the next `max_per_axis` in the axis's cyclic order, when given)."""
    text = "\n".join(_text(row[f]) for f in fields if row.get(f) is not None)
    swaps = []
    for s in sets:
        mentioned = s.mentioned(text)
        if not mentioned:
            continue
        names = list(s.groups)
        a = names.index(mentioned[0])
        others = [names[(a + i) % len(names)] for i in range(1, len(names))]
        swaps += [Swap(s.axis, names[a], b) for b in others[:max_per_axis]]
    return swaps


def apply_swap(row: dict[str, Any], fields: list[str], sets: list[BiasSet], swap: Swap) -> dict[str, Any]:
    """A copy of `row` with the swap applied to the given fields (others copied unchanged)."""
    bias_set = next(s for s in sets if s.axis == swap.axis)
    out = dict(row)
    for f in fields:
        if row.get(f) is not None:
            out[f] = _strings(row[f], lambda t: bias_set.swap(t, swap.source, swap.target))
    return out


def counterfactual_copies(row: dict[str, Any], fields: list[str], sets: list[BiasSet],
                          max_per_axis: int | None = None) -> list[tuple[Swap, dict[str, Any]]]:
    """Every counterfactual copy of a row (see `row_swaps`), each with its swap; none when the row
    mentions no group term."""
    return [(sw, apply_swap(row, fields, sets, sw)) for sw in row_swaps(row, fields, sets, max_per_axis)]


# ---- counterfactual copies for train.counterfactual_penalty ---------------------------------------

# Copies per pair the penalty scores (each is a chosen and a rejected sequence more in the forward
# pass): at most PENALTY_PER_AXIS per axis, PENALTY_MAX_COPIES in all.
PENALTY_PER_AXIS = 3
PENALTY_MAX_COPIES = 6
PAIR_FIELDS = ["prompt", "chosen", "rejected"]


def pair_copies_for_penalty(row: dict[str, Any], sets: list[BiasSet],
                            encode: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """The encoded counterfactual copies of a pairs row, each as `encode(copy)` = [chosen, rejected]
    sequences ({input_ids, loss_mask}); [] when the row mentions no group term."""
    copies = counterfactual_copies(row, PAIR_FIELDS, sets, PENALTY_PER_AXIS)[:PENALTY_MAX_COPIES]
    return [encode(copy) for _, copy in copies]


def collate_counterfactuals(copies: list[list[list[dict[str, Any]]]], pad_id: int) -> dict[str, np.ndarray]:
    """Per example its copies (each [chosen, rejected] of {input_ids, loss_mask}) -> right-padded
    cf_input_ids / cf_attention_mask / cf_loss_mask [B, K, 2, T'] and cf_valid [B, K], K = the most
    copies of any example (at least 1; missing copies are padding with cf_valid 0)."""
    b = len(copies)
    k = max([len(c) for c in copies] + [1])
    width = max([len(s["input_ids"]) for c in copies for pair in c for s in pair] + [1])
    ids = np.full((b, k, 2, width), pad_id, dtype=np.int64)
    attn = np.zeros((b, k, 2, width), dtype=np.int64)
    mask = np.zeros((b, k, 2, width), dtype=np.int64)
    valid = np.zeros((b, k), dtype=np.float32)
    for i, example in enumerate(copies):
        for j, pair in enumerate(example):
            valid[i, j] = 1.0
            for side, seq in enumerate(pair):
                n = len(seq["input_ids"])
                ids[i, j, side, :n] = seq["input_ids"]
                attn[i, j, side, :n] = 1
                mask[i, j, side, :n] = seq["loss_mask"]
    return {"cf_input_ids": ids, "cf_attention_mask": attn, "cf_loss_mask": mask, "cf_valid": valid}
