"""discriminator_loss, gradient_penalty, generator_reward and the SeqGAN per-prefix reward against
hand-computed values."""

from __future__ import annotations

import math
import random

import pytest
import torch

from raylign.algorithms.adversarial import (
    discriminator_loss,
    discriminator_metrics,
    generator_reward,
    gradient_penalty,
    mc_prefix_values,
    prefix_token_rewards,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_discriminator_loss_by_hand():
    human, policy = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0, 3.0])
    expected = (-(math.log(sig(2.0)) + math.log(0.5)) / 2
                - (math.log(1 - sig(-1.0)) + math.log(1 - sig(1.0)) + math.log(1 - sig(3.0))) / 3)
    assert discriminator_loss(human, policy).item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_targets_one_minus_eps_on_the_human_side_only():
    human, policy = torch.tensor([2.0]), torch.tensor([-1.0])
    eps = 0.1
    expected = (-(0.9 * math.log(sig(2.0)) + 0.1 * math.log(1 - sig(2.0)))
                - math.log(1 - sig(-1.0)))
    assert discriminator_loss(human, policy, label_smoothing=eps).item() == pytest.approx(expected, rel=1e-6)


def test_perfect_discriminator_has_near_zero_loss_and_a_fooled_one_a_large_loss():
    assert discriminator_loss(torch.tensor([20.0]), torch.tensor([-20.0])).item() < 1e-8
    assert discriminator_loss(torch.tensor([-5.0]), torch.tensor([5.0])).item() > 10


def test_gradient_penalty_of_a_linear_discriminator_is_half_its_squared_weight_norm():
    # ℓ(x) = Σ_{t,h} w_h·x_{t,h}: ∇_x ℓ = w at every position, ‖∇‖² = T·‖w‖², R1 = ½·T·‖w‖².
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    x = torch.randn(4, 2, 3, requires_grad=True)
    logits = (x * w).sum(dim=(1, 2))
    penalty = gradient_penalty(logits, x)
    assert penalty.item() == pytest.approx(0.5 * 2 * (1 + 4 + 0.25))
    penalty.backward()  # differentiable in D's weights: d(½·T·‖w‖²)/dw = T·w
    assert w.grad.tolist() == pytest.approx((2 * w).tolist())


@pytest.mark.parametrize(("kind", "fn"), [
    ("logit", lambda z: math.log(sig(z)) - math.log(1 - sig(z))),
    ("log_d", lambda z: math.log(sig(z))),
    ("minus_log_one_minus_d", lambda z: -math.log(1 - sig(z))),
])
def test_generator_rewards_by_hand(kind, fn):
    logits = torch.tensor([-3.0, -0.5, 0.0, 1.5, 4.0])
    expected = [fn(z) for z in logits.tolist()]
    assert generator_reward(logits, kind).tolist() == pytest.approx(expected, rel=1e-5)


def test_generator_rewards_rise_with_d_and_stay_finite_when_d_saturates():
    logits = torch.tensor([-200.0, -1.0, 0.0, 1.0, 200.0])
    for kind in ("logit", "log_d", "minus_log_one_minus_d"):
        r = generator_reward(logits, kind)
        assert torch.isfinite(r).all() and (r[1:] > r[:-1]).all(), kind
    assert generator_reward(torch.tensor([0.0]), "log_d").item() == pytest.approx(math.log(0.5))


def test_unknown_generator_reward_names_the_choices():
    with pytest.raises(ValueError, match="log_d"):
        generator_reward(torch.zeros(1), "wasserstein")


def test_discriminator_metrics_count_the_sides():
    m = discriminator_metrics(torch.tensor([1.0, 2.0, -1.0, 3.0]), torch.tensor([-1.0, 0.5, -2.0, -3.0]))
    assert m == {"accuracy_human": 0.75, "accuracy_policy": 0.75, "fool_rate": 0.25}


def test_prefix_token_rewards_are_differences_that_sum_to_the_sequence_reward():
    q = torch.tensor([[0.0, 0.2, 0.5, 0.4, 9.0], [7.0, 1.0, 3.0, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    r = prefix_token_rewards(q, mask)
    expected = torch.tensor([[0.0, 0.2, 0.3, -0.1, 0.0], [7.0, -6.0, 2.0, 0.0, 0.0]])
    assert torch.allclose(r, expected)
    assert r.sum(-1).tolist() == pytest.approx([0.4, 3.0])  # = Q at each row's last token


def count_ones(tokens) -> float:
    return float(sum(tokens))


def test_mc_prefix_values_with_a_deterministic_policy_are_exact():
    # D's reward: the number of 1-tokens; the "policy" always completes a prefix with 1s up to length 4.
    responses = [[0, 1, 0, 0], [1, 1], [0]]
    finals = [count_ones(r) for r in responses]
    calls = []

    def rollouts(prefixes, n):
        calls.append(len(prefixes))
        return [[count_ones(responses[row][:t] + [1] * (4 - t))] * n for row, t in prefixes]

    values = mc_prefix_values(responses, finals, rollouts, n_rollouts=3)
    assert calls == [4]  # all prefixes (3 + 1 + 0) in one batched call
    assert values[0].tolist() == [3.0, 3.0, 2.0, 1.0]  # Q_1 = 0 + 3, Q_2 = 1 + 2, Q_3 = 1 + 1, Q_4 = R
    assert values[1].tolist() == [4.0, 2.0]  # Q_1 = 1 + 3 (completed to length 4), Q_2 = R
    assert values[2].tolist() == [0.0]


def test_mc_prefix_values_average_random_rollouts_to_the_known_expectation():
    # Random completions: each remaining token is 1 with probability ½, so Q_t = ones(y_{1:t}) + (L − t)/2.
    rng = random.Random(0)
    length = 6
    response = [1, 0, 0, 1, 1, 0]

    def rollouts(prefixes, n):
        return [[count_ones(response[:t] + [rng.randint(0, 1) for _ in range(length - t)]) for _ in range(n)]
                for _, t in prefixes]

    (q,) = mc_prefix_values([response], [count_ones(response)], rollouts, n_rollouts=4000)
    expected = [sum(response[:t]) + (length - t) / 2 for t in range(1, length)] + [3.0]
    assert q.tolist() == pytest.approx(expected, abs=0.06)
    # A token that takes a 1 is credited about +½, one that takes a 0 about −½.
    r = prefix_token_rewards(q[None], torch.ones(1, length))[0]
    assert r[1:].tolist() == pytest.approx([0.5 if y else -0.5 for y in response[1:]], abs=0.1)


def test_mc_prefix_values_checks_what_the_rollout_function_returns():
    with pytest.raises(ValueError, match="expected 2"):
        mc_prefix_values([[1, 2]], [0.0], lambda p, n: [[0.0]], n_rollouts=2)
    with pytest.raises(ValueError, match="1 prefixes"):
        mc_prefix_values([[1, 2]], [0.0], lambda p, n: [], n_rollouts=2)


def test_distinct_n_by_hand():
    from raylign.algorithms.diversity import distinct_n

    seqs = [[1, 2, 3, 1], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 6)  # {1, 2, 3} of 6 unigrams
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)  # (1,2) (2,3) (3,1) (1,2): 3 unique of 4
    assert distinct_n([[5]], 2) == 0.0


def test_collapse_watch_warns_once_when_accuracy_is_pinned_high_or_at_chance():
    import io

    from rich.console import Console

    from raylign.config import load_config
    from raylign.pipelines.adversarial import AdversarialGame

    def game():
        out = io.StringIO()
        config = load_config("adversarial", ["adversarial.collapse_patience=3"])
        return AdversarialGame(config, Console(file=out, width=200)), out

    g, out = game()
    flags = [g._watch_collapse(s, {"accuracy_human": 1.0, "accuracy_policy": 1.0})["discriminator/collapsed"]
             for s in range(5)]
    assert flags == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert out.getvalue().count("discriminator collapse at step 3") == 1 and "D wins outright" in out.getvalue()
    g, out = game()
    for s, acc in enumerate([0.9, 0.5, 0.51, 0.49]):
        g._watch_collapse(s, {"accuracy_human": acc, "accuracy_policy": acc})
    assert "cannot tell policy from human" in out.getvalue()
    g, out = game()  # a D that is good but not perfect is left alone
    for s in range(6):
        g._watch_collapse(s, {"accuracy_human": 0.9, "accuracy_policy": 0.8})
    assert out.getvalue() == ""
