"""RLModules that act with a causal LM over its vocabulary, for RLlib's DQN and PPO (new API stack).

Both read the observation of `TextGenerationEnv` ({"tokens" [B, L], "length" [B, 1]}), run the LM on
the real tokens and take the logits at the last real position. Both keep a frozen copy of the initial
model, the reference, outside their state dict (it is rebuilt from the model path, never synced or
checkpointed): its top-k tokens at each state are the allowed actions (`rllib.top_k`; 0 = all).

* `CausalLMQModule` (DQN) subclasses RLlib's `DefaultDQNTorchRLModule`, so RLlib's epsilon-greedy,
  double-Q and target-network plumbing is reused; only the Q head is ours:
  Q(s, ·) = τ·log_softmax(logits), −inf outside the reference's top-k (`masked_q_values`). The mask is a
  function of the state alone, computed from the shared reference, so the online and the target network
  are masked identically: a double-Q argmax over the online Q can never pick a token the target masked.
  This is soft Q-learning with the LM's log-probabilities as Q (Guo et al. 2021, "Efficient (Soft)
  Q-Learning for Text Generation with Limited Good Data"; Rafailov et al. 2024, "From r to Q*").
* `CausalLMPolicyModule` (PPO): the (top-k masked) logits are the action-distribution inputs, a linear
  value head on the last hidden state implements `ValueFunctionAPI`, and the reference's logits go to
  the learner, which adds β·KL(π ‖ π_ref) (`categorical_kl`) to RLlib's PPO loss
  (`ReferenceKLPPOTorchLearner`): RLlib's own `use_kl_loss` is to the previous policy, not the reference.

Custom keys reach the modules through `config.rl_module(model_config={...})` (merged with DQN's
defaults: double_q, dueling, epsilon, ...): `model` (a raylign ModelConfig as a dict), `top_k`, `tau`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.dqn.default_dqn_rl_module import QF_PREDS
from ray.rllib.algorithms.dqn.torch.default_dqn_torch_rl_module import DefaultDQNTorchRLModule
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import nn

REF_LOGITS = "ref_logits"  # PPO: the reference's (masked) logits, from the train forward to the learner
REF_KL_COEF = "ref_kl_coef"  # the key of β in the learner's config.learner_config_dict


# ---- pure math -----------------------------------------------------------------------------------


def topk_allowed(ref_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Allowed actions [B, V] (bool): the k highest-scoring tokens of the reference at each state
    (ties broken by `torch.topk`); k = 0 or k ≥ V allows every token."""
    vocab = ref_logits.shape[-1]
    if k <= 0 or k >= vocab:
        return torch.ones_like(ref_logits, dtype=torch.bool)
    allowed = torch.zeros_like(ref_logits, dtype=torch.bool)
    return allowed.scatter_(-1, ref_logits.topk(k, dim=-1).indices, True)


def masked_q_values(logits: torch.Tensor, allowed: torch.Tensor, tau: float) -> torch.Tensor:
    """Q(s, a) = τ·log_softmax(logits)[a] for allowed a, −inf otherwise.  # [B, V]

    The log-softmax runs over the whole vocabulary (the LM's own distribution), then is restricted."""
    q = tau * torch.log_softmax(logits.float(), dim=-1)
    return q.masked_fill(~allowed, float("-inf"))


def categorical_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(π ‖ π_ref) = Σ_a π(a) (log π(a) − log π_ref(a)) per state, exact over the vocabulary.  # [B]

    Tokens π gives probability 0 (masked with a very negative finite logit) contribute 0."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - ref_logp), torch.zeros_like(p)).sum(-1)


def last_position(lm: nn.Module, obs: dict[str, torch.Tensor], hidden: bool = False):
    """(logits [B, V], last hidden state [B, H] or None) of `lm` at each row's last real token.

    Rows are right-padded, so a causal LM's outputs at real positions ignore the padding; the batch is
    cut to its longest row first."""
    tokens, length = obs["tokens"].long(), obs["length"].long().reshape(-1)  # [B, L], [B]
    width = int(length.max())
    tokens = tokens[:, :width]
    mask = (torch.arange(width, device=tokens.device)[None, :] < length[:, None]).long()
    out = lm(input_ids=tokens, attention_mask=mask, output_hidden_states=hidden)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    logits = out.logits[rows, length - 1]  # [B, V]
    return logits, (out.hidden_states[-1][rows, length - 1] if hidden else None)


# ---- shared pieces -------------------------------------------------------------------------------


class CausalLMHead(nn.Module):
    """The LM as RLlib's "encoder": observation dict -> logits at the last real position [B, V]."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return last_position(self.lm, obs)[0]


def _load(model_config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """(the trainable LM, the frozen reference) from `model_config["model"]` (a raylign ModelConfig)."""
    from raylign.config import ModelConfig
    from raylign.models import load_causal_lm

    cfg = ModelConfig.model_validate(model_config["model"])
    lm = load_causal_lm(cfg)[0]
    reference = load_causal_lm(cfg.model_copy(update={"lora": None}))[0].eval().requires_grad_(False)
    return lm, reference


def _model_config(module: Any) -> dict[str, Any]:
    """The module's model_config as a plain dict (RLlib types it as a dict or a dataclass)."""
    return dict(module.model_config or {})


class _ReferenceMixin:
    """Holds the frozen reference outside the nn.Module tree (not in the state dict, not synced)."""

    _frozen: tuple[nn.Module, ...]
    top_k: int

    def reference_logits(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        (reference,) = self._frozen
        device = obs["tokens"].device
        if next(reference.parameters()).device != device:
            reference.to(device)
        with torch.no_grad():
            return last_position(reference, obs)[0]

    def allowed_actions(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return topk_allowed(self.reference_logits(obs), self.top_k)

    def lm_state_dict(self) -> dict[str, np.ndarray]:
        """The trained LM's weights as numpy (what `final/` is written from, on the driver)."""
        lm = self._lm()
        return {k: v.detach().cpu().numpy() for k, v in lm.state_dict().items()}

    def _lm(self) -> nn.Module:
        raise NotImplementedError


# ---- DQN -----------------------------------------------------------------------------------------


class CausalLMQModule(_ReferenceMixin, DefaultDQNTorchRLModule):
    """DQN's Q-network over the vocabulary (module docstring)."""

    def setup(self) -> None:
        from ray.rllib.utils.schedules.scheduler import Scheduler

        mc = _model_config(self)
        if mc.get("dueling") or mc.get("num_atoms", 1) != 1:
            raise ValueError("CausalLMQModule computes Q from the LM's log-probs: set dueling=False, num_atoms=1")
        self.uses_dueling = False
        self.uses_double_q = bool(mc.get("double_q"))
        self.num_atoms = 1
        self.epsilon_schedule = Scheduler(fixed_value_or_schedule=mc["epsilon"], framework=self.framework)
        self.top_k, self.tau = int(mc.get("top_k", 0)), float(mc.get("tau", 1.0))
        lm, reference = _load(mc)
        self._frozen = (reference,)
        self.encoder = CausalLMHead(lm)
        self.af = nn.Identity()  # the Q head is `masked_q_values`; Identity keeps RLlib's (af, target_af) pair

    def _lm(self) -> nn.Module:
        return self.encoder.lm

    def get_initial_state(self) -> dict:
        return {}

    def _qf_forward_helper(self, batch: dict[str, Any], encoder: Any, head: Any) -> dict[str, Any]:
        """Q-values for `batch[obs]` from the online or the target network (`encoder`, `head`); the mask
        depends on the observation only, so both networks get the same one."""
        obs = batch[Columns.OBS]
        logits = head(encoder(obs))  # [B, V]
        return {QF_PREDS: masked_q_values(logits, self.allowed_actions(obs), self.tau)}


# ---- PPO -----------------------------------------------------------------------------------------


class CausalLMPolicyModule(_ReferenceMixin, TorchRLModule, ValueFunctionAPI):
    """PPO's policy and value function on one LM (module docstring)."""

    def setup(self) -> None:
        mc = _model_config(self)
        self.top_k = int(mc.get("top_k", 0))
        lm, reference = _load(mc)
        self._frozen = (reference,)
        self.lm = lm
        hf_config: Any = lm.config
        hidden = int(getattr(hf_config, "hidden_size", None) or hf_config.n_embd)
        self.vf = nn.Linear(hidden, 1)
        nn.init.zeros_(self.vf.weight)
        nn.init.zeros_(self.vf.bias)

    def _lm(self) -> nn.Module:
        return self.lm

    def _masked(self, logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
        """Logits outside the reference's top-k set to the most negative finite float: probability 0,
        while RLlib's categorical log-prob/entropy/KL stay finite (−inf would give 0·inf = nan)."""
        allowed = topk_allowed(ref_logits, self.top_k)
        return logits.float().masked_fill(~allowed, torch.finfo(torch.float32).min)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        logits = last_position(self.lm, obs)[0]
        return {Columns.ACTION_DIST_INPUTS: self._masked(logits, self.reference_logits(obs))}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        logits, hidden = last_position(self.lm, obs, hidden=True)
        ref_logits = self.reference_logits(obs)
        return {Columns.ACTION_DIST_INPUTS: self._masked(logits, ref_logits), Columns.EMBEDDINGS: hidden,
                REF_LOGITS: self._masked(ref_logits, ref_logits)}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            embeddings = last_position(self.lm, batch[Columns.OBS], hidden=True)[1]
        return self.vf(embeddings.float()).squeeze(-1)  # [B]


class ReferenceKLPPOTorchLearner(PPOTorchLearner):
    """RLlib's PPO loss + β·E_s[KL(π(·|s) ‖ π_ref(·|s))] to the frozen reference (β =
    `learner_config_dict["ref_kl_coef"]`); the KL is logged as `ref_kl` either way."""

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        loss: torch.Tensor = super().compute_loss_for_module(  # type: ignore[assignment]
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)
        kl = categorical_kl(fwd_out[Columns.ACTION_DIST_INPUTS], fwd_out[REF_LOGITS])  # [B]
        if Columns.LOSS_MASK in batch:
            mask = batch[Columns.LOSS_MASK].float()
            kl_mean = (kl * mask).sum() / mask.sum().clamp(min=1.0)
        else:
            kl_mean = kl.mean()
        self.metrics.log_value((module_id, "ref_kl"), kl_mean.item(), window=1)
        coef = float(config.learner_config_dict.get(REF_KL_COEF, 0.0))
        return loss + coef * kl_mean if coef else loss
