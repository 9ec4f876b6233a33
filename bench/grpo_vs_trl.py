"""GRPO throughput: raylign against TRL's `GRPOTrainer` on the same model, prompts, reward and settings.

Both sides train `tiny:llama` (the same local HF directory, so identical weights and tokenizer) with
full fine-tuning in float32. Every step samples `--prompts-per-step` prompts, `--group-size`
completions each (at most `--max-new-tokens` tokens, temperature 1, top-p 1, top-k 0, through the
model's ChatML chat template), scores them with the same reward function (`letter_reward` below: 10 x
the share of the letter "e" in the completion, dense enough for a tiny random model to move in a few
dozen steps), turns scores into group advantages (group mean and std), and takes one AdamW step
(constant learning rate, no warmup, weight decay 0, gradient clipping at 1.0) on the clipped surrogate
(epsilon 0.2) plus beta x k3 KL to the frozen initial model, averaged over all completion tokens of the
step (raylign `rl.aggregation=token-mean`, TRL `loss_type="dapo"`; with one micro-batch per step
TRL's `"bnpo"` is the same). One generation batch per optimizer step on both sides (raylign
`train.batch_size` = prompts x group size, `rl.epochs=1`; TRL `per_device_train_batch_size` = prompts x
group size, `gradient_accumulation_steps=1`, so `steps_per_generation=1` and the generation batch is
one optimizer step's batch, `num_iterations=1`). Both see the same prompts at every step: raylign
draws them with its seeded `step_indices`, and TRL gets its dataset in that order with
`shuffle_dataset=False`.

Throughput is completions per second over the training steps, generation included (it is part of
RL throughput): from the start of the first step to the end of the last. Ray start-up, model
loading, the dataset and the final save are outside the window. raylign's window comes from its
`metrics.jsonl` (`time` of the last step minus `time - perf/step_seconds` of the first); TRL's from a
`TrainerCallback` (first `on_step_begin`, which precedes the step's generation, to last
`on_step_end`). The time split per step is raylign's `perf/*_seconds` (generate / score + reference
log-probs / train) and, for TRL, timers around `_generate_single_turn` (generation) and
`_generate_and_score_completions` (generation + reference log-probs + rewards + advantages); the rest
of TRL's step is the policy forward/backward and optimizer step.

raylign runs through its public API (`load_config('grpo', overrides)` + `run_pipeline`) on a local
Ray started here with `--threads` CPUs, shared by its learner, rollout worker and reward worker, in one
of two modes (`--raylign-mode`):
  * overlap (default, raylign's best settings for this job): `rollout.overlap=true` - the rollout
    worker samples step k+1 (with the weights before step k's update) while the learner trains on
    step k, and decoupled PPO corrects the loss for that one-update lag - and
    `rollout.reference_on_workers=true` - the rollout worker also computes the reference log-probs, so
    the learner only trains. The learner and the rollout worker then run at the same time, so each gets
    half the cores (`resources.threads=--threads/2`).
  * sequential: generation, scoring and training one after the other, each phase with every core
    (`resources.threads=--threads`).
The work per step is the same in both modes (the same samples, rewards, reference log-probs and one
optimizer step); overlap changes when it runs and that the samples are one update old. TRL then runs
in this same process with `torch.set_num_threads(--threads)`, after Ray is shut down, so the two never
compete for cores.

The reward curves are printed side by side. The final reward (mean of the last 5 steps) is compared
against the step-to-step noise: the sides sample with different random streams, so the curves differ
step by step even though the prompts are the same. One seed's final reward also varies from seed to
seed by about as much, so `--seeds N` repeats the comparison on N seeds and reports the median
throughput ratio and the mean paired final-reward difference (raylign - TRL) against twice its
standard error.

On a machine shared with other work, runs are noisy: `--repeat N` alternates the two sides N times
and keeps each side's fastest run (medians are printed too); `--omp-passive` makes idle OpenMP
threads sleep on both sides.

    python bench/grpo_vs_trl.py                        # 30 steps x 8 prompts x 4 completions, 16 tokens
    python bench/grpo_vs_trl.py --seeds 5 --json grpo.json  # 5 seeds: median ratio, mean reward difference
    python bench/grpo_vs_trl.py --raylign-mode sequential   # raylign one phase after the other
    python bench/grpo_vs_trl.py --repeat 3 --json grpo.json
    python bench/grpo_vs_trl.py --only raylign         # one side, e.g. under py-spy
    python bench/grpo_vs_trl.py --raylign-set resources.rollout_workers=2   # try a raylign setting
    RAYLIGN_HOME=/tmp/qs-home python bench/grpo_vs_trl.py --model builtin:smollm2-135m-instruct \
        --steps 6 --max-new-tokens 24 --lr 1e-5 [--lora]       # real-model scale (quickstart lengths)

`--model` takes a raylign model name (`builtin:smollm2-135m-instruct`) or a local HF directory.
`--lora` trains LoRA adapters of rank 16 (alpha 32, dropout 0) on every linear layer but the LM head
on both sides (raylign `model.lora.*`, TRL `peft_config=peft.LoraConfig(target_modules="all-linear")`),
and the reference is the model with its adapters switched off on both.

Model FLOPs utilisation of the learner step (the policy's forward + backward + optimizer step on the
sampled batch; generation excluded) is printed per side: FLOPs per trained token ÷ the matmul peak that
`bench/peak.py` measures at the start of this run, at the model's shapes for `--peak-tokens` rows
in float32 with `--threads` threads. FLOPs per token: 6N for full fine-tuning (forward 2N, backward
4N; Kaplan et al. 2020 sec. 2.1, PaLM's MFU definition, Chowdhery et al. 2022 appendix B), with LoRA
4N + 6N_lora (forward 2N + 2N_lora; backward 2N through the frozen weights, activation gradients only,
+ 4N_lora for the adapters), N = the linear weights incl. the LM head, plus PaLM's attention term
12·L·H·Q·T at the mean sequence length; tokens = the real (unpadded) prompt + completion tokens
trained (raylign: `perf/train_tokens_per_second` x `perf/train_seconds`; TRL: the prompt and
completion masks its `compute_loss` receives). See `peak.train_flops_per_token`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
PROMPTS = "builtin:everyday-prompts"
HERE = Path(__file__).resolve().parent
# raylign's reward actor imports the function from this file: its folder goes on the actors' PYTHONPATH.
REWARD_SPEC = f"function:{Path(__file__).stem}:letter_reward"


# ---- the reward (both sides call this same function) ----------------------------------------------


def letter_reward(prompts, completions, **_) -> list[float]:
    """10 x the share of "e" among the completion's characters (0 when empty).

    raylign passes completion strings (decoded, stripped); TRL passes, for chat prompts, one
    `[{"role": "assistant", "content": ...}]` list per completion, unstripped: both become the same text.
    """
    out = []
    for c in completions:
        text = (c[-1]["content"] if isinstance(c, list) else c).strip()
        out.append(10.0 * text.count("e") / len(text) if text else 0.0)
    return out


# ---- prompts -------------------------------------------------------------------------------------


def load_prompts(model_dir: str, max_prompt_tokens: int) -> list[str]:
    """The builtin prompts whose chat-templated form fits `max_prompt_tokens` (raylign would skip the
    rest, TRL would not: filtering here keeps the two prompt sets equal)."""
    from raylign.data import load_dataset
    from raylign.data.templates import format_prompt
    from raylign.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    prompts = load_dataset(PROMPTS).column("prompt").to_pylist()
    return [p for p in prompts
            if len(tokenizer(format_prompt(p, tokenizer, True), add_special_tokens=False)["input_ids"])
            <= max_prompt_tokens]


def check_prompt_tokens(model_dir: str, prompts: list[str]) -> int:
    """How many prompts tokenize differently on the two sides: raylign's rollout worker renders
    `format_prompt` to text and tokenizes it without special tokens; TRL tokenizes the chat messages
    with `apply_chat_template(add_generation_prompt=True, tokenize=True)`."""
    from raylign.data.templates import format_prompt
    from raylign.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ours = [tokenizer(format_prompt(p, tokenizer, True), add_special_tokens=False)["input_ids"] for p in prompts]
    theirs = tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in prompts],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return sum(list(a) != list(b) for a, b in zip(ours, theirs, strict=True))


def step_order(n_prompts: int, args: argparse.Namespace) -> list[int]:
    """The prompt indices raylign samples, step after step (its seeded `step_indices`)."""
    from raylign.pipelines.loop import step_indices

    return [int(i) for step in range(args.steps)
            for i in step_indices(n_prompts, args.prompts_per_step, args.seed, step)]


# ---- results -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    name: str
    steps: int
    completions: int  # completions sampled and trained on inside the window
    window_s: float  # first step start -> last step end
    step_s: list[float]  # per-step times as each side measures them
    rewards: list[float]  # mean reward of each step's completions
    split_s: dict[str, float]  # summed seconds per phase over the steps (generate, score+ref, train)
    setup_s: float  # everything else: start-up, model load, data, final save
    train_tokens: float = 0.0  # real prompt + completion tokens the learner trained on, over the window
    load: float = dataclasses.field(default_factory=lambda: os.getloadavg()[0])  # 1-min load avg at the end

    @property
    def samples_per_s(self) -> float:
        return self.completions / self.window_s

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    def final_reward(self) -> tuple[float, float]:
        return tail_mean(self.rewards)


# ---- raylign -------------------------------------------------------------------------------------


# raylign's settings for this job. overlap (the default): the rollout worker samples step k+1 while the
# learner trains on step k (decoupled PPO corrects for the one-update lag) and also computes the
# reference log-probs, so the learner's core only trains; the two run at once, each on half the cores.
# sequential: generation, scoring and training one after the other, each with every core.
MODES = {"overlap": ["rollout.overlap=true", "rollout.reference_on_workers=true"], "sequential": []}
LORA_RANK = 16
# LoRA r=16 on every linear layer but the LM head (peft's "all-linear"), alpha 32, no dropout: both sides.
LORA_OVERRIDES = ["model.lora.r=16", "model.lora.alpha=32", "model.lora.dropout=0.0",
                  "model.lora.target_modules=all-linear"]


def trl_lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def raylign_threads(args: argparse.Namespace) -> int:
    """Torch threads of raylign's learner and rollout worker: all cores when they take turns, half each
    when they run at once."""
    return args.threads if args.raylign_mode == "sequential" else max(1, args.threads // 2)


def run_raylign(args: argparse.Namespace, data_path: Path, model_dir: str, workdir: Path, name: str) -> Result:
    import ray
    from rich.console import Console

    from raylign.config import load_config
    from raylign.pipelines import run_pipeline

    per_step = args.prompts_per_step * args.group_size
    t = args.threads
    overrides = [
        f"seed={args.seed}", "progress=false",
        f"model.path={model_dir}", "model.lora=null", "model.dtype=float32", "model.gradient_checkpointing=false",
        *(LORA_OVERRIDES if args.lora else []),
        "data.kind=prompts", f"data.train={data_path}", "data.val_fraction=0", "data.apply_chat_template=true",
        f"data.max_prompt_length={args.max_prompt_tokens}",
        f"reward.sources=[{{source: '{REWARD_SPEC}', weight: 1.0}}]",
        f"rollout.prompts_per_step={args.prompts_per_step}", f"rollout.n_samples={args.group_size}",
        f"rollout.batch_size={args.prompts_per_step}",  # one generate call per step, like TRL
        f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=0",
        f"rl.kl_coef={args.beta}", "rl.kl_estimator=k3", "rl.kl_in=loss", "rl.kl_target=null",
        f"rl.clip_eps={args.epsilon}", "rl.clip_eps_high=null", "rl.dual_clip=null", "rl.epochs=1",
        "rl.aggregation=token-mean", "rl.scale_rewards=true", "rl.entropy_coef=0", "rl.eval_prompts=0",
        f"train.lr={args.lr}", f"train.batch_size={per_step}", f"train.micro_batch_size={per_step}",
        f"train.max_steps={args.steps}", "train.scheduler=constant", "train.warmup_steps=0",
        "train.weight_decay=0", "train.max_grad_norm=1.0", "train.eval_every=0", "train.log_every=1",
        "resources.learners=1", "resources.rollout_workers=1", "resources.reward_workers=1",
        f"resources.threads={raylign_threads(args)}",
        *MODES[args.raylign_mode],
        f"output.dir={workdir / 'runs'}", f"output.name={name}", "output.overwrite=true",
        "output.save_every=0", "output.trackers=[]", "output.samples_per_step=0",
    ] + list(args.raylign_set)
    config = load_config("grpo", overrides)
    # The Ray CPUs (a scheduling reservation only) are split evenly over the actors so that they all fit
    # on a local Ray of --threads CPUs; torch threads come from resources.threads, not from these shares.
    res = config.resources
    share = t / (res.learners + res.rollout_workers + res.reward_workers)
    res.cpus_per_learner = res.cpus_per_rollout_worker = res.cpus_per_reward_worker = share
    start = time.perf_counter()
    # Actors inherit this process's environment (PYTHONPATH for the reward function, HF offline, OMP).
    ray.init(address="local", num_cpus=t, include_dashboard=False)
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
    split = {"generate": sum(r["perf/generate_seconds"] for r in rows),
             "score+ref": sum(r.get(f"perf/{phase}_seconds", 0.0) for r in rows
                              for phase in ("score", "reference", "values", "advantages")),
             "train": sum(r["perf/train_seconds"] for r in rows)}
    if sum(r["rollout/completions"] for r in rows) != args.steps * per_step:
        raise RuntimeError("raylign trained on a different number of completions than expected")
    train_tokens = sum(r["perf/train_tokens_per_second"] * r["perf/train_seconds"] for r in rows)
    return Result("raylign", args.steps, args.steps * per_step, window, step_s,
                  [r["reward/mean"] for r in rows], split, total - window, train_tokens)


# ---- TRL -----------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, prompts: list[str], order: list[int], model_dir: str, workdir: Path,
            name: str) -> Result:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with two timers around its own methods (behaviour unchanged)."""

        seconds = {"generate": 0.0, "generate+score+ref": 0.0}
        train_tokens = 0.0

        def compute_loss(self, model, inputs, *a, **kw):
            # the real tokens of the batch the policy is trained on (prompt + completion masks)
            TimedGRPOTrainer.train_tokens += float(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            return super().compute_loss(model, inputs, *a, **kw)

        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                self.seconds["generate"] += time.perf_counter() - t0

        def _generate_and_score_completions(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return super()._generate_and_score_completions(*a, **kw)
            finally:
                self.seconds["generate+score+ref"] += time.perf_counter() - t0

    TimedGRPOTrainer.seconds = {"generate": 0.0, "generate+score+ref": 0.0}
    TimedGRPOTrainer.train_tokens = 0.0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per_step = args.prompts_per_step * args.group_size
    # Chat-format prompts: TRL applies the tokenizer's chat template with add_generation_prompt=True,
    # which is what raylign's data.apply_chat_template=true does.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": prompts[i]}]} for i in order])
    settings: dict[str, Any] = dict(
        output_dir=str(workdir / "runs" / name), seed=args.seed, data_seed=args.seed, use_cpu=True,
        bf16=False, fp16=False,  # float32 on both sides
        # One optimizer step = one generation batch of prompts_per_step x group_size completions.
        per_device_train_batch_size=per_step, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=args.group_size, num_iterations=1, max_steps=args.steps,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=args.epsilon, loss_type="dapo", scale_rewards="group",
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0,  # optim: TRL's default AdamW (adamw_torch_fused), like raylign's learner
        shuffle_dataset=False,  # the dataset is already in raylign's per-step prompt order
        use_vllm=False, eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )
    # TRL turns activation checkpointing on by default; raylign does not checkpoint here, and it only
    # costs time when memory is not the limit.
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    settings["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = False
    timer = step_timer("reward")
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[letter_reward], args=GRPOConfig(**settings),
                               train_dataset=dataset, processing_class=tokenizer, callbacks=[timer],
                               peft_config=trl_lora_config() if args.lora else None)
    trainer.remove_callback(PrinterCallback)  # no per-step dict printing; raylign prints none either
    trainer.train()
    total = time.perf_counter() - start
    if len(timer.begin) != args.steps or len(timer.values) != args.steps:
        raise RuntimeError(f"TRL ran {len(timer.begin)} steps and logged {len(timer.values)} rewards, "
                           f"expected {args.steps}")
    window = timer.end[-1] - timer.begin[0]
    step_s = [e - b for b, e in zip(timer.begin, timer.end, strict=True)]
    sec = TimedGRPOTrainer.seconds
    split = {"generate": sec["generate"], "score+ref": sec["generate+score+ref"] - sec["generate"],
             "train": sum(step_s) - sec["generate+score+ref"]}
    return Result("TRL", args.steps, args.steps * per_step, window, step_s, timer.values, split, total - window,
                  TimedGRPOTrainer.train_tokens)


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (= generation batches) on each side")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (raylign n_samples, "
                   "TRL num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="max completion tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=128,
                   help="prompts longer than this (chat-templated) are left out on both sides")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3 in the loss)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range of the surrogate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=MODEL, help="model on both sides (a raylign name or a local HF directory)")
    p.add_argument("--lora", action="store_true", help=f"LoRA r={LORA_RANK} on all linear layers (peft) on both sides")
    p.add_argument("--peak-tokens", type=int, default=512,
                   help="rows of the matmuls bench/peak.py times for the MFU's peak (0: skip the MFU)")
    p.add_argument("--threads", type=int, default=2,
                   help="raylign: Ray CPUs and torch threads of its rollout worker and learner; TRL: torch threads")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each side this many times, alternating which goes first, and keep each side's "
                        "fastest run (for machines with other load)")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE for both sides (Ray actors inherit it): idle OpenMP threads sleep "
                        "instead of spinning, which keeps multi-threaded torch usable when other work shares the "
                        "cores")
    p.add_argument("--raylign-mode", choices=sorted(MODES), default="overlap",
                   help="overlap: sampling for the next step and the reference log-probs run on the rollout "
                        "worker while the learner trains (one update behind, decoupled PPO); sequential: one "
                        "phase after the other")
    p.add_argument("--seeds", type=int, default=1,
                   help="compare on this many seeds (--seed, --seed + 1, ...): median throughput ratio and "
                        "the mean final-reward difference against its standard error")
    p.add_argument("--raylign-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra raylign config override (repeatable), e.g. resources.rollout_workers=2; the "
                        "default is one learner, one rollout worker and one reward worker")
    p.add_argument("--only", choices=["raylign", "trl"], help="run one side (e.g. under a profiler)")
    p.add_argument("--workdir", help="where data and runs go (default: a fresh temp dir)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.seeds < 1:
        p.error("--repeat and --seeds must be >= 1")
    if args.group_size < 2:
        p.error("--group-size must be >= 2 (GRPO compares completions of one prompt)")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def describe(r: Result) -> str:
    reward, sd = r.final_reward()
    split = " / ".join(f"{k} {v / r.steps * 1000:.0f}" for k, v in r.split_s.items())
    other = r.window_s - sum(r.split_s.values())
    return (f"{r.name:>8}: {r.samples_per_s:7.1f} samples/s  ({r.steps} steps in {r.window_s:6.2f}s, median step "
            f"{1000 * r.median_step_s:6.1f} ms; mean ms/step: {split} / other {other / r.steps * 1000:.0f}; "
            f"outside the window {r.setup_s:5.1f}s; load {r.load:.1f})  "
            f"final reward {reward:.3f} ± {sd:.3f} (first {r.rewards[0]:.3f})")


def reward_table(results: list[Result], every: int) -> str:
    lines = ["step  " + "".join(f"{r.name:>10}" for r in results)]
    steps = results[0].steps
    for s in range(steps):
        if s % every == 0 or s == steps - 1:
            lines.append(f"{s + 1:>4}  " + "".join(f"{r.rewards[s]:>10.3f}" for r in results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.omp_passive:  # before torch (and its OpenMP runtime) is loaded here or in any Ray worker
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    # raylign's reward actor imports `letter_reward` from this file, wherever the script is run from.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    from raylign.models import pull_model

    load_at_start = os.getloadavg()[0]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raylign-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = pull_model(args.model)
    prompts = load_prompts(model_dir, args.max_prompt_tokens)
    if len(prompts) < args.prompts_per_step:
        raise SystemExit(f"only {len(prompts)} prompts fit --max-prompt-tokens={args.max_prompt_tokens}")
    data_path = workdir / "prompts.jsonl"
    with open(data_path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    mismatched = check_prompt_tokens(model_dir, prompts)
    per_step = args.prompts_per_step * args.group_size
    print(f"{args.model} at {model_dir}; {len(prompts)} prompts ({PROMPTS}, chat template, <= "
          f"{args.max_prompt_tokens} tokens); {args.steps} steps x {args.prompts_per_step} prompts x "
          f"{args.group_size} completions = {per_step} per optimizer step, <= {args.max_new_tokens} new tokens; "
          f"beta {args.beta} (k3, in the loss), epsilon {args.epsilon}, lr {args.lr}, {args.threads} threads "
          f"(TRL; raylign {args.raylign_mode}: {raylign_threads(args)} per actor), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}", flush=True)
    print(f"same work: prompt token ids identical on both sides = {mismatched == 0}"
          + (f" ({mismatched} of {len(prompts)} differ)" if mismatched else ""), flush=True)

    args.peak = measure_peak(args, model_dir)
    sides = [s for s in ("raylign", "trl") if args.only in (None, s)]
    first_seed = args.seed
    report: dict[str, Any] = {
        "settings": {k: getattr(args, k) for k in ("steps", "prompts_per_step", "group_size", "max_new_tokens",
                                                   "max_prompt_tokens", "lr", "beta", "epsilon", "seed", "seeds",
                                                   "model", "lora", "threads", "repeat", "raylign_mode", "raylign_set")}
        | {"raylign_threads": raylign_threads(args), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "load_avg_at_start": load_at_start, "prompts": len(prompts), "prompt_token_mismatches": mismatched,
           "peak": args.peak},
        "seeds": {},
    }
    for seed in range(first_seed, first_seed + args.seeds):
        args.seed = seed
        if args.seeds > 1:
            print(f"--- seed {seed}", flush=True)
        report["seeds"][seed] = compare_seed(args, sides, prompts, data_path, model_dir, workdir)
    args.seed = first_seed
    if len(sides) == 2 and args.seeds > 1:
        report["summary"] = summarize_seeds(report["seeds"])
    if args.json:
        if report["settings"]["peak"]:
            report["settings"]["peak"] = {k: v for k, v in report["settings"]["peak"].items() if k != "config"}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def measure_peak(args: argparse.Namespace, model_dir: str) -> dict[str, Any] | None:
    """bench/peak.py's float32 matmul peak at the model's shapes, now, in this run (None: --peak-tokens 0)."""
    return peak.model_peak(model_dir, args.model, args.peak_tokens, args.threads) if args.peak_tokens else None


def learner_mfu(args: argparse.Namespace, r: Result) -> dict[str, float] | None:
    """The MFU of `r`'s learner steps (train tokens over the summed train seconds) against the run's peak."""
    if not args.peak or not r.train_tokens or not r.split_s.get("train"):
        return None
    return peak.learner_mfu(args.peak["config"], LORA_RANK if args.lora else None, r.train_tokens,
                            r.completions, r.split_s["train"], args.peak["gflops"])


def compare_seed(args: argparse.Namespace, sides: list[str], prompts: list[str], data_path: Path, model_dir: str,
                 workdir: Path) -> dict[str, Any]:
    """Both sides on `args.seed`; prints the runs, the reward table and the comparison."""
    order = step_order(len(prompts), args)

    def run_side(side: str, r: int) -> Result:
        if side == "raylign":
            return run_raylign(args, data_path, model_dir, workdir, f"raylign-{args.seed}-{r}")
        return run_trl(args, prompts, order, model_dir, workdir, f"trl-{args.seed}-{r}")

    runs, results = alternate_runs(sides, args.repeat, run_side, describe, lambda res: res.samples_per_s)
    mfus = {r.name: learner_mfu(args, r) for r in results}
    for name, m in mfus.items():
        if m:
            print(peak.mfu_line(name, m))
    print("reward mean per step (same prompts at every step on both sides):")
    print(reward_table(results, max(1, args.steps // 10)))
    report: dict[str, Any] = {
        "results": {r.name: {"samples_per_s": r.samples_per_s, "window_s": r.window_s,
                             "median_step_s": r.median_step_s, "split_s": r.split_s,
                             "final_reward": r.final_reward()[0], "final_reward_sd": r.final_reward()[1],
                             "rewards": r.rewards, "step_s": r.step_s,
                             "all_runs_samples_per_s": [x.samples_per_s for x in runs[s]],
                             "all_runs_load": [x.load for x in runs[s]], "train_tokens": r.train_tokens,
                             "learner_mfu": mfus[r.name]}
                    for r, s in zip(results, sides, strict=True)},
    }
    if len(results) == 2:
        ours, peer = results
        ratio = ours.samples_per_s / peer.samples_per_s
        r1, r2 = ours.final_reward()[0], peer.final_reward()[0]
        # The step-to-step spread of the reward is the noise: the two sides sample with different random
        # streams, so only the curves' endpoints are compared.
        k, noise, agree = endpoints_agree(ours.rewards, peer.rewards)
        medians = [statistics.median(x.samples_per_s for x in runs[s]) for s in sides]
        report.update(ratio_raylign_over_trl=ratio, ratio_of_medians=medians[0] / medians[1],
                      final_reward_raylign=r1, final_reward_trl=r2, final_reward_agree=agree)
        print(f"ratio raylign/TRL: {ratio:.2f}x samples/s"
              + (f" (best runs; median runs {medians[0]:.1f} / {medians[1]:.1f} = {medians[0] / medians[1]:.2f}x)"
                 if args.repeat > 1 else ""))
        print(f"final reward (mean of last {k} steps): raylign {r1:.3f}, TRL {r2:.3f}, |diff| {abs(r1 - r2):.3f} "
              f"{'<=' if agree else '>'} noise {noise:.3f}: {'agree' if agree else 'DISAGREE'} within noise",
              flush=True)
    return report


def summarize_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: the median throughput ratio, and the mean paired final-reward difference
    (raylign - TRL) against twice its standard error (a paired t-interval of about 95%)."""
    ratios = [r["ratio_raylign_over_trl"] for r in per_seed.values()]
    diffs = [r["final_reward_raylign"] - r["final_reward_trl"] for r in per_seed.values()]
    mean_diff = statistics.mean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    out = {"ratios": ratios, "median_ratio": statistics.median(ratios), "reward_diffs": diffs,
           "mean_reward_diff": mean_diff, "reward_diff_se": se, "rewards_agree": abs(mean_diff) <= 2 * se,
           "mean_final_reward_raylign": statistics.mean(r["final_reward_raylign"] for r in per_seed.values()),
           "mean_final_reward_trl": statistics.mean(r["final_reward_trl"] for r in per_seed.values())}
    print(f"=== {len(ratios)} seeds: throughput ratio raylign/TRL per seed "
          f"{', '.join(f'{x:.2f}x' for x in ratios)}; median {out['median_ratio']:.2f}x")
    print(f"=== final reward, mean over seeds: raylign {out['mean_final_reward_raylign']:.3f}, TRL "
          f"{out['mean_final_reward_trl']:.3f}; paired difference {mean_diff:+.3f} ± {se:.3f} (s.e.): "
          f"{'agree' if out['rewards_agree'] else 'DISAGREE'} (|diff| {'<=' if out['rewards_agree'] else '>'} 2 s.e.)",
          flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
