"""Typed run configuration: pydantic models for every recipe section, YAML recipes, dotted overrides.

A recipe is a YAML file whose top-level keys are the sections below. `load_config` reads a built-in
recipe name or a path, applies `key=value` overrides (`train.lr=1e-5 resources.rollout_workers=2`)
and validates everything before anything starts. Every mistake a user can make (unknown key, wrong
type, missing file) becomes one `ConfigError` naming the key, the expected type and the valid keys.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from raylign.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration mistake the user can fix; the message says what to do."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SectionT = typing.TypeVar("SectionT", bound=BaseModel)


def as_section(cls: type[SectionT], value: SectionT | dict[str, Any]) -> SectionT:
    """A section as its model. Configs cross actor boundaries as the models themselves (validated once,
    at load); a plain mapping (a caller's shorthand, e.g. in a test) is validated here."""
    return value if isinstance(value, cls) else cls.model_validate(value)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


class LoraConfig(Section):
    """LoRA adapters through peft."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "all-linear" lets peft pick every linear layer except the output head.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_on_save: bool = True


class ModelConfig(Section):
    """A model named by HF id, local path, `builtin:<name>` or `tiny:<arch>`."""

    path: str = "tiny:llama"
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False


class DataConfig(Section):
    """Where the examples come from and how they are split and truncated."""

    kind: Literal["prompts", "pairs", "unpaired", "ratings", "text"] = "prompts"
    train: str = "builtin:everyday-prompts"
    validation: str | None = None
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    split_seed: int = 0
    max_prompt_length: int = Field(256, gt=0)
    max_length: int = Field(512, gt=0)
    apply_chat_template: bool = True
    limit: int | None = Field(None, gt=0, description="use only the first N rows (quick trials)")


class RewardSourceConfig(Section):
    """One reward source and its weight in the mix (`lexicon:vader`, `length`, a model path, ...)."""

    source: str
    weight: float = 1.0


class RewardConfig(Section):
    sources: list[RewardSourceConfig] = Field(default_factory=list)
    batch_size: int = Field(32, gt=0)


class RolloutConfig(Section):
    """Sampling settings for rollout workers and for evaluation generation."""

    prompts_per_step: int = Field(8, gt=0, description="online RL: prompts sampled per step (x n_samples)")
    batch_size: int = Field(8, gt=0, description="prompts per generate call on one worker (memory bound)")
    n_samples: int = Field(1, ge=1, description="completions per prompt (GRPO group size)")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    reference_on_workers: bool = Field(
        False, description="online RL: rollout workers also compute the reference log-probs of what they "
        "sample, with a frozen copy of the initial model (one more model copy per worker), so the learner "
        "does not; with overlap this takes them off the learner's critical path")
    overlap: bool = Field(
        False, description="online RL: sample step k+1 while the learners train on step k (one update "
        "behind; decoupled PPO corrects for it: the clip is taken against the policy as the step starts "
        "and each token is reweighted by min(π_prox/π_sampler, rl.behavior_weight_cap))")


class RLConfig(Section):
    """Online RL (ppo, grpo, rloo, reinforce_pp): advantages, KL to the reference, PPO clipping."""

    kl_coef: float = Field(0.05, ge=0.0, description="β of the KL penalty; 0 = none (KL still logged)")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["reward", "loss"] = Field("loss", description="per-token reward shaping or a loss term")
    kl_target: float | None = Field(None, gt=0.0, description="adaptive β toward this KL (Ziegler et al.)")
    kl_horizon: int = Field(10000, gt=0)
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    clip_eps: float = Field(0.2, gt=0.0)
    clip_eps_high: float | None = Field(None, gt=0.0, description="DAPO clip-higher; None = clip_eps")
    dual_clip: float | None = Field(None, gt=1.0)
    behavior_weight_cap: float = Field(
        2.0, gt=0.0, description="with rollout.overlap: truncation of decoupled PPO's weight π_prox/π_behav")
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    scale_rewards: bool = Field(True, description="GRPO: divide by the group std (False = Dr. GRPO)")
    whiten_advantages: bool = Field(True, description="PPO: whiten GAE advantages over the batch")
    entropy_coef: float = Field(0.0, ge=0.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    critic: str | None = Field(None, description="PPO critic backbone; None = a copy of the policy")
    critic_lr: float | None = Field(None, gt=0.0, description="None = train.lr")
    value_clip: float = Field(0.2, gt=0.0)
    eval_prompts: int = Field(32, ge=0, description="held-out prompts scored before/after and at eval_every")


class TrainConfig(Section):
    """Optimisation settings shared by every learner."""

    lr: float = Field(1e-5, gt=0.0)
    batch_size: int = Field(8, gt=0, description="examples per optimizer step, across all learners")
    micro_batch_size: int = Field(8, gt=0, description="examples per forward pass on one learner")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, gt=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    eval_every: int = Field(0, ge=0, description="0 = only at the end")
    log_every: int = Field(1, ge=1)
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop", description="a NaN/inf loss or gradient norm: stop the run with a message (the last checkpoint "
        "stays resumable), or skip that optimizer step and go on (counted as train/skipped_steps)")
    counterfactual_penalty: float = Field(
        0.0, ge=0.0, description="reward models and the DPO family: λ · (score(x) − score(x'))² for each text x "
        "and its counterfactual copies x' (a group term swapped), added to the loss (counterfactual logit "
        "pairing); 0 = off")


class PreferenceConfig(Section):
    """Hyperparameters of the offline preference objectives (DPO family, KTO, ORPO, SimPO, reward)."""

    beta: float = Field(0.1, gt=0.0, description="DPO/IPO/KTO temperature; SimPO reward scale")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="> 0 gives conservative DPO (cDPO)")
    precompute_ref_logps: bool = Field(
        True, description="one pass over the data before training; the reference is then not held")
    desirable_weight: float = Field(1.0, gt=0.0)
    undesirable_weight: float = Field(1.0, gt=0.0)
    orpo_lambda: float = Field(0.1, gt=0.0)
    simpo_gamma: float = Field(0.5, ge=0.0)
    use_margin: bool = Field(False, description="reward models: use the data's `margin` column")


class AdversarialConfig(Section):
    """Adversarial training: a discriminator D learns human text (label 1) from policy samples (label 0)
    and its judgement is the policy's reward (`raylign train adversarial`)."""

    generator: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = Field(
        "grpo", description="the RL algorithm that updates the policy (generator) on D's reward")
    discriminator: str = Field("builtin:minilm-l6", description="D's backbone (any reward-model spec)")
    human_data: str | None = Field(
        None, description="human texts ({text} rows); unset: data.kind=pairs gives the chosen answers")
    weight: float = Field(1.0, description="weight of D's reward in the mix with reward.sources")
    generator_reward: Literal["logit", "log_d", "minus_log_one_minus_d"] = "logit"
    per_prefix: bool = Field(False, description="SeqGAN Monte-Carlo reward per prefix (token-level credit)")
    mc_rollouts: int = Field(4, ge=1, description="completions per prefix when per_prefix is on")
    lr: float = Field(5e-5, gt=0.0, description="D's AdamW learning rate")
    d_steps: int = Field(1, ge=1, description="D updates (k_D) per generator step")
    warmup_steps: int = Field(0, ge=0, description="D updates on the initial policy's samples before G moves")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="one-sided: human target 1 - eps")
    gradient_penalty: float = Field(0.0, ge=0.0, description="weight of the R1 penalty on human inputs")
    replay_size: int = Field(512, ge=0, description="earlier policy samples kept for D (0 = none)")
    replay_fraction: float = Field(0.5, ge=0.0, le=1.0,
                                   description="share of D's policy side drawn from the replay buffer")
    accuracy_ceiling: float = Field(0.95, gt=0.5, le=1.0, description="pause D while its accuracy is above")
    collapse_patience: int = Field(10, ge=1, description="warn when D accuracy is pinned this many steps")
    max_length: int = Field(256, gt=1, description="D's max tokens per (prompt, completion)")


_GATE = re.compile(r"^\s*([A-Za-z_][\w/]*)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


class TaskConfig(Section):
    """One task of a multi-task run (`multitask.tasks.<name>`): its data, loss, weight and priority."""

    type: Literal["imitation", "preference", "rating"]
    data: DataConfig
    weight: float = Field(1.0, ge=0.0, description="static λ_i (multiplies learned uncertainty/GradNorm weights)")
    ratio: float = Field(1.0, gt=0.0, description="share of train.batch_size drawn from this task each step")
    loss: Literal["dpo", "ipo", "hinge", "simpo", "orpo"] = Field("dpo", description="preference tasks")
    head: Literal["regression", "classification"] = Field("regression", description="rating tasks")
    num_classes: int | None = Field(None, ge=2, description="rating classification: ratings are 0..K-1")
    priority: int = Field(0, ge=0, description="0 = highest; a task trains only while higher ones meet their gate")
    gate: str | None = Field(None, description="condition on this task's smoothed train metric that lets lower-"
                             "priority tasks train, e.g. 'accuracy >= 0.8' or 'loss < 2.5'")

    @model_validator(mode="before")
    @classmethod
    def _default_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("data"), dict) and "kind" not in data["data"]:
            kinds: dict[Any, str] = {"imitation": "text", "preference": "pairs", "rating": "ratings"}
            kind = kinds.get(data.get("type"))
            if kind:
                data = {**data, "data": {**data["data"], "kind": kind}}
        return data

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        kinds = {"imitation": ("text", "pairs", "unpaired"), "preference": ("pairs",), "rating": ("ratings",)}
        if self.data.kind not in kinds[self.type]:
            raise ValueError(f"a {self.type} task trains on data.kind {' or '.join(kinds[self.type])}, "
                             f"not '{self.data.kind}'")
        if self.gate is not None and not _GATE.match(self.gate):
            raise ValueError(f"gate '{self.gate}' must look like 'accuracy >= 0.8' or 'loss < 2.5'")
        if self.head == "classification" and self.num_classes is None:
            raise ValueError("a classification rating head needs num_classes")
        return self

    def gate_parts(self) -> tuple[str, str, float] | None:
        """('accuracy', '>=', 0.8) for gate 'accuracy >= 0.8'."""
        if self.gate is None:
            return None
        match = _GATE.match(self.gate)
        assert match is not None, "the gate was checked against _GATE at validation"
        metric, op, value = match.groups()
        return metric, op, float(value)


class MultitaskConfig(Section):
    """Multi-task learning on one shared backbone: L = Σ λ_i L_i (see algorithms/task_weighting.py)."""

    weighting: Literal["static", "uncertainty", "gradnorm", "pcgrad"] = "static"
    gradnorm_alpha: float = Field(1.5, ge=0.0)
    weighting_lr: float = Field(0.025, gt=0.0, description="step size of learned weights (uncertainty, GradNorm)")
    gate_smoothing: float = Field(0.8, ge=0.0, lt=1.0, description="EMA of the train metrics that gates use")
    tasks: dict[str, TaskConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _drop_removed(cls, data: Any) -> Any:
        """`multitask.tasks.rating=null` removes a task that the recipe lists."""
        if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
            data = {**data, "tasks": {k: v for k, v in data["tasks"].items() if v is not None}}
        return data


class RLlibConfig(Section):
    """`raylign train dqn` / `rllib_ppo`: RLlib's DQN and PPO over the LM's vocabulary (raylign/rllib/).
    One episode is one completion; one action one token; the reward is the completion's score at the end."""

    episodes: int = Field(300, gt=0, description="stop once this many episodes (completions) were sampled")
    iterations: int | None = Field(None, gt=0, description="also stop after this many RLlib iterations")
    env_runners: int = Field(1, ge=0, description="EnvRunner actors (0 = sample in the driver)")
    cpus_per_env_runner: float = Field(0.5, gt=0.0)
    envs_per_env_runner: int = Field(4, ge=1, description="vectorised episodes per EnvRunner (one batched forward)")
    top_k: int = Field(50, ge=0, description="actions = the reference's top-k tokens at each state; 0 = whole vocab")
    tau: float = Field(1.0, gt=0.0, description="Q(s, a) = tau * log_softmax(logits)[a]")
    score_offset: float = Field(0.0, description="terminal reward = score - score_offset (DQN: tau*log-probs are "
                                "<= 0, so returns <= 0 are representable)")
    kl_coef: float = Field(0.0, ge=0.0, description="β of the KL to the frozen reference (DQN: per-token reward "
                           "penalty; PPO: a loss term); 0 = none")
    # DQN
    replay: Literal["prioritized", "uniform"] = "prioritized"
    replay_capacity: int = Field(50000, gt=0, description="transitions the episode replay buffer holds")
    prioritized_alpha: float = Field(0.6, ge=0.0)
    prioritized_beta: float = Field(0.4, ge=0.0)
    n_step: int = Field(8, ge=1, description="n-step returns")
    target_update_period: int = Field(200, ge=1, description="env steps between target-network updates")
    target_update_tau: float = Field(1.0, gt=0.0, le=1.0, description="Polyak weight of a target update (1 = copy)")
    double_q: bool = True
    td_loss: Literal["mse", "huber"] = "mse"
    epsilon_start: float = Field(1.0, ge=0.0, le=1.0)
    epsilon_end: float = Field(0.05, ge=0.0, le=1.0)
    epsilon_steps: int = Field(1000, gt=0, description="env steps over which epsilon decays linearly")
    learning_starts: int = Field(128, ge=0, description="env steps sampled before the first update")
    dqn_batch_size: int = Field(32, gt=0, description="transitions per DQN update")
    training_intensity: float | None = Field(None, gt=0.0, description="replayed / sampled steps; None = RLlib's")
    # PPO
    clip_param: float = Field(0.2, gt=0.0)
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0)
    ppo_batch_steps: int = Field(256, gt=0, description="env steps per PPO iteration (per learner)")
    minibatch_size: int = Field(64, gt=0)
    ppo_epochs: int = Field(2, ge=1)
    vf_loss_coeff: float = Field(0.5, ge=0.0)
    entropy_coeff: float = Field(0.0, ge=0.0)


class ResourcesConfig(Section):
    """How many actors of each kind, and what each gets; fractional CPUs let 2 cores host many."""

    ray_address: str | None = Field(None, description="attach to this cluster; None = auto/local")
    learners: int = Field(1, ge=1)
    cpus_per_learner: float = Field(1.0, gt=0.0)
    gpus_per_learner: float = Field(0.0, ge=0.0)
    rollout_workers: int = Field(1, ge=1)
    cpus_per_rollout_worker: float = Field(0.5, gt=0.0)
    gpus_per_rollout_worker: float = Field(0.0, ge=0.0, description="> 0: sample on a GPU (fractions share one)")
    reward_workers: int = Field(1, ge=1)
    cpus_per_reward_worker: float = Field(0.25, gt=0.0)
    gpus_per_reward_worker: float = Field(0.0, ge=0.0, description="> 0: reward models / discriminator on a GPU")
    threads: int | None = Field(
        None, gt=0, description="torch threads per rollout/learner actor; None = its CPU share. The RL loop's "
        "groups take turns, so on one small machine each may use every core")
    learner_strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every learner holds the whole model and optimizer; fsdp: parameters, gradients "
        "and optimizer state sharded across learners (PyTorch FSDP2, fully_shard)")
    learner_placement: str = Field(
        "pack", description="where the learner group's actors go: pack | spread | a node resource name "
        "(e.g. node_a, from `raylign cluster up`)")
    rollout_placement: str = Field("pack", description="as learner_placement, for rollout workers")
    reward_placement: str = Field("pack", description="as learner_placement, for reward workers")
    call_timeout_s: float | None = Field(
        1800.0, gt=0.0, description="a remote call (a train step, a generation, a reward) still running after "
        "this stops the run naming the actor and method; None = wait forever")

    @field_validator("learner_placement", "rollout_placement", "reward_placement")
    @classmethod
    def _placement(cls, value: str) -> str:
        return check_placement(value)


_NODE_RESOURCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_placement(value: str) -> str:
    """`pack`, `spread` or the name of a custom node resource (`node_b`); ValueError otherwise."""
    if value in ("pack", "spread"):
        return value
    if not _NODE_RESOURCE.match(value) or value in _RAY_RESOURCES or value.startswith("node:"):
        raise ValueError(f"placement {value!r} must be pack, spread or the name of a node resource (letters, "
                         "digits, '_', '-', '.'; not CPU/GPU/memory), e.g. node_b from `raylign cluster up`")
    return value


def _default_trackers() -> list[Literal["tensorboard", "wandb", "mlflow"]]:
    return ["tensorboard"]


class OutputConfig(Section):
    """The run directory `<dir>/<name>/`."""

    dir: str = "runs"
    name: str | None = Field(None, description="one path component under dir; default: <recipe>-<timestamp>")
    save_every: int = Field(0, ge=0, description="checkpoint every k steps; 0 = only final")
    keep_last: int = Field(2, ge=1)
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=_default_trackers, description="metric sinks besides metrics.jsonl: tensorboard "
        "(<run>/tb/), wandb (<run>/wandb/), mlflow (<run>/mlruns/ or mlflow_tracking_uri); [] = none")
    wandb_project: str = Field("raylign", description="W&B project of the run")
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline: no account or network, `wandb sync <run>/wandb/offline-run-*` uploads "
        "later; online: streams to W&B (needs `wandb login` or WANDB_API_KEY)")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow store or server (http://host:5000, sqlite:///mlflow.db); None = <run>/mlruns/")
    mlflow_experiment: str = Field("raylign", description="MLflow experiment the run is logged under")
    samples_per_step: int = Field(4, ge=0)
    overwrite: bool = False
    storage: str | None = Field(
        None, description="a pyarrow.fs URI (a local/NFS path, s3://, gs://) that checkpoints and final/ reach "
        "from the node that wrote them, for clusters without a shared filesystem; None = output.dir is shared")

    @field_validator("storage")
    @classmethod
    def _storage_uri(cls, storage: str | None) -> str | None:
        """Every node resolves output.storage itself: a relative path would mean a different place on each."""
        if storage is None or "://" in storage or storage.startswith(("/", "~")):
            return storage
        raise ValueError(f"{storage!r} is a relative path; output.storage must be a URI (s3://bucket/prefix, "
                         "gs://..., file:///path) or an absolute path that every node sees (NFS)")

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, name: str | None) -> str | None:
        """A run name is a directory name under `dir`, never a path: `output.overwrite` must not be able
        to reach outside it (`../victim`, `/`)."""
        if name is None:
            return None
        problem = ("is empty" if not name.strip() else "contains a NUL byte" if "\0" in name
                   else "is '.' or '..'" if name in (".", "..")
                   else "contains a path separator" if "/" in name or "\\" in name
                   else f"is {len(name.encode())} bytes, over 255" if len(name.encode()) > 255 else None)
        if problem:
            raise ValueError(f"the run name {name!r} {problem}: it must be one directory name under output.dir "
                             "(letters, digits, '-', '_', '.'), e.g. output.name=my-run")
        return name


# Every algorithm `raylign train` runs (IPO and cDPO are DPO's preference.loss_type / label_smoothing).
Algorithm = Literal["sft", "reward", "dpo", "simpo", "orpo", "kto", "ppo", "grpo", "rloo", "reinforce_pp",
                    "adversarial", "multitask", "dqn", "rllib_ppo"]
ALGORITHMS: tuple[str, ...] = typing.get_args(Algorithm)
# Keys that moved: the old spelling fails with a pointer to the new one.
MOVED_KEYS = {"rollout.workers": "resources.rollout_workers", "output.tensorboard": "output.trackers"}


class RunConfig(Section):
    """A whole recipe."""

    recipe: str = "custom"
    algorithm: Algorithm = "sft"
    description: str = ""
    seed: int = 0
    progress: bool = True
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ModelConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    multitask: MultitaskConfig = Field(default_factory=MultitaskConfig)
    rllib: RLlibConfig = Field(default_factory=RLlibConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _batch_divides(self) -> RunConfig:
        t = self.train
        if t.micro_batch_size > t.batch_size:
            raise ValueError(
                f"train.micro_batch_size ({t.micro_batch_size}) must be <= train.batch_size ({t.batch_size})"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Loading, overrides, errors
# --------------------------------------------------------------------------------------------------

RECIPES_PACKAGE = "raylign.recipes"


def list_recipes() -> dict[str, str]:
    """Built-in recipe names and their one-line descriptions."""
    out = {}
    for entry in sorted(resources.files(RECIPES_PACKAGE).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text()) or {}
            out[entry.name[:-5]] = str(data.get("description", "")).strip()
    return out


def recipe_text(name_or_path: str) -> tuple[str, str]:
    """(recipe name, YAML text) for a built-in recipe name or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {name_or_path}")
        return path.stem, path.read_text()
    entry = resources.files(RECIPES_PACKAGE) / f"{name_or_path}.yaml"
    if not entry.is_file():
        known = list(list_recipes())
        hint = difflib.get_close_matches(name_or_path, known, n=1)
        did = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(
            f"unknown recipe '{name_or_path}'.{did} Built-in recipes: {', '.join(known)}; "
            "or pass a path to a YAML file."
        )
    return name_or_path, entry.read_text()


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-5", "model.lora.r=8"]` -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key part")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # a later override wins: `model.lora=null model.lora.r=8` enables LoRA
            node = node[part]
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic section class at a location like ('model', 'lora')."""
    model: type[BaseModel] = RunConfig
    key_next = False  # the part after a dict-of-sections field is a key (e.g. multitask.tasks.<name>)
    for part in path:
        if isinstance(part, int):
            continue
        if key_next:
            key_next = False
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        sub = _section_type(field.annotation)
        if sub is None:
            return None
        key_next = typing.get_origin(field.annotation) is dict
        model = sub
    return model


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        return f"list of {_type_name(inner)}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return "a section (mapping)" if issubclass(annotation, BaseModel) else annotation.__name__
    return str(annotation)


def _literal_values(annotation: Any) -> list[Any]:
    """The allowed values of a Literal annotation (inside Optional/unions too)."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in _literal_values(arg)]


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic appends union-member tags (e.g. 'LoraConfig', 'literal[...]') to locations; drop them."""
    return tuple(p for i, p in enumerate(loc) if isinstance(p, int) or _model_at(loc[:i]) is not None)


def _format_error(loc: tuple[Any, ...], err: ErrorDetails, several: bool) -> str:
    dotted = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        moved = MOVED_KEYS.get(".".join(str(p) for p in loc if not isinstance(p, int)))
        if moved:
            return f"unknown key '{dotted}'. Did you mean '{moved}'? (the key moved there)"
        parent = _model_at(loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        did = f" Did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else ""
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"unknown key '{dotted}'.{did} Valid keys in {where}: {', '.join(valid)}"
    if not loc:  # a cross-field check of a whole section
        return err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":  # a field's own check: its message says what is wrong and what to do
        return f"'{dotted}': " + err["msg"].removeprefix("Value error, ")
    parent = _model_at(loc[:-1])
    expected = ""
    if parent is not None and str(loc[-1]) in parent.model_fields:
        expected = f"expected {_type_name(parent.model_fields[str(loc[-1])].annotation)}"
    got = f"got {err['input']!r} ({type(err['input']).__name__})" if "input" in err else ""
    # A list item (`output.trackers.0`) is checked against its list field's Literal.
    field_loc = loc[:-1] if loc and isinstance(loc[-1], int) else loc
    owner = _model_at(field_loc[:-1]) if field_loc else None
    if err["type"] == "literal_error" and isinstance(err.get("input"), str) and owner is not None \
            and str(field_loc[-1]) in owner.model_fields:
        choices = [str(a) for a in _literal_values(owner.model_fields[str(field_loc[-1])].annotation)]
        if field_loc is not loc:
            expected = "expected one of " + ", ".join(repr(c) for c in choices)
        close = difflib.get_close_matches(err["input"], choices, n=1)
        if close:
            got += f". Did you mean '{close[0]}'?"
    # With several union members failing, pydantic's per-member messages only confuse.
    quiet = several or err["type"] == "literal_error"  # the expected values are already listed
    detail = "" if quiet else f" ({err['msg'].removeprefix('Value error, ')})"
    return f"'{dotted}': " + "; ".join(x for x in (expected, got) if x) + detail


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a raw mapping, turning pydantic's errors into one readable ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        by_loc: dict[tuple[Any, ...], list[ErrorDetails]] = {}
        for e in exc.errors():
            by_loc.setdefault(_clean_loc(tuple(e["loc"])), []).append(e)
        lines = [_format_error(loc, errs[0], len(errs) > 1) for loc, errs in by_loc.items()]
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines)) from None


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Built-in recipe or YAML path + dotted overrides -> validated RunConfig."""
    name, text = recipe_text(name_or_path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {name_or_path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {name_or_path}: expected a mapping of sections")
    data.setdefault("recipe", name)
    data = deep_merge(data, parse_overrides(overrides or []))
    return validate_config(data, source=f"recipe '{name_or_path}'")


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (what `config.yaml` in a run directory holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def validate_settings(cls: type[SectionT], values: dict[str, Any],
                      error: type[ConfigError] = ConfigError) -> SectionT:
    """A command's settings model (`ServeSettings`, `EvalSettings`, `AnnotateSettings`) from CLI values;
    a bad value or combination is one `error` naming the field, not a pydantic traceback."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise error(f"{where}: {message}" if where else message) from None
