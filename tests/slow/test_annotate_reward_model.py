"""Simulated human annotation with a real model: SmolLM2 samples, VADER (human-rated lexicon) picks,
a MiniLM reward model learns the annotator's preference and ranks held-out annotated pairs."""

from __future__ import annotations

import pytest

from raylign.cli import main
from raylign.config import load_config
from raylign.data import load_dataset
from raylign.pipelines import run_pipeline
from raylign.rewards import build_reward_source
from raylign.rundir import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def test_vader_annotated_pairs_train_a_reward_model_above_80_percent(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    assert main(["data", "annotate", "--prompts", "builtin:everyday-prompts",
                 "--model", "builtin:smollm2-135m-instruct", "--annotator", "lexicon:vader",
                 # Best vs worst of 4 and a minimum margin: pairs the annotator clearly separates (with
                 # n=2 and no filter a quarter of pairs differ by < 0.16 VADER and the RM reaches ~60%).
                 "--n", "4", "--min-margin", "0.2", "--max-new-tokens", "40", "--batch-size", "16",
                 "--cpus-per-worker", "2",
                 "--seed", "0", "--out", str(pairs), "--no-progress"]) == 0
    assert main(["data", "validate", str(pairs), "--kind", "pairs"]) == 0
    n_pairs = load_dataset(str(pairs), "pairs").num_rows
    assert n_pairs >= 200

    cfg = load_config("reward", [f"data.train={pairs}", "data.val_fraction=0.2", f"output.dir={tmp_path}/runs",
                                 "output.name=rm", "progress=false", "train.epochs=4", "train.lr=1e-4",
                                 "train.batch_size=16", "train.micro_batch_size=16", "train.eval_every=20",
                                 "resources.cpus_per_learner=2"])
    result = run_pipeline(cfg)
    held_out = [r["eval/accuracy"] for r in read_metrics(result.run_dir) if "eval/accuracy" in r]
    print(f"\n{n_pairs} annotated pairs; held-out pair accuracy by eval: {held_out}")
    assert held_out[-1] > 0.8

    # final/ is a reward source again and scores (prompt, completion) batches.
    scorer = build_reward_source(f"{result.run_dir}/final")
    scores = scorer.score(["How was your day?"] * 2,
                          ["It was wonderful, I loved every minute!", "It was awful and I hated it."])
    assert scores[0] > scores[1]
