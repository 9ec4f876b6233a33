"""Driver loops. `run_pipeline` picks the loop for `config.algorithm`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console

from raylign.config import ConfigError, RunConfig
from raylign.pipelines.adversarial import run_adversarial
from raylign.pipelines.multitask import MULTITASK_ALGORITHMS, run_multitask
from raylign.pipelines.offline import OFFLINE_ALGORITHMS, run_offline
from raylign.pipelines.online import ONLINE_ALGORITHMS, run_online
from raylign.rundir import RunResult


def run_rllib(config: RunConfig, **kwargs: Any) -> RunResult:
    """RLlib's DQN / PPO on text (raylign.rllib.runner), imported on first use: `import raylign.pipelines`
    does not import RLlib."""
    from raylign.rllib.runner import run_rllib as run

    return run(config, **kwargs)


PIPELINES = (dict.fromkeys(OFFLINE_ALGORITHMS, run_offline) | dict.fromkeys(ONLINE_ALGORITHMS, run_online)
             | {"adversarial": run_adversarial} | dict.fromkeys(MULTITASK_ALGORITHMS, run_multitask)
             | dict.fromkeys(("dqn", "rllib_ppo"), run_rllib))


def run_pipeline(config: RunConfig, resume: bool = False, console: Console | None = None,
                 on_step: Callable[[int, dict[str, Any]], None] | None = None, resume_force: bool = False) -> RunResult:
    """Run the loop for `config.algorithm`; `on_step(step, metrics)` is called after each logged step.
    `resume_force`: resume even a run whose identity (model, algorithm, data, seed) the config changed."""
    runner = PIPELINES.get(config.algorithm)
    if runner is None:
        raise ConfigError(
            f"algorithm '{config.algorithm}' is not available; available: {', '.join(sorted(PIPELINES))}"
        )
    return runner(config, resume=resume, console=console, on_step=on_step, resume_force=resume_force)


__all__ = ["PIPELINES", "RunResult", "run_pipeline"]
