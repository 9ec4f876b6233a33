"""Offline driver loop (SFT, reward model, DPO family, KTO, ORPO, SimPO): batches from a dataset,
sharded over the learner group, one optimizer step at a time.

The driver holds no model: it tokenizes, batches, asks the learners to step, logs, checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from raylign.config import ConfigError, RunConfig
from raylign.rundir import RunDir, RunResult
from raylign.runtime import init_ray
from raylign.workers.group import WorkerGroup
from raylign.workers.learner import LearnerWorker
from raylign.workers.objectives import NEEDS_REFERENCE, count_units

# Algorithm -> (objective the learner runs, data kinds it trains on).
OFFLINE_ALGORITHMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sft": ("sft", ("text", "pairs", "unpaired")),
    "reward": ("reward", ("pairs",)),
    "dpo": ("dpo", ("pairs",)),
    "simpo": ("simpo", ("pairs",)),
    "orpo": ("orpo", ("pairs",)),
    "kto": ("kto", ("unpaired",)),
}


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
        else:
            if not row["label"]:
                continue  # SFT imitates only the desirable completions
            completion = row["completion"]
        encoded.append(tokenize_example(
            tokenizer, row["prompt"], completion, d.max_prompt_length, d.max_length, d.apply_chat_template))
    return encoded


def encode_pair_rows(rows: list[dict[str, Any]], kind: str, tokenizer, config: RunConfig) -> list[dict]:
    """Each example as two sequences [chosen, rejected]. For KTO's unpaired rows the second sequence
    is the prompt with the *next* row's completion: the mismatched pair whose KL gives z0."""
    from raylign.data import tokenize_example

    d = config.data
    encoded = []
    for i, row in enumerate(rows):
        if kind == "pairs":
            first, second, extra = row["chosen"], row["rejected"], {"margin": float(row.get("margin") or 0.0)}
        else:
            first, second = row["completion"], rows[(i + 1) % len(rows)]["completion"]
            extra = {"label": float(bool(row["label"]))}
        encoded.append({
            "seqs": [tokenize_example(tokenizer, row["prompt"], c, d.max_prompt_length, d.max_length,
                                      d.apply_chat_template) for c in (first, second)],
            **extra,
        })
    return encoded


def collate(encoded: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded training batch as numpy arrays; pair examples become [B, 2, T] arrays."""
    from raylign.data import collate_right_pad

    if not encoded or "seqs" not in encoded[0]:
        batch = collate_right_pad(encoded, pad_id)
        return {k: np.asarray(v) for k, v in batch.items() if k != "prompt_length"}
    flat = [{"input_ids": s["input_ids"], "loss_mask": s["loss_mask"]} for e in encoded for s in e["seqs"]]
    padded = collate_right_pad(flat, pad_id)
    out = {k: np.asarray(padded[k]).reshape(len(encoded), 2, -1)
           for k in ("input_ids", "attention_mask", "loss_mask")}
    for key in ("margin", "label"):
        if key in encoded[0]:
            out[key] = np.array([e[key] for e in encoded], dtype=np.float32)
    if "ref_logps" in encoded[0]:
        out["ref_logps"] = np.stack([e["ref_logps"] for e in encoded]).astype(np.float32)
    return out


# ---- the loop ------------------------------------------------------------------------------------


def step_indices(n_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of global step `step`: a fresh seeded permutation each epoch, incomplete batches dropped.

    Pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
    """
    per_epoch = n_rows // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return order[offset * batch_size : (offset + 1) * batch_size]


def summarize_sums(objective: str, sums: dict[str, float], prefix: str) -> dict[str, float]:
    """Summed learner metrics -> means, named for metrics.jsonl."""
    if objective == "sft":
        nll = sums["nll_sum"] / max(sums["tokens"], 1.0)
        out = {f"{prefix}/loss": nll, f"{prefix}/tokens": sums["tokens"]}
        if prefix == "eval":
            out = {"eval/nll": nll, "eval/ppl": math.exp(min(nll, 50.0))}
        return out
    if objective == "kto":
        n, d = max(sums["examples"], 1.0), sums["desirable"]
        return {f"{prefix}/loss": sums["loss_sum"] / n, f"{prefix}/kl": sums["kl_sum"] / n,
                f"{prefix}/desirable_reward": sums["desirable_reward_sum"] / max(d, 1.0),
                f"{prefix}/undesirable_reward": sums["undesirable_reward_sum"] / max(n - d, 1.0)}
    n = max(sums["pairs"], 1.0)
    out = {f"{prefix}/loss": sums["loss_sum"] / n, f"{prefix}/accuracy": sums["correct"] / n,
           f"{prefix}/margin": sums["margin_sum"] / n, f"{prefix}/chosen_reward": sums["chosen_sum"] / n,
           f"{prefix}/rejected_reward": sums["rejected_sum"] / n}
    if "log_odds_sum" in sums:
        out[f"{prefix}/log_odds_ratio"] = sums["log_odds_sum"] / n
    return out


def _add(totals: dict[str, float], sums: dict[str, float]) -> None:
    for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + v


def _evaluate(group: WorkerGroup, objective: str, val: list[dict], pad_id: int, micro: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    chunk = micro * len(group)
    for i in range(0, len(val), chunk):
        for sums in group.call_sharded("eval_step", collate(val[i : i + chunk], pad_id)):
            _add(totals, sums)
    return summarize_sums(objective, totals, "eval") if totals else {}


def _attach_reference_logps(group: WorkerGroup, run: RunDir, splits: dict[str, list[dict]], pad_id: int,
                            micro: int, console: Console, progress: bool = True) -> None:
    """One pass of the reference over every example, cached in the run directory (reused on resume)."""
    fingerprint = hashlib.sha256(
        json.dumps([[s["input_ids"] for e in rows for s in e["seqs"]] for rows in splits.values()]).encode()
    ).hexdigest()[:16]
    cache = run.path / f"ref_logps_{fingerprint}.npz"
    if cache.exists():
        cached = np.load(cache)
        console.print(f"reference log-probs: cached ({cache.name})")
    else:
        cached = {}
        chunk = micro * len(group)
        for name, rows in splits.items():
            parts = []
            for i in tqdm(range(0, len(rows), chunk), desc=f"reference log-probs ({name})", leave=False,
                          disable=not progress):
                parts.extend(group.call_sharded("compute_reference_logps", collate(rows[i : i + chunk], pad_id)))
            cached[name] = np.concatenate(parts) if parts else np.zeros((0, 2), np.float32)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **cached)
        tmp.replace(cache)
    for name, rows in splits.items():
        for row, logps in zip(rows, cached[name], strict=True):
            row["ref_logps"] = logps
    group.call("drop_reference")


def run_offline(config: RunConfig, resume: bool = False, console: Console | None = None,
                on_step: Callable[[int, dict[str, Any]], None] | None = None) -> RunResult:
    """Train `config.algorithm` offline. `on_step(step, metrics)` is called after each step's metrics are
    logged and its checkpoint (if any) is written (Ray Tune reports from it)."""
    from raylign.data import load_split
    from raylign.models import load_tokenizer

    console = console or Console()
    objective, kinds = OFFLINE_ALGORITHMS[config.algorithm]
    if config.data.kind not in kinds:
        raise ConfigError(
            f"{config.algorithm} trains on data.kind {' or '.join(kinds)}, not '{config.data.kind}'"
        )
    # Everything a user can get wrong is checked before Ray or any actor starts.
    tokenizer = load_tokenizer(config.model.path)
    train_table, val_table = load_split(config.data)
    encode = encode_sft_rows if objective == "sft" else encode_pair_rows
    train = encode(train_table.to_pylist(), config.data.kind, tokenizer, config)
    val = encode(val_table.to_pylist(), config.data.kind, tokenizer, config) if val_table else []
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
    console.print(f"[bold]{config.algorithm}[/bold] {run.path}  ·  {len(train)} train / {len(val)} val  ·  "
                  f"{total_steps} steps  ·  {learners} learner(s)")
    init_ray(config.resources.ray_address)
    group = WorkerGroup(
        LearnerWorker, learners, config.resources.cpus_per_learner, config.resources.gpus_per_learner,
        name="learners", init_kwargs={"config": config.model_dump(), "objective": objective},
    )
    try:
        addr, port = group.call("master_address")[0]
        group.call("setup_distributed", addr, port)
        group.call("setup_optimizer", total_steps)
        if objective in NEEDS_REFERENCE and config.preference.precompute_ref_logps:
            _attach_reference_logps(group, run, {"train": train, "val": val}, pad_id, t.micro_batch_size,
                                    console, config.progress)
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
            run.log_metrics(0, _evaluate(group, objective, val, pad_id, t.micro_batch_size))
        bar = tqdm(range(start, total_steps), desc=config.algorithm, disable=not config.progress,
                   initial=start, total=total_steps, unit="step")
        for step in bar:
            t0 = time.perf_counter()
            idx = step_indices(len(train), t.batch_size, config.seed, step)
            batch = collate([train[i] for i in idx], pad_id)
            units = count_units(objective, batch)
            shards = group.call_sharded("train_step", batch, global_units=units)
            seconds = time.perf_counter() - t0
            totals: dict[str, float] = {}
            for s in shards:
                _add(totals, {k: v for k, v in s.items() if k not in ("grad_norm", "lr")})
            metrics = summarize_sums(objective, totals, "train")
            metrics.update({
                "train/grad_norm": shards[0]["grad_norm"], "train/lr": shards[0]["lr"],
                "perf/step_seconds": seconds, "perf/examples_per_second": len(idx) / seconds,
                "perf/tokens_per_second": float(batch["attention_mask"].sum()) / seconds,
            })
            done = step + 1
            if t.eval_every and done % t.eval_every == 0 and val:
                metrics.update(_evaluate(group, objective, val, pad_id, t.micro_batch_size))
            if done % t.log_every == 0 or done == total_steps:
                run.log_metrics(done, metrics)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
            if config.output.save_every and done % config.output.save_every == 0 and done < total_steps:
                _checkpoint(group, run, done)
            if on_step is not None:
                on_step(done, metrics)
        final_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if val and not final_eval:
            final_eval = _evaluate(group, objective, val, pad_id, t.micro_batch_size)
            run.log_metrics(total_steps, final_eval)
        group.call("save_final", str(run.final))
        keys = ("train/loss", "eval/loss", "eval/nll", "eval/accuracy", "eval/margin")
        final = {k: v for k, v in {**metrics, **final_eval}.items() if k in keys}
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
