"""`raylign annotate make --prompts/--pairs-or-references`: a task whose answers are sampled on Ray.

  --kind pairwise --prompts P --models A[,B]
      two answers per prompt: two samples of one model, or one sample of each of two models (base vs
      aligned: `--models runs/x/final,builtin:smollm2-135m-instruct`); source_a / source_b = the model names.
  --kind human-vs-model --pairs-or-references F --model M
      the model's answer against the human-written answer to the same prompt; F is a pairs file (the
      human answer is `chosen`), or rows {prompt, reference}, {prompt, human} or {prompt, completion}
      (rows with `label: false` are skipped); sources "human" and "model".
  --kind rating --prompts P --model M [--criteria helpful,harmless,honest,natural]
      one answer per prompt, rated 1-7 on each criterion.
  --select uncertainty --reward-model R --size K [--pool N]   (pairwise, human-vs-model)
      active selection: sample N candidate pairs (default 4 K), score both answers with the reward source
      R (any `raylign.rewards` spec, scored in this process as `raylign data annotate` scores), keep the K
      pairs with the smallest |margin| = |R(a) − R(b)|: those the reward model is least sure about. When
      the file has fewer than N prompts, each prompt gives ceil(N / prompts) candidate pairs.
  --size K without --select: the first K prompts (rows).

Sampling is `raylign.pipelines.annotate.sample_on_workers`, the sampler of `raylign data annotate`:
rollout workers (`RolloutWorker`) seeded with (seed, Purpose.ANNOTATE, step, first prompt of the chunk),
step 0 for the first model and 1 for the second, so the same inputs and --seed give the same task for
any number of workers. The two samples of one model are two independent draws of its stream. An answer
that came out empty, or a pair whose two answers are the same text, gives no item (counted).
Which answer of a pair is A is drawn per item from a hash of the two texts, as for `--items` (an answer
always on one side would leave choices with one category, and α and κ at 0 however well people agree);
source_a / source_b say which is which, and the app still randomises which is shown on the left.
Item ids are `<kind>-<n>` and reveal nothing (they appear in URLs); `meta` keeps where each answer came
from: prompt_index, sample (human-vs-model: model), and with --select the scores of A and B, the
margin score_a − score_b and the pool (never shown to annotators, copied into exports).

This module sits in `raylign.annotation` and imports the Ray sampler from `raylign.pipelines.annotate`
(same layer, and `pipelines` imports nothing of `annotation`): the task format stays here, one sampler
stays there.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raylign.annotation.errors import TaskError, listing
from raylign.annotation.tasks import HUMAN, TaskItem, _assign_sides, make_items, parse_item
from raylign.config import ConfigError, RolloutConfig, validate_settings

SELECT_MODES = ("uncertainty",)
POOL_FACTOR = 4  # default --pool: this many candidates per kept pair
SCORE_CHUNK = 64


class SampledTaskSettings(BaseModel):
    """What `annotate make` needs to sample a task (module docstring; `raylign annotate make --help`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pairwise", "human-vs-model", "rating"]
    prompts: str | None = Field(None, description="prompts file (pairwise, rating) or builtin:everyday-prompts")
    references: str | None = Field(None, description="human-vs-model: rows with a human answer to each prompt")
    models: list[str] = Field(description="pairwise: one or two models; otherwise one")
    criteria: list[str] | None = Field(None, description="rating: the criteria")
    gold: str | None = Field(None, description="gold items (attention checks), as for --items")
    size: int | None = Field(None, ge=1, description="items to keep (with --select: out of the pool)")
    select: Literal["uncertainty"] | None = Field(None, description="active selection of the pairs")
    reward_model: str | None = Field(None, description="--select uncertainty: the reward source scoring the pool")
    pool: int | None = Field(None, ge=1, description="--select: candidate pairs sampled (default 4 x size)")
    seed: int = Field(0, ge=0, description="sampling seed (the task's seed too)")
    max_new_tokens: int = Field(48, description="tokens per answer")
    temperature: float = Field(1.0, description="sampling temperature")
    top_p: float = Field(1.0, description="nucleus sampling (1.0 = off)")
    workers: int = Field(1, description="rollout actors")
    cpus_per_worker: float = Field(1.0, description="CPUs per rollout actor")
    batch_size: int = Field(8, description="prompts per generate call")
    progress: bool = True
    ray_address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SampledTaskSettings:
        if self.kind == "human-vs-model":
            if self.prompts:
                raise ConfigError("--kind human-vs-model compares the model with a person's answer: give the prompts "
                                  "with their human answers as --pairs-or-references F (pairs: chosen is the human "
                                  "answer; or rows {prompt, reference}), not --prompts")
            if not self.references:
                raise ConfigError("--kind human-vs-model needs --pairs-or-references F (the human answers) and "
                                  "--model M")
        else:
            if self.references:
                raise ConfigError(f"--pairs-or-references goes with --kind human-vs-model; --kind {self.kind} samples "
                                  "from --prompts P")
            if not self.prompts:
                raise ConfigError(f"--kind {self.kind} samples answers to --prompts P (or give ready answers with "
                                  "--items F)")
        if not self.models or any(not m.strip() for m in self.models):
            raise ConfigError("give the model(s) that write the answers: --model M (pairwise: --models A or A,B)")
        if len(self.models) > (2 if self.kind == "pairwise" else 1):
            raise ConfigError("--models takes one model (two samples per prompt) or two, A,B (one answer each)"
                              if self.kind == "pairwise" else
                              f"--kind {self.kind} samples from one model; got {len(self.models)}: "
                              f"{','.join(self.models)}")
        if self.criteria is not None and self.kind != "rating":
            raise ConfigError("--criteria goes with --kind rating")
        if self.select is None:
            if self.reward_model or self.pool:
                raise ConfigError("--reward-model and --pool go with --select uncertainty")
        else:
            if self.kind == "rating":
                raise ConfigError("--select uncertainty picks pairs a reward model barely separates: use it with "
                                  "--kind pairwise or human-vs-model")
            if not self.reward_model:
                raise ConfigError("--select uncertainty needs --reward-model R (any reward source spec: a reward "
                                  "model directory, lexicon:vader, module:function) to score the candidate pairs")
            if self.size is None:
                raise ConfigError("--select uncertainty needs --size K: how many of the --pool candidates to keep")
            if self.pool is not None and self.pool < self.size:
                raise ConfigError(f"--pool ({self.pool}) must be at least --size ({self.size}): the pool is what "
                                  "the pairs are selected from")
        if self.kind == "pairwise" and len(self.models) == 1 and self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 (got {self.temperature}) for two samples of one model: "
                              "greedy decoding gives two identical answers")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker must be positive, got {self.cpus_per_worker}")
        try:
            self.sampling(1)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid sampling settings: {problems}") from None
        return self

    @property
    def pool_size(self) -> int | None:
        """Candidate pairs sampled under --select (None without)."""
        if self.select is None:
            return None
        assert self.size is not None  # checked above
        return self.pool or POOL_FACTOR * self.size

    def sampling(self, n: int) -> RolloutConfig:
        """The rollout workers' settings for `n` samples per prompt."""
        return RolloutConfig.model_validate({"batch_size": self.batch_size, "n_samples": n, "top_p": self.top_p,
                                             "max_new_tokens": self.max_new_tokens, "temperature": self.temperature})


def settings_from(values: dict[str, Any]) -> SampledTaskSettings:
    """`SampledTaskSettings` from CLI values; a bad value or combination is one `ConfigError` naming it."""
    return validate_settings(SampledTaskSettings, values)


# ---- inputs -----------------------------------------------------------------------------------------


def load_human_answers(path: str, limit: int | None = None) -> list[tuple[Any, str]]:
    """(prompt, human answer) per row of a pairs file (chosen), or of rows {prompt, reference | human |
    completion} (`label: false` rows skipped); every bad row in one `TaskError`."""
    from raylign.annotation.tasks import _prompt_from_csv, _read_rows

    if not Path(path).expanduser().exists():
        raise TaskError(f"--pairs-or-references file {path} not found")
    out: list[tuple[Any, str]] = []
    problems: list[str] = []
    for where, values in _read_rows(path):
        if limit is not None and len(out) >= limit:
            break
        row = {k: v for k, v in values.items() if v is not None}
        _prompt_from_csv(row)
        if row.get("label") is False:
            continue
        answer = next((row[k] for k in ("chosen", "reference", "human", "completion") if k in row), None)
        prompt = row.get("prompt")
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            problems.append(f"{where}: field 'prompt': missing or empty (the model answers the same prompt)")
        elif not isinstance(answer, str) or not answer.strip():
            problems.append(f"{where}: no human answer: give 'chosen' (a pairs file), 'reference', 'human' or "
                            "'completion' as non-empty text")
        else:
            out.append((prompt, answer))
    if problems:
        raise TaskError(listing(path, problems))
    if not out:
        raise TaskError(f"{path}: no rows with a human answer")
    return out


def _load_prompts(path: str, limit: int | None) -> list[Any]:
    from raylign.data import load_dataset

    return list(load_dataset(path, "prompts", limit=limit).column("prompt").to_pylist())


def _gold_items(path: str, kind: str, criteria: list[str] | None) -> list[TaskItem]:
    items = make_items(path, kind, None, criteria)
    missing = [item.item_id for item in items if not item.is_gold]
    if missing:
        raise TaskError(f"{path}: {len(missing)} row(s) of the --gold file have no known answer in field 'gold' "
                        f"(rows numbered {', '.join(m.rsplit('-', 1)[-1].lstrip('0') for m in missing[:10])})")
    return items


# ---- sampling and selection ---------------------------------------------------------------------------


def _sample(prompts: list[Any], model: str, s: SampledTaskSettings, n: int, step: int, what: str) -> list[list[str]]:
    """n texts per prompt from `model` (the shared annotation sampler), in prompt order."""
    from raylign.pipelines.annotate import sample_on_workers

    got: dict[int, list[list[str]]] = {}

    def keep(first: int, _prompts: list[Any], samples: list[list[str]]) -> None:
        got[first] = samples

    sample_on_workers(prompts, model, s.sampling(n), seed=s.seed, step=step, on_chunk=keep, workers=s.workers,
                      cpus_per_worker=s.cpus_per_worker, ray_address=s.ray_address, progress=s.progress,
                      desc=f"sampling {what}")
    return [texts for first in sorted(got) for texts in got[first]]


def _scores(source: Any, prompts: list[Any], texts: list[str], progress: bool) -> list[float]:
    from tqdm.auto import tqdm

    from raylign.rewards import as_scores

    out: list[float] = []
    with tqdm(total=len(texts), desc=f"scoring with {source.name}", unit="text", disable=not progress) as bar:
        for i in range(0, len(texts), SCORE_CHUNK):
            part = texts[i : i + SCORE_CHUNK]
            out += [float(v) for v in as_scores(source.score(prompts[i : i + SCORE_CHUNK], part), len(part),
                                                source.name, finite=True)]
            bar.update(len(part))
    return out


def _score_round(value: float) -> float:
    """The shortest text that round-trips a float32 score (as `raylign data annotate` writes them)."""
    import numpy as np

    return float(str(np.float32(value)))


def sample_task_items(s: SampledTaskSettings, console: Any = None) -> tuple[list[TaskItem], dict[str, Any]]:
    """The task's items (gold first, then the sampled ones) and a summary {prompts, candidates, items, gold,
    skipped {empty, identical}, pool, margin_kept, margin_pool, seconds}. Everything a user can get wrong
    (files, models, the reward spec, gold rows) fails before any actor starts."""
    from rich.console import Console

    from raylign.evaluation.scorers import resolve_model_or_run
    from raylign.models import resolve_model_path
    from raylign.rewards import build_reward_source

    console = console or Console()
    start = time.perf_counter()
    pool = s.pool_size
    wanted = pool if pool is not None else s.size
    # Read enough rows for `wanted` candidates (all of a short file; the pool repeats them then).
    humans: list[str | None]
    if s.kind == "human-vs-model":
        assert s.references is not None
        answered = load_human_answers(s.references, limit=wanted)
        prompts, humans = [p for p, _ in answered], [h for _, h in answered]
    else:
        assert s.prompts is not None
        prompts = _load_prompts(s.prompts, wanted)
        humans = [None] * len(prompts)
    if not prompts:
        raise TaskError(f"{s.prompts or s.references}: no rows")
    gold = _gold_items(s.gold, s.kind, s.criteria) if s.gold else []
    scorer = build_reward_source(s.reward_model) if s.reward_model else None
    paths = [resolve_model_or_run(m.strip())[0] for m in s.models]
    for path in paths:
        resolve_model_path(path)  # builds a tiny:/builtin: model once here, not in every actor

    # k candidate pairs per prompt: 1, or under --select enough for the pool from a short file.
    per_prompt = 1 if pool is None else math.ceil(pool / len(prompts))
    if pool is not None:
        prompts, humans = prompts[: math.ceil(pool / per_prompt)], humans[: math.ceil(pool / per_prompt)]
    names = [m.strip() for m in s.models]
    console.print(f"annotate make: {len(prompts)} prompts x {per_prompt} {s.kind} candidate(s) from "
                  f"{' vs '.join(names)}" + (f", {pool} scored by {scorer.name} (keep {s.size})" if scorer else ""))

    # candidates: (prompt index, sample, prompt, answer a, answer b | None, source a, source b | None)
    candidates: list[tuple[int, int, Any, str, str | None, str, str | None]] = []
    if s.kind == "pairwise" and len(paths) == 1:
        texts = _sample(prompts, paths[0], s, 2 * per_prompt, step=0, what=f"2 answers/prompt from {names[0]}")
        candidates = [(i, j, p, t[2 * j], t[2 * j + 1], names[0], names[0])
                      for i, (p, t) in enumerate(zip(prompts, texts, strict=True)) for j in range(per_prompt)]
    elif s.kind == "pairwise":
        from_a = _sample(prompts, paths[0], s, per_prompt, step=0, what=f"answers from {names[0]}")
        from_b = _sample(prompts, paths[1], s, per_prompt, step=1, what=f"answers from {names[1]}")
        candidates = [(i, j, p, ta[j], tb[j], names[0], names[1]) for i, (p, ta, tb)
                      in enumerate(zip(prompts, from_a, from_b, strict=True)) for j in range(per_prompt)]
    elif s.kind == "human-vs-model":
        texts = _sample(prompts, paths[0], s, per_prompt, step=0, what=f"answers from {names[0]}")
        candidates = [(i, j, p, str(h), t[j], HUMAN, "model")
                      for i, (p, h, t) in enumerate(zip(prompts, humans, texts, strict=True)) for j in range(per_prompt)]
    else:
        texts = _sample(prompts, paths[0], s, 1, step=0, what=f"answers from {names[0]}")
        candidates = [(i, 0, p, t[0], None, names[0], None) for i, (p, t) in enumerate(zip(prompts, texts, strict=True))]
    if pool is not None:
        candidates = candidates[:pool]
    n_candidates = len(candidates)

    skipped = {"empty": 0, "identical": 0}
    usable = []
    for c in candidates:
        a, b = c[3], c[4]
        if not a.strip() or (b is not None and not b.strip()):
            skipped["empty"] += 1
        elif b is not None and a.strip() == b.strip():
            skipped["identical"] += 1
        elif b is None:
            usable.append(c)
        else:  # which answer is A is drawn per item, as `annotate make --items` draws it
            sides: dict[str, Any] = {}
            _assign_sides(sides, (a, c[5]), (b, str(c[6])))
            usable.append((*c[:3], sides["response_a"], sides["response_b"], sides["source_a"], sides["source_b"]))

    margins: list[float] = []
    scores: list[tuple[float, float]] = []
    margin_pool = margin_kept = None
    keep = list(range(len(usable)))[: s.size]
    if scorer is not None and usable:
        flat_prompts = [c[2] for c in usable] * 2
        flat = [c[3] for c in usable] + [str(c[4]) for c in usable]
        values = _scores(scorer, flat_prompts, flat, s.progress)
        half = len(usable)
        scores = [(_score_round(values[i]), _score_round(values[half + i])) for i in range(half)]
        margins = [sa - sb for sa, sb in scores]
        keep = sorted(sorted(range(half), key=lambda i: (abs(margins[i]), i))[: s.size])
        margin_pool = sum(abs(m) for m in margins) / half
        margin_kept = sum(abs(margins[i]) for i in keep) / len(keep)

    items: list[TaskItem] = list(gold)
    problems: list[str] = []
    for number, i in enumerate(keep, start=len(gold) + 1):
        index, sample, prompt, a, b, source_a, source_b = usable[i]
        meta: dict[str, Any] = {"prompt_index": index, "sample": sample}
        if s.kind == "human-vs-model":
            meta["model"] = names[0]
        if scorer is not None:
            meta |= {"selection": "uncertainty", "reward_model": scorer.name, "score_a": scores[i][0],
                     "score_b": scores[i][1], "margin": margins[i], "pool": n_candidates}
        row: dict[str, Any] = {"item_id": f"{s.kind}-{number:05d}", "kind": s.kind, "prompt": prompt,
                               "response_a": a, "source_a": source_a, "meta": meta}
        if b is not None:
            row |= {"response_b": b, "source_b": source_b}
        if s.criteria:
            row["criteria"] = list(s.criteria)
        item, bad = parse_item(row, f"sampled item {number}")
        problems += bad
        if item is not None:
            items.append(item)
    ids = [item.item_id for item in items]
    if len(set(ids)) != len(ids):
        taken = sorted({i for i in ids if ids.count(i) > 1})
        problems.append(f"--gold item ids {', '.join(taken[:5])} are also sampled items' ids; give the gold rows "
                        "other item_ids (or none)")
    if problems:
        raise TaskError(listing("annotate make", problems))
    if len(items) == len(gold):
        raise TaskError(f"sampling {n_candidates} candidate(s) gave no usable item ({skipped['empty']} with an empty "
                        f"answer, {skipped['identical']} with two identical answers); nothing was written. Raise "
                        "--max-new-tokens or --temperature, or use another model")
    summary = {"prompts": len(prompts), "candidates": n_candidates, "items": len(items) - len(gold),
               "gold": len(gold), "skipped": skipped, "pool": pool, "selected": s.select,
               "margin_pool": margin_pool, "margin_kept": margin_kept, "models": names,
               "seconds": time.perf_counter() - start}
    return items, summary
