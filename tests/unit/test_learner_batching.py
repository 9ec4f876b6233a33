"""Micro-batching: rows grouped by length, padding columns cut, nothing lost."""

from __future__ import annotations

import numpy as np

from raylign.pipelines.loop import step_indices
from raylign.workers.learner import micro_batches


def test_micro_batches_sort_trim_and_keep_every_row():
    attn = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    batch = {"input_ids": np.arange(20).reshape(4, 5) * attn, "attention_mask": attn,
             "loss_mask": attn, "margin": np.arange(4, dtype=np.float32)}
    mbs = micro_batches(batch, 2)
    assert [mb["input_ids"].shape for mb in mbs] == [(2, 5), (2, 2)]  # rows 1,3 then rows 0,2
    assert sorted(float(m) for mb in mbs for m in mb["margin"]) == [0.0, 1.0, 2.0, 3.0]
    assert mbs[1]["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_pair_batches_trim_last_axis_only_and_unsorted_keeps_order():
    attn = np.zeros((3, 2, 6), dtype=int)
    attn[0, :, :2] = 1
    attn[1, 0, :4] = 1
    attn[2, 1, :3] = 1
    batch = {"input_ids": attn.copy(), "attention_mask": attn, "loss_mask": attn,
             "ref_logps": np.arange(6, dtype=np.float32).reshape(3, 2)}
    mbs = micro_batches(batch, 3, sort=False)
    assert mbs[0]["input_ids"].shape == (3, 2, 4)
    assert mbs[0]["ref_logps"].tolist() == batch["ref_logps"].tolist()


def test_step_indices_are_a_pure_function_of_seed_and_step():
    a = [step_indices(10, 3, seed=1, step=s).tolist() for s in range(6)]
    b = [step_indices(10, 3, seed=1, step=s).tolist() for s in range(6)]
    assert a == b
    epoch0 = sum(a[:3], [])
    assert len(set(epoch0)) == 9  # no row twice within an epoch; the 10th row is dropped
    assert a[3:] != a[:3]  # a fresh permutation each epoch
