"""Offline preference training end to end on tiny models: the learnable property is learned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raylign.config import load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")

COMMON = ["model.path=tiny:llama", "model.lora=null", "resources.cpus_per_learner=0.5", "progress=false",
          "output.trackers=[]", "train.batch_size=16", "train.micro_batch_size=8", "train.warmup_steps=0",
          "train.scheduler=constant", "data.val_fraction=0.2"]


def _run(recipe, tmp_path, data_file, *extra):
    cfg = load_config(recipe, COMMON + [f"data.train={data_file}", f"output.dir={tmp_path}/runs",
                                        f"output.name={recipe}", *extra])
    result = run_pipeline(cfg)
    return result, read_metrics(result.run_dir)


def _first_last(rows, key):
    values = [r[key] for r in rows if key in r]
    return values[0], values[-1]


def test_reward_model_learns_the_preferred_property(tmp_path, pairs_file):
    result, rows = _run("reward", tmp_path, pairs_file, "train.lr=3e-3", "train.max_steps=24", "train.eval_every=12")
    _, acc = _first_last(rows, "eval/accuracy")
    assert acc > 0.9, rows[-1]
    # final/ loads again as a scorer and ranks held-out style pairs.
    from raylign.models import load_scalar_model

    model, tok = load_scalar_model(str(Path(result.run_dir) / "final"))
    enc = tok(["Tell me about the park. I think the park is wonderful.",
               "Tell me about the park. I think the park is awful."], return_tensors="pt", padding=True)
    scores = model(**enc).logits[:, 0].detach().numpy()
    assert scores[0] > scores[1]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_raises_validation_pair_accuracy(tmp_path, pairs_file, loss_type):
    recipe = "dpo" if loss_type == "sigmoid" else "ipo"
    _, rows = _run(recipe, tmp_path, pairs_file, "train.lr=2e-3", "train.max_steps=20", "train.eval_every=10")
    before, after = _first_last(rows, "eval/accuracy")
    assert after > 0.9 and after > before, (before, after)
    m0, m1 = _first_last(rows, "eval/margin")
    assert m0 == pytest.approx(0.0, abs=1e-4)  # at step 0 the policy is the reference
    assert m1 > 0


def test_precomputed_and_live_reference_agree(tmp_path, pairs_file):
    _, pre = _run("dpo", tmp_path / "a", pairs_file, "train.lr=1e-3", "train.max_steps=4")
    _, live = _run("dpo", tmp_path / "b", pairs_file, "train.lr=1e-3", "train.max_steps=4",
                   "preference.precompute_ref_logps=false")
    a = [r["train/loss"] for r in pre if "train/loss" in r]
    b = [r["train/loss"] for r in live if "train/loss" in r]
    np.testing.assert_allclose(a, b, rtol=1e-4)


@pytest.mark.parametrize("recipe", ["simpo", "orpo"])
def test_reference_free_losses_learn(tmp_path, pairs_file, recipe):
    _, rows = _run(recipe, tmp_path, pairs_file, "train.lr=2e-3", "train.max_steps=20", "train.eval_every=10")
    before, after = _first_last(rows, "eval/accuracy")
    assert after > 0.9 and after >= before


def test_kto_separates_desirable_from_undesirable(tmp_path):
    from tests.conftest import synthetic_pairs, write_jsonl

    rows = []
    for i, pair in enumerate(synthetic_pairs(240, seed=1)):
        good = i % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"],
                     "label": good})
    data = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    _, metrics = _run("kto", tmp_path, data, "train.lr=2e-3", "train.max_steps=20", "train.eval_every=10")
    last = [r for r in metrics if "eval/desirable_reward" in r][-1]
    assert last["eval/desirable_reward"] > last["eval/undesirable_reward"]
    assert np.isfinite(last["eval/kl"])


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, pairs_file):
    _, plain = _run("dpo", tmp_path / "a", pairs_file, "train.lr=1e-3", "train.max_steps=3")
    _, ckpt = _run("dpo", tmp_path / "b", pairs_file, "train.lr=1e-3", "train.max_steps=3",
                   "model.gradient_checkpointing=true")
    np.testing.assert_allclose([r["train/loss"] for r in ckpt if "train/loss" in r],
                               [r["train/loss"] for r in plain if "train/loss" in r], rtol=1e-5)


def test_lora_dpo_uses_the_adapter_free_model_as_reference(tmp_path, pairs_file):
    result, rows = _run("dpo", tmp_path, pairs_file, "model.lora.r=8", "model.lora.alpha=16",
                        "train.lr=5e-3", "train.max_steps=12", "train.eval_every=6",
                        "preference.precompute_ref_logps=false")
    m0, m1 = _first_last(rows, "eval/margin")
    assert m0 == pytest.approx(0.0, abs=1e-4) and m1 > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(Path(result.run_dir) / "final")  # merged on save: plain HF dir
