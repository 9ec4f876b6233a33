"""The one seeding scheme of raylign.runtime: a pure function of (seed, purpose, step, index)."""

from __future__ import annotations

import numpy as np

from raylign.runtime import Purpose, derive_seed, rng


def test_a_seed_is_a_pure_31_bit_function_of_its_key():
    assert derive_seed(3, Purpose.SAMPLE, 5, 7) == derive_seed(3, Purpose.SAMPLE, 5, 7)
    assert 0 <= derive_seed(3, Purpose.SAMPLE, 5, 7) < 2**31
    assert rng(3, Purpose.MINIBATCH, 2).permutation(10).tolist() == rng(3, Purpose.MINIBATCH, 2).permutation(10).tolist()


def test_every_word_of_the_key_changes_the_seed():
    base = derive_seed(1, Purpose.SAMPLE, 2, 3)
    others = {derive_seed(2, Purpose.SAMPLE, 2, 3), derive_seed(1, Purpose.EVAL, 2, 3),
              derive_seed(1, Purpose.SAMPLE, 3, 3), derive_seed(1, Purpose.SAMPLE, 2, 4)}
    assert base not in others and len(others) == 4


def test_purposes_never_share_a_stream():
    """Every purpose of one (seed, step) draws a different permutation."""
    draws = {tuple(rng(0, p, 1).permutation(20).tolist()) for p in Purpose}
    assert len(draws) == len(Purpose)


def test_data_order_keeps_the_historical_permutation():
    """SeedSequence ignores trailing zero words: rng(s, DATA_ORDER, e) is default_rng([s, e]), the row
    order offline training always used, so same-seed runs from before the scheme still repeat."""
    assert Purpose.DATA_ORDER == 0
    for seed, epoch in ((0, 0), (7, 3), (123, 41)):
        expected = np.random.default_rng([seed, epoch]).permutation(50)
        assert rng(seed, Purpose.DATA_ORDER, epoch).permutation(50).tolist() == expected.tolist()


def test_negative_and_huge_seeds_are_accepted():
    assert derive_seed(-1, Purpose.SERVE, 0, 0) == derive_seed(2**64 - 1, Purpose.SERVE, 0, 0)
    assert 0 <= derive_seed(2**70, Purpose.SERVE) < 2**31
