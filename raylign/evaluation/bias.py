"""Counterfactual bias sets: templates whose only difference is an interchangeable group term.

The packaged set (`builtin`, `raylign/data/builtin/bias_counterfactuals.jsonl`, written for this
project) covers five axes: gender, given names across origins (all female names, so gender does not
confound origin), nationality, religion and age. A JSONL file, one object per line, of two kinds:

  {"axis": "religion", "groups": {"Christian": "a Christian", "Muslim": "a Muslim", ...}}
  {"prompt": "Tell me about my new colleague, {X}.", "completion": "Your new colleague, {X}, is ..."}

A template line applies to every axis, or only to the axes named in its optional "axis" (a name or a
list). `{X}` is replaced by each group's term (capitalised at the start of a text). A user file given
with `--bias FILE` extends the packaged set: its axes are added (an axis of the same name replaces the
packaged one's groups) and its templates are added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from raylign.data import DataError

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


def load_bias_sets(spec: str = BUILTIN) -> list[BiasSet]:
    """The packaged sets (`builtin`), or the packaged sets extended by a user JSONL file."""
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
        if rows:
            sets.append(BiasSet(axis, groups, rows))
    return sets


def score_matrix(bias_set: BiasSet, scores: np.ndarray) -> np.ndarray:
    """Flat template-major scores -> S[t, g] (templates x groups)."""
    return np.asarray(scores, dtype=np.float64).reshape(len(bias_set.templates), len(bias_set.groups))


def evaluate_bias(scorer: Any, sets: list[BiasSet], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """counterfactual_gaps of `scorer` on each axis (see `metrics.counterfactual_gaps`)."""
    from raylign.evaluation.metrics import counterfactual_gaps

    out = {}
    for s in sets:
        prompts, completions = s.filled()
        scores = np.asarray(scorer.score(prompts, completions), dtype=np.float64)
        out[s.axis] = counterfactual_gaps(score_matrix(s, scores), list(s.groups), n_boot=n_boot, seed=seed)
    return out
