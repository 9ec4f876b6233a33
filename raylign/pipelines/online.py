"""Online RL on the loop skeleton: PPO, GRPO, RLOO and REINFORCE++ in one single-controller loop.

Each step:
  1. generate: the policy learner's trainable weights (only the adapter under LoRA) go into the object
     store once; every rollout worker samples its share of the step's prompts with them (weight
     version = policy updates so far) and returns token ids and sampling log-probs;
  2. score / reference / values: the reward workers score the completions while the learners compute
     reference log-probs (and the critic its values, for PPO);
  3. advantages: the driver turns scores into advantages with `algorithms.advantages.compute_advantages`;
  4. train: the learners take `rl.epochs` passes over the batch in minibatches of `train.batch_size`
     completions, one optimizer step each (the critic trains beside the policy).

The driver holds no model. Every random choice comes from `raylign.runtime`'s seeding scheme keyed by
(seed, purpose, step, index), so a resumed run repeats the uninterrupted one, and a rollout or reward
actor restarted by Ray after a crash repeats its share of the step exactly (no sample lost or counted
twice). `loop.run_loop` owns the run directory, resume, logging, checkpoints, final/ and shutdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from rich.console import Console

from raylign.algorithms.advantages import compute_advantages
from raylign.algorithms.diversity import distinct_n, pearson
from raylign.algorithms.kl import AdaptiveKLController, FixedKLController
from raylign.algorithms.policy import rl_units
from raylign.config import ConfigError, RolloutConfig, RunConfig
from raylign.data.batches import combine_ranks, summarize_critic, summarize_policy
from raylign.pipelines.loop import Algorithm, LearnerSlot, OnStep, PhaseTimer, run_loop, step_indices
from raylign.rundir import CRITIC_DIR, PENDING_ROLLOUTS, PENDING_ROLLOUTS_META, RunDir, RunResult
from raylign.runtime import Purpose, derive_seed, rng
from raylign.workers.group import WorkerGroup, shard_batch
from raylign.workers.learner import LearnerWorker
from raylign.workers.reward import RewardWorker, merge_scores
from raylign.workers.rollout import RolloutWorker

# Algorithm -> advantage estimator.
ONLINE_ALGORITHMS = {"ppo": "gae", "grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp"}
EVAL_SAMPLES = 2  # completions per held-out prompt when measuring reward and KL
ROLLOUT_RESTARTS = 3  # a crashed rollout or reward actor is restarted this often, its call retried
Pending = tuple[list[ray.ObjectRef], list[int]] | dict[str, Any]  # rollouts in flight, or restored


def rl_algorithm(config: RunConfig) -> str:
    """The RL algorithm that updates the policy: the run's own, or the generator's of an adversarial run."""
    return config.adversarial.generator if config.algorithm == "adversarial" else config.algorithm


# ---- batches -------------------------------------------------------------------------------------


def merge_rollouts(parts: list[dict[str, Any]], prompt_offsets: list[int]) -> dict[str, Any]:
    """Concatenate the workers' results (prompt-major) and give each row its step-global prompt id."""
    out: dict[str, Any] = {"prompt_ids": [], "response_ids": [], "logprobs": [], "texts": []}
    if all("ref_logps" in p for p in parts):  # rollout.reference_on_workers
        out["ref_logps"] = []
    group, finished = [], []
    for part, offset in zip(parts, prompt_offsets, strict=True):
        for key in out:
            out[key].extend(part[key])
        group.append(np.asarray(part["prompt_index"]) + offset)
        finished.append(np.asarray(part["finished"]))
    out["group_ids"] = np.concatenate(group)
    out["finished"] = np.concatenate(finished)
    out["versions"] = [p["version"] for p in parts]
    out["seconds"] = max(p["seconds"] for p in parts)
    out["tokens"] = sum(p["tokens"] for p in parts)
    return out


def training_batch(rollouts: dict[str, Any], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded prompt + response rows. `loss_mask` marks response tokens; `old_logps` holds the
    sampling log-probs at those positions (per-token arrays aligned with input_ids), and `ref_logps`
    the reference's when the rollout workers computed them."""
    rows = [np.concatenate([p, r]) for p, r in zip(rollouts["prompt_ids"], rollouts["response_ids"], strict=True)]
    width = max(len(r) for r in rows)
    n = len(rows)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    attn = np.zeros((n, width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        attn[i, : len(row)] = 1

    def at_responses(per_row: list[Any], dtype: Any) -> np.ndarray:
        """Per-row response values placed at the response positions of the padded rows (0 elsewhere)."""
        out = np.zeros((n, width), dtype=dtype)
        for i, (row, prompt, values) in enumerate(zip(rows, rollouts["prompt_ids"], per_row, strict=True)):
            out[i, len(prompt) : len(row)] = values
        return out

    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": at_responses([1] * n, np.int64),
             "old_logps": at_responses(rollouts["logprobs"], np.float32)}
    if "ref_logps" in rollouts:
        batch["ref_logps"] = at_responses(rollouts["ref_logps"], np.float32)
    return batch


def batch_advantages(
    algorithm: str, config: RunConfig, batch: dict[str, np.ndarray], scores: np.ndarray, group_ids: np.ndarray,
    kl_coef: float, values: np.ndarray | None = None, prefix_values: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """`compute_advantages` on a training batch's input-aligned arrays, with `config.rl`'s settings:
    (advantages [B, T], PPO's returns [B, T] or None, metrics), aligned with input_ids again."""
    rl = config.rl

    def predicted(x: np.ndarray) -> torch.Tensor:  # [B, T] input-aligned -> [B, T-1] predicted tokens
        return torch.as_tensor(x[:, 1:])

    adv, ret, metrics = compute_advantages(
        algorithm, torch.as_tensor(scores, dtype=torch.float32), predicted(batch["old_logps"]),
        predicted(batch["ref_logps"]), predicted(batch["loss_mask"]), group_ids, kl_coef=kl_coef,
        kl_in_reward=rl.kl_in == "reward", kl_estimator=rl.kl_estimator, scale_rewards=rl.scale_rewards,
        whiten=rl.whiten_advantages, gamma=rl.gamma, lam=rl.lam,
        values=None if values is None else predicted(values),
        prefix_values=None if prefix_values is None else predicted(prefix_values).float())
    full = np.zeros_like(batch["old_logps"])
    full[:, 1:] = adv.numpy()
    returns = None
    if ret is not None:
        returns = np.zeros_like(batch["old_logps"])
        returns[:, 1:] = ret.numpy()
    return full, returns, metrics


# ---- the algorithm -------------------------------------------------------------------------------


def discriminator_kwargs(config: RunConfig) -> dict[str, Any]:
    """`Discriminator(...)` arguments (plus its weight in the reward mix) from `config.adversarial`."""
    a = config.adversarial
    return {"model": a.discriminator, "reward": a.generator_reward, "lr": a.lr, "weight": a.weight,
            "label_smoothing": a.label_smoothing, "gradient_penalty": a.gradient_penalty,
            "batch_size": config.reward.batch_size, "max_length": a.max_length,
            "max_prompt_length": config.data.max_prompt_length,
            "apply_chat_template": config.data.apply_chat_template,
            "seed": derive_seed(config.seed, Purpose.INIT),
            "conditioned": config.data.kind == "pairs"}  # pairs: human answers to the same prompts


class OnlineRL(Algorithm):
    """The actor groups of one online-RL run and the driver-side operations on them (module docstring).

    `game` (the adversarial pipeline's `AdversarialGame`) adds a second player: `prepare` sees the
    training rows before Ray starts (called by `run_online`), `start` warms up or restores it,
    `prefix_values` may give per-prefix rewards, `after_step` trains it on the step's samples (its
    metrics join the step's), `save` writes it into each checkpoint and `finish` next to the final
    policy. `eval_samples`, when given, receives the held-out generations before and after training
    (the quickstart shows them)."""

    def __init__(self, config: RunConfig, console: Console, train: list[Any], held_out: list[Any], pad_id: int,
                 game: Any = None, eval_samples: dict[str, Any] | None = None):
        super().__init__(config, console)
        rl, t, ro = config.rl, config.train, config.rollout
        self.algorithm = rl_algorithm(config)  # the policy's update rule (the generator's, if adversarial)
        self.name = config.algorithm
        self.train, self.held_out, self.pad_id = train, held_out, pad_id
        self.game, self.eval_samples = game, eval_samples
        self.per_step = ro.prompts_per_step * ro.n_samples
        self.minibatches = self.per_step // t.batch_size
        self.total_steps = t.max_steps or t.epochs * (len(train) // ro.prompts_per_step)
        self.kl_ctl: AdaptiveKLController | FixedKLController = (
            AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon) if rl.kl_target
            else FixedKLController(rl.kl_coef))
        self.policy: WorkerGroup | None = None
        self.critic: WorkerGroup | None = None
        self.rollout: WorkerGroup | None = None
        self.reward: WorkerGroup | None = None
        # With rollout.overlap, step k+1 is sampled (with the weights before step k's update) while the
        # learners train on step k; a checkpoint then keeps that batch, so a resumed run trains on it too.
        self.pending: Pending | None = None
        self.before: dict[str, float] = {}
        self.run: RunDir | None = None

    @property
    def optimizer_steps(self) -> int:
        return self.total_steps * self.config.rl.epochs * self.minibatches

    def describe(self, run: RunDir) -> str:
        return (f"[bold]{self.config.algorithm}[/bold] {run.path}  ·  {len(self.train)} prompts, "
                f"{len(self.held_out)} held out  ·  {self.total_steps} steps x {self.per_step} completions  ·  "
                f"{self.config.rl.epochs} epoch(s) x {self.minibatches} minibatch(es)")

    # ---- groups --------------------------------------------------------------------------------
    def start(self, run: RunDir) -> None:
        self.run = run
        config, r = self.config, self.config.resources
        prefix = run.actor_prefix
        timeout = r.call_timeout_s
        self.policy = WorkerGroup(
            LearnerWorker, r.learners, r.cpus_per_learner, r.gpus_per_learner, name="policy", threads=r.threads,
            call_timeout_s=timeout,
            actor_name_prefix=f"{prefix}-policy", init_kwargs={"config": config, "objective": "policy"},
            placement=r.learner_placement)
        self.learners.append(LearnerSlot(self.policy))
        if self.algorithm == "ppo":
            critic_cfg = config.model_copy(deep=True)
            critic_cfg.model.path = config.rl.critic or config.model.path
            critic_cfg.train.lr = config.rl.critic_lr or config.train.lr
            self.critic = WorkerGroup(
                LearnerWorker, r.learners, r.cpus_per_learner, r.gpus_per_learner, name="critic",
                threads=r.threads, actor_name_prefix=f"{prefix}-critic", call_timeout_s=timeout,
                init_kwargs={"config": critic_cfg, "objective": "value"}, placement=r.learner_placement)
            self.learners.append(LearnerSlot(self.critic, CRITIC_DIR, model_dir=False, final=False))
        self.rollout = WorkerGroup(
            RolloutWorker, r.rollout_workers, r.cpus_per_rollout_worker, r.gpus_per_rollout_worker, name="rollout",
            threads=r.threads, max_restarts=ROLLOUT_RESTARTS, actor_name_prefix=f"{prefix}-rollout",
            call_timeout_s=timeout, placement=r.rollout_placement,
            init_kwargs={"model": config.model, "seed": config.seed,
                         "apply_chat_template": config.data.apply_chat_template,
                         "reference": config.rollout.reference_on_workers})
        self.groups.append(self.rollout)
        reward_kwargs: dict[str, Any] = {"reward": config.reward, "tokenizer": config.model.path}
        if config.algorithm == "adversarial":
            reward_kwargs["discriminator"] = discriminator_kwargs(config)
        self.reward = WorkerGroup(
            RewardWorker, r.reward_workers, r.cpus_per_reward_worker, r.gpus_per_reward_worker, name="reward",
            # A restarted actor would come back with the initial discriminator: the run stops instead
            # (and `--resume` continues from the last checkpoint, D included).
            max_restarts=0 if config.algorithm == "adversarial" else ROLLOUT_RESTARTS,
            actor_name_prefix=f"{prefix}-reward", init_kwargs=reward_kwargs, call_timeout_s=timeout,
            placement=r.reward_placement)
        self.groups.append(self.reward)

    @property
    def policy_group(self) -> WorkerGroup:
        assert self.policy is not None, "start() first"
        return self.policy

    @property
    def reward_group(self) -> WorkerGroup:
        assert self.reward is not None, "start() first"
        return self.reward

    # ---- driver-side operations (the adversarial game uses them too) ---------------------------
    def launch_generate(self, prompts: list[Any], sampling: RolloutConfig, *, step: int, purpose: Purpose,
                        version: int) -> tuple[list[ray.ObjectRef], list[int]]:
        """Start sampling with the policy's weights as they are now (the learner's `get_weights` call is
        queued before any later training call): one object reaches every worker. Prompt i of `prompts`
        is sampled under the seed key (seed, purpose, step, i) whichever worker gets it. Returns the
        pending results and each worker's first prompt index, for `collect`."""
        assert self.rollout is not None, "start() first"
        # Under fsdp gathering the weights is a collective: every rank takes part, rank 0's copy is sent.
        sharded = self.config.resources.learner_strategy == "fsdp"
        weights = [w.get_weights.remote() for w in self.policy_group.workers[: None if sharded else 1]][0]
        parts = [s["prompts"] for s in shard_batch({"prompts": prompts}, len(self.rollout))]
        offsets = [int(o) for o in np.cumsum([0] + [len(p) for p in parts[:-1]])]
        busy = [(w, part, offset) for w, part, offset in zip(self.rollout.workers, parts, offsets, strict=True) if part]
        refs = [w.generate.remote(part, sampling, self.config.seed, step=step, purpose=purpose, first_index=offset,
                                  weights=weights, version=version, reference=self.config.rollout.reference_on_workers)
                for w, part, offset in busy]
        return refs, [offset for _, _, offset in busy]

    def collect(self, pending: Pending) -> dict[str, Any]:
        if isinstance(pending, dict):  # restored from a checkpoint
            return pending
        assert self.rollout is not None, "start() first"
        refs, offsets = pending
        return merge_rollouts(self.rollout.get(refs, "generate"), offsets)

    def generate(self, prompts: list[Any], sampling: RolloutConfig, *, step: int, purpose: Purpose,
                 version: int) -> dict[str, Any]:
        return self.collect(self.launch_generate(prompts, sampling, step=step, purpose=purpose, version=version))

    def score_async(self, prompts: list[Any], completions: list[str]) -> list[ray.ObjectRef]:
        shards = shard_batch({"prompts": prompts, "completions": completions}, len(self.reward_group))
        return [w.score.remote(s["prompts"], s["completions"])
                for w, s in zip(self.reward_group.workers, shards, strict=True) if s["completions"]]

    def token_logps(self, batch: dict[str, np.ndarray], reference: bool) -> list[ray.ObjectRef]:
        return self.policy_group.call_sharded_async("rl_token_logps", batch, reference=reference)

    def step_prompts(self, step: int) -> list[Any]:
        return [self.train[i] for i in step_indices(len(self.train), self.config.rollout.prompts_per_step,
                                                    self.config.seed, step)]

    def launch_step(self, step: int, version: int) -> tuple[list[ray.ObjectRef], list[int]]:
        return self.launch_generate(self.step_prompts(step), self.config.rollout, step=step, purpose=Purpose.SAMPLE,
                                    version=version)

    # ---- the skeleton's hooks ------------------------------------------------------------------
    def load_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.config.rollout.overlap:
            self.pending = load_pending_rollouts(checkpoint)

    def begin(self, run: RunDir, start: int, checkpoint: Path | None) -> None:
        if self.game is not None:
            self.game.start(self, run, checkpoint if start else None)
        if self.held_out and start == 0:
            self.console.print(f"scoring the initial policy on {len(self.held_out)} held-out prompts x {EVAL_SAMPLES}")
            self.before, shown = self._evaluate(0)
            run.log_metrics(0, self.before)
            if self.eval_samples is not None:
                self.eval_samples["before"] = shown

    def step(self, step: int, timer: PhaseTimer) -> dict[str, Any]:
        with timer.phase("generate"):
            if self.pending is None:
                self.pending = self.launch_step(step, version=step)
            rollouts = self.collect(self.pending)
        overlap = self.config.rollout.overlap and step + 1 < self.total_steps
        self.pending = self.launch_step(step + 1, version=step) if overlap else None
        return self._rl_step(step, rollouts, timer)

    def eval_due(self, done: int) -> bool:
        return super().eval_due(done) and bool(self.held_out) and done < self.total_steps

    def evaluate(self, done: int) -> dict[str, Any]:
        return self._evaluate(done)[0]

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        postfix = {"reward": f"{metrics['reward/mean']:.3f}", "kl": f"{metrics['kl/seq_mean']:.3f}"}
        if "discriminator/fool_rate" in metrics:
            postfix["fooled"] = f"{metrics['discriminator/fool_rate']:.2f}"
        return postfix

    def save_state(self, checkpoint: Path) -> dict[str, Any]:
        if self.pending is not None:
            self.pending = self.collect(self.pending)
            save_pending_rollouts(self.pending, checkpoint)
        if self.game is not None:
            self.game.save(self, checkpoint)
        return {"kl_controller": self.kl_ctl.state_dict()}

    def finish(self, run: RunDir, metrics: dict[str, Any]) -> dict[str, Any]:
        after: dict[str, float] = {}
        if self.held_out:
            self.console.print(f"scoring the trained policy on {len(self.held_out)} held-out prompts x {EVAL_SAMPLES}")
            after, shown = self._evaluate(self.total_steps)
            run.log_metrics(self.total_steps, after)
            if self.eval_samples is not None:
                self.eval_samples["after"] = shown
        final = {k: v for k, v in metrics.items() if k in ("reward/mean", "kl/seq_mean")}
        final.update({f"{k} (before)": v for k, v in self.before.items() if k in ("eval/reward", "eval/kl")})
        final.update({k: v for k, v in after.items() if k in ("eval/reward", "eval/kl")})
        return final

    def after_final(self, run: RunDir) -> None:
        if self.game is not None:
            self.game.finish(self, run)

    # ---- one step ------------------------------------------------------------------------------
    def _rl_step(self, step: int, rollouts: dict[str, Any], timer: PhaseTimer) -> dict[str, Any]:
        from raylign.data import prompt_plain_text

        config = self.config
        rl, t, ro = config.rl, config.train, config.rollout
        prompts = self.step_prompts(step)
        n = len(rollouts["texts"])
        expected = len(prompts) * ro.n_samples
        if n != expected:  # a retried rollout must neither lose nor duplicate samples
            raise RuntimeError(f"step {step}: got {n} completions from the rollout workers, expected {expected}")
        batch = training_batch(rollouts, self.pad_id)
        # Scoring, reference log-probs and values run at the same time on their own actors.
        repeated = [prompts[i] for i in rollouts["group_ids"]]
        score_refs = self.score_async(repeated, rollouts["texts"])
        # Reference log-probs: from the rollout workers (rollout.reference_on_workers), else the learners.
        ref_refs = self.token_logps(batch, reference=True) if "ref_logps" not in batch else []
        value_refs = self.critic.call_sharded_async("values", batch) if self.critic is not None else []
        # Decoupled PPO (rollout.overlap) clips against the policy as the step starts; with one update per
        # step that is the training forward pass itself (detached), with several it is computed here.
        several_updates = rl.epochs * self.minibatches > 1
        prox_refs = self.token_logps(batch, reference=False) if ro.overlap and several_updates else []
        with timer.phase("score"):
            scores = merge_scores(self.reward_group.get(score_refs, "score"))
        with timer.phase("reference"):
            if ref_refs:
                batch["ref_logps"] = np.concatenate(self.policy_group.get(ref_refs, "rl_token_logps"))
            if prox_refs:
                batch["prox_logps"] = np.concatenate(self.policy_group.get(prox_refs, "rl_token_logps"))
        with timer.phase("values"):
            values = np.concatenate(self.critic.get(value_refs, "values")) if self.critic and value_refs else None
        with timer.phase("advantages"):
            prefix_values = None
            if self.game is not None:
                prefix_values = self.game.prefix_values(self, step, repeated, rollouts, batch, scores["total"])
            kl_coef = self.kl_ctl.value
            advantages, returns, adv_metrics = batch_advantages(
                self.algorithm, config, batch, scores["total"], rollouts["group_ids"], kl_coef, values, prefix_values)
            batch["advantages"] = advantages
            if values is not None:
                assert returns is not None  # a critic (PPO) gets returns as its targets
                batch["old_values"], batch["returns"] = values, returns

        policy_sums: list[dict[str, float]] = []
        critic_sums: list[dict[str, float]] = []
        with timer.phase("train"):
            order_rng = rng(config.seed, Purpose.MINIBATCH, step)
            for _ in range(rl.epochs):
                order = order_rng.permutation(n)
                for m in range(self.minibatches):
                    idx = np.sort(order[m * t.batch_size : (m + 1) * t.batch_size])
                    mb = {k: v[idx] for k, v in batch.items()}
                    units = rl_units(mb["loss_mask"], rl.aggregation)
                    refs = self.policy_group.call_sharded_async("train_step", mb, global_units=units,
                                                                hparams={"kl_coef": kl_coef})
                    crefs = self.critic.call_sharded_async("train_step", mb, global_units=units) if self.critic else []
                    policy_sums.append(combine_ranks(self.policy_group.get(refs, "train_step")))
                    if self.critic is not None and crefs:
                        critic_sums.append(combine_ranks(self.critic.get(crefs, "train_step")))

        self.kl_ctl.update(adv_metrics["kl/seq_mean"], n)
        metrics = step_metrics(batch, scores, rollouts, policy_sums, critic_sums)
        metrics.update(adv_metrics)
        metrics["kl/coef"] = kl_coef
        if self.game is not None:
            metrics.update(self.game.after_step(self, step, repeated, rollouts))
        seconds = timer.elapsed()
        train_seconds = timer.seconds["train"]
        metrics.update({
            "rollout/generate_seconds": rollouts["seconds"],
            "perf/samples_per_second": n / seconds,
            "perf/generate_tokens_per_second": rollouts["tokens"] / max(rollouts["seconds"], 1e-9),
            "perf/train_tokens_per_second": float(batch["attention_mask"].sum()) * rl.epochs / max(train_seconds, 1e-9),
            "rollout/weight_version": min(rollouts["versions"]), "rollout/completions": n,
            "rollout/weight_lag": step - min(rollouts["versions"]),
        })
        k = config.output.samples_per_step
        assert self.run is not None
        self.run.log_samples(step + 1, [
            {"prompt": prompt_plain_text(repeated[i]), "completion": rollouts["texts"][i],
             "reward": float(scores["total"][i])} for i in range(min(k, n))])
        return metrics

    def _evaluate(self, step: int) -> tuple[dict[str, float], dict]:
        """Mean reward and KL(π ‖ π_ref) (Σ_t log π − log π_ref per completion, k1) on held-out prompts, and
        two reward-hacking signals: distinct-1/2 of the completions' token ids (collapse) and the Pearson
        correlation of reward with length (`eval/reward_length_corr`, omitted when either is constant)."""
        prompts = self.held_out
        sampling = self.config.rollout.model_copy(update={"n_samples": EVAL_SAMPLES})
        # The same seed key for every evaluation (step 0): before/after differ only by the weights.
        out = self.generate(prompts, sampling, step=0, purpose=Purpose.EVAL, version=step)
        repeated = [prompts[i] for i in out["group_ids"]]
        scores = merge_scores(self.reward_group.get(self.score_async(repeated, out["texts"]), "score"))
        batch = training_batch(out, self.pad_id)
        pol, ref = (np.concatenate(self.policy_group.get(self.token_logps(batch, reference=r), "rl_token_logps"))
                    for r in (False, True))
        mask = batch["loss_mask"].astype(bool)
        seq_kl = np.where(mask, pol - ref, 0.0).sum(-1)
        metrics = {"eval/reward": float(scores["total"].mean()), "eval/kl": float(seq_kl.mean()),
                   "eval/response_length": float(mask.sum(-1).mean())}
        metrics.update({f"eval/reward/{k}": float(v.mean()) for k, v in scores["components"].items()})
        metrics.update({f"eval/distinct_{n}": distinct_n(out["response_ids"], n) for n in (1, 2)})
        corr = pearson(scores["total"].tolist(), mask.sum(-1).tolist())
        if corr is not None:
            metrics["eval/reward_length_corr"] = corr
        return metrics, {"prompts": repeated, "texts": out["texts"], "scores": scores["total"]}


def step_metrics(batch: dict[str, np.ndarray], scores: dict[str, Any], rollouts: dict[str, Any],
                 policy_sums: list[dict[str, float]], critic_sums: list[dict[str, float]]) -> dict[str, float]:
    total = scores["total"]
    lengths = batch["loss_mask"].sum(-1)
    metrics = {
        "reward/mean": float(total.mean()), "reward/std": float(total.std()),
        **{f"reward/{k}": float(v.mean()) for k, v in scores["components"].items()},
        "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
        "response/finished_fraction": float(np.mean(rollouts["finished"])),
        "response/distinct_1": distinct_n(rollouts["response_ids"], 1),
        "response/distinct_2": distinct_n(rollouts["response_ids"], 2),
        **summarize_policy(policy_sums),
    }
    if critic_sums:
        metrics.update(summarize_critic(critic_sums))
    return metrics


def run_online(config: RunConfig, resume: bool = False, console: Console | None = None,
               eval_samples: dict[str, Any] | None = None, on_step: OnStep | None = None,
               game: Any = None, resume_force: bool = False) -> RunResult:
    """Train `config.algorithm` online (module docstring; `OnlineRL` for `eval_samples` and `game`).
    `on_step(step, metrics)` is called after each step's metrics are logged and its checkpoint (if any)
    is written (Ray Tune reports from it)."""
    from raylign.data import format_prompt, load_split
    from raylign.models import context_length, load_tokenizer
    from raylign.rewards import check_reward_specs

    console = console or Console()
    # Everything a user can get wrong is checked before Ray or any actor starts.
    if config.reward.sources or game is None:  # an adversarial run may have D as its only reward
        check_reward_specs(config.reward)
    tokenizer = load_tokenizer(config.model.path)
    check_context(config, context_length(config.model))
    train_table, val_table = load_split(config.data, algorithm=config.algorithm)

    def fits(prompt: Any) -> bool:
        text = format_prompt(prompt, tokenizer, config.data.apply_chat_template)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= config.data.max_prompt_length

    all_train = train_table.column("prompt").to_pylist()
    kept = [i for i, p in enumerate(all_train) if fits(p)]
    train = [all_train[i] for i in kept]
    if len(train) < len(all_train):
        console.print(f"[yellow]skipping {len(all_train) - len(train)} prompts longer than "
                      f"data.max_prompt_length={config.data.max_prompt_length} tokens[/yellow]")
    held_out = [p for p in (val_table.column("prompt").to_pylist() if val_table else []) if fits(p)]
    held_out = held_out[: config.rl.eval_prompts]
    check_online_config(config, len(train))
    if game is not None:
        game.prepare(train_table.take(kept), tokenizer, console)
    algorithm = OnlineRL(config, console, train, held_out, tokenizer.pad_token_id, game, eval_samples)
    return run_loop(config, algorithm, resume=resume, resume_force=resume_force, on_step=on_step)


# ---- checks and checkpoints ----------------------------------------------------------------------


def check_context(config: RunConfig, context: int | None) -> None:
    """A kept prompt (at most data.max_prompt_length tokens) plus its completion must fit the model."""
    prompt, new = config.data.max_prompt_length, config.rollout.max_new_tokens
    if context is not None and prompt + new > context:
        raise ConfigError(
            f"data.max_prompt_length ({prompt}) + rollout.max_new_tokens ({new}) = {prompt + new} tokens, more "
            f"than the {context} positions {config.model.path} attends over; lower one of them")


def check_online_config(config: RunConfig, n_prompts: int) -> None:
    """Everything a user can get wrong about batch shapes, before any actor starts."""
    ro, t, learners = config.rollout, config.train, config.resources.learners
    algorithm = rl_algorithm(config)
    kinds = ("prompts", "pairs") if config.algorithm == "adversarial" else ("prompts",)
    if config.data.kind not in kinds:
        raise ConfigError(f"{config.algorithm} samples from prompts: set data.kind={' or '.join(kinds)} "
                          f"(got '{config.data.kind}')")
    if algorithm in ("grpo", "rloo") and ro.n_samples < 2:
        raise ConfigError(f"{algorithm} compares completions of one prompt: rollout.n_samples must be >= 2")
    per_step = ro.prompts_per_step * ro.n_samples
    if per_step % t.batch_size:
        raise ConfigError(
            f"train.batch_size ({t.batch_size} completions per optimizer step) must divide the "
            f"{per_step} completions of a step (rollout.prompts_per_step x rollout.n_samples)")
    if t.batch_size < learners:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be >= resources.learners ({learners})")
    if n_prompts < ro.prompts_per_step:
        raise ConfigError(f"{config.data.train}: {n_prompts} training prompts, fewer than "
                          f"rollout.prompts_per_step={ro.prompts_per_step}")


def save_pending_rollouts(rollouts: dict[str, Any], path: Path) -> None:
    """The batch sampled for the next step, as plain arrays (no pickle): ids and log-probs concatenated
    with their lengths, texts as JSON."""
    lengths = {k: np.array([len(x) for x in rollouts[k]], dtype=np.int64)
               for k in ("prompt_ids", "response_ids")}
    # One mapping of Any: numpy types `savez(**arrays)` as possibly binding its `allow_pickle: bool`.
    arrays: dict[str, Any] = dict(
        **{k: np.concatenate(rollouts[k]).astype(np.int64) if len(rollouts[k]) else np.zeros(0, np.int64)
           for k in ("prompt_ids", "response_ids")},
        logprobs=np.concatenate(rollouts["logprobs"]).astype(np.float32),
        prompt_lengths=lengths["prompt_ids"], response_lengths=lengths["response_ids"],
        group_ids=rollouts["group_ids"], finished=rollouts["finished"],
        **({"ref_logps": np.concatenate(rollouts["ref_logps"]).astype(np.float32)}
           if "ref_logps" in rollouts else {}))
    np.savez(path / PENDING_ROLLOUTS, **arrays)
    meta = {k: rollouts[k] for k in ("texts", "versions", "seconds", "tokens")}
    (path / PENDING_ROLLOUTS_META).write_text(json.dumps(meta))


def load_pending_rollouts(ckpt: Path | None) -> dict[str, Any] | None:
    if ckpt is None or not (ckpt / PENDING_ROLLOUTS).exists():
        return None
    data = np.load(ckpt / PENDING_ROLLOUTS, allow_pickle=False)
    out: dict[str, Any] = json.loads((ckpt / PENDING_ROLLOUTS_META).read_text())
    for key, lengths in (("prompt_ids", "prompt_lengths"), ("response_ids", "response_lengths"),
                         ("logprobs", "response_lengths"), ("ref_logps", "response_lengths")):
        if key in data:
            out[key] = np.split(data[key], np.cumsum(data[lengths])[:-1])
    out.update(group_ids=data["group_ids"], finished=data["finished"])
    return out
