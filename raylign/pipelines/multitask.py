"""Multi-task training on the loop skeleton (`raylign train multitask`): one shared backbone, tasks listed in
`multitask.tasks`, joint loss L = Σ λ_i L_i combined by `multitask.weighting`.

Each step draws a batch from every active task (task i gets train.batch_size · ratio_i / Σ ratio
examples), shards each across the `MultiTaskLearner` group and takes one optimizer step. Priority
gates (`priority`, `gate`) switch lower-priority tasks off while a higher-priority task's smoothed
train metric misses its gate. Logged per task: train/<task>/loss (+ accuracy, pearson), the weight,
the gradient norm, the cosine between every two tasks' gradients (train/grad_cos/<a>~<b>; negative =
conflict); at eval: eval/<task>/loss (+ accuracy, pearson) and eval/multitask_score, the mean
relative improvement of the tasks' validation losses since step 0 (the sweep objective).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from raylign.algorithms.task_weighting import priority_active, relative_improvement
from raylign.config import ConfigError, RunConfig, TaskConfig
from raylign.data.batches import add_sums, summarize_task
from raylign.pipelines.loop import Algorithm, LearnerSlot, OnStep, PhaseTimer, run_loop, step_indices
from raylign.pipelines.offline import (
    attach_reference_logps,
    collate,
    encode_pair_rows,
    encode_sft_rows,
    reference_identity,
)
from raylign.rundir import RunDir, RunResult
from raylign.workers.group import WorkerGroup
from raylign.workers.multitask import REFERENCE_LOSSES, MultiTaskLearner

MULTITASK_ALGORITHMS = ("multitask",)


def encode_rating_rows(rows: list[dict[str, Any]], tokenizer, config: RunConfig) -> list[dict]:
    """Ratings rows ({text} or {prompt, completion}) -> ids with the raw rating attached."""
    from raylign.data import tokenize_example, tokenize_prompt_completion

    d = config.data
    out = []
    for row in rows:
        if row.get("text") is not None:
            enc = tokenize_prompt_completion(tokenizer, "", row["text"], d.max_prompt_length, d.max_length)
        else:
            enc = tokenize_example(tokenizer, row["prompt"], row["completion"], d.max_prompt_length,
                                   d.max_length, d.apply_chat_template)
        enc["rating"] = float(row["rating"])
        out.append(enc)
    return out


def task_batch_sizes(tasks: dict[str, TaskConfig], batch_size: int, learners: int) -> dict[str, int]:
    """Examples per step of each task: train.batch_size split by the sampling ratios, each at least
    one per learner."""
    total = sum(t.ratio for t in tasks.values())
    return {name: max(learners, round(batch_size * t.ratio / total)) for name, t in tasks.items()}


def gates_hold(tasks: dict[str, TaskConfig], smoothed: dict[str, dict[str, float]]) -> list[bool]:
    """Whether each task's gate holds on its smoothed train metrics. No gate: holds; a gate whose
    metric has no value yet (the task has not trained) does not."""
    ops = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__}
    out = []
    for name, task in tasks.items():
        parts = task.gate_parts()
        value = smoothed.get(name, {}).get(parts[0]) if parts else None
        out.append(parts is None or (value is not None and ops[parts[1]](float(value), parts[2])))
    return out


class _TaskData:
    def __init__(self, name: str, task: TaskConfig, train: list[dict], val: list[dict], batch_size: int):
        self.name, self.task, self.train, self.val, self.batch_size = name, task, train, val, batch_size


def _load_tasks(config: RunConfig, tokenizer, console: Console) -> tuple[list[_TaskData], dict[str, tuple]]:
    from raylign.data import load_split

    tasks = config.multitask.tasks
    sizes = task_batch_sizes(tasks, config.train.batch_size, config.resources.learners)
    out, stats = [], {}
    for name, task in tasks.items():
        cfg = config.model_copy(update={"data": task.data})
        train_table, val_table = load_split(task.data, algorithm="multitask", task=task.type)
        encoders: dict[str, Callable[..., list[dict]]] = {  # each called with the rows alone
            "imitation": lambda rows, c=cfg, k=task.data.kind: encode_sft_rows(rows, k, tokenizer, c),
            "preference": lambda rows, c=cfg: encode_pair_rows(rows, "pairs", tokenizer, c),
            "rating": lambda rows, c=cfg: encode_rating_rows(rows, tokenizer, c)}
        encode = encoders[task.type]
        train = encode(train_table.to_pylist())
        val = encode(val_table.to_pylist()) if val_table is not None and len(val_table) else []
        if len(train) < sizes[name]:
            raise ConfigError(f"task '{name}' ({task.data.train}): {len(train)} training examples, fewer than "
                              f"its {sizes[name]} per step (train.batch_size x its ratio share)")
        if task.type == "rating" and task.head == "regression":
            ratings = np.array([e["rating"] for e in train])
            mean, std = float(ratings.mean()), float(ratings.std()) or 1.0
            stats[name] = (mean, std)
            for e in train + val:  # the head regresses standardised ratings
                e["rating"] = (e["rating"] - mean) / std
        elif task.type == "rating":
            assert task.num_classes is not None, "TaskConfig requires num_classes for a classification head"
            bad = [e["rating"] for e in train + val if e["rating"] != int(e["rating"])
                   or not 0 <= e["rating"] < task.num_classes]
            if bad:
                raise ConfigError(f"task '{name}': a classification head needs ratings 0..{task.num_classes - 1}, "
                                  f"found {bad[0]!r}")
        out.append(_TaskData(name, task, train, val, sizes[name]))
    return out, stats


def check_multitask_config(config: RunConfig) -> None:
    tasks = config.multitask.tasks
    if not tasks:
        raise ConfigError("multitask: list at least one task under multitask.tasks "
                          "(see `raylign recipes show multitask`)")
    if "/" in "".join(tasks) or "~" in "".join(tasks):
        raise ConfigError("multitask.tasks: task names may not contain '/' or '~'")
    if config.train.batch_size < config.resources.learners:
        raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be >= resources.learners "
                          f"({config.resources.learners})")


def multitask_score(start: dict[str, float], now: dict[str, float], names: list[str]) -> float | None:
    """Mean relative improvement of the tasks' validation losses since step 0 (higher is better)."""
    keys = [f"eval/{n}/loss" for n in names if f"eval/{n}/loss" in start and f"eval/{n}/loss" in now]
    if not keys:
        return None
    return float(np.mean([relative_improvement(start[k], now[k]) for k in keys]))


class MultiTaskTraining(Algorithm):
    """One `MultiTaskLearner` group; each step a batch from every task whose priority gate is open."""

    name = "multitask"

    def __init__(self, config: RunConfig, console: Console, data: list[_TaskData],
                 rating_stats: dict[str, tuple[float, float]], pad_id: int):
        super().__init__(config, console)
        t = config.train
        self.data, self.rating_stats, self.pad_id = data, rating_stats, pad_id
        self.names = [td.name for td in data]
        self.total_steps = t.max_steps or t.epochs * max(len(td.train) // td.batch_size for td in data)
        self.start_eval: dict[str, float] = {}
        self.smoothed: dict[str, dict[str, float]] = {}  # EMA of each task's train metrics (the gates')
        self.group: WorkerGroup | None = None

    @property
    def learner_group(self) -> WorkerGroup:
        assert self.group is not None, "start() first"
        return self.group

    def describe(self, run: RunDir) -> str:
        desc = ", ".join(f"{td.name}={td.task.type}:{len(td.train)}/{len(td.val)}x{td.batch_size}" for td in self.data)
        return (f"[bold]multitask[/bold] ({self.config.multitask.weighting}) {run.path}  ·  {desc}  ·  "
                f"{self.total_steps} steps  ·  {self.config.resources.learners} learner(s)")

    def start(self, run: RunDir) -> None:
        r = self.config.resources
        self.group = WorkerGroup(MultiTaskLearner, r.learners, r.cpus_per_learner, r.gpus_per_learner,
                                 name="multitask-learners", init_kwargs={"config": self.config},
                                 actor_name_prefix=f"{run.actor_prefix}-learner", call_timeout_s=r.call_timeout_s,
                                 placement=r.learner_placement)
        self.learners = [LearnerSlot(self.group)]

    def prepare(self, run: RunDir) -> None:
        self.learner_group.call("set_rating_stats", self.rating_stats)
        pref = [td for td in self.data if td.task.type == "preference" and td.task.loss in REFERENCE_LOSSES]
        if pref and self.config.preference.precompute_ref_logps:
            splits = {f"{td.name}/{part}": rows for td in pref for part, rows in (("train", td.train), ("val", td.val))}
            attach_reference_logps(self.learner_group, run, splits, self.pad_id, self.config.train.micro_batch_size,
                                   self.console, self.config.progress, reference=reference_identity(self.config))

    def load_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        self.start_eval, self.smoothed = state["start_eval"], state["smoothed"]

    def begin(self, run: RunDir, start: int, checkpoint: Path | None) -> None:
        if start == 0:
            self.start_eval = self._evaluate()
            if self.start_eval:
                run.log_metrics(0, {**self.start_eval, "eval/multitask_score": 0.0})

    def step(self, step: int, timer: PhaseTimer) -> dict[str, Any]:
        m = self.config.multitask
        with timer.phase("train"):
            task_cfgs = {td.name: td.task for td in self.data}
            active = priority_active([td.task.priority for td in self.data], gates_hold(task_cfgs, self.smoothed))
            batches, units = {}, {}
            for k, (td, on) in enumerate(zip(self.data, active, strict=True)):
                if not on:
                    continue
                idx = step_indices(len(td.train), td.batch_size, self.config.seed, step, stream=k)
                batches[td.name] = collate([td.train[i] for i in idx], self.pad_id)
                units[td.name] = (float(batches[td.name]["loss_mask"][:, 1:].sum()) if td.task.type == "imitation"
                                  else float(len(idx)))
            parts = self.learner_group.call_sharded_dict("multitask_train_step", batches, units,
                                                         dict(zip(self.names, active, strict=True)))
        info = parts[0]["info"]
        metrics: dict[str, Any] = {"train/grad_norm": info["grad_norm"], "train/lr": info["lr"],
                                   "train/skipped_steps": info["skipped_step"]}
        for td, on in zip(self.data, active, strict=True):
            metrics[f"train/{td.name}/weight"] = info[f"{td.name}/weight"]
            metrics[f"train/{td.name}/active"] = float(on)
            if not on:
                continue
            totals: dict[str, float] = {}
            for p in parts:
                add_sums(totals, p["sums"][td.name])
            task_metrics = summarize_task(td.task.type, totals, f"train/{td.name}")
            metrics.update(task_metrics)
            metrics[f"train/{td.name}/grad_norm"] = info[f"{td.name}/grad_norm"]
            ema = self.smoothed.setdefault(td.name, {})
            for key, value in task_metrics.items():
                short = key.rsplit("/", 1)[1]
                ema[short] = value if short not in ema else m.gate_smoothing * ema[short] + (
                    1 - m.gate_smoothing) * value
        metrics.update({f"train/grad_cos/{k}": v for k, v in info.items() if "~" in k})
        return metrics

    def eval_due(self, done: int) -> bool:
        return super().eval_due(done) or done == self.total_steps

    def evaluate(self, done: int) -> dict[str, Any]:
        metrics: dict[str, Any] = self._evaluate()
        score = multitask_score(self.start_eval, metrics, self.names)
        if score is not None:
            metrics["eval/multitask_score"] = score
        return metrics

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {td.name: f"{metrics.get(f'train/{td.name}/loss', float('nan')):.3f}" for td in self.data}

    def save_state(self, checkpoint: Path) -> dict[str, Any]:
        return {"start_eval": self.start_eval, "smoothed": self.smoothed}

    def finish(self, run: RunDir, metrics: dict[str, Any]) -> dict[str, Any]:
        final = {k: v for k, v in metrics.items()
                 if k.startswith("eval/") and (k.endswith("/loss") or k == "eval/multitask_score")}
        final.update({f"{k} (start)": v for k, v in self.start_eval.items() if k.endswith("/loss")})
        return final

    def _evaluate(self) -> dict[str, float]:
        out: dict[str, float] = {}
        chunk = self.config.train.micro_batch_size * len(self.learner_group)
        for td in self.data:
            if not td.val:
                continue
            totals: dict[str, float] = {}
            for i in range(0, len(td.val), chunk):
                batch = {td.name: collate(td.val[i : i + chunk], self.pad_id)}
                for part in self.learner_group.call_sharded_dict("multitask_eval_step", batch):
                    add_sums(totals, part[td.name])
            out.update(summarize_task(td.task.type, totals, f"eval/{td.name}"))
        return out


def run_multitask(config: RunConfig, resume: bool = False, console: Console | None = None,
                  on_step: OnStep | None = None, resume_force: bool = False) -> RunResult:
    from raylign.models import load_tokenizer

    console = console or Console()
    check_multitask_config(config)
    tokenizer = load_tokenizer(config.model.path)
    data, rating_stats = _load_tasks(config, tokenizer, console)
    algorithm = MultiTaskTraining(config, console, data, rating_stats, tokenizer.pad_token_id)
    return run_loop(config, algorithm, resume=resume, resume_force=resume_force, on_step=on_step)
