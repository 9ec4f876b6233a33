"""sequence_logps against an explicit loop over tokens."""

from __future__ import annotations

import math

import pytest
import torch

from raylign.algorithms.logprobs import sequence_logps


def _loop(logits, labels, mask, average):
    out = []
    for b in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(1, logits.shape[1]):
            if mask[b, t]:
                probs = torch.softmax(logits[b, t - 1].double(), -1)
                total += math.log(probs[labels[b, t]].item())
                count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out)


def test_sequence_logps_matches_token_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    for average in (False, True):
        got = sequence_logps(logits, labels, mask, average=average)
        torch.testing.assert_close(got, _loop(logits, labels, mask, average).float(), atol=1e-5, rtol=1e-5)


def test_masked_padding_labels_are_ignored():
    logits = torch.zeros(1, 3, 4)  # uniform: each scored token has log p = -log 4
    labels = torch.tensor([[1, 2, -100]])
    mask = torch.tensor([[1, 1, 0]])
    assert sequence_logps(logits, labels, mask).item() == pytest.approx(-math.log(4))
