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

`sample_on_workers` is that sampling loop on its own, the one sampler of annotation: `raylign annotate
make --prompts` (`raylign/annotation/sampling.py`) samples its tasks' answers through it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from raylign.config import ConfigError, RolloutConfig
from raylign.pipelines.annotate_settings import AnnotateSettings
from raylign.rundir import write_jsonl_atomic
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




def _out_path(out: str) -> Path:
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {path / 'pairs.jsonl'}")
    return path


def sample_on_workers(
    prompts: list[Any],
    model: str,
    sampling: RolloutConfig,
    *,
    seed: int,
    on_chunk: Callable[[int, list[Any], list[list[str]]], None],
    step: int = 0,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    ray_address: str | None = None,
    desc: str = "sampling",
    progress: bool = True,
) -> None:
    """Sample `sampling.n_samples` completions of every prompt from `model` on Ray rollout workers.

    The one sampler of annotation (`raylign data annotate`, `raylign annotate make --prompts`): prompts
    are cut into chunks of `sampling.batch_size`; the chunk starting at prompt i is sampled by
    `RolloutWorker.generate_texts` with the seed key (seed, Purpose.ANNOTATE, step, i), whichever of the
    `workers` actors runs it, so the samples depend only on the arguments (`step` keeps two passes over
    the same prompts, e.g. two models, on streams of their own). Chunks go one per idle worker; as each
    finishes, the next is sent before `on_chunk(i, chunk prompts, [[texts of prompt] ...])` runs in this
    process, so scoring a chunk overlaps sampling the next ones. The progress bar moves per chunk. The
    worker group is shut down on every way out, errors included.
    """
    import ray

    from raylign.runtime import init_ray
    from raylign.workers.group import WorkerGroup
    from raylign.workers.rollout import RolloutWorker

    size = sampling.batch_size
    chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    if not chunks:
        return
    init_ray(ray_address)
    group = WorkerGroup(RolloutWorker, min(workers, len(chunks)), cpus_per_worker, name="annotate-rollout",
                        init_kwargs={"model": {"path": model}, "seed": seed})
    idle = list(group.workers)
    pending: dict[Any, tuple[int, Any]] = {}
    next_chunk = 0

    def dispatch() -> None:
        nonlocal next_chunk
        while idle and next_chunk < len(chunks):
            worker = idle.pop()
            ref = worker.generate_texts.remote(chunks[next_chunk], sampling, seed=seed, step=step,
                                               purpose=Purpose.ANNOTATE, first_index=next_chunk * size)
            pending[ref] = (next_chunk, worker)
            next_chunk += 1

    try:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            dispatch()
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                index, worker = pending.pop(ref)
                samples: list[list[str]] = ray.get(ref)
                idle.append(worker)
                dispatch()  # the worker samples the next chunk while this one is handled
                on_chunk(index * size, chunks[index], samples)
                bar.update(len(chunks[index]))
    finally:
        group.shutdown()


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
    from raylign.data import DataError, load_dataset
    from raylign.models import resolve_model_path
    from raylign.rewards import as_scores, build_reward_source

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

    chunks = -(-len(prompt_list) // s.batch_size)
    workers = min(s.workers, chunks)
    console.print(f"annotate: {len(prompt_list)} prompts x {s.n} samples from {s.model}, scored by {scorer.name}, "
                  f"{workers} rollout worker(s)")
    skipped = {"tie": 0, "empty": 0, "below_margin": 0}
    results: list[list[dict[str, Any] | None]] = [[] for _ in range(chunks)]

    def score_chunk(first: int, prompts: list[Any], samples: list[list[str]]) -> None:
        flat_prompts = [p for p, answers in zip(prompts, samples, strict=True) for _ in answers]
        flat = [a for answers in samples for a in answers]
        scores = as_scores(scorer.score(flat_prompts, flat), len(flat), scorer.name, finite=True)
        offset = 0
        for prompt, answers in zip(prompts, samples, strict=True):
            row, why = best_worst_pair(prompt, answers, scores[offset : offset + len(answers)])
            offset += len(answers)
            if row is not None and row["margin"] < s.min_margin:
                row, why = None, "below_margin"
            results[first // s.batch_size].append(row)
            if why:
                skipped[why] += 1

    sample_on_workers(prompt_list, s.model, sampling, seed=s.seed, workers=s.workers,
                      cpus_per_worker=s.cpus_per_worker, ray_address=s.ray_address, on_chunk=score_chunk,
                      desc=f"sampling {s.n}/prompt + scoring", progress=s.progress)

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
