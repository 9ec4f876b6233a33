"""DPO throughput: raylign against TRL's `DPOTrainer` on the same model, data and hyperparameters.

Both sides train `tiny:llama` (the same local HF directory, so identical weights and tokenizer) with
full fine-tuning in float32 on the same synthetic preference pairs, with the same batch size, max
length, beta, learning rate (AdamW, constant, no warmup), gradient clipping, seed and number of
steps, and both precompute the reference log-probs in one pass before training (raylign always does;
TRL with `precompute_ref_log_probs=True`). The script checks that the work really is the same: every
tokenized sequence and every precomputed reference log-prob are compared across the two.

Throughput is pairs per second over the training steps only: from the start of the first optimizer
step to the end of the last one, for both. Model loading, tokenization, the reference pass, the
final save and Ray start-up are outside the window. raylign's window is read from its
`metrics.jsonl` (`time` of the last step minus `time - perf/step_seconds` of the first); TRL's from
a `TrainerCallback` (first `on_step_begin` to last `on_step_end`). Both log one metrics row per step
and show no progress bar.

raylign runs through its public API (`load_config('dpo', overrides)` + `run_pipeline`) on a local
Ray started here with as many CPUs as its one learner gets (`cpus_per_learner`, which also sets the
learner's torch threads); TRL then runs in this same process with `torch.set_num_threads` set to the
same number, after Ray is shut down, so the two never compete for cores.

The final losses (mean of the last 5 steps) are compared too: both sides see the same pairs, but in a
different order (raylign's seeded permutation, TRL's sampler), so only the curves' endpoints are
compared, against the batch-to-batch noise.

On a machine shared with other work, runs are noisy: `--repeat N` alternates the two sides N times
and keeps each side's fastest run (medians are printed too); `--omp-passive` makes idle OpenMP
threads sleep on both sides, which keeps 2-thread torch usable while another process holds a core.

    python bench/dpo_vs_trl.py                       # 512 pairs, 40 steps of 16 pairs, 128 tokens
    python bench/dpo_vs_trl.py --repeat 3 --json out.json
    python bench/dpo_vs_trl.py --steps 80 --seq-len 256 --batch-size 8 --pairs 1024
    RAYLIGN_HOME=/tmp/qs-home python bench/dpo_vs_trl.py --model builtin:smollm2-135m-instruct \
        --steps 6 --batch-size 8 --lr 1e-5 [--lora]            # real-model scale

`--model` takes a raylign model name or a local HF directory (default tiny:llama). `--lora` trains
LoRA adapters of rank 16 (alpha 32, dropout 0) on every linear layer but the LM head on both sides
(raylign `model.lora.*`, TRL `peft_config=peft.LoraConfig(target_modules="all-linear")`); the
reference is then the model with its adapters off, on both sides.

Model FLOPs utilisation of the learner step is printed per side against the float32 matmul peak that
`bench/peak.py` measures at the start of this run (at the model's shapes, `--peak-tokens` rows,
`--threads` threads): FLOPs per token 6N for full fine-tuning (Kaplan et al. 2020 sec. 2.1; PaLM's MFU,
Chowdhery et al. 2022 appendix B), 4N + 6N_lora with LoRA (no weight gradients for the frozen
weights), plus PaLM's attention term, over the real tokens of the chosen and rejected sequences
(raylign: `perf/tokens_per_second` x `perf/step_seconds`; TRL: the `attention_mask` its
`compute_loss` receives in training). The formula is `peak.train_flops_per_token`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peak  # noqa: E402
from _common import alternate_runs, endpoints_agree, step_timer, tail_mean  # noqa: E402

from raylign.rundir import METRICS_FILE  # noqa: E402

MODEL = "tiny:llama"
LORA_RANK = 16
# LoRA r=16 on every linear layer but the LM head (peft's "all-linear"), alpha 32, no dropout: both sides.
LORA_OVERRIDES = ["model.lora.r=16", "model.lora.alpha=32", "model.lora.dropout=0.0",
                  "model.lora.target_modules=all-linear"]

# ---- data ----------------------------------------------------------------------------------------
# Words the tiny tokenizer was trained on (raylign/models/tiny.py), so a word is about two tokens.
TOPICS = ["the weather", "the sea", "this book", "the city", "my garden", "the music", "our team",
          "the trip", "the morning", "the tea", "my job", "the park", "the answer", "the system"]
GOOD = ["great", "good", "kind", "happy", "warm", "clear", "helpful", "honest", "wonderful", "lovely"]
BAD = ["awful", "rude", "wrong", "sad", "cold", "gloomy", "terrible", "bad", "harmful", "boring"]
LIKE, DISLIKE = ["like", "love", "enjoy"], ["hate", "do not like", "fear"]
FILLER = [
    "The quick brown fox jumps over the lazy dog.", "The sea is wide and blue.",
    "The waves come in and go out.", "Boil the water and wait a few minutes.",
    "Read every day and ask questions.", "Let us start with the first step.",
    "The sun rises in the east and sets in the west.", "Cats like to sleep.",
    "Learning takes time and practice.", "We should check the details first.",
    "Tomorrow it will rain in the morning.", "A language model predicts the next word.",
]
SENTENCES = [  # {a} = the pair's adjective, {v} = its verb: good words in chosen, bad in rejected
    "I think {t} is {a}.", "People say {t} is {a} today.", "It is {a}, and I {v} it.",
    "To me {t} feels {a} and I {v} it.", "Honestly, {t} is {a}.", "I {v} {t} because it is {a}.",
]


def make_pairs(n: int, seq_len: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` deterministic {prompt, chosen, rejected} rows whose sequences run to roughly 0.5-1.0x
    `seq_len` tokens. Chosen and rejected share every sentence and differ only in sentiment words
    (cheerful vs gloomy), so the preference is learnable and both sides have about the same length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = f"Tell me about {topic}. " + " ".join(rng.sample(FILLER, 2))
        target_words = int(rng.uniform(0.5, 1.0) * seq_len / 2.1) - len(prompt.split())
        chosen, rejected, words = [], [], 0
        while words < max(target_words, 4):
            if rng.random() < 0.35:
                chosen.append(rng.choice(FILLER))
                rejected.append(chosen[-1])
            else:
                template = rng.choice(SENTENCES)
                chosen.append(template.format(t=topic, a=rng.choice(GOOD), v=rng.choice(LIKE)))
                rejected.append(template.format(t=topic, a=rng.choice(BAD), v=rng.choice(DISLIKE)))
            words += len(chosen[-1].split())
        # A leading space: the completion starts on a token boundary, so tokenizing prompt and
        # completion apart (raylign) or together (TRL) gives the same ids.
        rows.append({"prompt": prompt, "chosen": " " + " ".join(chosen), "rejected": " " + " ".join(rejected)})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ---- results -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    name: str
    steps: int
    pairs: int  # pairs trained inside the window
    window_s: float  # first step start -> last step end
    step_s: list[float]  # per-step times as each side measures them
    losses: list[float]
    setup_s: float  # everything else: start-up, model load, tokenization, reference pass, save
    train_tokens: float = 0.0  # real tokens (chosen + rejected sequences) trained inside the window
    load: float = dataclasses.field(default_factory=lambda: os.getloadavg()[0])  # 1-min load avg at the end

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.window_s

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    def final_loss(self) -> tuple[float, float]:
        return tail_mean(self.losses)


# ---- raylign -------------------------------------------------------------------------------------


def run_raylign(args: argparse.Namespace, data_path: Path, model_dir: str, workdir: Path, name: str
                ) -> tuple[Result, Path]:
    import ray
    from rich.console import Console

    from raylign.config import load_config
    from raylign.pipelines import run_pipeline

    overrides = [
        f"seed={args.seed}", "progress=false",
        f"model.path={model_dir}", "model.lora=null", "model.dtype=float32", "model.gradient_checkpointing=false",
        *(LORA_OVERRIDES if args.lora else []),
        "data.kind=pairs", f"data.train={data_path}", "data.val_fraction=0", "data.apply_chat_template=false",
        f"data.max_prompt_length={args.seq_len}", f"data.max_length={args.seq_len}",
        f"preference.beta={args.beta}", "preference.loss_type=sigmoid", "preference.precompute_ref_logps=true",
        f"train.lr={args.lr}", f"train.batch_size={args.batch_size}", f"train.micro_batch_size={args.batch_size}",
        f"train.max_steps={args.steps}", "train.scheduler=constant", "train.warmup_steps=0",
        "train.weight_decay=0", "train.max_grad_norm=1.0", "train.eval_every=0", "train.log_every=1",
        "resources.learners=1", f"resources.cpus_per_learner={args.threads}",
        f"output.dir={workdir / 'runs'}", f"output.name={name}", "output.overwrite=true",
        "output.save_every=0", "output.trackers=[]", "output.samples_per_step=0",
    ]
    config = load_config("dpo", overrides)
    start = time.perf_counter()
    # Actors inherit this process's environment (TOKENIZERS_PARALLELISM, HF_HUB_OFFLINE, RAYLIGN_HOME).
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False)
    try:
        result = run_pipeline(config, console=Console(stderr=True))
    finally:
        ray.shutdown()
    total = time.perf_counter() - start
    run_dir = Path(result.run_dir)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/step_seconds" in r]
    if len(rows) != args.steps:
        raise RuntimeError(f"raylign logged {len(rows)} training steps, expected {args.steps}")
    step_s = [r["perf/step_seconds"] for r in rows]
    window = rows[-1]["time"] - (rows[0]["time"] - step_s[0])
    res = Result("raylign", args.steps, args.steps * args.batch_size, window, step_s,
                 [r["train/loss"] for r in rows], total - window,
                 sum(r["perf/tokens_per_second"] * r["perf/step_seconds"] for r in rows))
    return res, run_dir


# ---- TRL -----------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, rows: list[dict[str, str]], model_dir: str, workdir: Path, name: str):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    class CountingDPOTrainer(DPOTrainer):
        """DPOTrainer counting the real tokens of the batches it trains on (behaviour unchanged)."""

        train_tokens = 0.0

        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:  # not the reference pass
                CountingDPOTrainer.train_tokens += float(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **kw)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings: dict[str, Any] = dict(
        output_dir=str(workdir / "runs" / name), seed=args.seed, data_seed=args.seed, use_cpu=True,
        bf16=False, fp16=False,  # TRL defaults to bf16; this benchmark is float32 on both sides
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0,  # optim: TRL's default AdamW (adamw_torch_fused)
        beta=args.beta, loss_type=["sigmoid"], max_length=args.seq_len, truncation_mode="keep_start",
        precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # TRL turns activation checkpointing on by default; raylign does not checkpoint here, and it only
    # costs time when memory is not the limit.
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    settings["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = False
    timer = step_timer("loss")
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_RANK, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = CountingDPOTrainer(model=model, args=DPOConfig(**settings), train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[timer], peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # no per-step dict printing; raylign prints none either
    trainer.train()
    total = time.perf_counter() - start
    if len(timer.begin) != args.steps or len(timer.values) != args.steps:
        raise RuntimeError(f"TRL ran {len(timer.begin)} steps and logged {len(timer.values)} losses, "
                           f"expected {args.steps}")
    window = timer.end[-1] - timer.begin[0]
    step_s = [e - b for b, e in zip(timer.begin, timer.end, strict=True)]
    res = Result("TRL", args.steps, args.steps * args.batch_size, window, step_s, timer.values, total - window,
                 CountingDPOTrainer.train_tokens)
    return res, trainer


# ---- same-work check -----------------------------------------------------------------------------


def check_same_work(rows, trainer, raylign_dir: Path | None, model_dir: str, seq_len: int) -> dict[str, Any]:
    """Token ids of every sequence, and the precomputed reference log-probs, on both sides."""
    import numpy as np

    from raylign.data import tokenize_example
    from raylign.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ds = trainer.train_dataset
    if len(ds) != len(rows):
        return {"same_tokens": False, "note": f"TRL kept {len(ds)} of {len(rows)} pairs"}
    mismatched, tokens = 0, 0
    for row, ex in zip(rows, ds, strict=True):
        for side in ("chosen", "rejected"):
            ours = tokenize_example(tokenizer, row["prompt"], row[side], seq_len, seq_len,
                                    apply_chat_template=False)["input_ids"]
            theirs = (ex["prompt_ids"] + ex[f"{side}_ids"])[:seq_len]
            mismatched += ours != theirs
            tokens += len(ours)
    out: dict[str, Any] = {"same_tokens": mismatched == 0, "mismatched_sequences": mismatched,
                           "mean_tokens_per_sequence": tokens / (2 * len(rows))}
    caches = sorted(raylign_dir.glob("ref_logps_*.npz")) if raylign_dir else []
    if caches and "ref_chosen_logps" in ds.column_names:
        ours = np.load(caches[0])["train"]
        theirs = np.stack([np.asarray(ds["ref_chosen_logps"]), np.asarray(ds["ref_rejected_logps"])], axis=1)
        out["ref_logps_max_abs_diff"] = float(np.abs(ours - theirs).max())
    return out


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps on each side")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step (one micro-batch)")
    p.add_argument("--seq-len", type=int, default=128, help="max tokens per sequence (prompt + completion)")
    p.add_argument("--pairs", type=int, default=512, help="synthetic pairs written to the dataset")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=MODEL, help="model on both sides (a raylign name or a local HF directory)")
    p.add_argument("--lora", action="store_true", help=f"LoRA r={LORA_RANK} on all linear layers (peft) on both sides")
    p.add_argument("--peak-tokens", type=int, default=512,
                   help="rows of the matmuls bench/peak.py times for the MFU's peak (0: skip the MFU)")
    p.add_argument("--threads", type=int, default=2,
                   help="raylign: Ray CPUs and cpus_per_learner (= learner torch threads); TRL: torch threads")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each side this many times, alternating which goes first, and keep each side's "
                        "fastest run (for machines with other load)")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE for both sides (Ray actors inherit it): idle OpenMP threads sleep "
                        "instead of spinning, which keeps multi-threaded torch usable when other work shares the "
                        "cores")
    p.add_argument("--only", choices=["raylign", "trl"], help="run one side (e.g. under a profiler)")
    p.add_argument("--workdir", help="where data and runs go (default: a fresh temp dir)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.seq_len > 512 and args.model == MODEL:
        p.error("--seq-len: tiny:llama has 512 positions")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.pairs < args.batch_size:
        p.error("--pairs must be >= --batch-size")
    return args


def describe(r: Result) -> str:
    loss, sd = r.final_loss()
    return (f"{r.name:>8}: {r.pairs_per_s:8.1f} pairs/s  ({r.steps} steps in {r.window_s:6.2f}s, median step "
            f"{1000 * r.median_step_s:6.1f} ms; outside the window {r.setup_s:5.1f}s; load {r.load:.1f})  "
            f"final loss {loss:.4f} ± {sd:.4f} (first {r.losses[0]:.4f})")


def measure_peak(args: argparse.Namespace, model_dir: str) -> dict[str, Any] | None:
    """bench/peak.py's float32 matmul peak at the model's shapes, now, in this run (None: --peak-tokens 0)."""
    return peak.model_peak(model_dir, args.model, args.peak_tokens, args.threads) if args.peak_tokens else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.omp_passive:  # before torch (and its OpenMP runtime) is loaded here or in any Ray worker
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    from raylign.models import pull_model

    load_at_start = os.getloadavg()[0]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raylign-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = pull_model(args.model)
    rows = make_pairs(args.pairs, args.seq_len, args.seed)
    data_path = workdir / "pairs.jsonl"
    write_jsonl(data_path, rows)
    print(f"{args.model} at {model_dir}{' (LoRA r=16, all linear layers)' if args.lora else ''}; {args.pairs} pairs in {data_path}; {args.steps} steps x {args.batch_size} "
          f"pairs, max {args.seq_len} tokens, beta {args.beta}, lr {args.lr}, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}", flush=True)

    peak_res = measure_peak(args, model_dir)
    sides = [s for s in ("raylign", "trl") if args.only in (None, s)]
    raylign_dir = trainer = None

    def run_side(side: str, r: int) -> Result:
        nonlocal raylign_dir, trainer
        if side == "raylign":
            res, raylign_dir = run_raylign(args, data_path, model_dir, workdir, f"raylign-{r}")
        else:
            res, trainer = run_trl(args, rows, model_dir, workdir, f"trl-{r}")
        return res

    runs, results = alternate_runs(sides, args.repeat, run_side, describe, lambda res: res.pairs_per_s)
    mfus: dict[str, Any] = {}
    for r in results:
        if peak_res and r.train_tokens:
            # the learner step is the whole window here (the reference pass is precomputed outside it)
            mfus[r.name] = peak.learner_mfu(peak_res["config"], LORA_RANK if args.lora else None, r.train_tokens,
                                            2 * r.pairs, r.window_s, peak_res["gflops"])
            print(peak.mfu_line(r.name, mfus[r.name]))

    report: dict[str, Any] = {
        "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "pairs", "lr", "beta",
                                                   "seed", "threads", "repeat", "model", "lora")}
        | {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg_at_start": load_at_start,
           "peak_gflops": peak_res["gflops"] if peak_res else None},
        "results": {r.name: {"pairs_per_s": r.pairs_per_s, "window_s": r.window_s, "median_step_s": r.median_step_s,
                             "final_loss": r.final_loss()[0], "final_loss_sd": r.final_loss()[1],
                             "losses": r.losses, "step_s": r.step_s,
                             "all_runs_pairs_per_s": [x.pairs_per_s for x in runs[s]],
                             "all_runs_load": [x.load for x in runs[s]], "train_tokens": r.train_tokens,
                             "learner_mfu": mfus.get(r.name)}
                    for r, s in zip(results, sides, strict=True)},
    }
    if trainer is not None:
        report["same_work"] = check_same_work(rows, trainer, raylign_dir, model_dir, args.seq_len)
        w = report["same_work"]
        print(f"same work: token ids identical = {w['same_tokens']} "
              f"({w.get('mean_tokens_per_sequence', 0):.1f} tokens/sequence on average)"
              + (f"; reference log-probs max |diff| = {w['ref_logps_max_abs_diff']:.2e}"
                 if "ref_logps_max_abs_diff" in w else ""))
    if len(results) == 2:
        ours, peer = results
        ratio = ours.pairs_per_s / peer.pairs_per_s
        l1, l2 = ours.final_loss()[0], peer.final_loss()[0]
        # Batch-to-batch spread of the loss is the noise: the two sides see the same pairs in a
        # different order, so only the curves' endpoints are compared.
        k, noise, agree = endpoints_agree(ours.losses, peer.losses)
        report["ratio_raylign_over_trl"] = ratio
        medians = [statistics.median(x.pairs_per_s for x in runs[s]) for s in sides]
        report["ratio_of_medians"] = medians[0] / medians[1]
        report["final_loss_agree"] = agree
        print(f"ratio raylign/TRL: {ratio:.2f}x pairs/s"
              + (f" (best runs; median runs {medians[0]:.1f} / {medians[1]:.1f} = {medians[0] / medians[1]:.2f}x)"
                 if args.repeat > 1 else ""))
        print(f"final loss (mean of last {k} steps): raylign {l1:.4f}, TRL {l2:.4f}, |diff| {abs(l1 - l2):.4f} "
              f"{'<=' if agree else '>'} noise {noise:.4f}: {'agree' if agree else 'DISAGREE'} within noise")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
