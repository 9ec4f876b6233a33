"""Issue 16 acceptance: the exported pairs train a reward model (`raylign train reward`) whose held-out
agreement with the simulated humans' majority is above 0.8 (tiny:llama).

Two tasks of ready pairs whose preferred answer has a learnable property (cheerful vs gloomy,
`synthetic_pairs`): a training task and a held-out one, each in its own annotations database, judged
through the HTTP API by 5 simulated annotators (noise 0.2) whose oracle prefers the cheerful answer.
The training database's majority pairs (`annotate export --kind pairs`) train the reward model; `raylign
eval --human` measures its agreement with the held-out database's majority.
"""

from __future__ import annotations

import json
from pathlib import Path

from raylign.annotation.cli import main as annotate
from raylign.annotation.simulate import simulate
from raylign.annotation.store import Store
from raylign.cli import main as raylign
from raylign.config import load_config
from raylign.data import load_dataset
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics
from tests.annotation_server import Server
from tests.conftest import synthetic_pairs, write_jsonl

GOOD = {"great", "lovely", "wonderful", "happy", "love"}  # the words of `synthetic_pairs`
BAD = {"awful", "sad", "terrible", "gloomy", "hate"}
ORACLE = f"function:{__name__}:cheerful"
ANNOTATORS, NOISE = 5, 0.2
TRAIN_ITEMS, HELD_OUT_ITEMS = 200, 60


def cheerful(prompts, completions):
    """The simulated humans' taste: cheerful words count +1, gloomy ones -1."""
    out = []
    for text in completions:
        words = [w.strip(".,!?").lower() for w in text.split()]
        out.append(float(sum(w in GOOD for w in words) - sum(w in BAD for w in words)))
    return out


def _judged_db(root: Path, name: str, pairs: list[dict]) -> tuple[Path, dict]:
    """A task of ready pairs (overlap = every annotator), served and judged by the simulated annotators."""
    items = write_jsonl(root / f"{name}_pairs.jsonl", pairs)
    task, db = root / f"{name}_task.jsonl", root / f"{name}.sqlite"
    assert annotate(["make", "--items", items, "--kind", "pairwise", "--overlap", str(ANNOTATORS), "--seed", "3",
                     "--out", str(task)]) == 0
    server = Server(task, db).start()
    try:
        summary = simulate(Store(db, create=False), server.url, annotators=ANNOTATORS, noise=NOISE, oracle=ORACLE,
                           seed=7)
    finally:
        server.stop()
    assert summary["judgments"] == ANNOTATORS * len(pairs)
    return db, summary


def test_exported_majority_trains_a_reward_model_that_agrees_with_held_out_humans(ray_session, tmp_path, capsys):
    train_db, summary = _judged_db(tmp_path, "train", synthetic_pairs(TRAIN_ITEMS, seed=11))
    a, tie, b = summary["true_distribution"]  # the oracle's answers: never a tie, the cheerful side A or B
    assert tie == 0 and 0.3 < a < 0.7, summary
    held_db, _ = _judged_db(tmp_path, "held_out", synthetic_pairs(HELD_OUT_ITEMS, seed=12))

    exported = tmp_path / "human_pairs.jsonl"
    assert annotate(["export", str(train_db), "--kind", "pairs", "--out", str(exported)]) == 0
    rows = load_dataset(str(exported), "pairs").to_pylist()
    assert 0.9 * TRAIN_ITEMS <= len(rows) <= TRAIN_ITEMS  # a few splits/ties under noise give no row
    assert sum(cheerful([None], [r["chosen"]])[0] > 0 for r in rows) >= 0.95 * len(rows)  # the majority is right

    cfg = load_config("reward", [
        "model.path=tiny:llama", "model.lora=null", "resources.cpus_per_learner=0.5", "progress=false",
        "output.trackers=[]", "train.batch_size=16", "train.micro_batch_size=8", "train.warmup_steps=0",
        "train.scheduler=constant", "data.val_fraction=0.1", "train.lr=3e-3", "train.max_steps=24",
        "train.eval_every=24", f"data.train={exported}", f"output.dir={tmp_path}/runs", "output.name=human-rm"])
    result = run_pipeline(cfg)
    accuracy = [r["eval/accuracy"] for r in read_metrics(result.run_dir) if "eval/accuracy" in r]
    assert accuracy[-1] > 0.8, accuracy
    final = Path(result.run_dir) / "final"

    out = tmp_path / "eval"
    capsys.readouterr()
    assert raylign(["eval", str(final), "--scorer", str(final), "--human", str(held_db), "--out", str(out),
                    "--no-progress"]) == 0
    human = json.loads((out / "eval.json").read_text())["human"]
    assert human["db"] == str(held_db)
    assert human["n"] + sum(human["excluded"].values()) == HELD_OUT_ITEMS and human["n"] >= 0.9 * HELD_OUT_ITEMS
    assert set(human["excluded"]) <= {"tie", "split"}
    assert human["n_judgments"] <= ANNOTATORS * human["n"] and 0.5 < human["mean_human_agreement"] <= 1
    assert human["agreement"] > 0.8, human
    assert human["ci_low"] <= human["agreement"] <= human["ci_high"]
    assert set(human["per_category"]) == {"pairwise"}
    # the pairs file's chosen answer against its rejected one, as the held-out humans' majority saw them
    (win,) = human["win_rates"].values()
    assert (win["source"], win["against"], win["n"]) == ("chosen", "rejected", human["n"]) and win["win_rate"] > 0.9
    assert "agreement with the human majority" in capsys.readouterr().out
    assert "Agreement with the human majority" in (out / "report.md").read_text()


def test_eval_human_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "none.sqlite"
    assert raylign(["eval", "tiny:llama", "--human", str(missing), "--scorer", "length", "--out",
                    str(tmp_path / "o")]) == 2
    assert f"annotations database {missing} not found" in capsys.readouterr().err
    empty = tmp_path / "empty.sqlite"
    Store(empty).close()  # a database without any judged pair item
    assert raylign(["eval", "tiny:llama", "--human", str(empty), "--scorer", "length", "--out",
                    str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no pairwise or human-vs-model item has a majority answer yet" in err and "Traceback" not in err



def test_human_win_rates_between_sources():
    from raylign.evaluation.runner import human_win_rates

    rows = ([{"source_chosen": "runs/new", "source_rejected": "runs/old"}] * 3
            + [{"source_chosen": "runs/old", "source_rejected": "runs/new"}]
            + [{"source_chosen": "human", "source_rejected": "model"}]
            + [{"source_chosen": "m", "source_rejected": "m"}, {"source_chosen": None, "source_rejected": "x"}])
    out = human_win_rates(rows, n_boot=200, seed=0)
    assert set(out) == {"runs/new vs runs/old", "human vs model"}  # same-source and unknown pairs: no winner
    new = out["runs/new vs runs/old"]
    assert (new["source"], new["against"], new["n"], new["wins"], new["win_rate"]) == ("runs/new", "runs/old", 4, 3,
                                                                                        0.75)
    assert 0.0 <= new["ci_low"] <= 0.75 <= new["ci_high"] <= 1.0
    assert out["human vs model"]["win_rate"] == 1.0
