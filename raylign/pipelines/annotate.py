"""`raylign data annotate`: turn prompts into preference pairs with a model and an annotator.

For every prompt, rollout workers (Ray actors) sample `n` completions from `model`; the annotator (any
reward source spec: `lexicon:vader`, `length`, `module:fn`, a reward model directory) scores them; the
best and the worst become one pair `{prompt, chosen, rejected, margin, chosen_score, rejected_score}`.
This is AI feedback standing in for human labels (RLAIF, Bai et al. 2022; Lee et al. 2023): the file
trains reward models and DPO-family objectives like human-labelled pairs.

Determinism: prompts are cut into chunks of `batch_size`; chunk i is sampled with its own seed derived
from (seed, i), whichever worker runs it, so the same inputs and seed give a byte-identical file for
any number of workers. The driver sends chunks one per idle worker (the progress bar moves per
chunk) and scores a finished chunk while the workers sample the next ones. The output is written to
`<out>.tmp` and renamed, so `out` is either the complete new file or untouched.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from rich.console import Console
from tqdm.auto import tqdm

from raylign.config import ConfigError, RolloutConfig

CHUNK_SEED_STRIDE = 1_000_003


def chunk_seed(seed: int, index: int) -> int:
    """The sampling seed of chunk `index`: independent of which worker runs it or what ran before."""
    return (seed * CHUNK_SEED_STRIDE + index) % (2**63)


def best_worst_pair(
    prompt: Any, completions: list[str], scores: np.ndarray
) -> tuple[dict[str, Any] | None, str | None]:
    """(pair row, None) or (None, why skipped: "empty" | "tie").

    Only non-empty completions compete (a pairs file needs non-empty text). Ties are broken
    towards the earliest sample, so the choice is deterministic; all-equal scores give no pair.
    """
    keep = [i for i, c in enumerate(completions) if c.strip()]
    if len(keep) < 2:
        return None, "empty"
    sub = np.asarray(scores, dtype=np.float32)[keep]
    best, worst = keep[int(np.argmax(sub))], keep[int(np.argmin(sub))]
    if scores[best] == scores[worst]:
        return None, "tie"
    # Shortest text that round-trips the float32 score ("0.871", not "0.8709999918937683").
    chosen_score = float(str(np.float32(scores[best])))
    rejected_score = float(str(np.float32(scores[worst])))
    return {
        "prompt": prompt,
        "chosen": completions[best],
        "rejected": completions[worst],
        "margin": chosen_score - rejected_score,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
    }, None


def write_jsonl_atomic(rows: list[dict[str, Any]], out: Path) -> None:
    """All rows to `<out>.tmp`, flushed and synced, then renamed over `out`; on error no tmp is left."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_args(out: str, n: int, workers: int, cpus_per_worker: float, sampling: dict[str, Any]) -> Path:
    if n < 2:
        raise ConfigError(f"--n must be at least 2 (a pair needs two samples per prompt), got {n}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if cpus_per_worker <= 0:
        raise ConfigError(f"cpus_per_worker must be positive, got {cpus_per_worker}")
    if sampling["temperature"] <= 0:
        raise ConfigError(
            f"--temperature must be > 0 (got {sampling['temperature']}): greedy decoding gives n identical "
            "completions, so every prompt would tie"
        )
    try:
        RolloutConfig.model_validate(sampling)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid sampling settings: {problems}") from None
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {path / 'pairs.jsonl'}")
    return path


def run_annotate(
    prompts: str,
    model: str,
    annotator: str,
    out: str,
    n: int = 2,
    seed: int = 0,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    limit: int | None = None,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    batch_size: int = 8,
    console: Console | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    min_margin: float = 0.0,
) -> dict[str, Any]:
    """Sample `n` completions per prompt on Ray, score them with `annotator`, write best-vs-worst pairs.

    `prompts`: any prompts-kind file or `builtin:everyday-prompts`; `model`: HF id, local dir,
    `builtin:`/`tiny:` name; `annotator`: a reward source spec (see `raylign.rewards`). Prompts whose
    scores all tie, or with fewer than two non-empty completions, give no pair and are counted.
    `min_margin` drops pairs the annotator barely separates (chosen − rejected score below it), as
    one drops low-agreement human labels; they are counted as `below_margin`.
    Returns the summary (also printed): prompts, samples, pairs, ties, empty, below_margin,
    mean_margin, seconds, samples_per_second, out.
    """
    import ray

    from raylign.data import DataError, load_dataset
    from raylign.models import resolve_model_path
    from raylign.rewards import as_scores, build_reward_source
    from raylign.runtime import init_ray
    from raylign.workers.group import WorkerGroup
    from raylign.workers.rollout import RolloutWorker

    console = console or Console()
    sampling = {"batch_size": batch_size, "n_samples": n, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p}
    out_path = _check_args(out, n, workers, cpus_per_worker, sampling)
    start = time.perf_counter()

    # Everything a user can get wrong fails here, before any actor starts.
    table = load_dataset(prompts, "prompts", limit=limit)
    prompt_list = table.column("prompt").to_pylist()
    scorer = build_reward_source(annotator)
    resolve_model_path(model)  # builds a tiny:/builtin: model once here, not in every actor
    out_path.parent.mkdir(parents=True, exist_ok=True)

    chunks = [prompt_list[i : i + batch_size] for i in range(0, len(prompt_list), batch_size)]
    workers = min(workers, len(chunks))
    console.print(f"annotate: {len(prompt_list)} prompts x {n} samples from {model}, scored by {scorer.name}, "
                  f"{workers} rollout worker(s)")
    init_ray(ray_address)
    group = WorkerGroup(RolloutWorker, workers, cpus_per_worker, name="annotate-rollout",
                        init_kwargs={"model": {"path": model}, "seed": seed})
    skipped = {"tie": 0, "empty": 0, "below_margin": 0}
    results: list[list[dict[str, Any] | None]] = [[] for _ in chunks]
    idle = list(group.workers)
    pending: dict[Any, tuple[int, Any]] = {}
    next_chunk = 0

    def dispatch() -> None:
        nonlocal next_chunk
        while idle and next_chunk < len(chunks):
            worker = idle.pop()
            ref = worker.generate_texts.remote(chunks[next_chunk], sampling, seed=chunk_seed(seed, next_chunk))
            pending[ref] = (next_chunk, worker)
            next_chunk += 1

    try:
        with tqdm(total=len(prompt_list), desc=f"sampling {n}/prompt + scoring", unit="prompt",
                  disable=not progress) as bar:
            dispatch()
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                index, worker = pending.pop(ref)
                samples: list[list[str]] = ray.get(ref)
                idle.append(worker)
                dispatch()  # the worker samples the next chunk while this one is scored
                flat_prompts = [p for p, answers in zip(chunks[index], samples, strict=True) for _ in answers]
                flat = [a for answers in samples for a in answers]
                scores = as_scores(scorer.score(flat_prompts, flat), len(flat), scorer.name, finite=True)
                offset = 0
                for prompt, answers in zip(chunks[index], samples, strict=True):
                    row, why = best_worst_pair(prompt, answers, scores[offset : offset + len(answers)])
                    offset += len(answers)
                    if row is not None and row["margin"] < min_margin:
                        row, why = None, "below_margin"
                    results[index].append(row)
                    if why:
                        skipped[why] += 1
                bar.update(len(chunks[index]))
    finally:
        group.shutdown()

    rows = [row for chunk_rows in results for row in chunk_rows if row is not None]
    seconds = time.perf_counter() - start
    samples_total = len(prompt_list) * n
    if not rows:
        raise DataError(
            f"annotating {len(prompt_list)} prompts gave no pairs ({skipped['tie']} ties, {skipped['empty']} "
            f"with fewer than two non-empty answers, {skipped['below_margin']} below --min-margin); nothing was written to {out}. Raise --n, "
            "--temperature or --max-new-tokens, or use another annotator."
        )
    write_jsonl_atomic(rows, out_path)
    margins = [r["margin"] for r in rows]
    summary = {
        "prompts": len(prompt_list),
        "samples": samples_total,
        "pairs": len(rows),
        "ties": skipped["tie"],
        "empty": skipped["empty"],
        "below_margin": skipped["below_margin"],
        "mean_margin": float(np.mean(margins)),
        "seconds": seconds,
        "samples_per_second": samples_total / seconds if seconds > 0 else float("inf"),
        "out": str(out_path),
        "model": model,
        "annotator": scorer.name,
    }
    empty = f", {summary['empty']} with <2 non-empty answers" if summary["empty"] else ""
    if summary["below_margin"]:
        empty += f", {summary['below_margin']} below margin {min_margin}"
    console.print(
        f"[green]annotated:[/green] {summary['prompts']} prompts -> {summary['pairs']} pairs in {out_path} "
        f"({summary['ties']} ties skipped{empty}) · mean margin {summary['mean_margin']:.3f} · "
        f"{seconds:.1f}s, {summary['samples_per_second']:.1f} samples/s"
    )
    return summary
