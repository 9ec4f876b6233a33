"""Offline training (SFT, reward model, DPO family, KTO, ORPO, SimPO) on the loop skeleton: batches
from a dataset, sharded over the learner group, one optimizer step each.

The driver holds no model: it tokenizes, batches and asks the learners to step; `loop.run_loop`
does the rest (run directory, resume, logging, checkpoints, final/, shutdown).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from raylign.config import ConfigError, RunConfig
from raylign.data.batches import add_sums, sum_parts, summarize_sums
from raylign.pipelines.loop import Algorithm, LearnerSlot, OnStep, PhaseTimer, run_loop, step_indices
from raylign.rundir import REFERENCE_CACHE_PREFIX, RunDir, RunResult
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

    def encode(row: dict[str, Any], first: str, second: str) -> list[dict]:
        return [tokenize_example(tokenizer, row["prompt"], c, d.max_prompt_length, d.max_length,
                                 d.apply_chat_template) for c in (first, second)]

    bias_sets = None
    if kind == "pairs" and config.train.counterfactual_penalty > 0:  # copies the penalty pairs each row with
        from raylign.data.counterfactual import load_bias_sets

        bias_sets = load_bias_sets(require_templates=False)
    encoded = []
    for i, row in enumerate(rows):
        extra: dict[str, Any]
        if kind == "pairs":
            first, second, extra = row["chosen"], row["rejected"], {"margin": float(row.get("margin") or 0.0)}
        else:
            first, second = row["completion"], rows[(i + 1) % len(rows)]["completion"]
            extra = {"label": float(bool(row["label"]))}
        if bias_sets is not None:
            from raylign.data.counterfactual import pair_copies_for_penalty

            extra["cf_seqs"] = pair_copies_for_penalty(row, bias_sets, lambda r: encode(r, r["chosen"], r["rejected"]))
        encoded.append({"seqs": encode(row, first, second), **extra})
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
    if "cf_seqs" in encoded[0]:  # train.counterfactual_penalty
        from raylign.data.counterfactual import collate_counterfactuals

        out.update(collate_counterfactuals([e["cf_seqs"] for e in encoded], pad_id))
    return out


# ---- the algorithm -------------------------------------------------------------------------------


def evaluate_sums(group: WorkerGroup, method: str, rows: list[dict], pad_id: int, micro: int) -> dict[str, float]:
    """`method` over `rows` in chunks of one micro-batch per learner; the learners' sums added up."""
    totals: dict[str, float] = {}
    chunk = micro * len(group)
    for i in range(0, len(rows), chunk):
        for sums in group.call_sharded(method, collate(rows[i : i + chunk], pad_id)):
            add_sums(totals, sums)
    return totals


def reference_identity(config: RunConfig) -> dict[str, Any]:
    """The model the learners compute reference log-probs with: `reference`, else the policy's own
    model without its adapter (learner `_load_reference`)."""
    ref = config.reference or config.model.model_copy(update={"lora": None, "gradient_checkpointing": False})
    return ref.model_dump(mode="json")


def reference_cache_name(splits: dict[str, list[dict]], reference: dict[str, Any] | None) -> str:
    """`ref_logps_<fingerprint>.npz`, keyed by the token ids of every split and the reference model's
    identity: a resumed run with other data or another reference computes its log-probs afresh."""
    fingerprint = hashlib.sha256(json.dumps({
        "reference": reference, "data": [[s["input_ids"] for e in rows for s in e["seqs"]] for rows in splits.values()],
    }, sort_keys=True).encode()).hexdigest()[:16]
    return f"{REFERENCE_CACHE_PREFIX}{fingerprint}.npz"


def attach_reference_logps(group: WorkerGroup, run: RunDir, splits: dict[str, list[dict]], pad_id: int,
                           micro: int, console: Console, progress: bool = True,
                           reference: dict[str, Any] | None = None) -> None:
    """One pass of the reference over every example, cached in the run directory (reused on resume)."""
    cache = run.path / reference_cache_name(splits, reference)
    cached: Any
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


class OfflineTraining(Algorithm):
    """One learner group; each step a batch of `train.batch_size` examples."""

    def __init__(self, config: RunConfig, console: Console, objective: str, train: list[dict], val: list[dict],
                 pad_id: int):
        super().__init__(config, console)
        t = config.train
        self.name, self.objective, self.train, self.val, self.pad_id = config.algorithm, objective, train, val, pad_id
        self.total_steps = t.max_steps or t.epochs * (len(train) // t.batch_size)
        self.group: WorkerGroup | None = None

    def describe(self, run: RunDir) -> str:
        return (f"[bold]{self.name}[/bold] {run.path}  ·  {len(self.train)} train / {len(self.val)} val  ·  "
                f"{self.total_steps} steps  ·  {self.config.resources.learners} learner(s)")

    @property
    def learner_group(self) -> WorkerGroup:
        assert self.group is not None, "start() first"
        return self.group

    def start(self, run: RunDir) -> None:
        r = self.config.resources
        self.group = WorkerGroup(LearnerWorker, r.learners, r.cpus_per_learner, r.gpus_per_learner, name="learners",
                                 init_kwargs={"config": self.config, "objective": self.objective},
                                 actor_name_prefix=f"{run.actor_prefix}-learner", call_timeout_s=r.call_timeout_s,
                                 placement=r.learner_placement)
        self.learners = [LearnerSlot(self.group)]

    def prepare(self, run: RunDir) -> None:
        if self.objective in NEEDS_REFERENCE and self.config.preference.precompute_ref_logps:
            attach_reference_logps(self.learner_group, run, {"train": self.train, "val": self.val}, self.pad_id,
                                   self.config.train.micro_batch_size, self.console, self.config.progress,
                                   reference=reference_identity(self.config))

    def begin(self, run: RunDir, start: int, checkpoint: Path | None) -> None:
        if start == 0 and self.config.train.eval_every and self.val:
            run.log_metrics(0, self.evaluate(0))

    def step(self, step: int, timer: PhaseTimer) -> dict[str, Any]:
        t = self.config.train
        with timer.phase("train"):
            idx = step_indices(len(self.train), t.batch_size, self.config.seed, step)
            batch = collate([self.train[i] for i in idx], self.pad_id)
            shards = self.learner_group.call_sharded("train_step", batch,
                                                     global_units=count_units(self.objective, batch))
        seconds = timer.elapsed()
        metrics = summarize_sums(self.objective, sum_parts(shards), "train")
        metrics.update({
            "train/grad_norm": shards[0]["grad_norm"], "train/lr": shards[0]["lr"],
            "train/skipped_steps": shards[0]["skipped_step"],
            "perf/examples_per_second": len(idx) / seconds,
            "perf/tokens_per_second": float(batch["attention_mask"].sum()) / seconds,
        })
        return metrics

    def eval_due(self, done: int) -> bool:
        return super().eval_due(done) and bool(self.val)

    def evaluate(self, done: int) -> dict[str, Any]:
        totals = evaluate_sums(self.learner_group, "eval_step", self.val, self.pad_id,
                               self.config.train.micro_batch_size)
        return summarize_sums(self.objective, totals, "eval") if totals else {}

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}"}

    def finish(self, run: RunDir, metrics: dict[str, Any]) -> dict[str, Any]:
        final_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if self.val and not final_eval:
            final_eval = self.evaluate(self.total_steps)
            run.log_metrics(self.total_steps, final_eval)
        keys = ("train/loss", "eval/loss", "eval/nll", "eval/accuracy", "eval/margin")
        return {k: v for k, v in {**metrics, **final_eval}.items() if k in keys}


def run_offline(config: RunConfig, resume: bool = False, console: Console | None = None,
                on_step: OnStep | None = None, resume_force: bool = False) -> RunResult:
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
    if config.train.counterfactual_penalty > 0 and objective not in ("reward", "dpo", "simpo", "orpo"):
        raise ConfigError(f"train.counterfactual_penalty applies to reward models and the DPO family (reward, dpo, "
                          f"simpo, orpo), not {config.algorithm}; set it to 0")
    tokenizer = load_tokenizer(config.model.path)
    train_table, val_table = load_split(config.data, algorithm=config.algorithm)
    encode = encode_sft_rows if objective == "sft" else encode_pair_rows
    train = encode(train_table.to_pylist(), config.data.kind, tokenizer, config)
    val = encode(val_table.to_pylist(), config.data.kind, tokenizer, config) if val_table else []
    t, learners = config.train, config.resources.learners
    if t.batch_size < learners:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be >= resources.learners ({learners})")
    if len(train) < t.batch_size:
        raise ConfigError(
            f"{config.data.train}: {len(train)} training examples, fewer than train.batch_size={t.batch_size}"
        )
    algorithm = OfflineTraining(config, console, objective, train, val, tokenizer.pad_token_id)
    return run_loop(config, algorithm, resume=resume, resume_force=resume_force, on_step=on_step)
