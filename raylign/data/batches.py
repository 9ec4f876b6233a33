"""The batch contract: the keys of every batch kind that crosses an actor boundary, and the metric
sums learners return for them, written and decoded here.

Batches are dicts of numpy arrays (zero-copy through Ray's object store); the learner turns each
micro-batch into torch tensors with the same keys. Shapes: B rows, T tokens (right-padded).

Metric sums. An objective returns *sums* over its micro-batch (a loss summed over units, counts of
tokens, pairs, examples), never means, so that sums from micro-batches, ranks and minibatches add up
(`add_sums`) and are divided once, by the driver (`summarize_*`), into the means that metrics.jsonl
holds. The producers (`sft_sums`, `pair_sums`, ...) and the decoders live side by side so that a new
metric is one edit here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from typing_extensions import NotRequired, TypedDict

# ---- batch kinds ---------------------------------------------------------------------------------


class SFTBatch(TypedDict):
    """Imitation (SFT) and the imitation task of multi-task runs."""

    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] 1 on real tokens
    loss_mask: np.ndarray  # [B, T] 1 on the tokens trained on (the completion)
    rating: NotRequired[np.ndarray]  # [B] float: a multi-task rating task's target


class PairBatch(TypedDict):
    """DPO family, SimPO, ORPO and reward models: row 0 of each pair is chosen, row 1 rejected."""

    input_ids: np.ndarray  # [B, 2, T]
    attention_mask: np.ndarray  # [B, 2, T]
    loss_mask: np.ndarray  # [B, 2, T]
    margin: NotRequired[np.ndarray]  # [B] float: the data's preference margin (reward models)
    ref_logps: NotRequired[np.ndarray]  # [B, 2] precomputed Σ_t log π_ref of each sequence
    # train.counterfactual_penalty: K counterfactual copies of each pair (a group term swapped in
    # prompt, chosen and rejected), padded to the batch's most copies; cf_valid marks the real ones.
    cf_input_ids: NotRequired[np.ndarray]  # [B, K, 2, T']
    cf_attention_mask: NotRequired[np.ndarray]  # [B, K, 2, T']
    cf_loss_mask: NotRequired[np.ndarray]  # [B, K, 2, T']
    cf_valid: NotRequired[np.ndarray]  # [B, K] float 1.0 = copy k exists


class UnpairedBatch(TypedDict):
    """KTO: row 0 is (prompt, completion), row 1 the prompt with another example's completion (z0)."""

    input_ids: np.ndarray  # [B, 2, T]
    attention_mask: np.ndarray  # [B, 2, T]
    loss_mask: np.ndarray  # [B, 2, T]
    label: np.ndarray  # [B] float 1.0 = desirable
    ref_logps: NotRequired[np.ndarray]  # [B, 2]


class RLBatch(TypedDict):
    """Online RL: prompt + response rows; every per-token array is aligned with input_ids (entry t
    belongs to token t; entry 0 is never a response token)."""

    input_ids: np.ndarray  # [B, T]
    attention_mask: np.ndarray  # [B, T]
    loss_mask: np.ndarray  # [B, T] 1 on response tokens
    old_logps: np.ndarray  # [B, T] float32 log-probs the tokens were sampled with
    ref_logps: np.ndarray  # [B, T] under the frozen reference
    advantages: np.ndarray  # [B, T]
    prox_logps: NotRequired[np.ndarray]  # [B, T] decoupled PPO: the policy as the step began
    old_values: NotRequired[np.ndarray]  # [B, T] PPO: critic values at sampling time
    returns: NotRequired[np.ndarray]  # [B, T] PPO: GAE returns, the critic's targets


# ---- producing sums (inside learners) ------------------------------------------------------------

# Values every DDP rank reports identically: taken from one rank, never summed.
PER_RANK_SAME = ("grad_norm", "lr", "skipped_step")


def sft_sums(nll_sum: float, tokens: float) -> dict[str, float]:
    return {"nll_sum": nll_sum, "tokens": tokens}


def pair_sums(losses: Any, chosen: Any, rejected: Any) -> dict[str, float]:
    """Pair metrics from per-pair tensors [B]: loss, accuracy (ties count half), margin, mean chosen and
    rejected reward."""
    correct = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {
        "loss_sum": losses.detach().sum().item(), "correct": correct.sum().item(),
        "margin_sum": (chosen - rejected).sum().item(), "chosen_sum": chosen.sum().item(),
        "rejected_sum": rejected.sum().item(), "pairs": float(len(losses)),
    }


def kto_sums(losses: Any, rewards: Any, desirable: Any, z0: float) -> dict[str, float]:
    """KTO from per-example losses and implicit rewards [B], the desirable mask [B] and the batch's z0."""
    return {"loss_sum": losses.detach().sum().item(), "examples": float(len(losses)),
            "desirable": desirable.float().sum().item(),
            "desirable_reward_sum": rewards[desirable].sum().item(),
            "undesirable_reward_sum": rewards[~desirable].sum().item(), "kl_sum": z0 * len(losses)}


def policy_sums(means: Mapping[str, float], units: float, tokens: float) -> dict[str, float]:
    """The clipped policy objective's sums from its micro-batch means: `pg_loss` is a mean over units
    (rl.aggregation), every other value (clip_fraction, approx_kl, logp_gap, entropy, kl,
    behavior_weight) a mean over response tokens."""
    sums = {f"{k}_sum": v * (units if k == "pg_loss" else tokens) for k, v in means.items()}
    return sums | {"tokens": tokens, "units": units}


def value_sums(loss: float, clip_fraction: float, units: float, tokens: float) -> dict[str, float]:
    return {"value_loss_sum": loss * units, "units": units, "tokens": tokens,
            "value_clip_fraction_sum": clip_fraction * tokens}


def rating_sums(losses: Any, pred: Any, target: Any, classification: bool) -> dict[str, float]:
    """A rating head's sums: accuracy counts for a classifier ([B, K] logits), moments for the Pearson
    correlation of a regressor ([B] predictions)."""
    sums = {"loss_sum": losses.detach().sum().item(), "examples": float(len(losses))}
    if classification:
        return sums | {"correct": (pred.argmax(-1) == target.long()).float().sum().item()}
    pd, td = pred.detach().double(), target.double()
    return sums | {"pred_sum": pd.sum().item(), "target_sum": td.sum().item(), "pred_sq": (pd * pd).sum().item(),
                   "target_sq": (td * td).sum().item(), "cross": (pd * td).sum().item()}


# ---- adding sums (driver) ------------------------------------------------------------------------


def add_sums(totals: dict[str, float], sums: Mapping[str, float]) -> dict[str, float]:
    """totals += sums, key by key; returns totals."""
    for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + v
    return totals


def sum_parts(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum metric sums over ranks, micro-batches or minibatches, leaving out the PER_RANK_SAME values."""
    out: dict[str, float] = {}
    for part in parts:
        add_sums(out, {k: v for k, v in part.items() if k not in PER_RANK_SAME})
    return out


def combine_ranks(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One optimizer step's sums over DDP ranks; grad norm and lr (equal on every rank) from rank 0."""
    return sum_parts(parts) | {k: parts[0][k] for k in PER_RANK_SAME if k in parts[0]}


# ---- decoding sums into metrics (driver) ---------------------------------------------------------


def summarize_sums(objective: str, sums: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Summed offline-learner metrics -> means named `<prefix>/...` for metrics.jsonl."""
    if objective == "sft":
        nll = sums["nll_sum"] / max(sums["tokens"], 1.0)
        if prefix == "eval":
            return {"eval/nll": nll, "eval/ppl": math.exp(min(nll, 50.0))}
        return {f"{prefix}/loss": nll, f"{prefix}/tokens": sums["tokens"]}
    if objective == "kto":
        n, d = max(sums["examples"], 1.0), sums["desirable"]
        return {f"{prefix}/loss": sums["loss_sum"] / n, f"{prefix}/kl": sums["kl_sum"] / n,
                f"{prefix}/desirable_reward": sums["desirable_reward_sum"] / max(d, 1.0),
                f"{prefix}/undesirable_reward": sums["undesirable_reward_sum"] / max(n - d, 1.0)}
    n = max(sums["pairs"], 1.0)
    out = {f"{prefix}/loss": sums["loss_sum"] / n, f"{prefix}/accuracy": sums["correct"] / n,
           f"{prefix}/margin": sums["margin_sum"] / n, f"{prefix}/chosen_reward": sums["chosen_sum"] / n,
           f"{prefix}/rejected_reward": sums["rejected_sum"] / n}
    if "log_odds_sum" in sums:
        out[f"{prefix}/log_odds_ratio"] = sums["log_odds_sum"] / n
    if "cf_penalty_sum" in sums:  # train.counterfactual_penalty: mean squared gap over pairs with copies
        out[f"{prefix}/counterfactual_gap"] = sums["cf_penalty_sum"] / max(sums["cf_examples"], 1.0)
        out[f"{prefix}/counterfactual_pairs"] = sums["cf_examples"]
    return out


def summarize_task(task_type: str, sums: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Summed metrics of one multi-task task -> means named `<prefix>/loss` (+ `/ppl`, `/accuracy` or
    `/pearson`)."""
    if task_type == "imitation":
        nll = sums["nll_sum"] / max(sums["tokens"], 1.0)
        return {f"{prefix}/loss": nll, f"{prefix}/ppl": math.exp(min(nll, 50.0))}
    if task_type == "preference":
        return summarize_sums("dpo", sums, prefix)
    n = max(sums["examples"], 1.0)
    out = {f"{prefix}/loss": sums["loss_sum"] / n}
    if "correct" in sums:
        out[f"{prefix}/accuracy"] = sums["correct"] / n
    else:
        cov = sums["cross"] / n - (sums["pred_sum"] / n) * (sums["target_sum"] / n)
        var_p = sums["pred_sq"] / n - (sums["pred_sum"] / n) ** 2
        var_t = sums["target_sq"] / n - (sums["target_sum"] / n) ** 2
        out[f"{prefix}/pearson"] = cov / math.sqrt(var_p * var_t) if var_p > 1e-12 and var_t > 1e-12 else 0.0
    return out


def summarize_policy(steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The policy learner's sums of every optimizer step of an RL step -> `policy/*` and
    `rollout/logp_gap` (how far the learner's log-probs are from the sampler's)."""
    p = sum_parts(steps)
    tokens = max(p["tokens"], 1.0)
    out = {
        "policy/loss": p["pg_loss_sum"] / max(p["units"], 1.0),
        "policy/clip_fraction": p["clip_fraction_sum"] / tokens,
        "policy/approx_kl": p["approx_kl_sum"] / tokens,
        "policy/entropy": p["entropy_sum"] / tokens,
        "policy/grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
        "policy/lr": steps[-1]["lr"],
        "policy/skipped_steps": float(sum(s.get("skipped_step", 0.0) for s in steps)),
        "rollout/logp_gap": p["logp_gap_sum"] / tokens,
    }
    if "behavior_weight_sum" in p:  # rollout.overlap: decoupled PPO's mean min(π_prox/π_sampler, cap)
        out["policy/behavior_weight"] = p["behavior_weight_sum"] / tokens
    return out


def summarize_critic(steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    c = sum_parts(steps)
    return {"critic/value_loss": c["value_loss_sum"] / max(c["units"], 1.0),
            "critic/skipped_steps": float(sum(s.get("skipped_step", 0.0) for s in steps)),
            "critic/clip_fraction": c["value_clip_fraction_sum"] / max(c["tokens"], 1.0)}
