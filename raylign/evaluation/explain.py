"""`raylign explain`: why did the reward model say that? Token attributions by Integrated Gradients.

    raylign explain runs/rm --pairs data/pairs.jsonl --out explain/rm
    raylign eval runs/rm --pairs data/pairs.jsonl --scorer runs/rm/final --explain 20 --out eval/rm

What is explained (`--scorer`, default `auto`), always one differentiable scalar F(x) per text:
  reward         a reward model (`raylign train reward`'s final/, any one-output classifier or
                 `ScalarHeadModel` dir): F = its score at the last real token
  discriminator  the adversarial discriminator (`final/discriminator`): F = its logit
                 ℓ = log D − log(1 − D) (the generator's reward is a monotone function of it)
  rating:TASK    a multi-task run's rating head (`final/rating_heads/TASK`): F = the rating it predicts
  dpo            the DPO implicit reward F = β·Σ_t∈y (log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t))
                 (Rafailov et al. 2023, eq. 5), of a policy against its reference (`--reference`, or
                 the run's base model)
`auto` reads a run directory's algorithm (reward → reward, adversarial → discriminator, multitask →
its one regression rating head, any policy run → dpo against its base model); for a model directory
a sequence classifier or scalar-head dir is a reward model and a causal LM is dpo with `--reference`.

Attributions are Integrated Gradients (Sundararajan et al. 2017) on the input embedding layer, by
captum's `LayerIntegratedGradients` (extra `raylign[explain]`): for token t with embedding e_t and
baseline embedding e'_t,  A_t = Σ_d (e_td − e'_td) ∫_0^1 ∂F(e' + α(e − e'))/∂e_td dα, integrated by
Gauss–Legendre quadrature. The baseline is the same sequence with every token replaced by the pad
token except the special tokens (BOS/EOS/chat-turn markers), which are kept, so the model still sees a
well-formed input and special tokens get exactly zero attribution. Completeness: Σ_t A_t = F(x) − F(x')
up to the quadrature error, which is reported per example as the convergence delta
δ = Σ_t A_t − (F(x) − F(x')) (and δ relative to |F(x) − F(x')|); the steps are doubled from `steps` up to
`max_steps` until |δ| ≤ `tolerance`·|F(x) − F(x')|.

Faithfulness is checked by deletion (`aopc`, `deletion_test`): removing the tokens with the largest
attribution should lower F more than removing as many random tokens. Token attributions are summed
into words for display (a word is a run of tokens up to the next one starting with white space).

`write_explanations` writes DIR/explain.json, DIR/attributions.html (`raylign.evaluation.explain_html`),
DIR/report.md with a top-words table and DIR/top_tokens.png, DIR/deletion.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylign.config import ConfigError, validate_settings

if TYPE_CHECKING:
    import numpy as np
    import torch
    from rich.console import Console
    from torch import nn

ERASER_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)  # DeYoung et al. 2020, the AOPC bins of comprehensiveness
CAPTUM_HINT = "pip install 'raylign[explain]' (captum; with -c constraints-cpu.txt on a CPU machine)"
ScorerKind = Literal["reward", "discriminator", "rating", "dpo"]


def require_captum() -> None:
    """Fail with one message where captum is missing (before any model is loaded)."""
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        raise ConfigError(f"explanations need captum: {CAPTUM_HINT}") from None


# ---- pure pieces: baseline, words, deletion, AOPC -------------------------------------------------


def baseline_ids(ids: Sequence[int], special_ids: set[int], pad_id: int) -> list[int]:
    """The IG baseline: every token replaced by the pad token, special tokens kept in place."""
    return [i if i in special_ids else pad_id for i in ids]


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds: decode(ids[:t+1]) minus decode(ids[:t]), so word-piece joins and
    byte-level spaces come out as they read; a token inside a multi-byte character (whose prefix decodes
    differently) falls back to decoding it alone."""
    def decode(part: Sequence[int]) -> str:
        return tokenizer.decode(list(part), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces, before = [], ""
    for t in range(len(ids)):
        now = decode(ids[: t + 1])
        pieces.append(now[len(before):] if now.startswith(before) else decode(ids[t : t + 1]))
        before = now
    return pieces


def group_words(pieces: Sequence[str], special: Sequence[bool]) -> list[list[int]]:
    """Token positions of each word: a word starts at a special token, at a token after a special one,
    at a token whose text starts with white space, or after a token ending in white space."""
    words: list[list[int]] = []
    for t, piece in enumerate(pieces):
        new = (not words or special[t] or special[t - 1] or piece[:1].isspace() or pieces[t - 1][-1:].isspace()
               or not pieces[t - 1])
        if new:
            words.append([t])
        else:
            words[-1].append(t)
    return words


def top_positions(attributions: Sequence[float], eligible: Sequence[int], k: int) -> list[int]:
    """The k eligible positions with the largest (signed) attribution, ties to the earlier position."""
    order = sorted(eligible, key=lambda t: (-attributions[t], t))
    return sorted(order[:k])


def tokens_to_delete(n_eligible: int, fraction: float) -> int:
    """⌈fraction·n⌉ tokens, at least 1 and at most n (ERASER's bins on short texts)."""
    return min(n_eligible, max(1, math.ceil(fraction * n_eligible)))


def delete_positions(ids: Sequence[int], positions: Sequence[int]) -> list[int]:
    """`ids` with the tokens at `positions` removed (ERASER deletes rather than masks)."""
    drop = set(positions)
    return [i for t, i in enumerate(ids) if t not in drop]


def aopc(full_score: float, deleted_scores: Sequence[float]) -> float:
    """Area over the perturbation curve of one text:  AOPC = 1/|K| Σ_k∈K (F(x) − F(x ∖ r_k)),

    r_k the tokens deleted at bin k (top-k% attributed for ERASER's comprehensiveness, DeYoung et al.
    2020, "ERASER: A Benchmark to Evaluate Rationalized NLP Models", §4; Samek et al. 2017, "Evaluating
    the visualization of what a deep neural network has learned", eq. 12, averaged over the bins
    instead of L+1 deletion steps). A larger AOPC means deleting those tokens lowers the score more."""
    if not len(deleted_scores):
        raise ValueError("aopc needs the score after at least one deletion")
    return sum(full_score - s for s in deleted_scores) / len(deleted_scores)


def aopc_against_random(top: Sequence[float], random: Sequence[float], n_boot: int = 1000,
                        seed: int = 0) -> dict[str, Any]:
    """Mean AOPC of the top-attributed deletions, of the random ones, and their per-text difference
    d_i = AOPC_top,i − AOPC_random,i with a percentile bootstrap 95% interval over texts. The
    attributions beat random when the interval's low end is above 0."""
    import numpy as np

    from raylign.evaluation.metrics import bootstrap_ci

    t, r = np.asarray(top, dtype=np.float64), np.asarray(random, dtype=np.float64)
    if t.shape != r.shape or not len(t):
        raise ValueError(f"{len(t)} top-deletion AOPCs but {len(r)} random ones")
    diff = t - r
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    return {"n": int(len(t)), "aopc_top": float(t.mean()), "aopc_random": float(r.mean()),
            "difference": float(diff.mean()), "ci_low": lo, "ci_high": hi, "beats_random": bool(lo > 0)}


# ---- what is explained --------------------------------------------------------------------------


class ExplainTarget:
    """A differentiable scalar F over token ids, its tokenizer, how texts are encoded, and the
    embedding layer(s) IG integrates over. `forward` takes unpadded rows of one length."""

    kind: str
    name: str
    tokenizer: Any
    device: Any

    def encode(self, prompt: Any, completion: str) -> tuple[list[int], int]:
        """(token ids, index where the response starts) exactly as the scorer encodes the text."""
        raise NotImplementedError

    def embedding_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """F per row [B] for ids [B, T]; `targets` are the ids whose likelihood DPO scores (fixed along
        the IG path), `response_mask` [B, T] marks the response."""
        raise NotImplementedError

    def score_ids(self, rows: list[list[int]], response_start: int) -> np.ndarray:
        """F of rows of equal length, no gradient."""
        import torch

        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = response_mask(ids.shape[1], response_start, self.device).expand_as(ids)
        with torch.no_grad():
            return self.forward(ids, ids, mask).double().cpu().numpy()


def response_mask(length: int, start: int, device: Any) -> torch.Tensor:
    """[1, T] with 1 from `start` on."""
    import torch

    return (torch.arange(length, device=device) >= start).long().unsqueeze(0)


class RewardTarget(ExplainTarget):
    """A reward model, rating head or discriminator (a `RewardModelSource`): F = logits[:, 0]."""

    def __init__(self, source: Any, kind: str = "reward"):
        from raylign.models.hf import as_hf

        self.source, self.kind, self.name = source, kind, source.name
        self.tokenizer, self.device, self.model = source.tokenizer, source.device, source.model
        self.embeddings = as_hf(self.model).get_input_embeddings()

    def encode(self, prompt: Any, completion: str) -> tuple[list[int], int]:
        from raylign.data import format_prompt_completion
        from raylign.data.collators import tokenize_prompt_completion

        s = self.source
        if prompt is None or (self.kind == "discriminator" and not getattr(s, "conditioned", True)):
            return s.encode(None, completion), 0
        prompt_text, completion_text = format_prompt_completion(prompt, completion, self.tokenizer,
                                                                s.apply_chat_template)
        enc = tokenize_prompt_completion(self.tokenizer, prompt_text, completion_text, s.max_prompt_length,
                                         s.max_length)
        return enc["input_ids"], int(enc["prompt_length"])

    def embedding_layers(self) -> list[nn.Module]:
        return [self.embeddings]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        import torch

        embeds = self.embeddings(input_ids)  # captum's hook swaps in the interpolated embeddings
        mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        return self.model(inputs_embeds=embeds, attention_mask=mask).logits[:, 0].float()


class DPOTarget(ExplainTarget):
    """The DPO implicit reward of a `DPOImplicitScorer`; IG runs over both models' embeddings at once
    (the policy and the reference see the same interpolated input), so completeness holds for F."""

    kind = "dpo"

    def __init__(self, scorer: Any):
        from raylign.models.hf import as_hf

        self.scorer, self.name, self.beta = scorer, scorer.name, float(scorer.beta)
        self.policy, self.reference = scorer.policy, scorer.reference
        self.tokenizer, self.device = self.policy.tokenizer, self.policy.device
        self.policy_embeddings = as_hf(self.policy.model).get_input_embeddings()
        self.reference_embeddings = as_hf(self.reference.model).get_input_embeddings()
        if self.reference.device != self.device:
            raise ConfigError("the policy and the reference must be on the same device to explain the DPO reward")

    def encode(self, prompt: Any, completion: str) -> tuple[list[int], int]:
        enc = self.policy.encode(prompt, completion)
        mask = enc["loss_mask"]
        start = next((t for t, m in enumerate(mask) if m), len(mask))
        return enc["input_ids"], start

    def embedding_layers(self) -> list[nn.Module]:
        if self.policy_embeddings is self.reference_embeddings:
            return [self.policy_embeddings]
        return [self.policy_embeddings, self.reference_embeddings]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        from raylign.algorithms.logprobs import sequence_logps

        def logps(model: nn.Module, embeddings: nn.Module) -> torch.Tensor:
            logits = model(inputs_embeds=embeddings(input_ids)).logits.float()  # [B, T, V]
            return sequence_logps(logits, targets, response_mask)  # [B]

        return self.beta * (logps(self.policy.model, self.policy_embeddings)
                            - logps(self.reference.model, self.reference_embeddings))


def target_from_scorer(scorer: Any, kind: str | None = None) -> ExplainTarget:
    """The target of an evaluation scorer: a reward model / discriminator source or the DPO scorer."""
    from raylign.evaluation.scorers import DPOImplicitScorer
    from raylign.rewards.discriminator import Discriminator
    from raylign.rewards.model import RewardModelSource

    if isinstance(scorer, DPOImplicitScorer):
        return DPOTarget(scorer)
    if isinstance(scorer, RewardModelSource):
        return RewardTarget(scorer, kind or ("discriminator" if isinstance(scorer, Discriminator) else "reward"))
    raise ConfigError(f"cannot explain the scorer {getattr(scorer, 'name', scorer)!r}: explanations need a "
                      "differentiable model score: a reward model, rating head or discriminator directory, or "
                      "'dpo' (the policy's implicit reward against a reference)")


# ---- resolving MODEL_OR_RUN ---------------------------------------------------------------------


@dataclass
class TargetSpec:
    """What `resolve_target` decided, before any model is loaded."""

    kind: ScorerKind
    path: str  # the scalar model directory/name, or the policy for dpo
    reference: str | None = None  # dpo only
    beta: float = 0.1


def _run_config(path: Path) -> dict[str, Any] | None:
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        import yaml

        cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
        return cfg if isinstance(cfg, dict) else {}
    return None


def _rating_heads(final: Path) -> list[str]:
    from raylign.models.heads import HEAD_CONFIG

    heads = final / "rating_heads"
    return sorted(p.name for p in heads.iterdir() if (p / HEAD_CONFIG).is_file()) if heads.is_dir() else []


def _is_scalar_dir(path: Path) -> bool:
    from raylign.models.heads import has_scalar_head

    if has_scalar_head(path):
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def resolve_target(model: str, scorer: str = "auto", reference: str | None = None,
                   beta: float | None = None) -> TargetSpec:
    """The model and kind of score to explain (module docstring); one ConfigError for a wrong choice."""
    from raylign.evaluation.scorers import resolve_model_or_run
    from raylign.rundir import DISCRIMINATOR_DIR

    given = Path(model).expanduser()
    cfg = _run_config(given)
    path, base = resolve_model_or_run(model)  # a run without final/ fails here
    final = Path(path)
    beta = beta if beta is not None else float(((cfg or {}).get("preference") or {}).get("beta") or 0.1)
    if scorer.startswith("rating:"):
        task = scorer.split(":", 1)[1]
        heads = _rating_heads(final)
        if task not in heads:
            raise ConfigError(f"{model} has no rating head '{task}'" + (f"; it has: {', '.join(heads)}" if heads
                              else ": rating heads come from a multitask run with a regression rating task"))
        return TargetSpec("rating", str(final / "rating_heads" / task))
    if scorer == "auto":
        scorer = _auto_kind(model, cfg, final, reference)
        if scorer.startswith("rating:"):
            return resolve_target(model, scorer, reference, beta)
    if scorer == "discriminator":
        d = final / DISCRIMINATOR_DIR if (final / DISCRIMINATOR_DIR).is_dir() else final
        if not _is_scalar_dir(d):
            raise ConfigError(f"{model} holds no discriminator: pass an adversarial run directory or its "
                              f"final/{DISCRIMINATOR_DIR}")
        return TargetSpec("discriminator", str(d))
    if scorer == "reward":
        return TargetSpec("reward", path)
    if scorer == "dpo":
        ref = reference or base
        if not ref:
            raise ConfigError(f"the DPO implicit reward of {model} needs its reference model: pass --reference M")
        return TargetSpec("dpo", path, reference=ref, beta=beta)
    raise ConfigError(f"unknown --scorer '{scorer}': use auto, reward, discriminator, rating:TASK or dpo")


def _auto_kind(model: str, cfg: dict[str, Any] | None, final: Path, reference: str | None) -> str:
    from raylign.rundir import DISCRIMINATOR_DIR

    if cfg is not None:  # a run directory
        algorithm = cfg.get("algorithm")
        if algorithm == "reward":
            return "reward"
        if algorithm == "adversarial" and (final / DISCRIMINATOR_DIR).is_dir():
            return "discriminator"
        if algorithm == "multitask":
            heads = _rating_heads(final)
            if len(heads) == 1:
                return f"rating:{heads[0]}"
            if len(heads) > 1:
                raise ConfigError(f"{model} has several rating heads ({', '.join(heads)}): choose one with "
                                  f"--scorer rating:NAME, or --scorer dpo for the policy's implicit reward")
        return "dpo"
    if final.is_dir():
        if _is_scalar_dir(final):
            return "discriminator" if (final / "discriminator_optimizer.pt").is_file() else "reward"
        return "dpo"
    return "dpo" if reference else "reward"


def load_target(spec: TargetSpec, max_length: int = 512, max_prompt_length: int = 256,
                apply_chat_template: bool = True, device: str | None = None) -> ExplainTarget:
    """Load the models of `spec` as a scorer and wrap it."""
    from raylign.evaluation.scorers import DPOImplicitScorer
    from raylign.rewards.model import RewardModelSource

    kw: dict[str, Any] = {"max_length": max_length, "max_prompt_length": max_prompt_length,
          "apply_chat_template": apply_chat_template, "device": device}
    if spec.kind == "dpo":
        assert spec.reference is not None  # resolve_target checks it
        return DPOTarget(DPOImplicitScorer(spec.path, spec.reference, beta=spec.beta, **kw))
    name = {"reward": "rm", "discriminator": "discriminator", "rating": "rating"}[spec.kind]
    return RewardTarget(RewardModelSource(spec.path, name=f"{name}:{spec.path}", **kw), spec.kind)


# ---- attributions -------------------------------------------------------------------------------


@dataclass
class Explanation:
    """One explained text: its tokens, their attributions, the IG bookkeeping and (later) deletions."""

    prompt: Any
    completion: str
    ids: list[int]
    pieces: list[str]
    special: list[bool]
    response_start: int
    attributions: list[float]
    score: float  # F(x)
    baseline_score: float  # F(x')
    delta: float  # Σ A_t − (F(x) − F(x')), the convergence delta
    steps: int
    meta: dict[str, Any] = field(default_factory=dict)  # pair index, side, margin, ...
    deletion: dict[str, Any] = field(default_factory=dict)  # per-bin scores, AOPCs

    @property
    def delta_relative(self) -> float:
        """|δ| / |F(x) − F(x')| (0 when both are 0)."""
        diff = abs(self.score - self.baseline_score)
        return abs(self.delta) / diff if diff > 0 else (0.0 if self.delta == 0 else math.inf)

    def eligible(self) -> list[int]:
        """Positions the deletion test may delete: the response's non-special tokens."""
        return [t for t in range(self.response_start, len(self.ids)) if not self.special[t]]

    def words(self) -> list[dict[str, Any]]:
        """Words with their summed attribution, where they sit (prompt or response) and if special."""
        out = []
        for positions in group_words(self.pieces, self.special):
            text = "".join(self.pieces[t] for t in positions)
            out.append({"text": text, "attribution": float(sum(self.attributions[t] for t in positions)),
                        "tokens": len(positions), "response": positions[0] >= self.response_start,
                        "special": self.special[positions[0]], "blank": not text.strip()})
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["delta_relative"] = self.delta_relative
        d["words"] = self.words()
        return d


def integrated_gradients(target: ExplainTarget, ids: list[int], response_start: int, steps: int = 64,
                         max_steps: int = 512, tolerance: float = 0.05, internal_batch_size: int = 32
                         ) -> tuple[list[float], float, float, float, int]:
    """(per-token attributions, F(x), F(x'), δ, steps used): `LayerIntegratedGradients` on the target's
    embedding layer(s) from the pad baseline (module docstring), summed over the embedding dimension.
    The steps double from `steps` until |δ| ≤ tolerance·|F(x) − F(x')| or `max_steps` is reached."""
    import torch
    from captum.attr import LayerIntegratedGradients

    special = set(target.tokenizer.all_special_ids)
    x = torch.tensor([ids], dtype=torch.long, device=target.device)  # [1, T]
    base = torch.tensor([baseline_ids(ids, special, target.tokenizer.pad_token_id)], dtype=torch.long,
                        device=target.device)
    mask = response_mask(len(ids), response_start, target.device)
    with torch.no_grad():
        score = float(target.forward(x, x, mask)[0])
        baseline_score = float(target.forward(base, x, mask)[0])
    layers = target.embedding_layers()
    with warnings.catch_warnings():  # "multiple layers": the policy's and the reference's, independent
        warnings.filterwarnings("ignore", message="Multiple layers provided")
        lig = LayerIntegratedGradients(target.forward, layers if len(layers) > 1 else layers[0])
    n = steps
    while True:
        attr, delta = lig.attribute(x, baselines=base, additional_forward_args=(x, mask), n_steps=n,
                                    method="gausslegendre", internal_batch_size=internal_batch_size,
                                    return_convergence_delta=True)
        parts = attr if isinstance(attr, list) else [attr]
        per_token = sum(p.sum(-1)[0].double() for p in parts)  # [T], summed over embedding dims and models
        d = float(delta.reshape(-1)[0])
        if abs(d) <= tolerance * abs(score - baseline_score) or n * 2 > max_steps:
            return per_token.cpu().tolist(), score, baseline_score, d, n
        n *= 2


def explain_text(target: ExplainTarget, prompt: Any, completion: str, meta: dict[str, Any] | None = None,
                 **ig: Any) -> Explanation:
    """Attributions of one (prompt, completion); a prompt of None explains the text alone."""
    ids, start = target.encode(prompt, completion)
    special_ids = set(target.tokenizer.all_special_ids)
    attributions, score, baseline_score, delta, steps = integrated_gradients(target, ids, start, **ig)
    return Explanation(prompt=prompt, completion=completion, ids=list(ids), pieces=token_pieces(target.tokenizer, ids),
                       special=[i in special_ids for i in ids], response_start=start, attributions=attributions,
                       score=score, baseline_score=baseline_score, delta=delta, steps=steps, meta=dict(meta or {}))


def deletion_scores(target: ExplainTarget, ex: Explanation, fractions: Sequence[float] = ERASER_FRACTIONS,
                    random_draws: int = 10, seed: int = 0) -> dict[str, Any]:
    """F after deleting the top-k% attributed response tokens, and after deleting k% random ones
    (`random_draws` draws per bin), for each k in `fractions`; with each text's AOPCs."""
    from raylign.runtime import Purpose, rng

    eligible = ex.eligible()
    if not eligible:
        return {}
    # A stream of its own per text (step = 1 + index: the bootstrap of the summary draws at step 0).
    gen = rng(seed, Purpose.BOOTSTRAP, 1 + int(ex.meta.get("index", 0)), int(ex.meta.get("side") == "rejected"))
    top_scores, random_means, ks = [], [], []
    for fraction in fractions:
        k = tokens_to_delete(len(eligible), fraction)
        rows = [delete_positions(ex.ids, top_positions(ex.attributions, eligible, k))]
        rows += [delete_positions(ex.ids, [int(t) for t in gen.choice(eligible, size=k, replace=False)])
                 for _ in range(random_draws)]
        scores = target.score_ids(rows, ex.response_start)
        top_scores.append(float(scores[0]))
        random_means.append(float(scores[1:].mean()))
        ks.append(k)
    return {"fractions": list(fractions), "tokens": ks, "top": top_scores, "random": random_means,
            "aopc_top": aopc(ex.score, top_scores), "aopc_random": aopc(ex.score, random_means)}


def explain_items(target: ExplainTarget, items: Sequence[dict[str, Any]], fractions: Sequence[float] = ERASER_FRACTIONS,
                  random_draws: int = 10, seed: int = 0, progress: bool = True, **ig: Any) -> list[Explanation]:
    """Explain each {prompt, completion, meta} and run its deletion test, with a progress bar."""
    from tqdm.auto import tqdm

    out = []
    for item in tqdm(items, desc="explaining", unit="text", disable=not progress):
        ex = explain_text(target, item.get("prompt"), item["completion"], item.get("meta"), **ig)
        ex.deletion = deletion_scores(target, ex, fractions, random_draws, seed)
        out.append(ex)
    return out


def pair_items(rows: Sequence[dict[str, Any]], indices: Sequence[int] | None = None,
               margins: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Chosen and rejected of each pair (in `indices` order) as items, the pair's index/margin kept."""
    items = []
    for i in (range(len(rows)) if indices is None else indices):
        r = rows[i]
        meta = {"index": int(i), **({"margin": float(margins[i])} if margins is not None else {})}
        items.append({"prompt": r["prompt"], "completion": r["chosen"], "meta": {**meta, "side": "chosen"}})
        items.append({"prompt": r["prompt"], "completion": r["rejected"], "meta": {**meta, "side": "rejected"}})
    return items


def largest_margins(margins: Sequence[float], n: int) -> list[int]:
    """Indices of the n pairs with the largest |margin| (ties to the earlier pair), largest first."""
    return sorted(range(len(margins)), key=lambda i: (-abs(margins[i]), i))[:n]


# ---- summaries and the report -------------------------------------------------------------------


def summarize(explanations: Sequence[Explanation], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Completeness (δ per text) and the deletion test (AOPC against random) over all texts."""
    import numpy as np

    rel = np.array([e.delta_relative for e in explanations], dtype=np.float64)
    scored = [e for e in explanations if e.deletion]
    out: dict[str, Any] = {
        "texts": len(explanations),
        "completeness": {"max_abs_delta": float(max((abs(e.delta) for e in explanations), default=0.0)),
                         "median_relative_delta": float(np.median(rel)) if len(rel) else None,
                         "max_relative_delta": float(rel.max()) if len(rel) else None,
                         "steps": sorted({e.steps for e in explanations})},
    }
    if scored:
        out["deletion"] = aopc_against_random([e.deletion["aopc_top"] for e in scored],
                                              [e.deletion["aopc_random"] for e in scored], n_boot=n_boot, seed=seed)
        out["deletion"]["fractions"] = scored[0].deletion["fractions"]
        out["deletion"]["curve_top"] = [float(np.mean([e.score - e.deletion["top"][j] for e in scored]))
                                        for j in range(len(scored[0].deletion["top"]))]
        out["deletion"]["curve_random"] = [float(np.mean([e.score - e.deletion["random"][j] for e in scored]))
                                           for j in range(len(scored[0].deletion["random"]))]
    return out


def top_words(explanations: Sequence[Explanation], n: int = 15) -> list[dict[str, Any]]:
    """Response words (special and blank ones left out, compared stripped and lower-cased) by the size
    of their mean attribution: {word, count, mean, total}."""
    import numpy as np

    acc: dict[str, list[float]] = {}
    for e in explanations:
        for w in e.words():
            if w["response"] and not w["special"] and not w["blank"]:
                acc.setdefault(w["text"].strip().lower(), []).append(w["attribution"])
    rows: list[dict[str, Any]] = [{"word": k, "count": len(v), "mean": float(np.mean(v)), "total": float(np.sum(v))}
                                  for k, v in acc.items()]
    return sorted(rows, key=lambda r: (-abs(r["mean"]), r["word"]))[:n]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_top_words(path: Path, words: Sequence[dict[str, Any]], title: str) -> Path:
    """Horizontal bars of the words' mean attribution, blue raising the score, orange lowering it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, max(2.4, 0.32 * len(words) + 1.2)), dpi=100)
    values = [w["mean"] for w in words][::-1]
    from raylign.evaluation.explain_html import NEGATIVE_RGB, POSITIVE_RGB  # the page's colours

    colours = [tuple(c / 255 for c in (POSITIVE_RGB if v >= 0 else NEGATIVE_RGB)) for v in values]
    ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(range(len(values)), [w["word"][:24] for w in words][::-1], fontsize=8)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("mean attribution (score units)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_explanations(out_dir: str | Path, explanations: Sequence[Explanation], info: dict[str, Any],
                       n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """DIR/explain.json, attributions.html, report.md, top_tokens.png, deletion.png; returns the summary."""
    from raylign.evaluation.explain_html import render_attributions
    from raylign.evaluation.report import line_plot

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    summary = {**info, **summarize(explanations, n_boot=n_boot, seed=seed), "top_words": top_words(explanations)}
    _write_text_atomic(out / "explain.json", json.dumps(
        {"summary": summary, "explanations": [e.to_json() for e in explanations]}, indent=1, default=float))
    _write_text_atomic(out / "attributions.html", render_attributions(explanations, summary))
    lines = [f"# Explanations: {info.get('model')}", "",
             f"`{info.get('target')}` ({info.get('kind')}): token attributions by Integrated Gradients on the "
             "embedding layer (captum `LayerIntegratedGradients`), baseline = pad tokens with special tokens kept. "
             f"{summary['texts']} texts; open [attributions.html](attributions.html) for every word.", ""]
    c = summary["completeness"]
    lines += ["## Completeness", "", "Σ attributions = F(x) − F(baseline) up to the convergence delta δ.", "",
              "| texts | IG steps | max abs δ | median δ / abs(F(x) − F(x')) | max |", "|---|---|---|---|---|",
              f"| {summary['texts']} | {', '.join(map(str, c['steps']))} | {c['max_abs_delta']:.3g} | "
              f"{_fmt(c['median_relative_delta'])} | {_fmt(c['max_relative_delta'])} |", ""]
    if "deletion" in summary:
        d = summary["deletion"]
        lines += ["## Faithfulness: deletion test", "",
                  "AOPC = mean over k ∈ {" + ", ".join(f"{f:g}" for f in d["fractions"]) + "} of F(x) − F(x without "
                  "k of its response tokens) (ERASER comprehensiveness, DeYoung et al. 2020): deleting the top-attributed "
                  "tokens against deleting as many random ones; difference with a bootstrap 95% interval over texts.", "",
                  "| texts | AOPC top-k | AOPC random | difference | 95% CI | beats random |", "|---|---|---|---|---|---|",
                  f"| {d['n']} | {d['aopc_top']:.4f} | {d['aopc_random']:.4f} | {d['difference']:+.4f} | "
                  f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | {'yes' if d['beats_random'] else 'no'} |", ""]
        line_plot(out / "deletion.png", "Score drop after deleting response tokens",
                  {"top-attributed": (d["fractions"], d["curve_top"]), "random": (d["fractions"], d["curve_random"])},
                  "F(x) − F(x ∖ k)", xlabel="fraction of response tokens deleted")
        lines += ["![deletion test](deletion.png)", ""]
    if summary["top_words"]:
        lines += ["## Top words", "", "Response words with the largest mean attribution (positive: they raise the "
                  "score).", "", "| word | occurrences | mean attribution | total |", "|---|---|---|---|"]
        lines += [f"| {_md(w['word'])} | {w['count']} | {w['mean']:+.4f} | {w['total']:+.4f} |" for w in summary["top_words"]]
        plot_top_words(out / "top_tokens.png", summary["top_words"], "Words with the largest mean attribution")
        lines += ["", "![top words](top_tokens.png)", ""]
    _write_text_atomic(out / "report.md", "\n".join(lines))
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _md(text: str) -> str:
    """A word in a markdown table cell: pipes, backticks and angle brackets escaped, shown as code."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


# ---- `raylign explain` --------------------------------------------------------------------------


class ExplainSettings(BaseModel):
    """Settings of one `raylign explain` run (`raylign explain --help` documents each)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="MODEL_OR_RUN: a run dir (its final/), a model dir, builtin:/tiny:, HF id")
    out: str = Field(description="output directory")
    pairs: str | None = Field(None, description="pairs file {prompt, chosen, rejected}")
    texts: str | None = Field(None, description="texts file: {text} or {prompt, completion} rows")
    scorer: str = Field("auto", description="auto, reward, discriminator, rating:TASK or dpo")
    reference: str | None = Field(None, description="dpo: the reference model (default: the run's base model)")
    beta: float | None = Field(None, gt=0, description="dpo: β (default: the run's preference.beta, else 0.1)")
    limit: int | None = Field(None, ge=1, description="explain only the first N rows")
    steps: int = Field(64, ge=2, description="IG quadrature steps to start with")
    max_steps: int = Field(512, ge=2, description="most IG steps (doubling until δ is within tolerance)")
    tolerance: float = Field(0.05, gt=0, description="target |δ| / |F(x) − F(x')|")
    internal_batch_size: int = Field(32, ge=1, description="IG steps per forward pass")
    random_draws: int = Field(10, ge=1, description="random deletions per bin in the deletion test")
    max_length: int = Field(512, ge=2)
    max_prompt_length: int = Field(256, ge=1)
    seed: int = 0
    n_boot: int = Field(1000, ge=1)
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> ExplainSettings:
        if bool(self.pairs) == bool(self.texts):
            raise ConfigError("give exactly one of --pairs F (chosen and rejected side by side) or --texts F")
        if self.max_steps < self.steps:
            raise ConfigError(f"--max-steps ({self.max_steps}) must be at least --steps ({self.steps})")
        return self

    def ig_kwargs(self) -> dict[str, Any]:
        return {"steps": self.steps, "max_steps": self.max_steps, "tolerance": self.tolerance,
                "internal_batch_size": self.internal_batch_size}


def load_text_items(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """{prompt, completion} items from a file of {text} rows (prompt None) or {prompt, completion} rows."""
    from raylign.data import DataError, load_dataset, rows

    table = load_dataset(path, None, limit=limit)
    items = []
    for i, r in enumerate(rows(table)):
        if r.get("text") is not None:
            items.append({"prompt": None, "completion": r["text"], "meta": {"index": i}})
        elif r.get("completion") is not None and "prompt" in r:
            items.append({"prompt": r["prompt"], "completion": r["completion"], "meta": {"index": i}})
        else:
            raise DataError(f"{path}: --texts needs {{text}} or {{prompt, completion}} rows; row {i + 1} has "
                            f"{sorted(r)}")
    return items


def run_explain(settings: ExplainSettings, console: Console | None = None) -> dict[str, Any]:
    """Resolve, load, explain, write (module docstring); returns the summary."""
    from rich.console import Console

    from raylign.data import load_dataset, rows

    s = settings
    console = console or Console()
    require_captum()
    spec = resolve_target(s.model, s.scorer, s.reference, s.beta)
    if s.pairs:
        items = pair_items(rows(load_dataset(s.pairs, "pairs", limit=s.limit)))
    else:
        assert s.texts is not None  # the settings ask for one of them
        items = load_text_items(s.texts, s.limit)
    target = load_target(spec, s.max_length, s.max_prompt_length)
    console.print(f"explain: {target.name} ({spec.kind}) on {len(items)} texts")
    explanations = explain_items(target, items, random_draws=s.random_draws, seed=s.seed, progress=s.progress,
                                 **s.ig_kwargs())
    if s.pairs:
        for a, b in zip(explanations[::2], explanations[1::2], strict=True):
            a.meta["margin"] = b.meta["margin"] = a.score - b.score
    info = {"model": s.model, "target": target.name, "kind": spec.kind, "source": s.pairs or s.texts}
    summary = write_explanations(s.out, explanations, info, n_boot=s.n_boot, seed=s.seed)
    print_summary(summary, console)
    console.print(f"[green]wrote[/green] {Path(s.out) / 'attributions.html'} and {Path(s.out) / 'report.md'}")
    return summary


def print_summary(summary: dict[str, Any], console: Console) -> None:
    c = summary["completeness"]
    console.print(f"completeness: max |δ| {c['max_abs_delta']:.3g}, median δ/|F(x)−F(x')| "
                  f"{_fmt(c['median_relative_delta'])} (IG steps {', '.join(map(str, c['steps']))})")
    if "deletion" in summary:
        d = summary["deletion"]
        console.print(f"deletion test: AOPC top-k {d['aopc_top']:.4f} vs random {d['aopc_random']:.4f}, difference "
                      f"{d['difference']:+.4f} [95% CI {d['ci_low']:+.4f}, {d['ci_high']:+.4f}]: "
                      + ("beats random" if d["beats_random"] else "does NOT beat random"))


def add_explain_parser(sub: argparse._SubParsersAction) -> None:
    """`raylign explain` (the CLI registers it; cmd_explain runs it)."""
    p = sub.add_parser(
        "explain", help="why did the reward model say that? token attributions (Integrated Gradients), HTML report",
        description="Explain the scores of MODEL_OR_RUN (a reward model, discriminator, multi-task rating head, or "
        "the DPO implicit reward of a policy) on --pairs or --texts: Integrated Gradients on the embedding layer "
        "(captum), baseline = pad tokens with special tokens kept, the convergence delta per text, and a deletion "
        "test (AOPC of deleting the top-attributed tokens against random ones, bootstrap 95%% CI). Writes "
        "OUT/attributions.html (chosen and rejected side by side), OUT/report.md, OUT/explain.json and PNGs.",
    )
    p.add_argument("model", metavar="MODEL_OR_RUN", help="runs/<name>, a model directory, builtin:/tiny:, HF id")
    p.add_argument("--pairs", help="pairs file {prompt, chosen, rejected}")
    p.add_argument("--texts", help="texts file: {text} or {prompt, completion} rows")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--scorer", default="auto", help="auto (default: from the run or model), reward, discriminator, "
                   "rating:TASK (a multitask run's rating head) or dpo (implicit reward against --reference)")
    p.add_argument("--reference", help="dpo: reference model (default: the run's base model)")
    p.add_argument("--beta", type=float, help="dpo: β (default: the run's preference.beta, else 0.1)")
    p.add_argument("--limit", type=int, help="explain only the first N rows")
    p.add_argument("--steps", type=int, default=64, help="IG steps to start with (default 64)")
    p.add_argument("--max-steps", type=int, default=512, help="IG steps at most, doubling until the convergence "
                   "delta is within --tolerance (default 512)")
    p.add_argument("--tolerance", type=float, default=0.05, help="target |delta| / |F(x) - F(baseline)| (default 0.05)")
    p.add_argument("--random-draws", type=int, default=10, help="random deletions per bin (default 10)")
    p.add_argument("--max-length", type=int, default=512, help="tokens of prompt + response (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_explain)


def explain_settings(args: argparse.Namespace) -> ExplainSettings:
    return validate_settings(ExplainSettings, {
        "model": args.model, "out": args.out, "pairs": args.pairs, "texts": args.texts, "scorer": args.scorer,
        "reference": args.reference, "beta": args.beta, "limit": args.limit, "steps": args.steps,
        "max_steps": args.max_steps, "tolerance": args.tolerance, "random_draws": args.random_draws,
        "max_length": args.max_length, "seed": args.seed, "progress": not args.no_progress})


def cmd_explain(args: argparse.Namespace) -> None:
    from rich.console import Console

    run_explain(explain_settings(args), console=Console(soft_wrap=True))


def explain_eval_pairs(scorer: Any, rows: Sequence[dict[str, Any]], margins: Sequence[float], n: int,
                       out_dir: str | Path, model: str, seed: int = 0, n_boot: int = 1000,
                       progress: bool = True) -> dict[str, Any]:
    """`raylign eval --explain N`: the N pairs with the largest |margin| (the scorer's most confident
    decisions, right or wrong), explained with the evaluation's own scorer into `out_dir`."""
    target = target_from_scorer(scorer)
    chosen = largest_margins(margins, n)
    explanations = explain_items(target, pair_items(rows, chosen, margins), seed=seed, progress=progress)
    info = {"model": model, "target": target.name, "kind": target.kind, "selection": f"{len(chosen)} pairs with the "
            "largest |margin|"}
    summary = write_explanations(out_dir, explanations, info, n_boot=n_boot, seed=seed)
    return {"dir": str(out_dir), "pairs": [int(i) for i in chosen], **{k: summary[k] for k in
            ("completeness", "deletion", "top_words") if k in summary}}
