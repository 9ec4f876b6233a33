"""The Ray Tune trainable: one raylign recipe run per trial, reporting every `steps_per_iteration`
steps with `ray.tune.report(metrics, checkpoint=...)` and restarting from `ray.tune.get_checkpoint()`.

A trial's run directory is `<trial dir>/run/` (config.yaml, metrics.jsonl, tb/, checkpoints/, final/),
so one `tensorboard --logdir <sweep dir>` shows every trial. Each report carries `objective` (see
`raylign.tuning.objective`) besides the run's own metrics.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from raylign.config import RunConfig, load_config
from raylign.rundir import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, fsync_tree, read_metrics, read_trainer_state
from raylign.tuning.objective import alignment_objective
from raylign.tuning.spec import TuneSpec, override_item

RUN_SUBDIR = "run"


def trial_config(spec: TuneSpec, params: dict[str, Any], trial_dir: Path) -> RunConfig:
    """The recipe of one trial: the sweep's recipe and overrides, the sampled values, and the settings
    the sweep owns (step budget, eval/checkpoint interval, run directory, no progress bars)."""
    total = spec.iterations * spec.steps_per_iteration
    forced = [f"output.dir={trial_dir}", f"output.name={RUN_SUBDIR}", "progress=false", f"train.max_steps={total}",
              f"train.eval_every={spec.steps_per_iteration}", f"output.save_every={spec.steps_per_iteration}",
              "output.keep_last=1"]
    return load_config(spec.recipe, spec.overrides + [override_item(k, v) for k, v in params.items()] + forced)


def _place_checkpoint(src: Path, run_path: Path) -> int:
    """Put a Tune checkpoint back as the run's only checkpoint; returns its step.

    Atomic like the loop's own checkpoints: copied next to its place as `.tmp_step_<n>`, fsynced, then
    renamed, so a trial killed mid-copy leaves a partial dir that the next start deletes, never a
    `step_<n>` that resume would trust. It always replaces a same-step dir (a PBT exploit brings another
    trial's weights at a step this one also reached)."""
    step = int(read_trainer_state(src)["step"])
    ckpts = run_path / CHECKPOINTS_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    target = ckpts / f"{CHECKPOINT_PREFIX}{step}"
    tmp = ckpts / f".tmp_{CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    fsync_tree(tmp)
    if target.exists():
        stale = ckpts / f".tmp_{CHECKPOINT_PREFIX}{step}.old"
        os.replace(target, stale)
        os.replace(tmp, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, target)
    for old in ckpts.glob(f"{CHECKPOINT_PREFIX}*"):
        if old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)
    return step


def raylign_trainable(params: dict[str, Any], spec: dict[str, Any]) -> None:
    from ray import tune
    from rich.console import Console

    from raylign.pipelines import run_pipeline

    sweep = TuneSpec.model_validate(spec)
    trial_dir = Path(tune.get_context().get_trial_dir())
    run_path = trial_dir / RUN_SUBDIR
    config = trial_config(sweep, params, trial_dir)
    every, total = sweep.steps_per_iteration, sweep.iterations * sweep.steps_per_iteration
    resume = False
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a restored, resumed or PBT-exploited trial
        with checkpoint.as_directory() as d:
            _place_checkpoint(Path(d), run_path)
        resume = True
    elif run_path.exists():
        config.output.overwrite = True  # restarted from scratch: replace the partial run

    def report(step: int, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        row = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row["step"] = step
        objective = alignment_objective(config.algorithm, row, sweep.objective.kl_penalty)
        if objective is not None:
            row["objective"] = objective
        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(row, checkpoint=ckpt)

    def on_step(step: int, metrics: dict[str, Any]) -> None:
        if step % every == 0 and step < total:
            ckpt_dir = run_path / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step}"
            report(step, metrics, ckpt_dir if ckpt_dir.exists() else None)

    # resume_force: the sweep owns the trial's config (a PBT exploit may change any searched key).
    result = run_pipeline(config, resume=resume, resume_force=True, console=Console(quiet=True), on_step=on_step)
    final: dict[str, Any] = {}
    for row in read_metrics(result.run_dir):
        if row.get("step") == result.steps:
            final.update(row)
    final.pop("time", None)
    report(result.steps, final)
