"""Task weighting: hand-computed cases and the toy two-task problems of the multi-task issue."""

from __future__ import annotations

import math

import pytest
import torch

from raylign.algorithms.task_weighting import (
    GradNorm,
    TaskWeighting,
    cosine_matrix,
    gradnorm_targets,
    gradnorm_weight_grad,
    pcgrad,
    priority_active,
    relative_improvement,
    uncertainty_loss,
    uncertainty_weights,
    weighted_sum,
)

# ---- hand-computed cases -------------------------------------------------------------------------


def test_weighted_sum_by_hand():
    assert weighted_sum([torch.tensor(2.0), torch.tensor(3.0)], [0.5, 2.0]).item() == pytest.approx(7.0)
    g = weighted_sum([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [2.0, 3.0])
    assert g.tolist() == [2.0, 3.0]
    with pytest.raises(ValueError):
        weighted_sum([torch.tensor(1.0)], [1.0, 2.0])


def test_uncertainty_loss_by_hand():
    losses = torch.tensor([2.0, 3.0])
    s = torch.tensor([0.0, math.log(2.0)], requires_grad=True)
    total = uncertainty_loss(losses, s)
    # 1*2 + 0 + 0.5*3 + log 2
    assert total.item() == pytest.approx(3.5 + math.log(2.0))
    total.backward()
    # dL/ds_i = 1 - exp(-s_i) L_i  = 1 - 2, 1 - 1.5
    assert s.grad.tolist() == pytest.approx([-1.0, -0.5])
    assert uncertainty_weights(s).tolist() == pytest.approx([1.0, 0.5])


def test_gradnorm_targets_and_weight_gradient_by_hand():
    norms, w = torch.tensor([1.0, 4.0]), torch.tensor([1.0, 1.0])
    losses, init = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 3.0])
    g, target = gradnorm_targets(norms, w, losses, init, alpha=1.0)
    # G = [1, 4], mean 2.5; L~ = [0.5, 1], mean 0.75 -> r = [2/3, 4/3] -> target = [5/3, 10/3]
    assert g.tolist() == pytest.approx([1.0, 4.0])
    assert target.tolist() == pytest.approx([5 / 3, 10 / 3])
    # sign(G - target) * |g|: task 0 below target (grow its weight), task 1 above (shrink)
    assert gradnorm_weight_grad(norms, w, losses, init, alpha=1.0).tolist() == pytest.approx([-1.0, 4.0])
    _, flat = gradnorm_targets(norms, w, losses, init, alpha=0.0)
    assert flat.tolist() == pytest.approx([2.5, 2.5])


def test_gradnorm_update_renormalizes_to_task_count():
    gn = GradNorm(2, alpha=0.0, lr=0.1)
    w = gn.update(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 1.0]))
    # w - 0.1 * [-1, 4] = [1.1, 0.6], renormalised to sum 2
    assert w.tolist() == pytest.approx([2 * 1.1 / 1.7, 2 * 0.6 / 1.7])
    assert w.sum().item() == pytest.approx(2.0)


def test_pcgrad_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    p1, p2 = pcgrad([g1, g2])
    # g1 - (g1.g2)/|g2|^2 g2 = [1,0] + 0.5 [-1,1];  g2 - (g2.g1)/|g1|^2 g1 = [-1,1] + [1,0]
    assert p1.tolist() == pytest.approx([0.5, 0.5])
    assert p2.tolist() == pytest.approx([0.0, 1.0])
    # no conflict: untouched
    q1, q2 = pcgrad([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])])
    assert q1.tolist() == [1.0, 0.0] and q2.tolist() == [1.0, 1.0]


def test_cosine_matrix_and_priority():
    cos = cosine_matrix([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.zeros(2)])
    assert cos[0, 1].item() == pytest.approx(-1 / math.sqrt(2))
    assert cos[0, 0].item() == pytest.approx(1.0)
    assert cos[2].tolist() == [0.0, 0.0, 0.0]
    # priority 0 gates priority 1 and 2; equal priorities do not gate each other
    assert priority_active([0, 1, 2], [True, True, True]) == [True, True, True]
    assert priority_active([0, 1, 2], [False, True, True]) == [True, False, False]
    assert priority_active([0, 1, 2], [True, False, True]) == [True, True, False]
    assert priority_active([0, 0, 1], [False, True, True]) == [True, True, False]


def test_relative_improvement():
    assert relative_improvement(2.0, 1.5) == pytest.approx(0.25)
    assert relative_improvement(0.5, 0.75, higher_is_better=True) == pytest.approx(0.5)
    assert relative_improvement(0.0, 1.0) == 0.0


# ---- toy two-task problems -----------------------------------------------------------------------


def _two_regressions(noise: tuple[float, float], n: int = 512, seed: int = 0):
    """Two linear-regression tasks on one shared weight vector; task i's targets carry noise σ_i."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    w_true = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ys = [x @ w_true + s * torch.randn(n, generator=gen) for s in noise]
    return x, ys


def test_uncertainty_weighting_gives_the_noisier_task_the_smaller_weight():
    x, ys = _two_regressions((0.1, 1.0))
    theta = torch.zeros(4, requires_grad=True)
    tw = TaskWeighting("uncertainty", [1.0, 1.0])
    opt = torch.optim.Adam([theta, tw.log_vars], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        losses = torch.stack([((x @ theta - y) ** 2).mean() for y in ys])
        grads = [torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in losses]
        combined, _ = tw.combine(losses, grads)
        theta.grad = combined
        opt.step()
    w = tw.current_weights()
    assert w[1] < w[0]
    # at the optimum exp(s_i) = L_i ~ σ_i²: weights ~ 1/σ² = [100, 1]
    assert w[1].item() == pytest.approx(1.0, rel=0.3)
    assert w[0].item() / w[1].item() > 20


def test_gradnorm_equalises_gradient_norms():
    # Same task, loss scaled by 10: raw gradient norms differ 10x throughout training.
    x, (y, _) = _two_regressions((0.5, 0.5))
    theta = torch.zeros(4, requires_grad=True)
    tw = TaskWeighting("gradnorm", [1.0, 1.0], gradnorm_alpha=0.0, gradnorm_lr=0.01)
    opt = torch.optim.SGD([theta], lr=0.005)

    def weighted_norms():
        losses = torch.stack([((x @ theta - y) ** 2).mean() * s for s in (1.0, 10.0)])
        grads = [torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in losses]
        return losses, grads

    losses, grads = weighted_norms()
    norms0 = tw.current_weights() * torch.stack([g.norm() for g in grads])
    assert norms0[1] / norms0[0] == pytest.approx(10.0, rel=1e-4)
    for _ in range(300):
        opt.zero_grad()
        losses, grads = weighted_norms()
        combined, _ = tw.combine(losses, grads)
        theta.grad = combined
        opt.step()
    losses, grads = weighted_norms()
    norms = tw.current_weights() * torch.stack([g.norm() for g in grads])
    assert norms[1] / norms[0] == pytest.approx(1.0, abs=0.1)
    assert tw.current_weights().sum().item() == pytest.approx(2.0)
    assert losses[0] < 0.6  # and the model still trained


def test_pcgrad_removes_the_conflicting_component():
    # Two tasks pulling a shared 2-d parameter toward different points: their gradients conflict.
    theta = torch.tensor([0.0, 0.0], requires_grad=True)
    a, b = torch.tensor([1.0, 0.2]), torch.tensor([-1.0, 0.5])
    losses = torch.stack([((theta - a) ** 2).sum(), 3 * ((theta - b) ** 2).sum()])
    grads = [torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in losses]
    assert torch.dot(grads[0], grads[1]) < 0
    tw = TaskWeighting("pcgrad", [1.0, 1.0])
    combined, _ = tw.combine(losses, grads)
    g1, g2 = grads
    p1 = g1 - torch.dot(g1, g2) / torch.dot(g2, g2) * g2
    p2 = g2 - torch.dot(g2, g1) / torch.dot(g1, g1) * g1
    assert combined.tolist() == pytest.approx((p1 + p2).tolist(), abs=1e-6)
    # each projected gradient is orthogonal to the other task's original gradient
    proj = pcgrad(grads)
    assert torch.dot(proj[0], g2).item() == pytest.approx(0.0, abs=1e-5)
    assert torch.dot(proj[1], g1).item() == pytest.approx(0.0, abs=1e-5)
    # and the combined step no longer increases either task's loss to first order
    assert torch.dot(combined, g1) >= -1e-6 and torch.dot(combined, g2) >= -1e-6


def test_static_weights_and_inactive_tasks():
    g = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), None]
    tw = TaskWeighting("static", [2.0, 0.5, 1.0])
    combined, weights = tw.combine(torch.tensor([1.0, 1.0, 1.0]), g, active=[True, True, False])
    assert combined.tolist() == [2.0, 0.5]
    assert weights.tolist() == [2.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="unknown weighting"):
        TaskWeighting("magic", [1.0])


def test_weighting_state_round_trips():
    tw = TaskWeighting("gradnorm", [1.0, 1.0], gradnorm_lr=0.1)
    tw.combine(torch.tensor([1.0, 2.0]), [torch.tensor([1.0]), torch.tensor([4.0])])
    other = TaskWeighting("gradnorm", [1.0, 1.0])
    other.load_state_dict(tw.state_dict())
    assert other.current_weights().tolist() == tw.current_weights().tolist()
    assert other.gradnorm.initial_losses.tolist() == [1.0, 2.0]
    tu = TaskWeighting("uncertainty", [1.0, 1.0])
    with torch.no_grad():
        tu.log_vars.add_(torch.tensor([0.3, -0.2]))
    other = TaskWeighting("uncertainty", [1.0, 1.0])
    other.load_state_dict(tu.state_dict())
    assert other.log_vars.tolist() == pytest.approx([0.3, -0.2])
