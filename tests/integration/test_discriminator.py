"""The Discriminator reward source in-process on tiny:llama: it learns, scores as it reports, pauses at
its accuracy ceiling, and survives a save/load."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from raylign.algorithms.adversarial import generator_reward
from raylign.rewards.discriminator import Discriminator


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def texts(seed: int, n: int, e_share: float) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdfghijklmnoprstuvwy "
    return ["".join("e" if rng.random() < e_share else rng.choice(letters) for _ in range(rng.randint(8, 20)))
            for _ in range(n)]


HUMAN, POLICY = texts(0, 16, 0.5), texts(1, 16, 0.0)


def test_discriminator_learns_and_its_reward_ranks_human_text_higher():
    d = Discriminator("tiny:llama", lr=3e-3, seed=0)
    first = d.update(None, POLICY, human_texts=HUMAN, steps=1)
    for _ in range(15):
        last = d.update(None, POLICY, human_texts=HUMAN, steps=1)
    assert last["loss"] < first["loss"] - 0.3, (first, last)
    assert last["accuracy_human"] == 1.0 and last["accuracy_policy"] == 1.0 and last["fool_rate"] == 0.0
    assert last["updates"] == 16.0
    held_out_human, held_out_policy = texts(2, 8, 0.5), texts(3, 8, 0.0)
    assert d.score(None, held_out_human).mean() > d.score(None, held_out_policy).mean() + 1.0
    # The reported metrics are those of the D that scores: fool rate = share of policy logits > 0.
    logits = d.logits(None, POLICY)
    before = d.update(None, POLICY, human_texts=HUMAN, steps=0)
    assert before["fool_rate"] == pytest.approx(float((logits > 0).mean()))


def test_score_is_the_chosen_generator_reward_of_the_logit():
    d = Discriminator("tiny:llama", reward="log_d", seed=0)
    logits = d.logits(None, POLICY[:4])
    np.testing.assert_allclose(d.score(None, POLICY[:4]), generator_reward(torch.from_numpy(logits), "log_d"),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="unknown generator reward"):
        Discriminator("tiny:llama", reward="wasserstein")


def test_updates_pause_above_the_accuracy_ceiling_and_fresh_samples_are_measured_alone():
    d = Discriminator("tiny:llama", lr=3e-3, seed=0)
    for _ in range(12):
        d.update(None, POLICY, human_texts=HUMAN)
    paused = d.update(None, POLICY, human_texts=HUMAN, max_accuracy=0.9)
    assert paused["paused"] == 1.0 and paused["updates"] == 12.0
    # Policy side = 4 fresh samples that look human + replayed ones that do not: metrics see the fresh.
    mixed = d.update(None, HUMAN[:4] + POLICY, human_texts=HUMAN, fresh=4, steps=0)
    assert mixed["fool_rate"] == 1.0


def test_same_updates_same_weights_and_save_load_restores_them(tmp_path):
    a, b = Discriminator("tiny:llama", seed=0, lr=1e-3), Discriminator("tiny:llama", seed=0, lr=1e-3)
    for d in (a, b):
        d.update(None, POLICY, human_texts=HUMAN, steps=2)
    np.testing.assert_array_equal(a.logits(None, POLICY), b.logits(None, POLICY))  # actor copies stay equal
    a.save(tmp_path / "d")
    c = Discriminator("tiny:llama", seed=1, lr=1e-3)
    c.load(tmp_path / "d")
    np.testing.assert_allclose(c.logits(None, POLICY), a.logits(None, POLICY), atol=1e-6)
    assert c.updates == 2
    # The optimizer state came back too: the next update is the same on both.
    for d in (a, c):
        d.update(None, POLICY, human_texts=HUMAN)
    np.testing.assert_allclose(c.logits(None, POLICY), a.logits(None, POLICY), atol=1e-5)


def test_gradient_penalty_is_computed_on_the_embedded_human_inputs_and_reported():
    d = Discriminator("tiny:llama", lr=3e-3, gradient_penalty=10.0, seed=0)
    m = d.update(None, POLICY, human_texts=HUMAN, steps=2)
    assert m["gradient_penalty"] > 0 and math.isfinite(m["gradient_penalty"])
    assert m["updates"] == 2.0


def test_a_conditioned_discriminator_reads_the_prompt_and_an_unconditioned_one_ignores_it():
    cond, plain = Discriminator("tiny:llama", seed=0), Discriminator("tiny:llama", seed=0, conditioned=False)
    prompts = ["Tell me about the sea."] * 4
    np.testing.assert_array_equal(plain.logits(prompts, POLICY[:4]), plain.logits(None, POLICY[:4]))
    assert not np.allclose(cond.logits(prompts, POLICY[:4]), cond.logits(None, POLICY[:4]))
