"""train.counterfactual_penalty: the pairing penalty, the batch of counterfactual copies, and the
objectives that add it (reward model, DPO family)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylign.algorithms.fairness import counterfactual_pairing_penalty
from raylign.algorithms.logprobs import sequence_logps
from raylign.algorithms.preference import bradley_terry_loss
from raylign.config import load_config
from raylign.data.counterfactual import collate_counterfactuals, load_bias_sets, pair_copies_for_penalty
from raylign.workers.objectives import make_objective


def test_penalty_hand_computed():
    scores = torch.tensor([[1.0, 0.0], [0.0, 0.0], [5.0, -5.0]])  # [B=3, S=2]
    cf = torch.tensor([[[3.0, 0.0], [1.0, 2.0]],  # (1-3)² + 0 = 4 ; 0 + (0-2)² = 4 -> mean 4
                       [[2.0, 1.0], [9.0, 9.0]],  # 4 + 1 = 5 ; copy 2 missing -> 5
                       [[0.0, 0.0], [0.0, 0.0]]])  # no copies -> 0
    valid = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    penalty, copies = counterfactual_pairing_penalty(scores, cf, valid)
    assert penalty.tolist() == [4.0, 5.0, 0.0] and copies.tolist() == [2.0, 1.0, 0.0]


def test_penalty_gradient_pulls_both_scores_together():
    s = torch.tensor([[2.0]], requires_grad=True)
    c = torch.tensor([[[0.5]]], requires_grad=True)
    penalty, _ = counterfactual_pairing_penalty(s, c, torch.ones(1, 1))
    penalty.sum().backward()
    assert s.grad.item() == pytest.approx(2 * 1.5) and c.grad.item() == pytest.approx(-2 * 1.5)


def test_copies_for_a_pair_and_their_batch():
    sets = load_bias_sets(require_templates=False)
    row = {"prompt": "My boss is a woman.", "chosen": "A woman leads well.", "rejected": "no"}

    def encode(r):  # one id per character, loss on the answer
        return [{"input_ids": [ord(ch) for ch in r["prompt"] + r[side]],
                 "loss_mask": [0] * len(r["prompt"]) + [1] * len(r[side])} for side in ("chosen", "rejected")]

    copies = pair_copies_for_penalty(row, sets, encode)
    assert len(copies) == 2  # man, non-binary person
    assert "".join(map(chr, copies[0][0]["input_ids"])) == "My boss is a man.A man leads well."
    assert pair_copies_for_penalty({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, sets, encode) == []
    batch = collate_counterfactuals([copies, []], pad_id=0)
    assert batch["cf_input_ids"].shape[:3] == (2, 2, 2) and batch["cf_valid"].tolist() == [[1, 1], [0, 0]]
    longest = max(len(s["input_ids"]) for pair in copies for s in pair)
    assert batch["cf_input_ids"].shape[3] == longest
    assert batch["cf_attention_mask"][0, 1, 0].sum() == len(copies[1][0]["input_ids"])
    assert batch["cf_loss_mask"][0, 0, 1].sum() == len("no")


class CountingRewardModel(torch.nn.Module):
    """score = w · (number of token 7 in the real tokens): the penalty is hand-computable."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, input_ids, attention_mask=None):
        count = ((input_ids == 7) & attention_mask.bool()).sum(-1).float()
        return type("Out", (), {"logits": (self.w * count).unsqueeze(-1)})()


def pair_batch():
    # One pair: chosen has two 7s, rejected none; its one copy: chosen one 7, rejected one 7.
    ids = torch.tensor([[[1, 7, 7, 0], [1, 2, 3, 0]]])
    cf = torch.tensor([[[[1, 7, 2, 0], [1, 7, 3, 0]]]])
    ones = lambda x: (x != 0).long()  # noqa: E731
    return {"input_ids": ids, "attention_mask": ones(ids), "loss_mask": ones(ids),
            "cf_input_ids": cf, "cf_attention_mask": ones(cf), "cf_loss_mask": ones(cf),
            "cf_valid": torch.ones(1, 1)}


def test_reward_objective_adds_lambda_times_the_gap():
    config = load_config("reward", ["model.path=tiny:llama", "train.counterfactual_penalty=2.0"])
    model = CountingRewardModel()
    loss, sums = make_objective("reward", config)(model, pair_batch())
    # scores: chosen 0.5·2 = 1, rejected 0; copy: 0.5, 0.5 -> P = (1-0.5)² + (0-0.5)² = 0.5
    bt = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item()
    assert loss.item() == pytest.approx(bt + 2.0 * 0.5)
    assert sums["cf_penalty_sum"] == pytest.approx(0.5) and sums["cf_examples"] == 1
    loss.backward()
    assert model.w.grad is not None
    off = load_config("reward", ["model.path=tiny:llama"])
    loss_off, sums_off = make_objective("reward", off)(CountingRewardModel(), pair_batch())
    assert loss_off.item() == pytest.approx(bt) and "cf_penalty_sum" not in sums_off


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=10):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, **_):
        return type("Out", (), {"logits": self.emb(input_ids)})()


@pytest.mark.parametrize("algorithm", ["dpo", "simpo", "orpo"])
def test_dpo_family_penalty_on_mean_logps(algorithm):
    lam = 3.0
    base = ["model.path=tiny:llama", f"algorithm={algorithm}"]
    on, off = load_config("dpo", [*base, f"train.counterfactual_penalty={lam}"]), load_config("dpo", base)
    batch = pair_batch()
    batch["ref_logps"] = torch.zeros(1, 2)
    model = TinyLM()
    loss_on, sums = make_objective(algorithm, on)(model, batch)
    loss_off, _ = make_objective(algorithm, off)(model, batch)

    def mean_logps(ids, mask):
        flat_ids, flat_mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
        return sequence_logps(model(flat_ids).logits, flat_ids, flat_mask, average=True)

    s = mean_logps(batch["input_ids"], batch["loss_mask"]).view(1, 2)
    c = mean_logps(batch["cf_input_ids"], batch["cf_loss_mask"]).view(1, 1, 2)
    expected = ((s.unsqueeze(1) - c) ** 2).sum().item()
    assert sums["cf_penalty_sum"] == pytest.approx(expected, rel=1e-5)
    assert (loss_on - loss_off).item() == pytest.approx(lam * expected, rel=1e-5)
    assert np.isfinite(loss_on.item())
