"""Multi-task loss weighting and gradient surgery: pure torch, no Ray.

A multi-task step has T tasks with losses L_i and gradients g_i = ∇_θ L_i of the shared parameters θ
(flattened to one vector each). These functions turn (L_i, g_i) into the update direction:

- static λ:        g = Σ λ_i g_i                                    (`weighted_sum`)
- uncertainty:     L = Σ exp(−s_i) L_i + s_i, s_i = log σ_i² learned (`uncertainty_loss`, Kendall et al. 2018)
- GradNorm:        learned w_i so that ‖w_i g_i‖ ≈ mean_j ‖w_j g_j‖ · r_i^α  (`GradNorm`, Chen et al. 2018)
- PCGrad:          remove from g_i its component along a conflicting g_j      (`pcgrad`, Yu et al. 2020)
- priority:        task i trains only while every higher-priority task meets its gate  (`priority_active`)

`TaskWeighting` ties them together for a learner: give it the losses and per-task gradients of a
step, get the combined gradient, the weights used, and the cosines between task gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch

METHODS = ("static", "uncertainty", "gradnorm", "pcgrad")


def weighted_sum(
    values: Sequence[torch.Tensor], weights: Sequence[float | torch.Tensor] | torch.Tensor
) -> torch.Tensor:
    """Static weighting: Σ_i λ_i v_i, for losses (scalars) or gradients (vectors) alike.

    Each λ_i is a float or a one-element tensor."""
    if len(values) != len(weights):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    # `sum` starts from the int 0 and 0 + tensor is a tensor: a tensor for any non-empty `values`.
    return cast(torch.Tensor, sum(float(w) * v for w, v in zip(weights, values, strict=True)))


def uncertainty_loss(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", eq. 7 in the log-variance form):

        L = Σ_i exp(−s_i) · L_i + s_i,   s_i = log σ_i²  (learned with the model)

    The effective weight of task i is exp(−s_i) = 1/σ_i². At the optimum over s_i, exp(s_i) = L_i: a
    task whose loss stays high (noisy targets) gets a small weight, the +s_i term stops all weights
    from collapsing to zero. Gradients flow to both the losses and `log_vars`.
    """
    return (torch.exp(-log_vars) * losses + log_vars).sum()


def uncertainty_weights(log_vars: torch.Tensor) -> torch.Tensor:
    """The weights exp(−s_i) that `uncertainty_loss` puts on each task loss."""
    return torch.exp(-log_vars.detach())


def gradnorm_targets(grad_norms: torch.Tensor, weights: torch.Tensor, losses: torch.Tensor,
                     initial_losses: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GradNorm's weighted norms and their targets (Chen et al. 2018, "GradNorm: Gradient Normalization
    for Adaptive Loss Balancing in Deep Multitask Networks", eq. 1-2):

        G_i = ‖∇_W w_i L_i‖ = w_i ‖g_i‖,      Ḡ = mean_i G_i
        L̃_i = L_i(t) / L_i(0),   r_i = L̃_i / mean_j L̃_j   (relative inverse training rate)
        target_i = Ḡ · r_i^α     (treated as a constant)

    Returns (G, target).
    """
    g = weights * grad_norms
    ratio = losses / initial_losses.clamp_min(1e-12)
    r = ratio / ratio.mean().clamp_min(1e-12)
    return g, g.mean() * r.pow(alpha)


def gradnorm_weight_grad(grad_norms: torch.Tensor, weights: torch.Tensor, losses: torch.Tensor,
                         initial_losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """∂L_grad/∂w_i of GradNorm's loss L_grad = Σ_i |G_i − target_i| with targets held constant:

        ∂L_grad/∂w_i = sign(G_i − target_i) · ‖g_i‖
    """
    g, target = gradnorm_targets(grad_norms, weights, losses, initial_losses, alpha)
    return torch.sign(g - target) * grad_norms


def gradnorm_renormalize(weights: torch.Tensor, min_weight: float = 1e-3) -> torch.Tensor:
    """After each update GradNorm renormalises so that Σ_i w_i = T (the number of tasks); weights are
    kept positive."""
    w = weights.clamp_min(min_weight)
    return w * (len(w) / w.sum())


class GradNorm:
    """GradNorm's learned task weights w_i, updated once per step from the tasks' gradient norms.

    `update` takes one gradient step of size `lr` on L_grad (w ← w − lr · ∂L_grad/∂w) and renormalises
    to Σ w_i = T. The first losses seen are L_i(0). `alpha` sets how strongly tasks that train slower
    (higher L̃_i) are pulled up; α = 0 asks for equal weighted gradient norms.
    """

    def __init__(self, n_tasks: int, alpha: float = 1.5, lr: float = 0.025):
        self.weights = torch.ones(n_tasks)
        self.initial_losses: torch.Tensor | None = None
        self.alpha, self.lr = alpha, lr

    def update(self, grad_norms: torch.Tensor, losses: torch.Tensor,
               active: torch.Tensor | None = None) -> torch.Tensor:
        grad_norms, losses = grad_norms.detach().float(), losses.detach().float()
        if self.initial_losses is None:
            self.initial_losses = losses.clone()
        mask = torch.ones_like(losses, dtype=torch.bool) if active is None else active.bool()
        if mask.sum() >= 2:  # balancing needs two tasks at least
            w = self.weights[mask]
            grad = gradnorm_weight_grad(grad_norms[mask], w, losses[mask], self.initial_losses[mask], self.alpha)
            new = gradnorm_renormalize(w - self.lr * grad)
            self.weights = self.weights.clone()
            self.weights[mask] = new  # the active tasks' weights sum to their count
        return self.weights.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"weights": self.weights.clone()}
        if self.initial_losses is not None:
            state["initial_losses"] = self.initial_losses.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights = state["weights"].clone().float()
        self.initial_losses = state["initial_losses"].clone().float() if "initial_losses" in state else None


def pcgrad(grads: Sequence[torch.Tensor], generator: torch.Generator | None = None,
           shuffle: bool = True) -> list[torch.Tensor]:
    """Projecting Conflicting Gradients (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning",
    Algorithm 1). For each task i, for every other task j in random order:

        if g_i^PC · g_j < 0:   g_i^PC ← g_i^PC − (g_i^PC · g_j) / ‖g_j‖² · g_j

    i.e. the conflicting component is removed by projecting onto the normal plane of the *original*
    g_j. Returns the projected gradients g_i^PC (the update is their sum).
    """
    out = []
    n = len(grads)
    for i in range(n):
        g = grads[i].clone()
        others = [j for j in range(n) if j != i]
        if shuffle and len(others) > 1:
            others = [others[k] for k in torch.randperm(len(others), generator=generator).tolist()]
        for j in others:
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g = g - dot / grads[j].dot(grads[j]).clamp_min(1e-20) * grads[j]
        out.append(g)
    return out


def cosine_matrix(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """cos(g_i, g_j) for every pair of task gradients: negative entries are conflicts. 0 where a
    gradient is zero."""
    stacked = torch.stack([g.float() for g in grads])
    norms = stacked.norm(dim=1).clamp_min(1e-20)
    cos = (stacked @ stacked.T) / (norms[:, None] * norms[None, :])
    zero = stacked.norm(dim=1) == 0
    cos[zero, :] = 0.0
    cos[:, zero] = 0.0
    return cos


def priority_active(priorities: Sequence[int], gates_hold: Sequence[bool]) -> list[bool]:
    """Task priority: task i trains only while every task of strictly higher priority (a smaller
    number) meets its gate (e.g. "preference accuracy >= 0.8" still holds). Tasks of equal priority do
    not gate each other; the highest-priority tasks always train."""
    if len(priorities) != len(gates_hold):
        raise ValueError("one gate per task")
    return [all(ok for p, ok in zip(priorities, gates_hold, strict=True) if p < pi) for pi in priorities]


class TaskWeighting:
    """Combine per-task gradients into one update with one of `METHODS`.

    `log_vars` (uncertainty weighting) is a learnable tensor that the caller adds to its optimizer;
    `combine` sets its `.grad` (∂L/∂s_i = λ_i (1 − exp(−s_i) L_i)). Static λ multiply the learned weights of
    uncertainty and GradNorm, and the projected gradients of PCGrad.
    """

    def __init__(self, method: str, static_weights: Sequence[float], gradnorm_alpha: float = 1.5,
                 gradnorm_lr: float = 0.025, seed: int = 0):
        if method not in METHODS:
            raise ValueError(f"unknown weighting '{method}'; one of {', '.join(METHODS)}")
        self.method = method
        self.static = torch.tensor([float(w) for w in static_weights])
        n = len(self.static)
        self.log_vars = torch.nn.Parameter(torch.zeros(n)) if method == "uncertainty" else None
        self.gradnorm = GradNorm(n, gradnorm_alpha, gradnorm_lr) if method == "gradnorm" else None
        self.generator = torch.Generator().manual_seed(seed)

    def current_weights(self) -> torch.Tensor:
        """The weight each task's gradient gets now (before PCGrad's projection)."""
        if self.log_vars is not None:
            return self.static * uncertainty_weights(self.log_vars)
        if self.gradnorm is not None:
            return self.static * self.gradnorm.weights
        return self.static.clone()

    def combine(self, losses: torch.Tensor, grads: Sequence[torch.Tensor | None],
                active: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(combined gradient, weights used). Inactive tasks (priority) have weight 0 and may pass
        `None` for their gradient."""
        n = len(grads)
        active_t = torch.tensor(list(active) if active is not None else [True] * n)
        live: list[int] = []  # the tasks that contribute: active and with a gradient
        vecs: list[torch.Tensor] = []
        for i, g in enumerate(grads):
            if active_t[i] and g is not None:
                live.append(i)
                vecs.append(g)
        if not live:
            raise ValueError("no active task this step")
        weights = self.current_weights()
        weights[~active_t] = 0.0
        if self.method == "pcgrad":
            vecs = pcgrad([weights[i] * g for i, g in zip(live, vecs, strict=True)], self.generator)
            combined = torch.stack(vecs).sum(0)
        else:
            combined = weighted_sum(vecs, [weights[i] for i in live])
        if self.log_vars is not None:
            # L = Σ λ_i (exp(−s_i) L_i + s_i)  ->  ∂L/∂s_i = λ_i (1 − exp(−s_i) L_i)
            grad = self.static * (1.0 - torch.exp(-self.log_vars.detach()) * losses.detach().float().cpu())
            grad[~active_t] = 0.0
            self.log_vars.grad = grad
        if self.gradnorm is not None:
            norms = torch.stack([g.norm().float().cpu() if g is not None else torch.tensor(0.0) for g in grads])
            self.gradnorm.update(norms, losses.detach().float().cpu(), active_t)
        return combined, weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        if self.log_vars is not None:
            state["log_vars"] = self.log_vars.detach().clone()
        if self.gradnorm is not None:
            state.update({f"gradnorm.{k}": v for k, v in self.gradnorm.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.log_vars is not None and "log_vars" in state:
            with torch.no_grad():
                self.log_vars.copy_(state["log_vars"])
        if self.gradnorm is not None:
            self.gradnorm.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                           if k.startswith("gradnorm.")})


def relative_improvement(start: float, now: float, higher_is_better: bool = False) -> float:
    """(start − now)/|start| for a loss, (now − start)/|start| for a score; 0 when start is 0 or NaN."""
    if not start or math.isnan(start):
        return 0.0
    delta = (now - start) if higher_is_better else (start - now)
    return delta / abs(start)
