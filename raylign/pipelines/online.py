"""Online RL driver loop: PPO, GRPO, RLOO and REINFORCE++ in one single-controller loop.

Each step:
  1. the policy learner's trainable weights (only the adapter under LoRA) go into the object store
     once; every rollout worker samples its share of the step's prompts with them (weight version =
     policy updates so far) and returns token ids and sampling log-probs;
  2. the reward workers score the completions while the learners compute reference log-probs (and the
     critic its values, for PPO);
  3. the driver turns scores into advantages with the pure functions of `raylign.algorithms`;
  4. the learners take `rl.epochs` passes over the batch in minibatches of `train.batch_size`
     completions, one optimizer step each (the critic trains beside the policy).

The driver holds no model. Every random choice is a function of (seed, step), so a resumed run
repeats the uninterrupted one, and a rollout or reward actor restarted by Ray after a crash repeats
its share of the step exactly (no sample lost or counted twice).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
from rich.console import Console
from tqdm.auto import tqdm

from raylign.algorithms.advantages import (
    discounted_returns,
    gae,
    group_advantages,
    masked_mean,
    masked_whiten,
    token_rewards_with_kl,
)
from raylign.algorithms.adversarial import prefix_token_rewards
from raylign.algorithms.diversity import distinct_n
from raylign.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate
from raylign.config import ConfigError, RunConfig
from raylign.evaluation.metrics import reward_length_correlation
from raylign.pipelines.offline import _add, step_indices
from raylign.rundir import RunDir, RunResult
from raylign.runtime import init_ray
from raylign.workers.group import WorkerGroup, shard_batch
from raylign.workers.learner import LearnerWorker
from raylign.workers.objectives import rl_units
from raylign.workers.reward import RewardWorker, merge_scores
from raylign.workers.rollout import RolloutWorker

# Algorithm -> advantage estimator.
ONLINE_ALGORITHMS = {"ppo": "gae", "grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp"}
EVAL_SAMPLES = 2  # completions per held-out prompt when measuring reward and KL
ROLLOUT_RESTARTS = 3  # a crashed rollout or reward actor is restarted this often, its call retried


def rl_algorithm(config: RunConfig) -> str:
    """The RL algorithm that updates the policy: the run's own, or the generator's of an adversarial run."""
    return config.adversarial.generator if config.algorithm == "adversarial" else config.algorithm


def split_list(items: list[Any], n: int) -> list[list[Any]]:
    """n contiguous, nearly equal parts (the first get the extra items), like `shard_batch`."""
    bounds = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(len(items)), n)])
    return [items[bounds[i] : bounds[i + 1]] for i in range(n)]


def step_seed(seed: int, step: int, purpose: int) -> int:
    """A seed for one purpose (0 sampling, 1 minibatch order, 2 evaluation) of one step."""
    return int(np.random.default_rng([seed, step, purpose]).integers(2**31 - 1))


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
    out["wait_seconds"] = 0.0
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


def compute_advantages(
    algorithm: str, config: RunConfig, batch: dict[str, np.ndarray], scores: np.ndarray, group_ids: np.ndarray,
    kl_coef: float, values: np.ndarray | None = None, prefix_values: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """-> (advantages [B, T], returns [B, T] for the critic or None, metrics).

    The KL penalty enters here when rl.kl_in == "reward": per token for PPO and REINFORCE++ (r_t =
    −β·KL_t, plus the score on the last token), per sequence (score − β·Σ_t KL_t) for GRPO and RLOO.
    `prefix_values` [B, T] (per-prefix expected rewards Q_t at the response positions, SeqGAN) replace
    the score on the last token by r_t = Q_t − Q_{t−1} on every token (PPO and REINFORCE++ only).
    """
    rl = config.rl
    mask = torch.as_tensor(batch["loss_mask"][:, 1:])
    logp = torch.as_tensor(batch["old_logps"][:, 1:])
    ref = torch.as_tensor(batch["ref_logps"][:, 1:])
    kl = kl_estimate(logp, ref, rl.kl_estimator, clamp=10.0, mask=mask)
    beta = kl_coef if rl.kl_in == "reward" else 0.0
    scores_t = torch.as_tensor(scores, dtype=torch.float32)
    returns = None

    def token_rewards() -> torch.Tensor:
        if prefix_values is None:
            return token_rewards_with_kl(scores_t, kl, mask, beta)
        shaped = prefix_token_rewards(torch.as_tensor(prefix_values[:, 1:], dtype=torch.float32), mask)
        return shaped - beta * kl.detach() * mask

    if prefix_values is not None and algorithm in ("grpo", "rloo"):
        raise ConfigError(f"per-prefix rewards need a token-level algorithm (ppo, reinforce_pp), not {algorithm}")
    if algorithm in ("grpo", "rloo"):
        shaped = scores_t - beta * (kl * mask).sum(-1)
        seq_adv = group_advantages(shaped, group_ids, algorithm, scale_std=rl.scale_rewards)
        adv = seq_adv[:, None] * mask
    elif algorithm == "reinforce_pp":
        adv = masked_whiten(discounted_returns(token_rewards(), mask, rl.gamma), mask)
    else:  # ppo
        adv, ret = gae(token_rewards(), torch.as_tensor(values[:, 1:]), mask, rl.gamma, rl.lam)
        if rl.whiten_advantages:
            adv = masked_whiten(adv, mask)
        returns = np.zeros_like(batch["old_logps"])
        returns[:, 1:] = ret.numpy()
    full = np.zeros_like(batch["old_logps"])
    full[:, 1:] = adv.float().numpy()
    seq_kl = (kl * mask).sum(-1)
    metrics = {"kl/seq_mean": float(seq_kl.mean()), "kl/token_mean": float(masked_mean(kl, mask)),
               "advantage/mean": float(masked_mean(adv.float(), mask)),
               "advantage/abs_mean": float(masked_mean(adv.float().abs(), mask))}
    return full, returns, metrics


# ---- the loop ------------------------------------------------------------------------------------


def discriminator_kwargs(config: RunConfig) -> dict[str, Any]:
    """`Discriminator(...)` arguments (plus its weight in the reward mix) from `config.adversarial`."""
    a = config.adversarial
    return {"model": a.discriminator, "reward": a.generator_reward, "lr": a.lr, "weight": a.weight,
            "label_smoothing": a.label_smoothing, "gradient_penalty": a.gradient_penalty,
            "batch_size": config.reward.batch_size, "max_length": a.max_length,
            "max_prompt_length": config.data.max_prompt_length,
            "apply_chat_template": config.data.apply_chat_template, "seed": config.seed,
            "conditioned": config.data.kind == "pairs"}  # pairs: human answers to the same prompts


class OnlineRun:
    """The actor groups of one online-RL run and the driver-side operations on them."""

    def __init__(self, config: RunConfig, run: RunDir, tokenizer_pad_id: int):
        self.config = config
        self.algorithm = rl_algorithm(config)
        self.pad_id = tokenizer_pad_id
        self.policy = self.critic = self.rollout = self.reward = None
        self.game: Any = None  # the adversarial pipeline's second player, if any
        try:
            self._start_groups(config, run)
        except BaseException:
            self.shutdown()  # the groups already placed must not hold their CPUs
            raise

    def _start_groups(self, config: RunConfig, run: RunDir) -> None:
        r = config.resources
        prefix = f"raylign-{run.name}"
        self.policy = WorkerGroup(
            LearnerWorker, r.learners, r.cpus_per_learner, r.gpus_per_learner, name="policy", threads=r.threads,
            actor_name_prefix=f"{prefix}-policy", init_kwargs={"config": config.model_dump(), "objective": "policy"})
        if self.algorithm == "ppo":
            critic_cfg = config.model_copy(deep=True)
            critic_cfg.model.path = config.rl.critic or config.model.path
            critic_cfg.train.lr = config.rl.critic_lr or config.train.lr
            self.critic = WorkerGroup(
                LearnerWorker, r.learners, r.cpus_per_learner, r.gpus_per_learner, name="critic",
                threads=r.threads, actor_name_prefix=f"{prefix}-critic",
                init_kwargs={"config": critic_cfg.model_dump(), "objective": "value"})
        self.rollout = WorkerGroup(
            RolloutWorker, r.rollout_workers, r.cpus_per_rollout_worker, r.gpus_per_rollout_worker, name="rollout",
            threads=r.threads,
            max_restarts=ROLLOUT_RESTARTS, actor_name_prefix=f"{prefix}-rollout",
            init_kwargs={"model": config.model.model_dump(), "seed": config.seed,
                         "apply_chat_template": config.data.apply_chat_template,
                         "reference": config.rollout.reference_on_workers})
        reward_kwargs: dict[str, Any] = {"reward": config.reward.model_dump(), "tokenizer": config.model.path}
        if config.algorithm == "adversarial":
            reward_kwargs["discriminator"] = discriminator_kwargs(config)
        self.reward = WorkerGroup(
            RewardWorker, r.reward_workers, r.cpus_per_reward_worker, r.gpus_per_reward_worker, name="reward",
            # A restarted actor would come back with the initial discriminator: the run stops instead
            # (and `--resume` continues from the last checkpoint, D included).
            max_restarts=0 if config.algorithm == "adversarial" else ROLLOUT_RESTARTS,
            actor_name_prefix=f"{prefix}-reward", init_kwargs=reward_kwargs)

    @property
    def learner_groups(self) -> list[WorkerGroup]:
        return [g for g in (self.policy, self.critic) if g is not None]

    def setup(self, optimizer_steps: int) -> None:
        for group in self.learner_groups:
            addr, port = group.call("master_address")[0]
            group.call("setup_distributed", addr, port)
            group.call("setup_optimizer", optimizer_steps)

    def launch_generate(self, prompts: list[Any], sampling: dict[str, Any], seed: int,
                        version: int) -> tuple[list[ray.ObjectRef], list[int]]:
        """Start sampling with the policy's weights as they are now (the learner's `get_weights` call is
        queued before any later training call): one object reaches every worker. Returns the pending
        results and each worker's first prompt index, for `collect`."""
        weights = self.policy.workers[0].get_weights.remote()
        parts = split_list(prompts, len(self.rollout))
        offsets = list(np.cumsum([0] + [len(p) for p in parts[:-1]]))
        refs = [w.generate.remote(part, sampling, seed=seed + i, weights=weights, version=version,
                                  reference=self.config.rollout.reference_on_workers)
                for i, (w, part) in enumerate(zip(self.rollout.workers, parts, strict=True)) if part]
        return refs, [int(o) for o, p in zip(offsets, parts, strict=True) if p]

    @staticmethod
    def collect(pending: tuple[list[ray.ObjectRef], list[int]] | dict[str, Any]) -> dict[str, Any]:
        if isinstance(pending, dict):  # restored from a checkpoint
            return pending
        refs, offsets = pending
        start = time.perf_counter()
        out = merge_rollouts(ray.get(refs), offsets)
        out["wait_seconds"] = time.perf_counter() - start  # generation the driver waited for
        return out

    def generate(self, prompts: list[Any], sampling: dict[str, Any], seed: int, version: int) -> dict[str, Any]:
        return self.collect(self.launch_generate(prompts, sampling, seed, version))

    def score_async(self, prompts: list[Any], completions: list[str]) -> list[ray.ObjectRef]:
        p_parts, c_parts = split_list(prompts, len(self.reward)), split_list(completions, len(self.reward))
        return [w.score.remote(p, c) for w, p, c in zip(self.reward.workers, p_parts, c_parts, strict=True) if c]

    def token_logps(self, batch: dict[str, np.ndarray], reference: bool) -> list[ray.ObjectRef]:
        return self._sharded_async(self.policy, "rl_token_logps", batch, reference=reference)

    def _sharded_async(self, group: WorkerGroup, method: str, batch: dict[str, np.ndarray],
                       **kwargs: Any) -> list[ray.ObjectRef]:
        shards = shard_batch(batch, len(group))
        return [getattr(w, method).remote(s, **kwargs) for w, s in zip(group.workers, shards, strict=True)]

    def shutdown(self) -> None:
        for group in self.learner_groups:
            try:
                group.call("shutdown")
            finally:
                group.shutdown()
        for group in (self.rollout, self.reward):
            if group is not None:
                group.shutdown()


PER_RANK_SAME = ("grad_norm", "lr")  # equal on every DDP rank: taken once, never summed


def _sum_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Sum metric sums over ranks or minibatches, leaving out the PER_RANK_SAME values."""
    out: dict[str, float] = {}
    for part in parts:
        _add(out, {k: v for k, v in part.items() if k not in PER_RANK_SAME})
    return out


def _combine_ranks(parts: list[dict[str, float]]) -> dict[str, float]:
    """Sum the ranks' metric sums; grad norm and lr are the same on every rank (DDP): take rank 0's."""
    return _sum_metrics(parts) | {k: parts[0][k] for k in PER_RANK_SAME}


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


def _evaluate(state: OnlineRun, config: RunConfig, prompts: list[Any], step: int) -> tuple[dict[str, float], dict]:
    """Mean reward and KL(π ‖ π_ref) (Σ_t log π − log π_ref per completion, k1) on held-out prompts, and
    two reward-hacking signals: distinct-1/2 of the completions' token ids (collapse) and the Pearson
    correlation of reward with length (`eval/reward_length_corr`, omitted when either is constant)."""
    sampling = config.rollout.model_dump() | {"n_samples": EVAL_SAMPLES}
    # A fixed seed for every evaluation: before/after differ only by the weights.
    out = state.generate(prompts, sampling, step_seed(config.seed, 0, 2), version=step)
    repeated = [prompts[i] for i in out["group_ids"]]
    scores = merge_scores(ray.get(state.score_async(repeated, out["texts"])))
    batch = training_batch(out, state.pad_id)
    pol, ref = (np.concatenate(ray.get(state.token_logps(batch, reference=r))) for r in (False, True))
    mask = batch["loss_mask"].astype(bool)
    seq_kl = np.where(mask, pol - ref, 0.0).sum(-1)
    metrics = {"eval/reward": float(scores["total"].mean()), "eval/kl": float(seq_kl.mean()),
               "eval/response_length": float(mask.sum(-1).mean())}
    metrics.update({f"eval/reward/{k}": float(v.mean()) for k, v in scores["components"].items()})
    metrics.update({f"eval/distinct_{n}": distinct_n(out["response_ids"], n) for n in (1, 2)})
    corr = reward_length_correlation(scores["total"], mask.sum(-1))["pearson"]
    if corr is not None:
        metrics["eval/reward_length_corr"] = corr
    return metrics, {"prompts": repeated, "texts": out["texts"], "scores": scores["total"]}


def run_online(config: RunConfig, resume: bool = False, console: Console | None = None,
               eval_samples: dict[str, Any] | None = None,
               on_step: Callable[[int, dict[str, Any]], None] | None = None, game: Any = None) -> RunResult:
    """The loop of the module docstring. `eval_samples`, when given, receives the held-out generations
    before and after training (the quickstart shows them). `on_step(step, metrics)` is called after each
    step's metrics are logged and its checkpoint (if any) is written (Ray Tune reports from it).

    `game` (the adversarial pipeline's `AdversarialGame`) adds a second player: `prepare` sees the
    training rows before Ray starts, `start` warms up or restores it, `prefix_values` may give
    per-prefix rewards, `after_step` trains it on the step's samples (its metrics join the step's),
    `save` writes it into each checkpoint and `finish` next to the final policy."""
    from raylign.data import format_prompt, load_split
    from raylign.models import load_tokenizer
    from raylign.rewards import check_reward_specs

    console = console or Console()
    algorithm = config.algorithm
    rl, t, ro = config.rl, config.train, config.rollout
    # Everything a user can get wrong is checked before Ray or any actor starts.
    if config.reward.sources or game is None:  # an adversarial run may have D as its only reward
        check_reward_specs(config.reward)
    tokenizer = load_tokenizer(config.model.path)
    train_table, val_table = load_split(config.data)

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
    held_out = held_out[: rl.eval_prompts]
    check_online_config(config, len(train))
    if game is not None:
        game.prepare(train_table.take(kept), tokenizer, console)
    per_step = ro.prompts_per_step * ro.n_samples
    minibatches = per_step // t.batch_size
    total_steps = t.max_steps or t.epochs * (len(train) // ro.prompts_per_step)
    optimizer_steps = total_steps * rl.epochs * minibatches

    run = RunDir(config, resume=resume)
    console.print(f"[bold]{algorithm}[/bold] {run.path}  ·  {len(train)} prompts, {len(held_out)} held out  ·  "
                  f"{total_steps} steps x {per_step} completions  ·  {rl.epochs} epoch(s) x {minibatches} "
                  f"minibatch(es)")
    try:
        init_ray(config.resources.ray_address)
        state = OnlineRun(config, run, tokenizer.pad_token_id)
    except BaseException:
        run.close()
        raise
    state.game = game
    kl_ctl = (AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon) if rl.kl_target
              else FixedKLController(rl.kl_coef))
    try:
        state.setup(optimizer_steps)
        start = 0
        if resume:
            ckpt = run.latest_checkpoint()
            if ckpt is not None:
                state.policy.call("load_checkpoint", str(ckpt))
                if state.critic is not None:
                    state.critic.call("load_checkpoint", str(ckpt / "critic"))
                trainer = json.loads((ckpt / "trainer_state.json").read_text())
                start = trainer["step"]
                kl_ctl.load_state_dict(trainer["kl_controller"])
                run.truncate_logs_after(start)
                console.print(f"resumed from {ckpt} at step {start}")
        if game is not None:
            game.start(state, run, run.latest_checkpoint() if start else None)
        before: dict[str, float] = {}
        if held_out and start == 0:
            console.print(f"scoring the initial policy on {len(held_out)} held-out prompts x {EVAL_SAMPLES}")
            before, shown = _evaluate(state, config, held_out, 0)
            run.log_metrics(0, before)
            if eval_samples is not None:
                eval_samples["before"] = shown
        sampling = ro.model_dump()

        def launch(step: int, version: int):
            prompts = [train[i] for i in step_indices(len(train), ro.prompts_per_step, config.seed, step)]
            return state.launch_generate(prompts, sampling, step_seed(config.seed, step, 0), version)

        # With rollout.overlap, step k+1 is sampled (with the weights before step k's update) while the
        # learners train on step k; a checkpoint then keeps that batch, so a resumed run trains on it too.
        pending = load_pending_rollouts(run.latest_checkpoint()) if (resume and start and ro.overlap) else None
        bar = tqdm(range(start, total_steps), desc=algorithm, disable=not config.progress, initial=start,
                   total=total_steps, unit="step")
        metrics: dict[str, Any] = {}
        for step in bar:
            if pending is None:
                pending = launch(step, version=step)
            rollouts = state.collect(pending)
            pending = launch(step + 1, version=step) if ro.overlap and step + 1 < total_steps else None
            metrics = _rl_step(state, config, run, train, step, rollouts, kl_ctl, minibatches)
            done = step + 1
            if t.eval_every and done % t.eval_every == 0 and held_out and done < total_steps:
                metrics.update(_evaluate(state, config, held_out, done)[0])
            if done % t.log_every == 0 or done == total_steps:
                run.log_metrics(done, metrics)
            postfix = {"reward": f"{metrics['reward/mean']:.3f}", "kl": f"{metrics['kl/seq_mean']:.3f}"}
            if "discriminator/fool_rate" in metrics:
                postfix["fooled"] = f"{metrics['discriminator/fool_rate']:.2f}"
            bar.set_postfix(postfix)
            if config.output.save_every and done % config.output.save_every == 0 and done < total_steps:
                if pending is not None:
                    pending = state.collect(pending)
                _checkpoint(state, run, done, kl_ctl, pending)
            if on_step is not None:
                on_step(done, metrics)
        after: dict[str, float] = {}
        if held_out:
            console.print(f"scoring the trained policy on {len(held_out)} held-out prompts x {EVAL_SAMPLES}")
            after, shown = _evaluate(state, config, held_out, total_steps)
            run.log_metrics(total_steps, after)
            if eval_samples is not None:
                eval_samples["after"] = shown
        state.policy.call("save_final", str(run.final))
        if game is not None:
            game.finish(state, run)
        final = {k: v for k, v in metrics.items() if k in ("reward/mean", "kl/seq_mean")}
        final.update({f"{k} (before)": v for k, v in before.items() if k in ("eval/reward", "eval/kl")})
        final.update({k: v for k, v in after.items() if k in ("eval/reward", "eval/kl")})
        return RunResult(str(run.path), total_steps, final)
    finally:
        run.close()
        state.shutdown()


def _rl_step(state: OnlineRun, config: RunConfig, run: RunDir, train: list[Any], step: int,
             rollouts: dict[str, Any], kl_ctl, minibatches: int) -> dict[str, Any]:
    from raylign.data import prompt_plain_text

    rl, t, ro = config.rl, config.train, config.rollout
    t0 = time.perf_counter() - rollouts["wait_seconds"]
    prompts = [train[i] for i in step_indices(len(train), ro.prompts_per_step, config.seed, step)]
    n = len(rollouts["texts"])
    expected = len(prompts) * ro.n_samples
    if n != expected:  # a retried rollout must neither lose nor duplicate samples
        raise RuntimeError(f"step {step}: got {n} completions from the rollout workers, expected {expected}")
    t_gen = time.perf_counter()
    batch = training_batch(rollouts, state.pad_id)
    # Scoring, reference log-probs and values run at the same time on their own actors.
    repeated = [prompts[i] for i in rollouts["group_ids"]]
    score_refs = state.score_async(repeated, rollouts["texts"])
    # Reference log-probs: from the rollout workers (rollout.reference_on_workers), else the learners.
    ref_refs = state.token_logps(batch, reference=True) if "ref_logps" not in batch else []
    value_refs = state._sharded_async(state.critic, "values", batch) if state.critic is not None else []
    # Decoupled PPO (rollout.overlap) clips against the policy as the step starts; with one update per
    # step that is the training forward pass itself (detached), with several it is computed here.
    prox_refs = state.token_logps(batch, reference=False) if ro.overlap and rl.epochs * minibatches > 1 else []
    scores = merge_scores(ray.get(score_refs))
    t_score = time.perf_counter()
    if ref_refs:
        batch["ref_logps"] = np.concatenate(ray.get(ref_refs))
    values = np.concatenate(ray.get(value_refs)) if value_refs else None
    if prox_refs:
        batch["prox_logps"] = np.concatenate(ray.get(prox_refs))
    prefix_values = None
    if state.game is not None:
        prefix_values = state.game.prefix_values(state, step, repeated, rollouts, batch, scores["total"])
    kl_coef = kl_ctl.value
    advantages, returns, adv_metrics = compute_advantages(
        state.algorithm, config, batch, scores["total"], rollouts["group_ids"], kl_coef, values, prefix_values)
    batch["advantages"] = advantages
    if values is not None:
        batch["old_values"], batch["returns"] = values, returns
    t_ref = time.perf_counter()

    policy_sums: list[dict[str, float]] = []
    critic_sums: list[dict[str, float]] = []
    order_rng = np.random.default_rng(step_seed(config.seed, step, 1))
    for _ in range(rl.epochs):
        order = order_rng.permutation(n)
        for m in range(minibatches):
            idx = np.sort(order[m * t.batch_size : (m + 1) * t.batch_size])
            mb = {k: v[idx] for k, v in batch.items()}
            units = rl_units(mb["loss_mask"], rl.aggregation)
            refs = state._sharded_async(state.policy, "train_step", mb, global_units=units,
                                        hparams={"kl_coef": kl_coef})
            crefs = []
            if state.critic is not None:
                crefs = state._sharded_async(state.critic, "train_step", mb, global_units=units)
            policy_sums.append(_combine_ranks(ray.get(refs)))
            if crefs:
                critic_sums.append(_combine_ranks(ray.get(crefs)))
    t_train = time.perf_counter()

    mean_kl = adv_metrics["kl/seq_mean"]
    kl_ctl.update(mean_kl, n)
    metrics = _step_metrics(batch, scores, rollouts, policy_sums, critic_sums)
    metrics.update(adv_metrics)
    metrics["kl/coef"] = kl_coef
    if state.game is not None:
        metrics.update(state.game.after_step(state, step, repeated, rollouts))
    seconds = t_train - t0
    metrics.update({
        "perf/generate_seconds": t_gen - t0, "rollout/generate_seconds": rollouts["seconds"],
        "perf/score_seconds": t_score - t_gen,
        "perf/reference_seconds": t_ref - t_score, "perf/train_seconds": t_train - t_ref,
        "perf/step_seconds": seconds, "perf/samples_per_second": n / seconds,
        "perf/generate_tokens_per_second": rollouts["tokens"] / max(rollouts["seconds"], 1e-9),
        "perf/train_tokens_per_second": float(batch["attention_mask"].sum()) * rl.epochs / max(t_train - t_ref, 1e-9),
        "rollout/weight_version": min(rollouts["versions"]), "rollout/completions": n,
        "rollout/weight_lag": step - min(rollouts["versions"]),
    })
    k = config.output.samples_per_step
    run.log_samples(step + 1, [
        {"prompt": prompt_plain_text(repeated[i]), "completion": rollouts["texts"][i],
         "reward": float(scores["total"][i])} for i in range(min(k, n))])
    return metrics


def _step_metrics(batch, scores, rollouts, policy_sums, critic_sums) -> dict[str, float]:
    total = scores["total"]
    lengths = batch["loss_mask"].sum(-1)
    p = _sum_metrics(policy_sums)
    tokens = max(p["tokens"], 1.0)
    metrics = {
        "reward/mean": float(total.mean()), "reward/std": float(total.std()),
        **{f"reward/{k}": float(v.mean()) for k, v in scores["components"].items()},
        "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
        "response/finished_fraction": float(np.mean(rollouts["finished"])),
        "response/distinct_1": distinct_n(rollouts["response_ids"], 1),
        "response/distinct_2": distinct_n(rollouts["response_ids"], 2),
        "policy/loss": p["pg_loss_sum"] / max(p["units"], 1.0),
        "policy/clip_fraction": p["clip_fraction_sum"] / tokens,
        "policy/approx_kl": p["approx_kl_sum"] / tokens,
        "policy/entropy": p["entropy_sum"] / tokens,
        "policy/grad_norm": float(np.mean([s["grad_norm"] for s in policy_sums])),
        "policy/lr": policy_sums[-1]["lr"],
        "rollout/logp_gap": p["logp_gap_sum"] / tokens,
    }
    if "behavior_weight_sum" in p:  # rollout.overlap: decoupled PPO's mean min(π_prox/π_sampler, cap)
        metrics["policy/behavior_weight"] = p["behavior_weight_sum"] / tokens
    if critic_sums:
        c = _sum_metrics(critic_sums)
        metrics["critic/value_loss"] = c["value_loss_sum"] / max(c["units"], 1.0)
        metrics["critic/clip_fraction"] = c["value_clip_fraction_sum"] / max(c["tokens"], 1.0)
    return metrics


def save_pending_rollouts(rollouts: dict[str, Any], path) -> None:
    """The batch sampled for the next step, as plain arrays (no pickle): ids and log-probs concatenated
    with their lengths, texts as JSON."""
    lengths = {k: np.array([len(x) for x in rollouts[k]], dtype=np.int64)
               for k in ("prompt_ids", "response_ids")}
    np.savez(path / "rollouts.npz",
             **{k: np.concatenate(rollouts[k]).astype(np.int64) if len(rollouts[k]) else np.zeros(0, np.int64)
                for k in ("prompt_ids", "response_ids")},
             logprobs=np.concatenate(rollouts["logprobs"]).astype(np.float32),
             prompt_lengths=lengths["prompt_ids"], response_lengths=lengths["response_ids"],
             group_ids=rollouts["group_ids"], finished=rollouts["finished"],
             **({"ref_logps": np.concatenate(rollouts["ref_logps"]).astype(np.float32)}
                if "ref_logps" in rollouts else {}))
    meta = {k: rollouts[k] for k in ("texts", "versions", "seconds", "tokens")}
    (path / "rollouts.json").write_text(json.dumps(meta))


def load_pending_rollouts(ckpt) -> dict[str, Any] | None:
    if ckpt is None or not (ckpt / "rollouts.npz").exists():
        return None
    data = np.load(ckpt / "rollouts.npz", allow_pickle=False)
    out: dict[str, Any] = json.loads((ckpt / "rollouts.json").read_text())
    for key, lengths in (("prompt_ids", "prompt_lengths"), ("response_ids", "response_lengths"),
                         ("logprobs", "response_lengths"), ("ref_logps", "response_lengths")):
        if key in data:
            out[key] = np.split(data[key], np.cumsum(data[lengths])[:-1])
    out.update(group_ids=data["group_ids"], finished=data["finished"], wait_seconds=0.0)
    return out


def _checkpoint(state: OnlineRun, run: RunDir, step: int, kl_ctl, pending: dict[str, Any] | None) -> None:
    tmp = run.begin_checkpoint(step)
    if pending is not None:
        save_pending_rollouts(pending, tmp)
    if state.game is not None:
        state.game.save(state, tmp)
    state.policy.call("save_checkpoint", str(tmp))
    if state.critic is not None:
        state.critic.call("save_checkpoint", str(tmp / "critic"), with_model_dir=False)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "kl_controller": kl_ctl.state_dict()}))
    run.commit_checkpoint(step, tmp)
