"""RLlib DQN and RLlib PPO (token-level, `raylign train dqn` / `rllib_ppo`) against raylign's own GRPO
(sequence-level policy gradient) on the same work: the same tiny model, prompts, reward and sample budget.

Every side trains `tiny:llama` (full fine-tuning, float32) from the same prompts (`builtin:everyday-prompts`,
the first `--limit` rows, those whose chat-templated prompt fits `--max-prompt-tokens`), sampling
completions of at most `--max-new-tokens` tokens, scored by the same function (`letter_reward` below:
10 x the share of the letter "e" in the completion, which a tiny random model can move within a few
hundred completions), until `--completions` completions have been sampled:

  * dqn: RLlib DQN (new API stack) on `TextGenerationEnv`, one action per token, Q = tau*log_softmax over
    the reference's top-k tokens (`--top-k`), prioritized episode replay, n-step returns = the episode
    length, double Q, epsilon-greedy (1 -> 0.05 over the first ~60% of the budget's steps);
  * rllib_ppo: RLlib PPO on the same env: logits over the top-k as the action distribution, a value head,
    GAE, clipping, KL to the reference in the loss;
  * grpo: raylign's GRPO loop (`raylign train grpo`): 8 prompts x 4 completions a step, group-normalised
    advantages, one optimizer step per step.

All three run through raylign's public API (`load_config` + `run_pipeline`) on one local Ray of `--cpus`
CPUs, one after the other. Printed per side: the mean score of each consecutive block of `--block`
completions (the reward curve against completions sampled), the first and last block, completions per
second over the training loop (from the first iteration's start to the last one's end, from
metrics.jsonl: Ray/actor start-up and model loading are outside), and each side's ratio to GRPO.
The machine load (`uptime`) is printed too: on a shared machine the absolute rates move with it.

    .venv/bin/python bench/rllib_vs_raylign.py                  # all three, 320 completions each
    .venv/bin/python bench/rllib_vs_raylign.py --sides dqn grpo --completions 192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
# The reward actors import `letter_reward` from this file: its folder goes on the actors' PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
REWARD_SPEC = f"function:{Path(__file__).stem}:letter_reward"
MODEL = "tiny:llama"
SIDES = ("dqn", "rllib_ppo", "grpo")


def letter_reward(prompts, completions, **_) -> list[float]:
    """10 x the share of "e" among the completion's characters (0 when empty)."""
    return [10.0 * c.count("e") / len(c) if c else 0.0 for c in completions]


def overrides(side: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    common = [f"seed={args.seed}", "progress=false", f"model.path={MODEL}", "model.lora=null",
              "data.kind=prompts", "data.train=builtin:everyday-prompts", f"data.limit={args.limit}",
              "data.val_fraction=0", f"data.max_prompt_length={args.max_prompt_tokens}",
              f"reward.sources=[{{source: '{REWARD_SPEC}', weight: 1.0}}]",
              f"rollout.max_new_tokens={args.max_new_tokens}", "resources.learners=1",
              "resources.cpus_per_learner=0.5", "resources.reward_workers=1", "resources.cpus_per_reward_worker=0.25",
              f"output.dir={workdir}", f"output.name={side}", "output.overwrite=true", "output.save_every=0",
              "output.trackers=[]"]
    if side == "grpo":
        steps = args.completions // 32
        return common + ["rollout.prompts_per_step=8", "rollout.n_samples=4", "rollout.batch_size=8",
                         "train.batch_size=32", "train.micro_batch_size=32", f"train.max_steps={steps}",
                         f"train.lr={args.lr_grpo}", "train.eval_every=0", "rl.eval_prompts=0",
                         "resources.rollout_workers=1", "resources.cpus_per_rollout_worker=0.5",
                         "output.samples_per_step=0"]
    rl = [f"rllib.episodes={args.completions}", "rllib.env_runners=1", "rllib.cpus_per_env_runner=0.5",
          "rllib.envs_per_env_runner=8", f"rllib.top_k={args.top_k}", f"train.lr={args.lr_rllib}"]
    if side == "dqn":
        steps = args.completions * args.max_new_tokens
        return common + rl + ["rllib.score_offset=5", f"rllib.n_step={args.max_new_tokens}", "rllib.learning_starts=64",
                              "rllib.training_intensity=4", f"rllib.epsilon_steps={int(0.6 * steps)}"]
    return common + rl + ["rllib.ppo_batch_steps=256", "rllib.minibatch_size=64", "rllib.ppo_epochs=2",
                          "rllib.kl_coef=0.01"]


def run_side(side: str, args: argparse.Namespace, workdir: Path) -> dict:
    from rich.console import Console

    from raylign.config import load_config
    from raylign.pipelines import run_pipeline
    from raylign.rundir import read_metrics

    started = time.perf_counter()
    result = run_pipeline(load_config(side, overrides(side, args, workdir)), console=Console(stderr=True))
    total = time.perf_counter() - started
    rows = [r for r in read_metrics(result.run_dir) if "perf/step_seconds" in r]
    window = rows[-1]["time"] - (rows[0]["time"] - rows[0]["perf/step_seconds"])
    if side == "grpo":  # one score per step: the mean of its 32 completions
        scores = [r["reward/mean"] for r in rows for _ in range(int(r["rollout/completions"]))]
    else:
        with open(Path(result.run_dir) / "samples.jsonl", encoding="utf-8") as fh:
            scores = [json.loads(line)["score"] for line in fh]
    scores = scores[: args.completions]
    blocks = [statistics.fmean(scores[i : i + args.block]) for i in range(0, len(scores) - args.block + 1, args.block)]
    return {"side": side, "completions": len(scores), "window_s": window, "total_s": total,
            "completions_per_s": len(scores) / window, "blocks": blocks, "first": blocks[0], "last": blocks[-1]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--completions", type=int, default=320, help="sample budget per side (a multiple of 32)")
    p.add_argument("--block", type=int, default=32, help="completions per point of the reward curve")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=48)
    p.add_argument("--limit", type=int, default=64, help="first N rows of the prompt set")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--lr-rllib", type=float, default=1e-3)
    p.add_argument("--lr-grpo", type=float, default=3e-3)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/raylign-bench-rllib"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.completions % 32:
        p.error("--completions must be a multiple of 32 (GRPO samples 8 prompts x 4 a step)")
    return args


def main(argv: list[str] | None = None) -> None:
    import ray

    args = parse_args(argv)
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        results = [run_side(side, args, args.workdir) for side in args.sides]
    finally:
        ray.shutdown()
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    base = next((r for r in results if r["side"] == "grpo"), results[0])
    print(f"\nmodel {MODEL}, {args.completions} completions per side, <= {args.max_new_tokens} new tokens, "
          f"reward 10 x share of 'e', local Ray of {args.cpus} CPUs")
    print(f"load before: {load_before}\nload after:  {load_after}\n")
    print(f"reward (mean score per block of {args.block} completions) against completions sampled:")
    print("completions  " + "  ".join(f"{r['side']:>10}" for r in results))
    for i in range(max(len(r["blocks"]) for r in results)):
        cells = [f"{r['blocks'][i]:10.3f}" if i < len(r["blocks"]) else " " * 10 for r in results]
        print(f"{(i + 1) * args.block:>11}  " + "  ".join(cells))
    print(f"\n{'side':>10} {'first':>7} {'last':>7} {'gain':>7} {'compl/s':>8} {'x ' + base['side']:>9} "
          f"{'loop s':>7} {'total s':>8}")
    for r in results:
        print(f"{r['side']:>10} {r['first']:7.3f} {r['last']:7.3f} {r['last'] - r['first']:7.3f} "
              f"{r['completions_per_s']:8.3f} {r['completions_per_s'] / base['completions_per_s']:9.3f} "
              f"{r['window_s']:7.1f} {r['total_s']:8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load_before": load_before,
                                         "load_after": load_after, "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
