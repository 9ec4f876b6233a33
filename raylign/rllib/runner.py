"""The driver of `raylign train dqn` and `raylign train rllib_ppo`: RLlib's DQN / PPO on `TextGenerationEnv`.

It builds a `DQNConfig` / `PPOConfig` from raylign's typed config (`rllib:` plus model, data, reward,
rollout, train, resources), with EnvRunners and Learners as Ray actors on fractional CPUs and the reward
sources in raylign's reward actors, and keeps raylign's run-directory contract (`raylign.rundir`):

  config.yaml · metrics.jsonl (one row per RLlib iteration, `step` = iteration) + the trackers ·
  samples.jsonl (every finished episode: prompt, completion, score, reward, episode number) ·
  checkpoints/step_<n>/ = `rllib/` (RLlib's `Algorithm.save_to_path`), `replay_buffer.pkl` (DQN: the
  episode replay buffer, which RLlib's new-stack checkpoint leaves out) and trainer_state.json ·
  final/ = the trained LM as a Hugging Face directory (loads with `AutoModelForCausalLM`, `raylign serve`).

`--resume` restores the latest checkpoint with `Algorithm.restore_from_path`, puts the replay buffer
back and checks that the replay size and the sampled step count are the checkpoint's before going on.
"""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from rich.console import Console
from tqdm.auto import tqdm

from raylign.config import ConfigError, RunConfig
from raylign.rundir import RunDir, RunResult, read_trainer_state, write_trainer_state
from raylign.runtime import RunStopped, init_ray

RLLIB_ALGORITHMS = ("dqn", "rllib_ppo")
RLLIB_CHECKPOINT = "rllib"  # inside checkpoints/step_<n>/: Algorithm.save_to_path
REPLAY_BUFFER_FILE = "replay_buffer.pkl"  # ... and DQN's replay buffer state
REWARD_RESTARTS = 3


# ---- statistics ----------------------------------------------------------------------------------


def mean_and_sem(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) = (x̄, s/√n) with the sample std s (ddof = 1); sem = 0 for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def flat_scalars(tree: Any, prefix: str, depth: int = 2) -> dict[str, float]:
    """Numeric leaves of RLlib's nested result dict as `prefix/a/b` (down to `depth` levels)."""
    out: dict[str, float] = {}
    if not isinstance(tree, dict):
        return out
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict) and depth > 0:
            out.update(flat_scalars(value, name, depth - 1))
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


# ---- set-up --------------------------------------------------------------------------------------


def check_rllib_config(config: RunConfig) -> None:
    """What a user can get wrong, before Ray or any actor starts."""
    if config.algorithm not in RLLIB_ALGORITHMS:
        raise ConfigError(f"run_rllib runs {' or '.join(RLLIB_ALGORITHMS)}, not '{config.algorithm}'")
    if config.data.kind != "prompts":
        raise ConfigError(f"{config.algorithm} samples from prompts: set data.kind=prompts (got '{config.data.kind}')")
    rl = config.rllib
    if config.algorithm == "rllib_ppo" and rl.minibatch_size > rl.ppo_batch_steps:
        raise ConfigError(f"rllib.minibatch_size ({rl.minibatch_size}) must be <= rllib.ppo_batch_steps "
                          f"({rl.ppo_batch_steps})")
    if rl.epsilon_end > rl.epsilon_start:
        raise ConfigError(f"rllib.epsilon_end ({rl.epsilon_end}) must be <= rllib.epsilon_start ({rl.epsilon_start})")


def prompt_token_ids(config: RunConfig, console: Console) -> tuple[list[list[int]], list[Any], Any]:
    """(token ids of each formatted training prompt, the prompts as given, the tokenizer); prompts
    longer than data.max_prompt_length tokens are skipped, as in online RL."""
    from raylign.data import format_prompt, load_split
    from raylign.models import load_tokenizer

    tokenizer = load_tokenizer(config.model.path)
    train_table, _ = load_split(config.data, algorithm="grpo")  # a prompts dataset, as online RL reads it
    ids, texts = [], []
    prompts = train_table.column("prompt").to_pylist()
    for prompt in prompts:
        text = format_prompt(prompt, tokenizer, config.data.apply_chat_template)
        row = tokenizer(text, add_special_tokens=False)["input_ids"]
        if 0 < len(row) <= config.data.max_prompt_length:
            ids.append(row)
            texts.append(prompt)
    if len(ids) < len(prompts):
        console.print(f"[yellow]skipping {len(prompts) - len(ids)} prompts longer than "
                      f"data.max_prompt_length={config.data.max_prompt_length} tokens[/yellow]")
    if not ids:
        raise ConfigError(f"{config.data.train}: no prompt fits data.max_prompt_length={config.data.max_prompt_length}")
    return ids, texts, tokenizer


def vocab_size(config: RunConfig) -> int:
    """Rows of the LM's output layer (the action space), from its config (no weights loaded)."""
    from transformers import AutoConfig

    from raylign.models import resolve_model_path

    hf = AutoConfig.from_pretrained(resolve_model_path(config.model.path),
                                    trust_remote_code=config.model.trust_remote_code)
    return int(hf.vocab_size)


def env_config(config: RunConfig, prompts: list[list[int]], texts: list[Any], tokenizer: Any, vocab: int,
               reward_actors: list[str], episode_log: str | None) -> dict[str, Any]:
    """`TextGenerationEnv`'s config. DQN takes the KL to the reference as a per-token reward penalty;
    PPO adds it to its loss instead (so the env's is off)."""
    return {
        "prompts": prompts, "prompt_texts": texts, "tokenizer": config.model.path, "vocab_size": vocab,
        "eos_token_id": int(tokenizer.eos_token_id), "pad_token_id": int(tokenizer.pad_token_id or 0),
        "max_new_tokens": config.rollout.max_new_tokens, "reward_actors": reward_actors,
        "score_offset": config.rllib.score_offset, "episode_log": episode_log,
        "kl_coef": config.rllib.kl_coef if config.algorithm == "dqn" else 0.0,
        "reference": (config.reference or config.model).model_dump(mode="json"),
    }


def build_algorithm_config(config: RunConfig, env_cfg: dict[str, Any]) -> Any:
    """The RLlib `AlgorithmConfig` (DQNConfig or PPOConfig) of a run."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from raylign.rllib.env import TextGenerationEnv
    from raylign.rllib.modules import (
        REF_KL_COEF,
        CausalLMPolicyModule,
        CausalLMQModule,
        ReferenceKLPPOTorchLearner,
    )

    rl, res, ro = config.rllib, config.resources, config.rollout
    model_config = {"model": config.model.model_dump(mode="json"), "top_k": rl.top_k, "tau": rl.tau}
    if config.algorithm == "dqn":
        from ray.rllib.algorithms.dqn import DQNConfig

        replay: dict[str, Any] = (
            {"type": "PrioritizedEpisodeReplayBuffer", "capacity": rl.replay_capacity,
             "alpha": rl.prioritized_alpha, "beta": rl.prioritized_beta}
            if rl.replay == "prioritized" else {"type": "EpisodeReplayBuffer", "capacity": rl.replay_capacity})
        dqn_training: dict[str, Any] = {"grad_clip": config.train.max_grad_norm}
        if rl.training_intensity:
            dqn_training["training_intensity"] = rl.training_intensity
        algo: Any = DQNConfig().training(
            lr=config.train.lr, gamma=config.rl.gamma, n_step=rl.n_step, double_q=rl.double_q, dueling=False,
            num_atoms=1, target_network_update_freq=rl.target_update_period, tau=rl.target_update_tau,
            epsilon=[(0, rl.epsilon_start), (rl.epsilon_steps, rl.epsilon_end)],
            num_steps_sampled_before_learning_starts=rl.learning_starts,
            train_batch_size_per_learner=rl.dqn_batch_size, replay_buffer_config=replay,
            td_error_loss_fn=rl.td_loss, **dqn_training)
        module_class: type = CausalLMQModule
        fragment: int | str = ro.max_new_tokens
        learner: dict[str, Any] = {}
    else:
        from ray.rllib.algorithms.ppo import PPOConfig

        ppo_training: dict[str, Any] = {"grad_clip": config.train.max_grad_norm}
        algo = PPOConfig().training(
            lr=config.train.lr, gamma=config.rl.gamma, lambda_=rl.gae_lambda, clip_param=rl.clip_param,
            num_epochs=rl.ppo_epochs, minibatch_size=rl.minibatch_size, train_batch_size_per_learner=rl.ppo_batch_steps,
            vf_loss_coeff=rl.vf_loss_coeff, entropy_coeff=rl.entropy_coeff, use_kl_loss=False, **ppo_training)
        learner = {"learner_class": ReferenceKLPPOTorchLearner, "learner_config_dict": {REF_KL_COEF: rl.kl_coef}}
        module_class = CausalLMPolicyModule
        fragment = "auto"
    return (
        algo.framework("torch")
        .environment(TextGenerationEnv, env_config=env_cfg)
        .env_runners(num_env_runners=rl.env_runners, num_cpus_per_env_runner=rl.cpus_per_env_runner,
                     num_envs_per_env_runner=rl.envs_per_env_runner, rollout_fragment_length=fragment)
        .learners(num_learners=res.learners, num_cpus_per_learner=res.cpus_per_learner,
                  num_gpus_per_learner=res.gpus_per_learner, **learner)
        # Custom keys through rl_module(model_config=...): merged with DQN's defaults (double_q, epsilon,
        # ...), which an RLModuleSpec(model_config=...) would replace.
        .rl_module(rl_module_spec=RLModuleSpec(module_class=module_class), model_config=model_config)
        .reporting(min_sample_timesteps_per_iteration=0, min_time_s_per_iteration=0,
                   metrics_num_episodes_for_smoothing=20)
        .debugging(seed=config.seed, log_level="ERROR")
    )


# ---- the run -------------------------------------------------------------------------------------


class RLlibRun:
    """One run: the reward actors, the episode log, the RLlib Algorithm and the run directory."""

    def __init__(self, config: RunConfig, run: RunDir, console: Console):
        self.config, self.run, self.console = config, run, console
        self.algo: Any = None
        self.reward: Any = None
        self.episode_log: Any = None
        self.iteration = self.episodes = 0
        self.returns: list[float] = []  # every episode's terminal reward (score − offset), in order
        self.resumed: dict[str, float] = {}

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, prompts: list[list[int]], texts: list[Any], tokenizer: Any) -> None:
        from raylign.rllib.env import EpisodeLog
        from raylign.workers.group import WorkerGroup, gather
        from raylign.workers.reward import RewardWorker

        config, r = self.config, self.config.resources
        prefix = self.run.actor_prefix
        self.reward = WorkerGroup(
            RewardWorker, r.reward_workers, r.cpus_per_reward_worker, r.gpus_per_reward_worker, name="reward",
            max_restarts=REWARD_RESTARTS, actor_name_prefix=f"{prefix}-reward", call_timeout_s=r.call_timeout_s,
            init_kwargs={"reward": config.reward, "tokenizer": config.model.path}, placement=r.reward_placement)
        gather(self.reward.ready_async(), [f"reward[{i}].__init__" for i in range(len(self.reward))])
        log_name = f"{prefix}-episodes"
        self.episode_log = ray.remote(num_cpus=0)(EpisodeLog).options(name=log_name).remote()
        env_cfg = env_config(config, prompts, texts, tokenizer, vocab_size(config),
                             [f"{prefix}-reward-{i}" for i in range(len(self.reward))], log_name)
        self.algo = build_algorithm_config(config, env_cfg).build_algo()

    def stop(self) -> None:
        errors: list[BaseException] = []
        for release in (lambda: self.algo and self.algo.stop(), lambda: self.reward and self.reward.shutdown(),
                        lambda: self.episode_log and ray.kill(self.episode_log)):
            try:
                release()
            except BaseException as exc:  # noqa: BLE001 - release the rest whatever happens
                errors.append(exc)
        self.algo = self.reward = self.episode_log = None
        if errors:
            self.console.print(f"[yellow]while releasing the run's actors: {errors[0]!r}[/yellow]")

    # ---- counters ------------------------------------------------------------------------------
    def env_steps(self) -> int:
        from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

        return int(self.algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))

    def replay_timesteps(self) -> int:
        buffer = getattr(self.algo, "local_replay_buffer", None)
        return int(buffer.get_num_timesteps()) if buffer is not None else 0

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        tmp = self.run.begin_checkpoint(self.iteration)
        try:
            self.algo.save_to_path(str((tmp / RLLIB_CHECKPOINT).resolve()))
            buffer = getattr(self.algo, "local_replay_buffer", None)
            if buffer is not None:  # RLlib's new-stack checkpoint does not hold the replay buffer
                with open(tmp / REPLAY_BUFFER_FILE, "wb") as fh:
                    pickle.dump(buffer.get_state(), fh, protocol=pickle.HIGHEST_PROTOCOL)
            write_trainer_state(tmp, {"step": self.iteration, "episodes": self.episodes, "returns": self.returns,
                                      "env_steps": self.env_steps(), "replay_timesteps": self.replay_timesteps()})
            return self.run.commit_checkpoint(self.iteration, tmp)
        finally:
            self.run.remove_partial_checkpoints()

    def restore(self, checkpoint: Path) -> None:
        state = read_trainer_state(checkpoint)
        self.algo.restore_from_path(str((checkpoint / RLLIB_CHECKPOINT).resolve()))
        buffer = getattr(self.algo, "local_replay_buffer", None)
        if buffer is not None and (checkpoint / REPLAY_BUFFER_FILE).is_file():
            with open(checkpoint / REPLAY_BUFFER_FILE, "rb") as fh:  # written by this run itself (save)
                buffer.set_state(pickle.load(fh))  # noqa: S301
        self.iteration, self.episodes = int(state["step"]), int(state["episodes"])
        self.returns = [float(x) for x in state["returns"]]
        got = {"env_steps": self.env_steps(), "replay_timesteps": self.replay_timesteps()}
        for key, value in got.items():
            if value != int(state[key]):
                raise RunStopped(f"--resume: {checkpoint} was saved with {key}={state[key]} but restoring it gave "
                                 f"{value}; the checkpoint is incomplete, resume from an earlier one")
        self.resumed = {f"resume/{k}": float(v) for k, v in got.items()}
        self.run.truncate_logs_after(self.iteration)
        self.console.print(f"resumed from {checkpoint} at iteration {self.iteration}: {self.episodes} episodes, "
                           f"{got['env_steps']} env steps, replay buffer {got['replay_timesteps']} transitions")

    # ---- training ------------------------------------------------------------------------------
    def train(self, on_step: Any = None) -> dict[str, Any]:
        config, rl = self.config, self.config.rllib
        bar = tqdm(total=rl.episodes, initial=self.episodes, desc=config.algorithm, unit="episode",
                   disable=not config.progress)
        metrics: dict[str, Any] = {}
        started, episodes_at_start = time.perf_counter(), self.episodes
        while self.episodes < rl.episodes and (rl.iterations is None or self.iteration < rl.iterations):
            t0 = time.perf_counter()
            result = self.algo.train()
            rows = ray.get(self.episode_log.drain.remote())
            self.iteration += 1
            first = self.episodes
            self.episodes += len(rows)
            self.returns += [float(row["reward"]) for row in rows]
            self.run.log_samples(self.iteration, [{"episode": first + i + 1, **row} for i, row in enumerate(rows)])
            seconds = time.perf_counter() - t0
            metrics = {"episodes": self.episodes, "env_steps": self.env_steps(),
                       "perf/step_seconds": seconds, "perf/completions_per_second": len(rows) / max(seconds, 1e-9)}
            if rows:
                metrics.update({"reward/mean": float(np.mean([r["reward"] for r in rows])),
                                "score/mean": float(np.mean([r["score"] for r in rows])),
                                "response/length_mean": float(np.mean([r["tokens"] for r in rows])),
                                "response/finished_fraction": float(np.mean([r["finished"] for r in rows]))})
            if config.algorithm == "dqn":
                metrics["replay/timesteps"] = self.replay_timesteps()
            metrics.update(flat_scalars(result.get("learners", {}).get("default_policy", {}), "learner", depth=0))
            metrics.update(flat_scalars(result.get("env_runners", {}), "env_runners", depth=0))
            metrics.update(self.resumed)
            self.resumed = {}
            self.run.log_metrics(self.iteration, metrics)
            bar.update(len(rows))
            if rows:
                bar.set_postfix({"reward": f"{metrics['reward/mean']:.3f}"})
            every = config.output.save_every
            if every and self.iteration % every == 0:
                self.save()
            if on_step is not None:
                on_step(self.iteration, metrics)
        bar.close()
        elapsed = time.perf_counter() - started
        first20, first_sem = mean_and_sem(self.returns[:20])
        last20, last_sem = mean_and_sem(self.returns[-20:])
        return {"episodes": self.episodes, "iterations": self.iteration, "reward/first20": first20,
                "reward/first20_sem": first_sem, "reward/last20": last20, "reward/last20_sem": last_sem,
                "perf/completions_per_second": (self.episodes - episodes_at_start) / max(elapsed, 1e-9)}

    def save_final(self, tokenizer: Any) -> None:
        """The learner's LM weights reach the driver as numpy (through the object store), go into a fresh
        copy of the model and are saved as a Hugging Face directory (LoRA merged as model.lora says)."""
        import torch

        from raylign.models import load_causal_lm, save_model

        results = self.algo.learner_group.foreach_learner(
            lambda learner: learner.module["default_policy"].lm_state_dict())
        weights = next(iter(results)).get()
        lm = load_causal_lm(self.config.model)[0]
        lm.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
        lora = self.config.model.lora
        save_model(lm, tokenizer, self.run.final, merge_lora=lora.merge_on_save if lora else True)


def run_rllib(config: RunConfig, resume: bool = False, console: Console | None = None, on_step: Any = None,
              resume_force: bool = False) -> RunResult:
    """Train `config.algorithm` (dqn | rllib_ppo) with RLlib (module docstring)."""
    from raylign.rewards import check_reward_specs

    console = console or Console()
    check_rllib_config(config)
    check_reward_specs(config.reward)
    prompts, texts, tokenizer = prompt_token_ids(config, console)
    run = RunDir(config, resume=resume, resume_force=resume_force)
    console.print(f"[bold]{config.algorithm}[/bold] (RLlib) {run.path}  ·  {len(prompts)} prompts  ·  "
                  f"{config.rllib.episodes} episodes x <= {config.rollout.max_new_tokens} tokens")
    session = RLlibRun(config, run, console)
    try:
        init_ray(config.resources.ray_address)
        session.start(prompts, texts, tokenizer)
        checkpoint = run.latest_checkpoint() if resume else None
        if checkpoint is not None:
            session.restore(checkpoint)
        final = session.train(on_step)
        if config.output.save_every and session.iteration % config.output.save_every:
            session.save()  # the last iteration too, so --resume with a larger budget continues from it
        session.save_final(tokenizer)
        run.log_final_model()
    finally:
        session.stop()
        run.close()
    return RunResult(str(run.path), session.iteration, final)
