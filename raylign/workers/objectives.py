"""Objectives: a model forward on one micro-batch turned into a summed loss and summed metrics.

Each objective returns `(loss_sum, sums)`: the loss *summed* over the micro-batch's units (tokens for
SFT, pairs for DPO and reward models, examples for KTO) and metric sums that include the unit count.
The learner divides by the global unit count of the whole optimizer step, so gradient accumulation
and data parallelism give the same update as one big batch.

Pair batches hold chosen and rejected side by side: `input_ids` is [B, 2, T] (0 = chosen,
1 = rejected) and both go through the model in one forward pass of 2B rows.

Online-RL batches are right-padded [B, T] rows of prompt + response with `loss_mask` on the response.
Every per-token array (`old_logps`, `ref_logps`, `advantages`, `old_values`, `returns`) is aligned
with `input_ids`: entry t belongs to token t (its log-prob, the value of the state before it); entry 0
is never a response token. Model outputs at t-1 predict token t; only positions from the earliest
response start (`response_start`) on are computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from raylign.algorithms.advantages import masked_mean
from raylign.algorithms.fairness import counterfactual_pairing_penalty
from raylign.algorithms.kl import kl_estimate
from raylign.algorithms.logprobs import response_start, rl_logits, sequence_logps, token_logps
from raylign.algorithms.policy import (
    aggregate_loss,
    behavior_weights,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    rl_units,
)
from raylign.algorithms.preference import (
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    simpo_loss,
)
from raylign.config import RunConfig
from raylign.data.batches import kto_sums, pair_sums, policy_sums, sft_sums, value_sums

Batch = dict[str, torch.Tensor]
# (input_ids, loss_mask) [N, T] of right-padded rows -> summed log-probs [N] under the frozen reference.
ReferenceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Objective = Callable[[torch.nn.Module, Batch, ReferenceFn | None], tuple[torch.Tensor, dict[str, float]]]

# Objectives that need reference log-probs (precomputed or from a frozen reference).
NEEDS_REFERENCE = {"dpo", "kto", "policy"}
# Which model class a learner holds for each objective.
MODEL_KIND = {"reward": "scalar", "value": "value"}
# Online-RL objectives: their unit count depends on the loss aggregation.
RL_OBJECTIVES = {"policy", "value"}


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, T] -> [2B, T] with each pair's chosen row then its rejected row."""
    return x.reshape(-1, x.shape[-1])


def causal_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a right-padded batch. No attention mask: with right padding, causal attention never
    lets a real token see a pad, so the mask changes no scored log-prob, and leaving it out lets
    SDPA take its fused causal path (~7% faster steps on CPU)."""
    return model(input_ids=input_ids).logits


def policy_logps(model: torch.nn.Module, batch: Batch, average: bool = False) -> torch.Tensor:
    """Summed (or mean) completion log-probs of every sequence of a pair batch: [B, 2]."""
    ids, mask = _flat(batch["input_ids"]), _flat(batch["loss_mask"])
    return sequence_logps(causal_logits(model, ids), ids, mask, average=average).view(-1, 2)


def reference_logps(batch: Batch, ref_fn: ReferenceFn | None) -> torch.Tensor:
    """Precomputed reference log-probs when the batch carries them, else one no-grad pass: [B, 2]."""
    if "ref_logps" in batch:
        return batch["ref_logps"].float()
    if ref_fn is None:
        raise RuntimeError("this objective needs reference log-probs but the learner holds no reference")
    with torch.no_grad():
        return ref_fn(_flat(batch["input_ids"]), _flat(batch["loss_mask"])).view(-1, 2)


# (input_ids, attention_mask, loss_mask) [N, T] -> the score of each sequence [N], with gradients.
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def counterfactual_scores(batch: Batch, score_fn: ScoreFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the counterfactual copies of a pair batch, [B, K, 2], and which copies exist [B, K].

    The batch carries `cf_input_ids` / `cf_attention_mask` / `cf_loss_mask` [B, K, 2, T'] and
    `cf_valid` [B, K] (`raylign.data.counterfactual.collate_counterfactuals`); only existing copies go
    through the model, cut to their longest row."""
    valid = batch["cf_valid"].bool()  # [B, K]
    out = torch.zeros(*valid.shape, 2, device=valid.device)
    if valid.any():
        width = int(batch["cf_attention_mask"][valid].sum(-1).max())
        ids, attn, mask = (_flat(batch[k][valid][..., :width]) for k in ("cf_input_ids", "cf_attention_mask",
                                                                        "cf_loss_mask"))  # [2N, T]
        scores = score_fn(ids, attn, mask).float().view(-1, 2)  # [N, 2]
        out = out.index_put((valid,), scores)
    return out, valid


def sft_objective(model, batch, ref_fn=None):
    """Negative log-likelihood of the masked (completion) tokens, summed over tokens."""
    logits = causal_logits(model, batch["input_ids"])
    nll_sum = -sequence_logps(logits, batch["input_ids"], batch["loss_mask"]).sum()
    tokens = batch["loss_mask"][:, 1:].sum()
    return nll_sum, sft_sums(nll_sum.item(), tokens.item())


def make_objective(name: str, config: RunConfig) -> Objective:
    """The objective for `name`, with its hyperparameters from `config.preference` bound in."""
    p = config.preference
    cf_weight = config.train.counterfactual_penalty

    def counterfactual(losses: torch.Tensor, batch: Batch, scores: torch.Tensor,
                       score_fn: ScoreFn) -> tuple[torch.Tensor, dict[str, float]]:
        """losses + λ·P (counterfactual logit pairing, `algorithms.fairness`) when train.counterfactual_penalty
        is on and the batch carries copies; P's sum and the examples with copies for the log."""
        if cf_weight <= 0 or "cf_valid" not in batch:
            return losses, {}
        cf_scores, valid = counterfactual_scores(batch, score_fn)
        penalty, copies = counterfactual_pairing_penalty(scores.float(), cf_scores, valid)
        return losses + cf_weight * penalty, {"cf_penalty_sum": penalty.detach().sum().item(),
                                              "cf_examples": (copies > 0).sum().item()}

    def mean_logps(model):
        """The DPO family's counterfactual score: the completion's mean token log-prob under the policy
        (what `raylign eval --bias` measures as loglik-mean); the frozen reference adds no gradient."""
        return lambda ids, attn, mask: sequence_logps(causal_logits(model, ids), ids, mask, average=True)

    def dpo(model, batch, ref_fn=None):
        pol = policy_logps(model, batch)
        ref = reference_logps(batch, ref_fn)
        losses, chosen_r, rejected_r = dpo_loss(
            pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], p.beta, p.loss_type, p.label_smoothing
        )
        avg = pol / batch["loss_mask"][..., 1:].sum(-1).clamp(min=1)  # [B, 2] mean token log-probs
        losses, extra = counterfactual(losses, batch, avg, mean_logps(model))
        return losses.sum(), pair_sums(losses, chosen_r, rejected_r) | extra

    def simpo(model, batch, ref_fn=None):
        avg = policy_logps(model, batch, average=True)
        losses, chosen_r, rejected_r = simpo_loss(avg[:, 0], avg[:, 1], p.beta, p.simpo_gamma)
        losses, extra = counterfactual(losses, batch, avg, mean_logps(model))
        return losses.sum(), pair_sums(losses, chosen_r, rejected_r) | extra

    def orpo(model, batch, ref_fn=None):
        avg = policy_logps(model, batch, average=True)
        losses, log_odds = orpo_loss(-avg[:, 0], avg[:, 0], avg[:, 1], p.orpo_lambda)
        losses, extra = counterfactual(losses, batch, avg, mean_logps(model))
        sums = pair_sums(losses, avg[:, 0].detach(), avg[:, 1].detach()) | extra
        sums["log_odds_sum"] = log_odds.sum().item()
        return losses.sum(), sums

    def reward(model, batch, ref_fn=None):
        def score(ids, attn, mask=None):
            return model(input_ids=ids, attention_mask=attn).logits[:, 0]

        scores = score(_flat(batch["input_ids"]), _flat(batch["attention_mask"])).view(-1, 2)
        margin = batch.get("margin") if p.use_margin else None
        losses = bradley_terry_loss(scores[:, 0], scores[:, 1], margin)
        losses, extra = counterfactual(losses, batch, scores, score)
        return losses.sum(), pair_sums(losses, scores[:, 0].detach(), scores[:, 1].detach()) | extra

    def kto(model, batch, ref_fn=None):
        # Row 0 of each example is (prompt, completion); row 1 pairs the prompt with another example's
        # completion, whose KL estimates the reference point z0 (Ethayarajh et al. 2024, §4.1).
        pol = policy_logps(model, batch)
        ref = reference_logps(batch, ref_fn)
        z0 = kto_reference_point(pol[:, 1].detach(), ref[:, 1])
        labels = batch["label"].bool()
        losses, rewards = kto_loss(pol[:, 0], ref[:, 0], labels, z0, p.beta,
                                   p.desirable_weight, p.undesirable_weight)
        return losses.sum(), kto_sums(losses, rewards, labels, z0.item())

    rl = config.rl
    temperature = config.rollout.temperature or 1.0
    # rollout.overlap samples with the weights one update old: decoupled PPO (see behavior_weights).
    decoupled = config.rollout.overlap

    def policy(model, batch, ref_fn=None, kl_coef: float = 0.0):
        """Clipped surrogate (+ β·KL to the reference when rl.kl_in == "loss", − entropy bonus)."""
        ids = batch["input_ids"]
        start = response_start(batch["loss_mask"])
        mask, old, adv = (batch[k][:, start:] for k in ("loss_mask", "old_logps", "advantages"))
        logits = rl_logits(model, ids, temperature, start)
        logp = token_logps(logits, ids[:, start:])
        clip_against, weights = old, None
        if decoupled:  # sampled one update ago: clip against the policy as the step began, reweight
            clip_against = batch["prox_logps"][:, start:] if "prox_logps" in batch else logp.detach()
            weights = behavior_weights(clip_against, old, mask, rl.behavior_weight_cap)
        loss, stats = clipped_policy_loss(logp, clip_against, adv, mask, rl.clip_eps, rl.clip_eps_high,
                                          rl.dual_clip, rl.aggregation, weights)
        means = {"pg_loss": loss.item()}
        if weights is not None:
            means["behavior_weight"] = masked_mean(weights, mask).item()
        if "ref_logps" in batch:
            kl = kl_estimate(logp, batch["ref_logps"][:, start:], rl.kl_estimator, clamp=10.0, mask=mask)
            means["kl"] = masked_mean(kl.detach(), mask).item()
            if rl.kl_in == "loss" and kl_coef > 0:
                loss = loss + kl_coef * aggregate_loss(kl, mask, rl.aggregation)
        if rl.entropy_coef > 0:
            entropy = entropy_from_logits(logits)
            loss = loss - rl.entropy_coef * aggregate_loss(entropy, mask, rl.aggregation)
            means["entropy"] = masked_mean(entropy.detach(), mask).item()
        else:
            with torch.no_grad():  # for the log only, on the response tokens alone
                entropy = entropy_from_logits(logits[mask.bool()])
            means["entropy"] = entropy.mean().item() if entropy.numel() else 0.0
        stats["logp_gap"] = masked_mean((logp.detach() - old).abs(), mask)  # learner vs rollout log-probs
        means.update({k: stats[k].item() for k in ("clip_fraction", "approx_kl", "logp_gap")})
        tokens, units = mask.sum().item(), rl_units(batch["loss_mask"], rl.aggregation)
        sums = policy_sums(means, units, tokens)
        return loss * units, sums

    def value(model, batch, ref_fn=None, **_):
        """Clipped value loss of the critic against the GAE returns."""
        ids = batch["input_ids"]
        start = response_start(batch["loss_mask"])
        mask, old, returns = (batch[k][:, start:] for k in ("loss_mask", "old_values", "returns"))
        values = model(input_ids=ids).values[:, start - 1 : -1].float()
        loss, stats = clipped_value_loss(values, old, returns, mask, rl.value_clip, rl.aggregation)
        tokens, units = mask.sum().item(), rl_units(batch["loss_mask"], rl.aggregation)
        return loss * units, value_sums(loss.item(), stats["value_clip_fraction"].item(), units, tokens)

    objectives: dict[str, Objective] = {
        "sft": sft_objective, "dpo": dpo, "simpo": simpo, "orpo": orpo, "reward": reward, "kto": kto,
        "policy": policy, "value": value,
    }
    return objectives[name]


def count_units(objective: str, batch: dict[str, Any], aggregation: str = "token-mean") -> float:
    """Global unit count of a step batch (numpy or torch), computed by the driver before sharding."""
    if objective in RL_OBJECTIVES:
        return rl_units(batch["loss_mask"], aggregation)
    if objective == "sft":
        return float(batch["loss_mask"][:, 1:].sum())
    return float(len(batch["input_ids"]))
