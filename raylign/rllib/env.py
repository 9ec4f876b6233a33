"""Text generation as a gymnasium environment: one episode is one completion of one prompt.

    obs    = {"tokens": right-padded prompt + completion ids [L], "length": real tokens [1]}
    action = the next token, Discrete(vocab_size)
    reward = 0 per token (minus β·KL to the reference, optionally), score(prompt, completion) − offset at the end
    ends   = `terminated` at EOS or after max_new_tokens (the answer really ends; nothing is cut off)

The observation has a fixed shape (L = longest prompt + max_new_tokens), so episodes of any length batch
and replay as plain arrays; it never holds a vocabulary-sized mask (the RLModule restricts actions itself).
The score comes from raylign's reward actors (`RewardWorker`, found by name), so any reward source or mix
works: a lexicon of human-rated words, a reward model trained on human judgments, a Python function.
Without actor names (unit tests, `check_env`) the sources are built in-process.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from raylign.config import ModelConfig, RewardConfig, as_section


def greedy_kl_penalty(ref_logp: float, kl_coef: float) -> float:
    """Per-token reward penalty β·KL(π ‖ π_ref)(s) for a deterministic (greedy) policy π.

    KL(π ‖ π_ref)(s) = Σ_a π(a|s) (log π(a|s) − log π_ref(a|s)); with π = δ_{a_t} (DQN's greedy policy)
    it is exactly −log π_ref(a_t|s), so the penalty is β·(−log π_ref(a_t|s)) = −β·ref_logp ≥ 0
    (the per-token KL reward shaping of Ziegler et al. 2019, for an argmax policy).
    """
    return -kl_coef * ref_logp


class EpisodeLog:
    """A Ray actor (started with num_cpus=0) the environments report every finished episode to; the
    driver drains it after each iteration into samples.jsonl and the per-episode statistics."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def drain(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows


class TextGenerationEnv(gym.Env):
    """See the module docstring. `config` (RLlib's `env_config`) keys:

    prompts         token ids of each formatted prompt (chat template applied), list of lists
    prompt_texts    the prompts as given (strings or chat messages), what the reward sees
    tokenizer       model name or path, to decode completions
    vocab_size, eos_token_id, pad_token_id, max_new_tokens
    reward_actors   names of `RewardWorker` actors; or `reward`: a RewardConfig (built in-process)
    score_offset    subtracted from the final score (default 0)
    kl_coef         β of the per-token KL penalty (`greedy_kl_penalty`); > 0 loads `reference` (a ModelConfig)
    episode_log     name of an `EpisodeLog` actor, or None
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, config: dict[str, Any] | None = None):
        config = dict(config or {})
        self.prompts = [np.asarray(p, dtype=np.int64) for p in config["prompts"]]
        self.prompt_texts = list(config.get("prompt_texts") or [None] * len(self.prompts))
        if not self.prompts or len(self.prompt_texts) != len(self.prompts):
            raise ValueError("TextGenerationEnv needs at least one prompt, and one prompt text per prompt")
        self.vocab_size = int(config["vocab_size"])
        self.eos_token_id = int(config["eos_token_id"])
        self.pad_token_id = int(config.get("pad_token_id", 0))
        self.max_new_tokens = int(config["max_new_tokens"])
        self.score_offset = float(config.get("score_offset", 0.0))
        self.kl_coef = float(config.get("kl_coef", 0.0))
        self.max_length = max(len(p) for p in self.prompts) + self.max_new_tokens
        self.observation_space = gym.spaces.Dict({
            "tokens": gym.spaces.Box(0, self.vocab_size - 1, (self.max_length,), np.int64),
            "length": gym.spaces.Box(1, self.max_length, (1,), np.int64),
        })
        self.action_space = gym.spaces.Discrete(self.vocab_size)
        self._tokenizer_name = config["tokenizer"]
        self._tokenizer: Any = None
        self._reward_actor_names = list(config.get("reward_actors") or [])
        self._reward_config = config.get("reward")
        if not self._reward_actor_names and self._reward_config is None:
            raise ValueError("TextGenerationEnv needs `reward_actors` (RewardWorker names) or `reward` (a RewardConfig)")
        self._reward: Any = None  # actor handles or an in-process WeightedMix, built on first use
        self._reference_config = config.get("reference")
        self._reference: Any = None
        self._episode_log_name = config.get("episode_log")
        self._episode_log: Any = None
        self._episodes = 0
        self._prompt_index = 0
        self._tokens = np.zeros(self.max_length, dtype=np.int64)
        self._length = 0
        self._prompt_length = 0
        self._kl_penalty = 0.0

    # ---- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._prompt_index = int(self.np_random.integers(len(self.prompts)))
        prompt = self.prompts[self._prompt_index]
        self._tokens = np.full(self.max_length, self.pad_token_id, dtype=np.int64)
        self._tokens[: len(prompt)] = prompt
        self._length = self._prompt_length = len(prompt)
        self._kl_penalty = 0.0  # Σ_t β·KL_t of this episode (subtracted from its return)
        return self._obs(), {"prompt_index": self._prompt_index}

    def step(self, action: Any):
        token = int(action)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"action {token} is outside Discrete({self.vocab_size})")
        if self._length >= self.max_length or self._length - self._prompt_length >= self.max_new_tokens:
            raise RuntimeError("step() after the episode ended; call reset()")
        reward = 0.0
        if self.kl_coef > 0:
            penalty = greedy_kl_penalty(self._reference_logp(token), self.kl_coef)
            self._kl_penalty += penalty
            reward -= penalty
        self._tokens[self._length] = token
        self._length += 1
        generated = self._length - self._prompt_length
        terminated = token == self.eos_token_id or generated >= self.max_new_tokens
        info: dict[str, Any] = {}
        if terminated:
            completion = self.decode(self._tokens[self._prompt_length : self._length])
            score = self._score(self.prompt_texts[self._prompt_index], completion)
            reward += score - self.score_offset
            info = {"score": score, "completion": completion, "tokens": generated}
            self._report(score, completion, generated, token == self.eos_token_id)
        return self._obs(), float(reward), bool(terminated), False, info

    # ---- pieces --------------------------------------------------------------------------------
    def _obs(self) -> dict[str, np.ndarray]:
        return {"tokens": self._tokens.copy(), "length": np.array([self._length], dtype=np.int64)}

    def decode(self, ids: np.ndarray) -> str:
        if self._tokenizer is None:
            from raylign.models import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer_name)
        return str(self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True))

    def _score(self, prompt: Any, completion: str) -> float:
        if self._reward is None:
            if self._reward_actor_names:
                import ray

                self._reward = [ray.get_actor(name) for name in self._reward_actor_names]
            else:
                from raylign.rewards import build_reward

                self._reward = build_reward(as_section(RewardConfig, self._reward_config),
                                            tokenizer=self._tokenizer_name)
        if isinstance(self._reward, list):  # reward actors: spread episodes over them
            import ray

            actor = self._reward[self._episodes % len(self._reward)]
            return float(ray.get(actor.score.remote([prompt], [completion]))["total"][0])
        return float(self._reward.score([prompt], [completion])[0])

    def _reference_logp(self, token: int) -> float:
        """log π_ref(token | current state), from the frozen reference model."""
        import torch

        if self._reference is None:
            from raylign.models import load_causal_lm

            cfg = as_section(ModelConfig, self._reference_config).model_copy(update={"lora": None})
            self._reference = load_causal_lm(cfg)[0].eval().requires_grad_(False)
        with torch.no_grad():
            ids = torch.as_tensor(self._tokens[: self._length]).unsqueeze(0)
            logits = self._reference(input_ids=ids).logits[0, -1].float()
            return float(torch.log_softmax(logits, -1)[token])

    def _report(self, score: float, completion: str, tokens: int, finished: bool) -> None:
        self._episodes += 1
        if self._episode_log_name is None:
            return
        import ray

        if self._episode_log is None:
            self._episode_log = ray.get_actor(self._episode_log_name)
        prompt = self.prompt_texts[self._prompt_index]
        # Waited for: the episode is in the log before the EnvRunner's sample() returns.
        ray.get(self._episode_log.append.remote({
            "prompt": prompt if isinstance(prompt, str) else str(prompt), "completion": completion,
            "score": score, "reward": score - self.score_offset, "kl_penalty": self._kl_penalty,
            "tokens": tokens, "finished": finished}))
