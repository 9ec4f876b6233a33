"""Multi-task driver loop (`raylign train multitask`): one shared backbone, tasks listed in
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

import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from raylign.algorithms.task_weighting import priority_active, relative_improvement
from raylign.config import ConfigError, RunConfig, TaskConfig
from raylign.pipelines.offline import (
    _add,
    _attach_reference_logps,
    collate,
    encode_pair_rows,
    encode_sft_rows,
    step_indices,
    summarize_sums,
)
from raylign.rundir import RunDir, RunResult
from raylign.runtime import init_ray
from raylign.workers.group import WorkerGroup, shard_batch
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


def summarize_task(task: TaskConfig, sums: dict[str, float], prefix: str) -> dict[str, float]:
    """Summed learner metrics of one task -> means named `<prefix>/loss`, `/accuracy`, `/pearson`."""
    if task.type == "imitation":
        nll = sums["nll_sum"] / max(sums["tokens"], 1.0)
        return {f"{prefix}/loss": nll, f"{prefix}/ppl": math.exp(min(nll, 50.0))}
    if task.type == "preference":
        return summarize_sums("dpo", sums, prefix)
    n = max(sums["examples"], 1.0)
    out = {f"{prefix}/loss": sums["loss_sum"] / n}
    if "correct" in sums:
        out[f"{prefix}/accuracy"] = sums["correct"] / n
    else:
        cov = sums["cross"] / n - (sums["pred_sum"] / n) * (sums["target_sum"] / n)
        var_p = sums["pred_sq"] / n - (sums["pred_sum"] / n) ** 2
        var_t = sums["target_sq"] / n - (sums["target_sum"] / n) ** 2
        out[f"{prefix}/pearson"] = cov / math.sqrt(var_p * var_t) if var_p > 1e-12 and var_t > 1e-12 else 0.0
    return out


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
        train_table, val_table = load_split(task.data)
        encode = {"imitation": lambda rows, c=cfg, k=task.data.kind: encode_sft_rows(rows, k, tokenizer, c),
                  "preference": lambda rows, c=cfg: encode_pair_rows(rows, "pairs", tokenizer, c),
                  "rating": lambda rows, c=cfg: encode_rating_rows(rows, tokenizer, c)}[task.type]
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


def _evaluate(group: WorkerGroup, data: list[_TaskData], pad_id: int, micro: int) -> dict[str, float]:
    out: dict[str, float] = {}
    chunk = micro * len(group)
    for td in data:
        if not td.val:
            continue
        totals: dict[str, float] = {}
        for i in range(0, len(td.val), chunk):
            for part in group.call_sharded_dict("multitask_eval_step", {td.name: collate(td.val[i : i + chunk], pad_id)}):
                _add(totals, part[td.name])
        out.update(summarize_task(td.task, totals, f"eval/{td.name}"))
    return out


class _Group(WorkerGroup):
    def call_sharded_dict(self, method: str, batches: dict[str, dict[str, np.ndarray]], *args: Any) -> list[Any]:
        """Shard every task's batch across the actors; each gets {task: its shard}."""
        import ray

        shards = {name: shard_batch(b, len(self.workers)) for name, b in batches.items()}
        refs = [getattr(w, method).remote({name: s[r] for name, s in shards.items()}, *args)
                for r, w in enumerate(self.workers)]
        return ray.get(refs)


def multitask_score(start: dict[str, float], now: dict[str, float], names: list[str]) -> float | None:
    """Mean relative improvement of the tasks' validation losses since step 0 (higher is better)."""
    keys = [f"eval/{n}/loss" for n in names if f"eval/{n}/loss" in start and f"eval/{n}/loss" in now]
    if not keys:
        return None
    return float(np.mean([relative_improvement(start[k], now[k]) for k in keys]))


def run_multitask(config: RunConfig, resume: bool = False, console: Console | None = None,
                  on_step: Callable[[int, dict[str, Any]], None] | None = None) -> RunResult:
    from raylign.models import load_tokenizer

    console = console or Console()
    check_multitask_config(config)
    tokenizer = load_tokenizer(config.model.path)
    data, rating_stats = _load_tasks(config, tokenizer, console)
    t, m = config.train, config.multitask
    learners = config.resources.learners
    longest = max(len(td.train) // td.batch_size for td in data)
    total_steps = t.max_steps or t.epochs * longest
    pad_id = tokenizer.pad_token_id
    names = [td.name for td in data]

    run = RunDir(config, resume=resume)
    desc = ", ".join(f"{td.name}={td.task.type}:{len(td.train)}/{len(td.val)}x{td.batch_size}" for td in data)
    console.print(f"[bold]multitask[/bold] ({m.weighting}) {run.path}  ·  {desc}  ·  {total_steps} steps  ·  "
                  f"{learners} learner(s)")
    try:
        init_ray(config.resources.ray_address)
        group = _Group(MultiTaskLearner, learners, config.resources.cpus_per_learner,
                       config.resources.gpus_per_learner, name="multitask-learners",
                       init_kwargs={"config": config.model_dump()})
    except BaseException:
        run.close()
        raise
    try:
        addr, port = group.call("master_address")[0]
        group.call("setup_distributed", addr, port)
        group.call("setup_optimizer", total_steps)
        group.call("set_rating_stats", rating_stats)
        pref = [td for td in data if td.task.type == "preference" and td.task.loss in REFERENCE_LOSSES]
        if pref and config.preference.precompute_ref_logps:
            splits = {f"{td.name}/{part}": rows for td in pref for part, rows in (("train", td.train), ("val", td.val))}
            _attach_reference_logps(group, run, splits, pad_id, t.micro_batch_size, console, config.progress)
        start, start_eval = 0, {}
        smoothed: dict[str, dict[str, float]] = {}
        if resume:
            ckpt = run.latest_checkpoint()
            if ckpt is not None:
                group.call("load_checkpoint", str(ckpt))
                state = json.loads((ckpt / "trainer_state.json").read_text())
                start, start_eval, smoothed = state["step"], state["start_eval"], state["smoothed"]
                run.truncate_logs_after(start)
                console.print(f"resumed from {ckpt} at step {start}")
        if start == 0:
            start_eval = _evaluate(group, data, pad_id, t.micro_batch_size)
            if start_eval:
                run.log_metrics(0, {**start_eval, "eval/multitask_score": 0.0})
        metrics: dict[str, Any] = {}
        task_cfgs = {td.name: td.task for td in data}
        priorities = [td.task.priority for td in data]
        bar = tqdm(range(start, total_steps), desc="multitask", disable=not config.progress, initial=start,
                   total=total_steps, unit="step")
        for step in bar:
            t0 = time.perf_counter()
            active = priority_active(priorities, gates_hold(task_cfgs, smoothed))
            batches, units = {}, {}
            for k, (td, on) in enumerate(zip(data, active, strict=True)):
                if not on:
                    continue
                idx = step_indices(len(td.train), td.batch_size, config.seed + 1000 * k, step)
                batches[td.name] = collate([td.train[i] for i in idx], pad_id)
                units[td.name] = (float(batches[td.name]["loss_mask"][:, 1:].sum()) if td.task.type == "imitation"
                                  else float(len(idx)))
            parts = group.call_sharded_dict("multitask_train_step", batches, units,
                                            dict(zip(names, active, strict=True)))
            seconds = time.perf_counter() - t0
            info = parts[0]["info"]
            metrics = {"train/grad_norm": info["grad_norm"], "train/lr": info["lr"], "perf/step_seconds": seconds}
            for td, on in zip(data, active, strict=True):
                metrics[f"train/{td.name}/weight"] = info[f"{td.name}/weight"]
                metrics[f"train/{td.name}/active"] = float(on)
                if not on:
                    continue
                totals: dict[str, float] = {}
                for p in parts:
                    _add(totals, p["sums"][td.name])
                task_metrics = summarize_task(td.task, totals, f"train/{td.name}")
                metrics.update(task_metrics)
                metrics[f"train/{td.name}/grad_norm"] = info[f"{td.name}/grad_norm"]
                ema = smoothed.setdefault(td.name, {})
                for key, value in task_metrics.items():
                    short = key.rsplit("/", 1)[1]
                    ema[short] = value if short not in ema else m.gate_smoothing * ema[short] + (
                        1 - m.gate_smoothing) * value
            metrics.update({f"train/grad_cos/{k}": v for k, v in info.items() if "~" in k})
            done = step + 1
            if (t.eval_every and done % t.eval_every == 0) or done == total_steps:
                metrics.update(_evaluate(group, data, pad_id, t.micro_batch_size))
                score = multitask_score(start_eval, metrics, names)
                if score is not None:
                    metrics["eval/multitask_score"] = score
            if done % t.log_every == 0 or done == total_steps:
                run.log_metrics(done, metrics)
            bar.set_postfix({td.name: f"{metrics.get(f'train/{td.name}/loss', float('nan')):.3f}" for td in data})
            if config.output.save_every and done % config.output.save_every == 0 and done < total_steps:
                tmp = run.begin_checkpoint(done)
                group.call("save_checkpoint", str(tmp))
                (tmp / "trainer_state.json").write_text(json.dumps(
                    {"step": done, "start_eval": start_eval, "smoothed": smoothed}))
                run.commit_checkpoint(done, tmp)
            if on_step is not None:
                on_step(done, metrics)
        group.call("save_final", str(run.final))
        final = {k: v for k, v in metrics.items()
                 if k.startswith("eval/") and (k.endswith("/loss") or k == "eval/multitask_score")}
        final.update({f"{k} (start)": v for k, v in start_eval.items() if k.endswith("/loss")})
        return RunResult(str(run.path), total_steps, final)
    finally:
        run.close()
        group.call("shutdown")
        group.shutdown()
