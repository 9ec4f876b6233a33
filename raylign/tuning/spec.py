"""Sweep definitions (`tune_configs/*.yaml`): which recipe, what to search, how to schedule trials.

```yaml
recipe: multitask                 # built-in recipe name or a recipe YAML path
overrides: [model.path=tiny:llama] # dotted overrides applied to every trial
name: multitask-weights           # the sweep directory: <output_dir>/<name>/
metric: objective                 # any reported metric; `objective` = the alignment objective
mode: max
num_samples: 4
iterations: 4                     # reports per trial (ASHA's max_t)
steps_per_iteration: 5            # training steps between reports (= eval and checkpoint interval)
search_alg: random                # random | optuna | grid
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # asha | pbt | none
trial_resources: {cpus_per_trial: 0.25}   # the trial process; its learners ask for resources.* as usual
search_space:                     # dotted recipe key -> {distribution: arguments}
  multitask.tasks.imitation.weight: {loguniform: [0.1, 10.0]}
  train.lr: {choice: [1.0e-4, 3.0e-4]}
```

Distributions: `uniform: [lo, hi]`, `loguniform: [lo, hi]`, `quniform: [lo, hi, q]`, `randint: [lo, hi)`,
`choice: [...]`, `grid: [...]` (every value, times num_samples).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raylign.config import ConfigError, RunConfig, deep_merge, parse_overrides

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Section):
    type: Literal["asha", "pbt", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: iterations every trial gets before it can stop")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: keep the top 1/reduction_factor")
    perturbation_interval: int = Field(2, ge=1, description="PBT: iterations between exploit/explore")
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5, description="PBT: bottom/top fraction")
    mutations: dict[str, dict[str, Any]] | None = Field(
        None, description="PBT: resample spaces (default: search_space)")


class TrialResources(_Section):
    cpus_per_trial: float = Field(0.25, gt=0.0, description="the trial's driver process (learners ask for their own)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="default: as many as the cluster's CPUs hold, counting each trial's actors")


class ObjectiveSpec(_Section):
    kl_penalty: float = Field(0.1, ge=0.0, description="online RL: objective = reward - kl_penalty x KL")


class TuneSpec(_Section):
    description: str = ""
    recipe: str
    overrides: list[str] = Field(default_factory=list)
    name: str | None = None
    output_dir: str = "runs"
    metric: str = "objective"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1)
    iterations: int = Field(4, ge=1)
    steps_per_iteration: int = Field(5, ge=1)
    search_alg: Literal["random", "optuna", "grid"] = "random"
    search_seed: int = 0
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    trial_resources: TrialResources = Field(default_factory=TrialResources)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    search_space: dict[str, dict[str, Any]]

    @model_validator(mode="after")
    def _check_spaces(self) -> TuneSpec:
        spaces = dict(self.search_space)
        spaces.update({f"scheduler.mutations.{k}": v for k, v in (self.scheduler.mutations or {}).items()})
        for key, space in spaces.items():
            check_space(key, space)
        if self.search_alg == "grid" and any(next(iter(s)) != "grid" for s in self.search_space.values()):
            raise ValueError("search_alg grid: give every search_space entry as {grid: [...]}")
        if self.search_alg == "optuna" and any(next(iter(s)) == "grid" for s in self.search_space.values()):
            raise ValueError("search_alg optuna cannot search a grid; use choice: [...]")
        return self


def check_space(key: str, space: dict[str, Any]) -> None:
    if not isinstance(space, dict) or len(space) != 1:
        raise ValueError(f"search space '{key}': give one distribution, e.g. {{loguniform: [1e-5, 1e-3]}}")
    (dist, args), = space.items()
    if dist not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(dist), DISTRIBUTIONS, n=1)
        did = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"search space '{key}': unknown distribution '{dist}'.{did} One of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ValueError(f"search space '{key}': {dist} takes a list, e.g. {dist}: [..]")
    want = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2}.get(dist)
    if want and len(args) != want:
        raise ValueError(f"search space '{key}': {dist} takes {want} numbers, got {args}")
    if dist == "loguniform" and not 0 < args[0] < args[1]:
        raise ValueError(f"search space '{key}': loguniform needs 0 < low < high, got {args}")


def sample_values(space: dict[str, Any]) -> list[Any]:
    """A few representative values of a space (its ends, or its choices), for validating keys."""
    (dist, args), = space.items()
    if dist in ("choice", "grid"):
        return list(args)
    if dist == "randint":
        return [int(args[0]), int(args[1]) - 1]
    return [args[0], args[1]]


def override_item(key: str, value: Any) -> str:
    """`key=value` with the value written as YAML (so lists, floats and strings round-trip)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix(chr(10) + '...')}"


def _format(exc: ValidationError, source: str) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent: type[BaseModel] = TuneSpec
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part))
                ann = getattr(field, "annotation", None)
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    parent = ann
            valid = sorted(parent.model_fields)
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            did = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown key '{loc}'.{did} Valid keys: {', '.join(valid)}")
        else:
            lines.append(f"'{loc}': {e['msg'].removeprefix('Value error, ')}" if loc
                         else e["msg"].removeprefix("Value error, "))
    return f"invalid sweep config {source}:\n  " + "\n  ".join(lines)


def load_spec(path: str, overrides: list[str] | None = None) -> TuneSpec:
    """Read a sweep YAML; `key=value` overrides whose first part is a sweep key (num_samples,
    scheduler.type, ...) change the sweep, every other one is a recipe override for all trials."""
    p = Path(path)
    if not p.is_file():
        known = sorted(x.name for x in Path("tune_configs").glob("*.yaml")) if Path("tune_configs").is_dir() else []
        hint = f" Shipped sweeps: {', '.join('tune_configs/' + k for k in known)}" if known else ""
        raise ConfigError(f"sweep config not found: {path}.{hint}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep config {path}: expected a mapping")
    spec_items, recipe_items = [], []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        top = key.split(".", 1)[0]
        if top in TuneSpec.model_fields:
            spec_items.append(item)  # sweep keys win (recipe/description exist in both)
        elif top in RunConfig.model_fields:
            recipe_items.append(item)
        else:
            close = difflib.get_close_matches(top, list(TuneSpec.model_fields) + list(RunConfig.model_fields), n=1)
            did = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown override key '{key}'.{did} Sweep keys: {', '.join(TuneSpec.model_fields)}; "
                              "any other key is a recipe key (train.lr, model.path, ...)")
    data = deep_merge(data, parse_overrides(spec_items))
    data["overrides"] = list(data.get("overrides") or []) + recipe_items
    if data.get("name") is None:  # absent or `name: null`: the sweep is named after its file
        data["name"] = p.stem
    try:
        spec = TuneSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, path)) from None
    validate_trial_keys(spec)
    return spec


def validate_trial_keys(spec: TuneSpec) -> RunConfig:
    """Every searched key is a valid recipe key with valid values: one recipe per extreme value,
    so `train.lrr` fails with did-you-mean before any trial starts."""
    from raylign.config import load_config

    base = load_config(spec.recipe, spec.overrides)
    spaces = dict(spec.search_space) | (spec.scheduler.mutations or {})
    for key, space in spaces.items():
        for value in sample_values(space):
            try:
                load_config(spec.recipe, spec.overrides + [override_item(key, value)])
            except ConfigError as exc:
                raise ConfigError(f"search space '{key}' = {value!r}: {exc}") from None
    return base
