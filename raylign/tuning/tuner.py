"""`raylign tune CONFIG`: build the Ray Tune experiment from a sweep spec, or resume an interrupted one.

Results land in `<output_dir>/<name>/` (Tune's experiment directory): one `trial_<id>/` per trial with
Tune's result.json/progress.csv and TensorBoard events, the trial's raylign run under `run/`, and
Tune's checkpoints. Running the same command again resumes the sweep (`Tuner.restore`): finished
trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from raylign.config import ConfigError, OutputConfig, RunConfig
from raylign.trackers import MLFLOW_DIR, mlflow_tracking_uri, require_libraries
from raylign.tuning.spec import TuneSpec, validate_trial_keys
from raylign.tuning.trainable import raylign_trainable

SPEC_FILE = "sweep.yaml"


def to_tune_space(space: dict[str, Any]) -> Any:
    from ray import tune

    (dist, args), = space.items()
    return {"uniform": lambda: tune.uniform(*args), "loguniform": lambda: tune.loguniform(*args),
            "quniform": lambda: tune.quniform(*args), "randint": lambda: tune.randint(*args),
            "choice": lambda: tune.choice(list(args)), "grid": lambda: tune.grid_search(list(args))}[dist]()


def trial_actor_cpus(config: RunConfig) -> float:
    """CPUs the actors of one trial reserve (they are placed outside the trial's own bundle)."""
    r = config.resources
    cpus = r.learners * r.cpus_per_learner
    if config.algorithm in ("ppo", "grpo", "rloo", "reinforce_pp", "adversarial"):
        cpus += r.rollout_workers * r.cpus_per_rollout_worker + r.reward_workers * r.cpus_per_reward_worker
    return cpus


def make_scheduler(spec: TuneSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = spec.scheduler
    if s.type == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=spec.iterations, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        mutations = s.mutations or spec.search_space
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
                                       quantile_fraction=s.quantile_fraction,
                                       hyperparam_mutations={k: to_tune_space(v) for k, v in mutations.items()})
    return FIFOScheduler()


def make_search_alg(spec: TuneSpec, max_concurrent: int) -> Any:
    """Random/grid: Tune's variant generator; Optuna (TPE) wrapped in a concurrency limiter. Both cap
    the trials running at once, since each trial's learners reserve CPUs outside its own bundle."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("search_alg optuna needs the optuna package: pip install optuna") from None
        return ConcurrencyLimiter(OptunaSearch(seed=spec.search_seed), max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=spec.search_seed, max_concurrent=max_concurrent)


def _wandb_callback(mode: str, **kwargs: Any) -> Any:
    """Tune's WandbLoggerCallback; in offline/disabled mode its setup does not ask for an API key (Ray
    skips that check only when $WANDB_MODE says offline, and here the mode comes from the recipe)."""
    import os

    from ray.air.integrations.wandb import WandbLoggerCallback

    class RecipeModeWandbLoggerCallback(WandbLoggerCallback):
        def setup(self, *args: Any, **kw: Any) -> None:
            if mode == "online" or "WANDB_MODE" in os.environ:
                return super().setup(*args, **kw)
            os.environ["WANDB_MODE"] = mode
            try:
                return super().setup(*args, **kw)
            finally:
                os.environ.pop("WANDB_MODE", None)

    return RecipeModeWandbLoggerCallback(mode=mode, **kwargs)


def sweep_callbacks(output: OutputConfig, sweep_name: str, sweep_dir: Path) -> list[Any]:
    """Sweep-level logging to the sinks the trials' recipe lists in `output.trackers`, through Tune's own
    callbacks: one W&B / MLflow run per trial with what it reports to Tune (objective, eval metrics) and
    its sampled hyperparameters, grouped under the sweep (W&B group / MLflow tag `raylign.sweep`; local
    files in `<sweep dir>/wandb/` and `<sweep dir>/mlruns/` unless a tracking URI is given). Each
    trial's run dir (`trial_<id>/run/`) still logs its every step to the same sinks through `RunDir`.
    TensorBoard needs no callback: Tune's default TBXLoggerCallback writes into every trial dir."""
    names = [n for n in dict.fromkeys(output.trackers) if n != "tensorboard"]
    require_libraries(names)
    callbacks: list[Any] = []
    if "wandb" in names and output.wandb_mode != "disabled":
        # dir: every trial's W&B files in <sweep dir>/wandb/ (the default, the trial's local staging dir,
        # can miss Tune's last sync to the sweep dir: the last trial's offline run stayed in /tmp/ray).
        callbacks.append(_wandb_callback(output.wandb_mode, project=output.wandb_project, group=sweep_name,
                                         dir=str(sweep_dir)))
    if "mlflow" in names:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = mlflow_tracking_uri(output.mlflow_tracking_uri, Path(sweep_dir) / MLFLOW_DIR)
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=output.mlflow_experiment,
                                              tags={"raylign.sweep": sweep_name}))
    return callbacks


def connect(ray_address: str | None, dashboard: bool) -> str | None:
    """Attach to Ray (the given address, $RAY_ADDRESS, or a new local instance with its dashboard);
    returns the dashboard URL when there is one."""
    import os

    import ray

    if ray.is_initialized():
        try:
            from ray._private.worker import get_dashboard_url

            url = get_dashboard_url()
        except Exception:  # noqa: BLE001 - the URL is informational only
            url = None
        return url or None
    address = ray_address or os.environ.get("RAY_ADDRESS")
    import logging

    if address:
        ctx = ray.init(address=address, logging_level=logging.WARNING)
    else:
        ctx = ray.init(address="local", include_dashboard=dashboard, logging_level=logging.WARNING)
    url = getattr(ctx, "dashboard_url", None)
    return url or None


def run_tune(spec: TuneSpec, console: Console | None = None, restart: bool = False, dashboard: bool = True,
             ray_address: str | None = None) -> Path:
    """Run (or resume) the sweep; returns its directory."""
    from ray import tune

    console = console or Console()
    base = validate_trial_keys(spec)  # every mistake before Ray starts
    assert spec.name is not None, "load_spec names the sweep after its file"
    sweep_dir = (Path(spec.output_dir) / spec.name).resolve()
    if restart and sweep_dir.exists():
        shutil.rmtree(sweep_dir)
    resuming = sweep_dir.exists() and tune.Tuner.can_restore(str(sweep_dir))
    callbacks = sweep_callbacks(base.output, sweep_dir.name, sweep_dir)  # a missing tracker library fails here
    url = connect(ray_address or base.resources.ray_address, dashboard)
    import ray

    console.print(f"[bold]sweep[/bold] {spec.name}: {spec.recipe} x {spec.num_samples} trial(s), "
                  f"{spec.iterations} iterations of {spec.steps_per_iteration} steps, metric {spec.metric} "
                  f"({spec.mode}), scheduler {spec.scheduler.type}, search {spec.search_alg}")
    console.print(f"results:      {sweep_dir}")
    console.print(f"Ray dashboard: {('http://' + url) if url and not url.startswith('http') else (url or 'off')}")
    console.print(f"TensorBoard:  tensorboard --logdir {sweep_dir}   (or: raylign dashboard {sweep_dir})")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))

    trainable = tune.with_resources(tune.with_parameters(raylign_trainable, spec=spec.model_dump(mode="json")),
                                    {"CPU": spec.trial_resources.cpus_per_trial})
    if resuming:
        console.print(f"[yellow]resuming the interrupted sweep in {sweep_dir}[/yellow]")
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        per_trial = spec.trial_resources.cpus_per_trial + trial_actor_cpus(base)
        concurrent = spec.trial_resources.max_concurrent_trials or max(
            1, math.floor(ray.cluster_resources().get("CPU", 1.0) / per_trial + 1e-9))
        console.print(f"at most {concurrent} trial(s) at once ({per_trial:g} CPUs each: the trial process and its "
                      "actors)")
        tuner = tune.Tuner(
            trainable,
            param_space={k: to_tune_space(v) for k, v in spec.search_space.items()},
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                scheduler=make_scheduler(spec), search_alg=make_search_alg(spec, concurrent),
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(sweep_dir.parent), verbose=1, callbacks=callbacks or None,
                # PBT exploits other trials' checkpoints: keep a few; otherwise the last one is enough.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if spec.scheduler.type == "pbt" else 1),
            ),
        )
    results = tuner.fit()
    # ResultGrid iterates by __getitem__ (the old sequence protocol); ray's class declares no __iter__.
    errors = [r.error for r in results if r.error is not None]  # type: ignore[attr-defined]
    if errors:
        console.print(f"[red]{len(errors)} trial(s) failed[/red]; first error: {errors[0]}")
    return sweep_dir
