"""`raylign quickstart`: a real model aligned end to end on a laptop.

Sample n answers per prompt, let the reward pick the best and the worst, and train on the pairs: DPO
(Rafailov et al. 2023) by default, or SFT on the best answers (rejection-sampling fine-tuning, RAFT,
Dong et al. 2023) with algorithm=sft. Held-out prompts measure the reward before and after.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from raylign.config import RunConfig, load_config
from raylign.workers.group import WorkerGroup, init_ray
from raylign.workers.rollout import RolloutWorker


def _generator(config: RunConfig, model: dict[str, Any]) -> WorkerGroup:
    return WorkerGroup(RolloutWorker, 1, config.resources.cpus_per_rollout_worker, name="rollout",
                       init_kwargs={"model": model, "seed": config.seed,
                                    "apply_chat_template": config.data.apply_chat_template})


def _generate(group: WorkerGroup, config: RunConfig, prompts: list[Any], n: int, seed: int,
              desc: str) -> list[list[str]]:
    """Chunks sent from the driver so the progress bar moves; each chunk seeded from (seed, chunk)."""
    sampling = config.rollout.model_dump() | {"n_samples": n}
    size = config.rollout.batch_size
    out: list[list[str]] = []
    for i in tqdm(range(0, len(prompts), size), desc=desc, unit="batch", disable=not config.progress):
        out.extend(group.call("generate", prompts[i : i + size], sampling, seed=seed * 100_003 + i)[0])
    return out


def run_quickstart(overrides: list[str] | None = None, console: Console | None = None) -> dict[str, Any]:
    from raylign.data import load_dataset, prompt_plain_text, split_train_val
    from raylign.models import pull_model
    from raylign.pipelines.annotate import best_worst_pair, write_jsonl_atomic
    from raylign.pipelines.offline import run_offline
    from raylign.rewards.lexicon import VaderReward

    console = console or Console()
    config = load_config("quickstart", overrides)
    run_path = Path(config.output.dir) / (config.output.name or "quickstart")
    if run_path.exists():
        shutil.rmtree(run_path)
    (run_path / "data").mkdir(parents=True)

    console.rule("[bold]raylign quickstart")
    console.print(f"1/4 model {config.model.path}")
    pull_model(config.model.path)
    table = load_dataset(config.data.train, "prompts", limit=config.data.limit)
    train_t, eval_t = split_train_val(table, config.data.val_fraction, config.data.split_seed)
    train_prompts = train_t.column("prompt").to_pylist()
    eval_prompts = eval_t.column("prompt").to_pylist()
    reward = VaderReward()
    init_ray(config.resources.ray_address)

    base = config.model.model_dump() | {"lora": None}
    n = config.rollout.n_samples
    console.print(f"2/4 sampling {n} answers for {len(train_prompts)} prompts and scoring them with {reward.name}")
    group = _generator(config, base)
    try:
        before = _generate(group, config, eval_prompts, 2, config.seed + 1, "base model, held-out prompts")
        candidates = _generate(group, config, train_prompts, n, config.seed, f"base model, {n} samples/prompt")
    finally:
        group.shutdown()

    # The same best-vs-worst rule as `raylign data annotate` (ties and empty answers give no pair).
    pairs = [best_worst_pair(prompt, answers, reward.score([prompt] * len(answers), answers))[0]
             for prompt, answers in zip(train_prompts, candidates, strict=True)]
    rows = [row for row in pairs if row is not None]
    data_file = run_path / "data" / "best_of_n.jsonl"
    write_jsonl_atomic(rows, data_file)

    what = "DPO on" if config.algorithm == "dpo" else "fine-tuning on the preferred answers of"
    console.print(f"3/4 {what} {len(rows)} pairs (LoRA r={config.model.lora.r})")
    sft = config.model_copy(deep=True)
    sft.data.train = str(data_file)
    sft.data.kind = "pairs"
    sft.data.limit = None
    sft.data.val_fraction = 0.1
    # The run directory already holds the generated data: continue into it rather than replace it.
    result = run_offline(sft, resume=True, console=console)

    console.print("4/4 sampling the aligned model on held-out prompts")
    final = {"path": str(Path(result.run_dir) / "final")}
    group = _generator(config, final)
    try:
        after = _generate(group, config, eval_prompts, 2, config.seed + 1, "aligned model, held-out prompts")
    finally:
        group.shutdown()

    def mean_reward(samples: list[list[str]]) -> float:
        flat = [a for answers in samples for a in answers]
        return float(reward.score([None] * len(flat), flat).mean())

    summary = {"reward_before": mean_reward(before), "reward_after": mean_reward(after),
               "eval_prompts": len(eval_prompts), "train_examples": len(rows), "run_dir": result.run_dir}
    (run_path / "quickstart.json").write_text(json.dumps(summary, indent=2))

    shown = Table(title="held-out samples, before -> after", show_lines=True)
    shown.add_column("prompt", max_width=30)
    shown.add_column("base model", max_width=45)
    shown.add_column("aligned model", max_width=45)
    for i in range(min(3, len(eval_prompts))):
        shown.add_row(prompt_plain_text(eval_prompts[i]), before[i][0], after[i][0])
    console.print(shown)
    console.print(
        f"mean {reward.name} reward on {len(eval_prompts)} held-out prompts: "
        f"[bold]{summary['reward_before']:+.3f} -> {summary['reward_after']:+.3f}[/bold]"
    )
    console.print(f"aligned model: {final['path']}  (loads with transformers.AutoModelForCausalLM)")
    return summary
