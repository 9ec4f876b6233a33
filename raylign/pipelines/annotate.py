"""`raylign data annotate`: turn prompts into preference pairs with a model and an annotator.

For every prompt, rollout workers (Ray actors) sample `n` completions from `model`; the annotator (any
reward source spec: `lexicon:vader`, `length`, `module:fn`, a reward model directory) scores them; the
best and the worst become one pair `{prompt, chosen, rejected, margin, chosen_score, rejected_score}`.
This is AI feedback standing in for human labels (RLAIF, Bai et al. 2022; Lee et al. 2023): the file
trains reward models and DPO-family objectives like human-labelled pairs.

Determinism: prompts are cut into chunks of `batch_size`; the chunk whose first prompt is prompt i of
the file is sampled with the seed key (seed, Purpose.ANNOTATE, step 0, index i) of `raylign.runtime`'s
one seeding scheme, whichever worker runs it, so the same inputs and seed give a byte-identical file
for any number of workers. The driver sends chunks one per idle worker (the progress bar moves per
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
from rich.console import Console
from tqdm.auto import tqdm

from raylign.config import ConfigError
from raylign.pipelines.annotate_settings import AnnotateSettings
from raylign.runtime import Purpose


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


def _out_path(out: str) -> Path:
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {path / 'pairs.jsonl'}")
    return path


def run_annotate(settings: AnnotateSettings, console: Console | None = None) -> dict[str, Any]:
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

    s = settings
    console = console or Console()
    sampling = s.sampling
    out_path = _out_path(s.out)
    start = time.perf_counter()

    # Everything a user can get wrong fails here, before any actor starts.
    table = load_dataset(s.prompts, "prompts", limit=s.limit)
    prompt_list = table.column("prompt").to_pylist()
    scorer = build_reward_source(s.annotator)
    resolve_model_path(s.model)  # builds a tiny:/builtin: model once here, not in every actor
    out_path.parent.mkdir(parents=True, exist_ok=True)

    # Chunk k starts at prompt k * batch_size of the file: its seed key's index.
    chunks = [prompt_list[i : i + s.batch_size] for i in range(0, len(prompt_list), s.batch_size)]
    workers = min(s.workers, len(chunks))
    console.print(f"annotate: {len(prompt_list)} prompts x {s.n} samples from {s.model}, scored by {scorer.name}, "
                  f"{workers} rollout worker(s)")
    init_ray(s.ray_address)
    group = WorkerGroup(RolloutWorker, workers, s.cpus_per_worker, name="annotate-rollout",
                        init_kwargs={"model": {"path": s.model}, "seed": s.seed})
    skipped = {"tie": 0, "empty": 0, "below_margin": 0}
    results: list[list[dict[str, Any] | None]] = [[] for _ in chunks]
    idle = list(group.workers)
    pending: dict[Any, tuple[int, Any]] = {}
    next_chunk = 0

    def dispatch() -> None:
        nonlocal next_chunk
        while idle and next_chunk < len(chunks):
            worker = idle.pop()
            ref = worker.generate_texts.remote(chunks[next_chunk], sampling, seed=s.seed, purpose=Purpose.ANNOTATE,
                                               first_index=next_chunk * s.batch_size)
            pending[ref] = (next_chunk, worker)
            next_chunk += 1

    try:
        with tqdm(total=len(prompt_list), desc=f"sampling {s.n}/prompt + scoring", unit="prompt",
                  disable=not s.progress) as bar:
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
                    if row is not None and row["margin"] < s.min_margin:
                        row, why = None, "below_margin"
                    results[index].append(row)
                    if why:
                        skipped[why] += 1
                bar.update(len(chunks[index]))
    finally:
        group.shutdown()

    rows = [row for chunk_rows in results for row in chunk_rows if row is not None]
    seconds = time.perf_counter() - start
    samples_total = len(prompt_list) * s.n
    if not rows:
        raise DataError(
            f"annotating {len(prompt_list)} prompts gave no pairs ({skipped['tie']} ties, {skipped['empty']} "
            f"with fewer than two non-empty answers, {skipped['below_margin']} below --min-margin); nothing was written to {s.out}. Raise --n, "
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
        "model": s.model,
        "annotator": scorer.name,
    }
    empty = f", {summary['empty']} with <2 non-empty answers" if summary["empty"] else ""
    if summary["below_margin"]:
        empty += f", {summary['below_margin']} below margin {s.min_margin}"
    console.print(
        f"[green]annotated:[/green] {summary['prompts']} prompts -> {summary['pairs']} pairs in {out_path} "
        f"({summary['ties']} ties skipped{empty}) · mean margin {summary['mean_margin']:.3f} · "
        f"{seconds:.1f}s, {summary['samples_per_second']:.1f} samples/s"
    )
    return summary
