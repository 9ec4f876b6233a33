"""Adversarial training you can watch in a minute on a laptop: a tiny random policy learns a property
of the "human" texts because a discriminator rewards it for looking human.

The human side is the base policy's own samples with ~30% of their characters turned into 'e', so
the two sides differ in one property only; the share of 'e' in the policy's samples is logged through
a reward source of weight 0 (`tests/rl_rewards.py:letter_share`). The script writes the human file,
runs `raylign train adversarial` (tiny:llama as generator and discriminator, GRPO), and plots D's
accuracy on human and policy samples, the fool rate and the 'e' share to `<out>/adversarial.png`.

    python examples/adversarial_demo.py --out runs/adversarial-demo      # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

LETTER = "function:tests.rl_rewards:letter_share"


def write_human_texts(path: Path, n_prompts: int = 100, e_share: float = 0.3, seed: int = 0) -> int:
    from raylign.data import load_dataset
    from raylign.workers.rollout import RolloutWorker

    prompts = load_dataset("builtin:everyday-prompts").column("prompt").to_pylist()[:n_prompts]
    worker = RolloutWorker(0, 1, 1, {"path": "tiny:llama"}, seed=1)
    groups = worker.generate_texts(prompts, {"n_samples": 3, "max_new_tokens": 16, "batch_size": 50})
    rng = random.Random(seed)
    rows = ["".join("e" if rng.random() < e_share else c for c in t) for g in groups for t in g if t.strip()]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return len(rows)


def plot(run_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "discriminator/fool_rate" in r and "reward/mean" in r]
    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(steps, [r["discriminator/accuracy_human"] for r in rows], label="D accuracy on human")
    left.plot(steps, [r["discriminator/accuracy_policy"] for r in rows], label="D accuracy on policy")
    left.plot(steps, [r["discriminator/fool_rate"] for r in rows], label="fool rate")
    left.set(xlabel="step", ylim=(-0.02, 1.02), title="discriminator")
    left.legend(loc="center left", fontsize=8)
    right.plot(steps, [r[f"reward/{LETTER}"] for r in rows], color="tab:green", label="share of 'e' (policy)")
    right.axhline(0.35, color="gray", ls="--", label="share of 'e' (human)")
    right.set(xlabel="step", title="the human property in policy samples")
    right.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/adversarial-demo", help="run directory (replaced)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    human = out.parent / f"{out.name}-human.jsonl"
    print(f"wrote {write_human_texts(human)} human texts to {human}")
    cmd = [sys.executable, "-m", "raylign.cli", "train", "adversarial",
           "model.path=tiny:llama", "model.lora=null", "adversarial.discriminator=tiny:llama",
           f"adversarial.human_data={human}", "adversarial.lr=1e-3", "adversarial.label_smoothing=0",
           "adversarial.warmup_steps=0", f'reward.sources=[{{source: "{LETTER}", weight: 0}}]',
           "rollout.max_new_tokens=16", "rollout.prompts_per_step=8", "rollout.n_samples=4",
           "train.batch_size=32", "train.micro_batch_size=32", "train.lr=3e-3", f"train.max_steps={args.steps}",
           "rl.eval_prompts=0", "output.save_every=0", f"output.dir={out.parent}", f"output.name={out.name}",
           "output.overwrite=true", "resources.cpus_per_learner=0.5", "resources.cpus_per_rollout_worker=0.5",
           "resources.cpus_per_reward_worker=0.25"]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    plot(out, out / "adversarial.png")
    print(f"plot: {out / 'adversarial.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
