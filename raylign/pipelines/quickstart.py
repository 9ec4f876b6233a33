"""`raylign quickstart`: a real model aligned end to end on a laptop with online RL.

SmolLM2-135M-Instruct (LoRA) learns to write more positive text as judged by the human-rated VADER
lexicon, with GRPO (Shao et al. 2024) on the built-in everyday prompts: the same loop as
`raylign train grpo`, with actors on a local Ray. Held-out prompts measure the reward and the KL to
the base model before and after.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raylign.config import ConfigError, load_config
from raylign.rundir import FINAL_DIR


def run_quickstart(overrides: list[str] | None = None, console: Console | None = None) -> dict[str, Any]:
    from raylign.data import prompt_plain_text
    from raylign.models import pull_model
    from raylign.pipelines.online import EVAL_SAMPLES, run_online

    console = console or Console()
    config = load_config("quickstart", overrides)
    if not (config.rl.eval_prompts and (config.data.val_fraction or config.data.validation)):
        raise ConfigError("the quickstart measures the reward on held-out prompts: keep rl.eval_prompts > 0 "
                          "and data.val_fraction > 0 (or set data.validation)")
    console.rule("[bold]raylign quickstart")
    console.print(f"model {config.model.path} (LoRA r={config.model.lora.r if config.model.lora else '-'}), "
                  f"reward {', '.join(s.source for s in config.reward.sources)}, {config.algorithm}")
    pull_model(config.model.path)
    shown: dict[str, Any] = {}
    result = run_online(config, console=console, eval_samples=shown)
    m = result.final_metrics
    summary = {"reward_before": m["eval/reward (before)"], "reward_after": m["eval/reward"],
               "kl_before": m["eval/kl (before)"], "kl_after": m["eval/kl"],
               "eval_completions": len(shown["after"]["texts"]), "steps": result.steps, "run_dir": result.run_dir}
    (Path(result.run_dir) / "quickstart.json").write_text(json.dumps(summary, indent=2))

    table = Table(title="held-out samples, before -> after", show_lines=True)
    table.add_column("prompt", max_width=30)
    table.add_column("base model", max_width=45)
    table.add_column("aligned model", max_width=45)
    before, after = shown["before"], shown["after"]
    # Rows are prompt-major, EVAL_SAMPLES per prompt, the same prompts before and after.
    for i in range(0, min(3 * EVAL_SAMPLES, len(before["texts"])), EVAL_SAMPLES):
        table.add_row(prompt_plain_text(before["prompts"][i]),
                      f"{before['texts'][i]}\n[dim]reward {before['scores'][i]:+.2f}[/dim]",
                      f"{after['texts'][i]}\n[dim]reward {after['scores'][i]:+.2f}[/dim]")
    console.print(table)
    console.print(
        f"mean reward on {summary['eval_completions']} held-out completions: "
        f"[bold]{summary['reward_before']:+.3f} -> {summary['reward_after']:+.3f}[/bold]   "
        f"KL to the base model: {summary['kl_before']:.3f} -> {summary['kl_after']:.3f} nats/completion"
    )
    final = Path(result.run_dir) / FINAL_DIR
    console.print(f"aligned model: {final}  (a transformers model dir: AutoModelForCausalLM.from_pretrained)")
    console.print(f"serve it:      raylign serve {final}")
    return summary
