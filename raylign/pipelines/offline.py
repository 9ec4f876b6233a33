"""Offline driver loop: batches from a dataset, sharded over the learner group, one step at a time.

The driver holds no model: it tokenizes, batches, asks the learners to step, logs, checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from raylign.config import ConfigError, RunConfig
from raylign.pipelines.run_dir import RunDir
from raylign.workers.group import WorkerGroup, init_ray
from raylign.workers.learner import LearnerWorker
from raylign.workers.objectives import count_units


@dataclass
class RunResult:
    run_dir: str
    steps: int
    final_metrics: dict[str, Any] = field(default_factory=dict)

    def summary_line(self) -> str:
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.final_metrics.items()
        )
        return f"done: {self.steps} steps -> {self.run_dir}/final  ({shown})"


# ---- encoding ------------------------------------------------------------------------------------


def encode_sft_rows(rows: list[dict[str, Any]], kind: str, tokenizer, config: RunConfig) -> list[dict]:
    """Rows -> token ids + loss mask. Prompted kinds train on the completion only (assistant turn)."""
    from raylign.data import tokenize_example, tokenize_prompt_completion

    d = config.data
    encoded = []
    for row in rows:
        if kind == "text":
            # Plain human text: every token is a target, the sequence ends with EOS.
            text = row["text"] + (tokenizer.eos_token or "")
            encoded.append(tokenize_prompt_completion(tokenizer, "", text, d.max_prompt_length, d.max_length))
            continue
        if kind == "pairs":
            completion = row["chosen"]
        elif kind == "unpaired":
            if not row["label"]:
                continue  # SFT imitates only the desirable completions
            completion = row["completion"]
        else:
            raise ConfigError(f"sft trains on data.kind text, pairs or unpaired, not '{kind}'")
        encoded.append(tokenize_example(
            tokenizer, row["prompt"], completion, d.max_prompt_length, d.max_length, d.apply_chat_template))
    return encoded


def collate(encoded: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    from raylign.data import collate_right_pad

    batch = collate_right_pad(encoded, pad_id)
    return {k: np.asarray(v) for k, v in batch.items()}


# ---- the loop ------------------------------------------------------------------------------------


def step_indices(n_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of global step `step`: a fresh seeded permutation each epoch, incomplete batches dropped.

    Pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
    """
    per_epoch = n_rows // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return order[offset * batch_size : (offset + 1) * batch_size]


def _evaluate(group: WorkerGroup, val: list[dict], pad_id: int, micro: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    chunk = micro * len(group)
    for i in range(0, len(val), chunk):
        batch = collate(val[i : i + chunk], pad_id)
        for sums in group.call_sharded("eval_step", batch):
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
    if not totals:
        return {}
    nll = totals["nll_sum"] / max(totals["tokens"], 1.0)
    return {"eval/nll": nll, "eval/ppl": math.exp(min(nll, 50.0))}


def run_sft(config: RunConfig, resume: bool = False, console: Console | None = None) -> RunResult:
    from raylign.data import load_split
    from raylign.models import load_tokenizer

    console = console or Console()
    # Everything a user can get wrong is checked before Ray or any actor starts.
    tokenizer = load_tokenizer(config.model.path)
    train_table, val_table = load_split(config.data)
    train = encode_sft_rows(train_table.to_pylist(), config.data.kind, tokenizer, config)
    val = encode_sft_rows(val_table.to_pylist(), config.data.kind, tokenizer, config) if val_table else []
    t = config.train
    learners = config.resources.learners
    if t.batch_size < learners:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be >= resources.learners ({learners})")
    if len(train) < t.batch_size:
        raise ConfigError(
            f"{config.data.train}: {len(train)} training examples, fewer than train.batch_size={t.batch_size}"
        )
    total_steps = t.max_steps or t.epochs * (len(train) // t.batch_size)
    pad_id = tokenizer.pad_token_id

    run = RunDir(config, resume=resume)
    console.print(f"[bold]run[/bold] {run.path}  ·  {len(train)} train / {len(val)} val examples  ·  "
                  f"{total_steps} steps  ·  {learners} learner(s)")
    init_ray(config.resources.ray_address)
    group = WorkerGroup(
        LearnerWorker, learners, config.resources.cpus_per_learner, config.resources.gpus_per_learner,
        name="learners", init_kwargs={"config": config.model_dump(), "objective": "sft"},
    )
    try:
        addr, port = group.call("master_address")[0]
        group.call("setup_distributed", addr, port)
        group.call("setup_optimizer", total_steps)
        start = 0
        if resume:
            ckpt = run.latest_checkpoint()
            if ckpt is not None:
                group.call("load_checkpoint", str(ckpt))
                start = json.loads((ckpt / "trainer_state.json").read_text())["step"]
                run.truncate_logs_after(start)
                console.print(f"resumed from {ckpt} at step {start}")
        metrics: dict[str, Any] = {}
        if start == 0 and t.eval_every and val:
            run.log_metrics(0, _evaluate(group, val, pad_id, t.micro_batch_size))
        bar = tqdm(range(start, total_steps), desc="sft", disable=not config.progress, initial=start,
                   total=total_steps, unit="step")
        for step in bar:
            t0 = time.perf_counter()
            idx = step_indices(len(train), t.batch_size, config.seed, step)
            batch = collate([train[i] for i in idx], pad_id)
            units = count_units("sft", batch)
            shards = group.call_sharded("train_step", batch, global_units=units)
            seconds = time.perf_counter() - t0
            nll = sum(s["nll_sum"] for s in shards) / max(units, 1.0)
            metrics = {
                "train/loss": nll, "train/grad_norm": shards[0]["grad_norm"], "train/lr": shards[0]["lr"],
                "train/tokens": units, "perf/step_seconds": seconds,
                "perf/tokens_per_second": float(batch["attention_mask"].sum()) / seconds,
            }
            done = step + 1
            if t.eval_every and done % t.eval_every == 0 and val:
                metrics.update(_evaluate(group, val, pad_id, t.micro_batch_size))
            if done % t.log_every == 0 or done == total_steps:
                run.log_metrics(done, metrics)
            bar.set_postfix(loss=f"{nll:.3f}")
            if config.output.save_every and done % config.output.save_every == 0 and done < total_steps:
                _checkpoint(group, run, done)
        final_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if val and not final_eval:
            final_eval = _evaluate(group, val, pad_id, t.micro_batch_size)
            run.log_metrics(total_steps, final_eval)
        group.call("save_final", str(run.final))
        final = {k: v for k, v in {**metrics, **final_eval}.items() if k in ("train/loss", "eval/nll")}
        return RunResult(str(run.path), total_steps, final)
    finally:
        run.close()
        group.call("shutdown")
        group.shutdown()


def _checkpoint(group: WorkerGroup, run: RunDir, step: int) -> None:
    tmp = run.begin_checkpoint(step)
    group.call("save_checkpoint", str(tmp))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    run.commit_checkpoint(step, tmp)
