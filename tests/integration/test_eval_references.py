"""`raylign eval --references`: generations vs human answers by embedding similarity, on tiny:llama."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raylign.cli import main
from tests.conftest import synthetic_pairs, write_jsonl

pytestmark = pytest.mark.ray


def test_eval_references_reports_cosine_with_interval_and_pairs_each_generation_with_its_answer(
        tmp_path, ray_session, capsys):
    from raylign.evaluation.embeddings import SentenceEmbedder

    refs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(12))
    out = tmp_path / "eval"
    # tiny:llama as the embedder keeps the test offline and fast; the default is builtin:minilm-l6
    assert main(["eval", "tiny:llama", "--references", refs, "--embedder", "tiny:llama", "--limit", "8",
                 "--max-new-tokens", "4", "--actors", "1", "--cpus-per-actor", "0.5", "--batch-size", "8",
                 "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "eval.json").read_text())["references"]
    assert r["n"] == 8 and r["embedder"] == "tiny:llama"
    assert -1.0 <= r["ci_low"] <= r["mean_cosine"] <= r["ci_high"] <= 1.0
    assert "_cosines" not in r and "cosines" not in r  # per-row values go to the histogram, not eval.json
    # every sample's cosine is that of its own generation and its own prompt's chosen answer
    emb = SentenceEmbedder("tiny:llama")
    rows = synthetic_pairs(12)
    for s, row in zip(r["samples"], rows, strict=False):
        assert s["reference"] == row["chosen"] and s["prompt"] == row["prompt"]
        u, v = emb.embed([s["generation"], s["reference"]])
        assert s["cosine"] == pytest.approx(float(np.dot(u, v)), abs=1e-5)
    report = (out / "report.md").read_text()
    assert "Agreement with human reference answers" in report and "reference_similarity.png" in report
    assert (out / "reference_similarity.png").stat().st_size > 1000
    assert "agreement with human references: mean cosine" in capsys.readouterr().out
