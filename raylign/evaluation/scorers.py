"""Scorers for evaluation: anything that gives one number per (prompt, completion).

Every scorer is a `raylign.rewards.RewardSource` (`.name`, `.score(prompts, completions)`), so the
metrics treat a reward model, a lexicon and the policy's own likelihood alike. Spec strings
(`build_scorer`, `raylign eval --scorer`):

  loglik-mean      mean log π(y_t | x, y_<t) over the completion's tokens (length-normalised)
  loglik-sum       Σ_t log π(y_t | x, y_<t), the completion's total log-likelihood
  dpo              DPO implicit reward β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al. 2023, eq. 5);
                   needs a reference model (`--reference`, or the run's base model)
  <reward source>  any `build_reward_source` spec: lexicon:vader, length, module:function, a reward
                   model directory, builtin:/tiny: name

The prompt goes through the model's chat template as a user turn and the completion is scored as the
assistant turn (`raylign.data.format_prompt_completion`), exactly as training formats it; a prompt of
None scores the text alone.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raylign.rewards import RewardSource, RewardSourceError, build_reward_source, check_batch

SCORE_CHUNK = 64  # rows per scorer.score call in `score_in_chunks`
NAMED_SCORERS = ("loglik-mean", "loglik-sum", "dpo")
SCORER_FORMS = (
    "'loglik-mean' or 'loglik-sum' (the model's own log-likelihood of the answer), 'dpo' (implicit "
    "reward β·(log π − log π_ref), with --reference), or any reward source: 'lexicon:vader', 'length', "
    "'module:function', a reward model directory, 'builtin:<name>' or 'tiny:<arch>'"
)


def score_in_chunks(scorer: Any, prompts: Sequence[Any], completions: Sequence[str], desc: str,
                    progress: bool = True) -> np.ndarray:
    """scorer.score over chunks of SCORE_CHUNK rows, with a progress bar."""
    from tqdm.auto import tqdm

    out = np.zeros(len(completions), dtype=np.float64)
    with tqdm(total=len(completions), desc=desc, unit="text", disable=not progress) as bar:
        for i in range(0, len(completions), SCORE_CHUNK):
            out[i : i + SCORE_CHUNK] = scorer.score(prompts[i : i + SCORE_CHUNK], completions[i : i + SCORE_CHUNK])
            bar.update(len(completions[i : i + SCORE_CHUNK]))
    return out


class LogLikelihood:
    """A frozen causal LM that returns log π(completion | prompt) per row, batched and without grad."""

    def __init__(self, model: str, batch_size: int = 16, max_length: int = 512, max_prompt_length: int = 256,
                 apply_chat_template: bool = True, device: str | None = None, trust_remote_code: bool = False):
        import torch

        from raylign.config import ModelConfig
        from raylign.models import load_causal_lm

        net, self.tokenizer = load_causal_lm(ModelConfig(path=model, trust_remote_code=trust_remote_code))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = net.to(self.device).eval().requires_grad_(False)
        self.tokenizer.padding_side = "right"
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_prompt_length = min(max_prompt_length, max_length - 1)
        self.apply_chat_template = apply_chat_template
        self.path = model

    def encode(self, prompt: Any, completion: str) -> dict[str, list[int]]:
        """{input_ids, loss_mask}: chat-formatted prompt (mask 0) + assistant turn (mask 1)."""
        from raylign.data.collators import encode_prompt, tokenize_example

        if prompt is None:  # text alone: every token after the first is scored
            ids = encode_prompt(self.tokenizer, completion)[: self.max_length] or [self.tokenizer.eos_token_id]
            return {"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1)}
        ex = tokenize_example(self.tokenizer, prompt, completion, self.max_prompt_length, self.max_length,
                              self.apply_chat_template)
        return {"input_ids": ex["input_ids"], "loss_mask": ex["loss_mask"]}

    def logps(self, prompts: Sequence[Any], completions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(Σ_t log π(y_t | x, y_<t), number of scored tokens) per row."""
        prompts = check_batch(prompts, completions)
        return self.logps_encoded([self.encode(p, c) for p, c in zip(prompts, completions, strict=True)])

    def logps_ids(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The same on token ids (e.g. a policy's samples, scored under a reference model)."""
        encoded = [{"input_ids": [*map(int, p), *map(int, r)], "loss_mask": [0] * len(p) + [1] * len(r)}
                   for p, r in zip(prompt_ids, response_ids, strict=True)]
        return self.logps_encoded(encoded)

    def logps_encoded(self, encoded: list[dict[str, list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from raylign.algorithms.logprobs import sequence_logps
        from raylign.data.collators import collate_right_pad

        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
        totals = np.zeros(len(encoded), dtype=np.float64)
        counts = np.zeros(len(encoded), dtype=np.int64)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = collate_right_pad([encoded[i] for i in idx], self.tokenizer.pad_token_id)
                ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                loss_mask = batch["loss_mask"].to(self.device)
                totals[idx] = sequence_logps(logits, ids, loss_mask).double().cpu().numpy()
                counts[idx] = loss_mask[:, 1:].sum(-1).cpu().numpy()
        return totals, counts


class LogLikScorer(RewardSource):
    """loglik-sum: Σ_t log π(y_t|x, y_<t); loglik-mean: that sum / |y| (per-token average)."""

    def __init__(self, model: str | LogLikelihood, mean: bool = True, **kw: Any):
        self.lm = model if isinstance(model, LogLikelihood) else LogLikelihood(model, **kw)
        self.mean = mean
        self.name = f"loglik-{'mean' if mean else 'sum'}:{self.lm.path}"

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        total, count = self.lm.logps(prompts, completions)
        out = total / np.maximum(count, 1) if self.mean else total
        return out.astype(np.float32)


class DPOImplicitScorer(RewardSource):
    """DPO implicit reward r(x, y) = β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al. 2023, eq. 5);
    the partition term β·log Z(x) cancels within a pair, so pairwise agreement is exact."""

    def __init__(self, policy: str | LogLikelihood, reference: str | LogLikelihood, beta: float = 0.1, **kw: Any):
        if beta <= 0:
            raise RewardSourceError(f"the DPO scorer needs beta > 0, got {beta}")
        self.policy = policy if isinstance(policy, LogLikelihood) else LogLikelihood(policy, **kw)
        self.reference = reference if isinstance(reference, LogLikelihood) else LogLikelihood(reference, **kw)
        self.beta = beta
        self.name = f"dpo(beta={beta:g}):{self.policy.path} vs {self.reference.path}"

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> np.ndarray:
        pi, _ = self.policy.logps(prompts, completions)
        ref, _ = self.reference.logps(prompts, completions)
        return (self.beta * (pi - ref)).astype(np.float32)


def resolve_model_or_run(name: str) -> tuple[str, str | None]:
    """(model to load, its base model or None) for a model name or a run directory.

    A run directory (`runs/<name>/` with config.yaml) means its `final/` model; the base model is
    the run config's `model.path` (for DPO scoring, KL and win rate against the model it started from).
    """
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        final = path / "final"
        if not final.is_dir():
            from raylign.config import ConfigError

            raise ConfigError(f"{name} is a run directory without final/: the run has not finished; "
                              f"evaluate a checkpoint instead, e.g. {path / 'checkpoints' / 'step_<n>'}")
        import yaml

        cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
        base = ((cfg.get("model") or {}).get("path")) if isinstance(cfg, dict) else None
        return str(final), base
    from raylign.models.loading import adapter_base_model

    base = adapter_base_model(str(path)) if path.is_dir() else None
    return name, base


def build_scorer(spec: str, model: str | None = None, reference: str | None = None, beta: float = 0.1,
                 **kw: Any) -> RewardSource:
    """A scorer from its spec (module docstring). `model` is the model under evaluation (for
    loglik-*/dpo), `reference` the DPO reference. Unknown names fail with a did-you-mean."""
    spec = (spec or "").strip()
    if spec in ("loglik-mean", "loglik-sum"):
        if model is None:
            raise RewardSourceError(f"scorer '{spec}' needs a model to evaluate")
        return LogLikScorer(model, mean=spec.endswith("mean"), **kw)
    if spec == "dpo":
        if model is None or reference is None:
            raise RewardSourceError("scorer 'dpo' needs the policy and a reference model: pass --reference M "
                                    "(a run directory's base model is used by default)")
        return DPOImplicitScorer(model, reference, beta=beta, **kw)
    close = difflib.get_close_matches(spec, NAMED_SCORERS, n=1, cutoff=0.6)
    if close or spec in ("loglik", "log-likelihood", "likelihood", "logprob"):
        guess = close[0] if close else "loglik-mean"
        raise RewardSourceError(f"unknown scorer '{spec}'. Did you mean '{guess}'? Scorers are: {SCORER_FORMS}")
    try:
        return build_reward_source(spec, **{k: v for k, v in kw.items() if k in ("batch_size", "max_length")})
    except RewardSourceError as exc:
        raise RewardSourceError(f"{exc} (evaluation scorers also include loglik-mean, loglik-sum, dpo)") from None
