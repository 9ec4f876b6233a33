"""`raylign eval builtin:smollm2-135m-instruct --pairs F --scorer loglik-mean` on a trivially separable file."""

from __future__ import annotations

import json

import pytest

from raylign.cli import main
from tests.conftest import write_jsonl

pytestmark = pytest.mark.slow

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("How many days are in a week?", "There are seven days in a week."),
      ("What do bees make?", "Bees make honey and wax."),
      ("What is ice made of?", "Ice is frozen water."),
      ("Where does the sun rise?", "The sun rises in the east.")]


def test_smollm2_loglik_mean_agrees_on_separable_pairs(tmp_path):
    rows = []
    for i in range(20):
        q, a = QA[i % len(QA)]
        words = a.split()
        salad = " ".join(w + "qz" for w in words[::-1])  # the same words, reversed and garbled
        rows.append({"prompt": q, "chosen": a, "rejected": salad})
    out = tmp_path / "eval"
    assert main(["eval", "builtin:smollm2-135m-instruct", "--pairs", write_jsonl(tmp_path / "p.jsonl", rows),
                 "--scorer", "loglik-mean", "--out", str(out), "--no-progress"]) == 0
    p = json.loads((out / "eval.json").read_text())["pairs"]
    assert p["agreement"] >= 0.95 and p["ci_low"] <= p["agreement"] <= p["ci_high"]
