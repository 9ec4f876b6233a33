"""Adversarial alignment: the online-RL loop with a discriminator as a second, learning player.

A discriminator D (a reward source that trains, hosted by the reward workers) learns to tell human
text (label 1) from the policy's samples (label 0); its judgement, `generator_reward(ℓ)`, is the
policy's reward, mixed by weight with `reward.sources` when there are any. Each step of `run_online`:

  1. the rollout workers sample; D (with the other sources) scores; the generator algorithm
     (`adversarial.generator`: PPO, GRPO, RLOO or REINFORCE++) updates the policy, KL to the reference
     kept as in any online run; with `adversarial.per_prefix`, every response prefix is completed
     `mc_rollouts` times and scored, for token-level credit (SeqGAN);
  2. D takes `d_steps` updates on human texts against this step's samples plus samples replayed
     from earlier steps, unless its accuracy is above `accuracy_ceiling`.

Human texts are the `chosen` answers of the prompts drawn this step when `data.kind=pairs` (D then
sees prompt + answer on both sides), else rows of `adversarial.human_data` ({text}) drawn at random
(D sees the answer alone). D warms up for `warmup_steps` updates on the initial policy's samples
before the policy moves. Checkpoints hold D (weights and optimizer), the replay buffer and the
collapse watch, so `--resume` restores both players.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from rich.console import Console

from raylign import storage
from raylign.algorithms.adversarial import mc_prefix_values
from raylign.config import ConfigError, RunConfig
from raylign.pipelines.loop import checkpoint_source, run_storage, step_indices
from raylign.pipelines.online import run_online
from raylign.rundir import ADVERSARIAL_STATE, DISCRIMINATOR_DIR, RunResult
from raylign.runtime import Purpose, rng
from raylign.workers.reward import merge_scores

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PINNED_HIGH, PINNED_LOW = 0.99, 0.52  # D accuracy this close to 1 (D wins) or to ½ (D is blind)


class AdversarialGame:
    """The discriminator's side of the loop (the hooks `run_online` calls; see its docstring)."""

    def __init__(self, config: RunConfig, console: Console):
        self.config = config
        self.adv = config.adversarial
        self.console = console
        self.replay: deque[tuple[Any, str]] = deque(maxlen=self.adv.replay_size)  # 0: no replay
        self.accuracies: list[float] = []  # D's mean accuracy per step, for the collapse watch
        self.warned = False
        self.conditioned = config.data.kind == "pairs"
        self.prompts: list[Any] = []  # the run's training prompts (those that fit), row-aligned with
        self.human_texts: list[str] = []  # ... the chosen answers when conditioned
        self.tokenizer: PreTrainedTokenizerBase | None = None  # set by prepare()

    # ---- before Ray ----------------------------------------------------------------------------
    def prepare(self, train_rows, tokenizer, console: Console) -> None:
        """Check and load the human side: every error here is the user's to fix, before any actor starts."""
        from raylign.data import load_dataset
        from raylign.models import ModelNotFoundError, resolve_model_path

        if self.adv.per_prefix and self.adv.generator in ("grpo", "rloo"):
            raise ConfigError("adversarial.per_prefix gives per-token rewards: set adversarial.generator to ppo "
                              f"or reinforce_pp (got {self.adv.generator})")
        self.prompts = train_rows.column("prompt").to_pylist()
        if self.conditioned:
            if self.adv.human_data:
                raise ConfigError("data.kind=pairs already gives the human answers (the chosen side); "
                                  "unset adversarial.human_data or use data.kind=prompts")
            self.human_texts = train_rows.column("chosen").to_pylist()
        else:
            if not self.adv.human_data:
                raise ConfigError("adversarial training needs human text: set adversarial.human_data=FILE "
                                  "({text} rows), or data.kind=pairs with data.train=FILE (the chosen answers "
                                  "are the human side)")
            self.human_texts = load_dataset(self.adv.human_data, kind="text").column("text").to_pylist()
            if not self.human_texts:
                raise ConfigError(f"adversarial.human_data={self.adv.human_data} has no rows")
        try:
            resolve_model_path(self.adv.discriminator)
        except ModelNotFoundError as exc:
            raise ConfigError(f"adversarial.discriminator={self.adv.discriminator}: {exc}") from None
        self.tokenizer = tokenizer  # the policy's, already loaded by run_online
        console.print(f"discriminator {self.adv.discriminator} on {len(self.human_texts)} human texts"
                      f"{' (answers to the same prompts)' if self.conditioned else ''}; generator "
                      f"{self.adv.generator}, reward {self.adv.generator_reward}")

    # ---- the game ------------------------------------------------------------------------------
    def start(self, state, run, checkpoint: Path | None) -> None:
        """Restore D and the replay buffer from `checkpoint`, or warm D up on the initial policy."""
        if checkpoint is not None:
            source = checkpoint_source(self.config.output.storage, run, checkpoint, DISCRIMINATOR_DIR,
                                       state.reward_group)
            state.reward_group.call("load_discriminator", str(checkpoint / DISCRIMINATOR_DIR), source=source)
            saved = json.loads((checkpoint / ADVERSARIAL_STATE).read_text())
            self.replay.extend((p, t) for p, t in saved["replay"])
            self.accuracies, self.warned = saved["accuracies"], saved["warned"]
            return
        for w in range(self.adv.warmup_steps):
            # Warm-up batches: their own random streams, apart from the training steps'.
            draws = rng(self.config.seed, Purpose.WARMUP, w)
            indices = draws.choice(len(self.prompts), self.config.rollout.prompts_per_step, replace=False)
            prompts = [self.prompts[i] for i in indices]
            out = state.generate(prompts, self.config.rollout, step=w, purpose=Purpose.WARMUP_SAMPLE, version=0)
            repeated = [prompts[i] for i in out["group_ids"]]
            metrics = self._update_d(state, draws, repeated, out["texts"], indices, ceiling=1.0)
            run.log_metrics(0, {f"discriminator/warmup_{k}": v for k, v in metrics.items()})
        if self.adv.warmup_steps:
            self.console.print(f"discriminator warmed up for {self.adv.warmup_steps} update(s): accuracy on human "
                               f"{metrics['accuracy_human']:.2f}, on policy {metrics['accuracy_policy']:.2f}")

    def prefix_values(self, state, step: int, prompts: list[Any], rollouts: dict[str, Any],
                      batch: dict[str, np.ndarray], totals: np.ndarray) -> np.ndarray | None:
        """Monte-Carlo Q_t for every response prefix, laid out like the batch's token positions."""
        if not self.adv.per_prefix:
            return None
        responses = rollouts["response_ids"]
        budget = self.config.rollout.max_new_tokens

        def rollout_rewards(prefixes: list[tuple[int, int]], n: int) -> list[list[float]]:
            assert self.tokenizer is not None, "prepare() sets the tokenizer"
            starts = [np.concatenate([rollouts["prompt_ids"][row], responses[row][:t]]) for row, t in prefixes]
            sampling = self.config.rollout.model_copy(update={
                "n_samples": self.adv.mc_rollouts, "max_new_tokens": max(budget - min(t for _, t in prefixes), 1)})
            out = state.generate(starts, sampling, step=step, purpose=Purpose.PREFIX, version=step)
            texts = []
            for k, cont in enumerate(out["response_ids"]):
                row, t = prefixes[k // n]
                ids = np.concatenate([responses[row][:t], cont[: budget - t]])
                # One sequence of ids decodes to one string.
                texts.append(cast(str, self.tokenizer.decode(ids, skip_special_tokens=True)).strip())
            row_prompts = [prompts[prefixes[k // n][0]] for k in range(len(texts))]
            scores = merge_scores(state.reward_group.get(state.score_async(row_prompts, texts), "score"))["total"]
            return [scores[k * n : (k + 1) * n].tolist() for k in range(len(prefixes))]

        values = mc_prefix_values(responses, totals.tolist(), rollout_rewards, self.adv.mc_rollouts)
        out = np.zeros_like(batch["old_logps"])
        for row, (prompt, q) in enumerate(zip(rollouts["prompt_ids"], values, strict=True)):
            out[row, len(prompt) : len(prompt) + len(q)] = q.numpy()
        return out

    def after_step(self, state, step: int, prompts: list[Any], rollouts: dict[str, Any]) -> dict[str, float]:
        indices = step_indices(len(self.prompts), self.config.rollout.prompts_per_step, self.config.seed, step)
        draws = rng(self.config.seed, Purpose.DISCRIMINATOR, step)
        metrics = self._update_d(state, draws, prompts, rollouts["texts"], indices, self.adv.accuracy_ceiling)
        out = {f"discriminator/{k}": v for k, v in metrics.items()}
        out["discriminator/replay_size"] = float(len(self.replay))
        out.update(self._watch_collapse(step, metrics))
        return out

    def save(self, state, path: Path) -> None:
        self._save_d(state, path / DISCRIMINATOR_DIR)
        (path / ADVERSARIAL_STATE).write_text(json.dumps(
            {"replay": list(self.replay), "accuracies": self.accuracies, "warned": self.warned}))

    def finish(self, state, run) -> None:
        self._save_d(state, run.final / DISCRIMINATOR_DIR)

    # ---- helpers -------------------------------------------------------------------------------
    def _save_d(self, state, path: Path) -> None:
        """D (every reward actor holds the same copy: the first one's) into `path` on this node, by way of
        `output.storage` or the object store when that actor runs on another node."""
        handoff = storage.Handoff.to(path, run_storage(self.config.output.storage, state.run))
        worker = state.reward_group.workers[0]
        delivered = state.reward_group.get([worker.save_discriminator.remote(str(path), handoff)], "save_discriminator")
        storage.receive(handoff, delivered[0])

    def _update_d(self, state, draws: np.random.Generator, prompts: list[Any], texts: list[str],
                  indices: np.ndarray, ceiling: float) -> dict[str, float]:
        """D's k_D updates on this step's samples (+ replay) against human texts; the same on every
        reward actor so their copies stay equal. `indices`: the step's rows of the training prompts."""
        fresh = [(p if self.conditioned else None, t) for p, t in zip(prompts, texts, strict=True)]
        n_replay = min(len(self.replay), round(self.adv.replay_fraction * len(fresh)))
        replayed = [self.replay[i] for i in draws.choice(len(self.replay), n_replay, replace=False)] if n_replay else []
        policy = fresh + replayed
        if self.conditioned:  # the human answers to this step's prompts
            human_prompts = [self.prompts[i] for i in indices]
            human = [self.human_texts[i] for i in indices]
        else:
            human_prompts = None
            human = [self.human_texts[i] for i in draws.choice(len(self.human_texts), len(fresh),
                                                              replace=len(fresh) > len(self.human_texts))]
        args = {"human_prompts": human_prompts, "human_texts": human, "steps": self.adv.d_steps,
                "fresh": len(fresh), "max_accuracy": ceiling}
        parts = state.reward_group.call("update", [p for p, _ in policy], [t for _, t in policy], **args)
        self.replay.extend(fresh)
        prefix = "discriminator/"
        return {k[len(prefix):]: v for k, v in parts[0].items() if k.startswith(prefix)}

    def _watch_collapse(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Warn once when D's accuracy has been pinned near 1 (it wins outright: its reward no longer
        ranks the samples) or near ½ (it cannot tell them apart) for `collapse_patience` steps."""
        accuracy = (metrics["accuracy_human"] + metrics["accuracy_policy"]) / 2
        self.accuracies = (self.accuracies + [accuracy])[-self.adv.collapse_patience:]
        window = self.accuracies
        pinned = ""
        if len(window) == self.adv.collapse_patience:
            if min(window) >= PINNED_HIGH:
                pinned = (f"accuracy pinned at {np.mean(window):.2f}: D wins outright, so its reward barely "
                          "ranks the samples; try a lower adversarial.lr, label_smoothing, gradient_penalty, "
                          "fewer d_steps or a lower accuracy_ceiling")
            elif max(abs(a - 0.5) for a in window) <= PINNED_LOW - 0.5:
                pinned = (f"accuracy pinned at {np.mean(window):.2f}: D cannot tell policy from human text; "
                          "raise adversarial.lr or d_steps, or use a stronger discriminator")
        if pinned and not self.warned:
            self.console.print(f"[bold yellow]warning: discriminator collapse at step {step + 1}: {pinned} "
                               f"(last {self.adv.collapse_patience} steps)[/bold yellow]")
            self.warned = True
        return {"discriminator/accuracy": accuracy, "discriminator/collapsed": float(bool(pinned))}


def run_adversarial(config: RunConfig, resume: bool = False, console: Console | None = None,
                    on_step=None, resume_force: bool = False) -> RunResult:
    """`raylign train adversarial`: the online loop with the discriminator game (module docstring)."""
    console = console or Console()
    return run_online(config, resume=resume, console=console, on_step=on_step, resume_force=resume_force,
                      game=AdversarialGame(config, console))
