"""Agreement of generations with human references (embedding cosine) and over-optimisation helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raylign.data import DataError
from raylign.evaluation.embeddings import SentenceEmbedder, mean_pool
from raylign.evaluation.metrics import reference_similarity
from raylign.evaluation.overoptimization import gold_peak, plot_curves, run_checkpoints
from raylign.evaluation.runner import load_references
from tests.conftest import write_jsonl


def test_reference_similarity_against_a_hand_computed_case():
    gen = [[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]
    ref = [[2.0, 0.0], [1.0, 1.0], [-3.0, -4.0]]  # cosines 1, 1/√2, −1 (scale does not matter)
    out = reference_similarity(gen, ref, n_boot=2000, seed=1)
    assert out["cosines"] == pytest.approx([1.0, 1 / math.sqrt(2), -1.0])
    assert out["mean_cosine"] == pytest.approx((1 + 1 / math.sqrt(2) - 1) / 3)
    assert out["ci_low"] <= out["mean_cosine"] <= out["ci_high"]
    # mismatched baseline: cos(g_i, r_j), i ≠ j, by hand
    off = [1 / math.sqrt(2), -3 / 5, 0.0, -4 / 5, 3 / 5, 7 / (5 * math.sqrt(2))]
    assert out["mismatched_cosine"] == pytest.approx(sum(off) / 6)
    assert reference_similarity([[0.0, 0.0]], [[1.0, 0.0]])["mean_cosine"] == 0.0  # an empty text's zero vector
    with pytest.raises(ValueError, match="one shape"):
        reference_similarity([[1.0, 0.0]], [[1.0, 0.0, 0.0]])


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    return SentenceEmbedder("tiny:llama", batch_size=3)


def test_embedder_mean_pools_with_the_mask_and_normalises(embedder):
    texts = ["a fairly long sentence about the weather today", "hi", "hi", "something else entirely"]
    emb = embedder.embed(texts)
    assert emb.shape[0] == 4 and np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    assert float(emb[1] @ emb[2]) == pytest.approx(1.0, abs=1e-6)  # identical texts: cosine 1
    assert reference_similarity(emb[[1, 3]], emb[[2, 3]])["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    # padded in a batch with a long text == alone by hand: mean of the token states, L2-normalised
    enc = embedder.tokenizer(texts[1], return_tensors="pt")
    with torch.no_grad():
        h = embedder.model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state[0].double()
    manual = h.mean(0) / h.mean(0).norm()
    assert np.allclose(emb[1], manual.numpy(), atol=1e-5)
    assert float(emb[0] @ emb[3]) < 0.9999  # different texts differ
    pooled = mean_pool(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]]), torch.tensor([[1, 1, 0]]))
    assert pooled.tolist() == [[2.0, 3.0]]  # the padding position is ignored


def test_load_references_takes_chosen_or_true_completions_and_names_the_file(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p1", "chosen": "good", "rejected": "bad"}])
    assert load_references(pairs) == [{"prompt": "p1", "reference": "good"}]
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "yes", "label": True},
                                                  {"prompt": "b", "completion": "no", "label": False}])
    assert load_references(unpaired) == [{"prompt": "a", "reference": "yes"}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a", "completion": "x"}])
    with pytest.raises(DataError, match=r"prompts.jsonl: --references needs rows with a human answer"):
        load_references(prompts)
    none_true = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "x", "label": False}])
    with pytest.raises(DataError, match="no row has label true"):
        load_references(none_true)


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")


def test_run_checkpoints_orders_steps_then_final(tmp_path):
    from raylign.config import ConfigError

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  path: tiny:llama\n")
    _model_dir(run / "checkpoints" / "step_10" / "model")  # what the pipelines write
    _model_dir(run / "checkpoints" / "step_2")  # a model dir itself
    (run / "checkpoints" / "step_x").mkdir()
    (run / "checkpoints" / "step_5").mkdir()  # no model inside: skipped
    _model_dir(run / "final")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s}) for s in (0, 5, 12)) + "\n")
    points, base, _ = run_checkpoints(str(run))
    assert [(p["label"], p["step"]) for p in points] == [("step_2", 2), ("step_10", 10), ("final", 12)]
    assert points[1]["path"].endswith("step_10/model") and base == "tiny:llama"
    with pytest.raises(ConfigError, match="not one"):
        run_checkpoints(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="output.save_every"):
        run_checkpoints(str(empty))


def _pt(name, step, kl, proxy, gold):
    return {"checkpoint": name, "step": step, "kl": kl, "sqrt_kl": math.sqrt(kl), "proxy": proxy,
            "proxy_ci": [proxy - 0.1, proxy + 0.1], "gold": gold, "gold_ci": [gold - 0.1, gold + 0.1]}


def test_gold_peak_flags_goodhart_and_the_plot_is_written(tmp_path):
    curve = [_pt("reference", 0, 0.0, 0.0, 0.0), _pt("step_10", 10, 1.0, 1.0, 0.5), _pt("final", 20, 4.0, 2.0, 0.2)]
    out = gold_peak(curve)
    assert out["gold_peak"]["checkpoint"] == "step_10" and out["overoptimized"]
    healthy = [_pt("reference", 0, 0.0, 0.0, 0.0), _pt("final", 20, 4.0, 2.0, 0.7)]
    assert not gold_peak(healthy)["overoptimized"] and gold_peak(healthy)["gold_peak"]["checkpoint"] == "final"
    png = plot_curves(tmp_path / "o.png", {"points": curve, "proxy": "length", "gold": "lexicon:vader"})
    assert png.stat().st_size > 1000
