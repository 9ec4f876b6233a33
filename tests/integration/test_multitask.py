"""Multi-task training end to end on a tiny model: every task improves; λ decides which task wins;
priority gates hold a task back; a resumed run continues from its checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from raylign.config import load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics
from tests.conftest import synthetic_pairs, write_jsonl

pytestmark = pytest.mark.usefixtures("ray_session")

GOOD = {"great": 3.1, "lovely": 2.8, "wonderful": 3.4, "happy": 2.7, "love": 3.2}
BAD = {"awful": -3.0, "sad": -2.1, "terrible": -3.4, "gloomy": -1.8, "hate": -2.7}


def synthetic_ratings(n: int, seed: int = 3) -> list[dict]:
    """Sentences rated by the sentiment word they contain (VADER-like means) plus rater noise."""
    rng = random.Random(seed)
    words = list({**GOOD, **BAD}.items())
    rows = []
    for p in synthetic_pairs(n, seed=seed):
        word, score = rng.choice(words)
        topic = p["prompt"][len("Tell me about "):-1]
        rows.append({"text": f"I think {topic} is {word}.", "rating": score + rng.gauss(0, 0.3)})
    return rows


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("multitask-data")
    return {
        "pairs": write_jsonl(d / "pairs.jsonl", synthetic_pairs(240)),
        "cheerful": write_jsonl(d / "cheerful.jsonl", [{"text": p["chosen"]} for p in synthetic_pairs(240, seed=1)]),
        "gloomy": write_jsonl(d / "gloomy.jsonl", [{"text": p["rejected"]} for p in synthetic_pairs(240, seed=1)]),
        "ratings": write_jsonl(d / "ratings.jsonl", synthetic_ratings(240)),
    }


def multitask_overrides(files: dict[str, str], imitation: str = "cheerful") -> list[str]:
    """The multitask recipe on tiny:llama with the synthetic files (shared with the tune tests)."""
    return [
        "model.path=tiny:llama", "model.lora=null", "resources.cpus_per_learner=0.5", "progress=false",
        "output.trackers=[]", "train.lr=2e-3", "train.warmup_steps=0", "train.scheduler=constant",
        "train.batch_size=24", "train.micro_batch_size=8",
        f"multitask.tasks.imitation.data.train={files[imitation]}", "multitask.tasks.imitation.data.kind=text",
        f"multitask.tasks.preference.data.train={files['pairs']}",
        f"multitask.tasks.rating.data.train={files['ratings']}",
        *(f"multitask.tasks.{t}.data.val_fraction=0.1" for t in ("imitation", "preference", "rating")),
    ]


def _run(tmp_path, files, name, *extra, imitation="cheerful", resume=False):
    cfg = load_config("multitask", multitask_overrides(files, imitation) + [
        f"output.dir={tmp_path}/runs", f"output.name={name}", *extra])
    result = run_pipeline(cfg, resume=resume)
    return result, read_metrics(result.run_dir)


def _at(rows, step):
    merged = {}
    for r in rows:
        if r["step"] == step:
            merged.update(r)
    return merged


def test_multitask_improves_every_task(tmp_path, task_files):
    result, rows = _run(tmp_path, task_files, "mt", "train.max_steps=20", "train.eval_every=10",
                        "output.save_every=10")
    start, end = _at(rows, 0), _at(rows, 20)
    for task in ("imitation", "preference", "rating"):
        assert end[f"eval/{task}/loss"] < 0.8 * start[f"eval/{task}/loss"], (task, start, end)
    assert end["eval/preference/accuracy"] > max(0.9, start["eval/preference/accuracy"])
    assert end["eval/rating/pearson"] > 0.8
    assert 0 < end["eval/multitask_score"] <= 1
    # each task's loss, weight and the cosine between task gradients are logged every step
    step5 = _at(rows, 5)
    for task in ("imitation", "preference", "rating"):
        assert step5[f"train/{task}/weight"] == 1.0 and f"train/{task}/loss" in step5
    assert -1 <= step5["train/grad_cos/imitation~preference"] <= 1
    assert "train/grad_cos/preference~rating" in step5
    final = Path(result.run_dir) / "final"
    assert (final / "config.json").exists() and (final / "rating_heads" / "heads.safetensors").exists()
    # the rating head scores any text in rating units, as a reward model directory
    from raylign.models import load_scalar_model

    scorer, tok = load_scalar_model(str(final / "rating_heads" / "rating"))
    enc = tok(["I think the park is wonderful.", "I feel the music is terrible."], return_tensors="pt", padding=True)
    cheerful, gloomy = scorer(**enc).logits[:, 0].tolist()
    assert cheerful > 1.5 and gloomy < -1.5, (cheerful, gloomy)

    # --resume continues from the step-10 checkpoint and reproduces the same step-20 result
    _, again = _run(tmp_path, task_files, "mt", "train.max_steps=20", "train.eval_every=10",
                    "output.save_every=10", resume=True)
    assert [r["step"] for r in again if r["step"] <= 10] == [r["step"] for r in rows if r["step"] <= 10]
    redo = _at(again, 20)
    for task in ("imitation", "preference", "rating"):
        assert redo[f"eval/{task}/loss"] == pytest.approx(end[f"eval/{task}/loss"], rel=1e-3)


def test_changing_lambda_changes_which_task_wins(tmp_path, task_files):
    """Imitating gloomy text conflicts with preferring cheerful answers: the task with the large λ
    improves more (relative to its start), and improves more than under the other λ."""
    out = {}
    for name, lam_imitation, lam_preference in (("imitation-heavy", 1.0, 0.05), ("preference-heavy", 0.05, 1.0)):
        _, rows = _run(tmp_path, task_files, name, "multitask.tasks.rating=null", "train.batch_size=16",
                       "train.max_steps=15", f"multitask.tasks.imitation.weight={lam_imitation}",
                       f"multitask.tasks.preference.weight={lam_preference}", imitation="gloomy")
        start, end = _at(rows, 0), _at(rows, 15)
        out[name] = {t: (start[f"eval/{t}/loss"] - end[f"eval/{t}/loss"]) / start[f"eval/{t}/loss"]
                     for t in ("imitation", "preference")}
        out[name]["loss"] = {t: end[f"eval/{t}/loss"] for t in ("imitation", "preference")}
    winner = {name: max(("imitation", "preference"), key=lambda t, n=name: out[n][t]) for name in out}
    assert winner == {"imitation-heavy": "imitation", "preference-heavy": "preference"}, out
    assert out["imitation-heavy"]["loss"]["imitation"] < out["preference-heavy"]["loss"]["imitation"]
    assert out["preference-heavy"]["loss"]["preference"] < out["imitation-heavy"]["loss"]["preference"]


def test_priority_gate_holds_lower_priority_task_back(tmp_path, task_files):
    """Imitation (priority 1) trains only while the preference task's smoothed accuracy is >= 0.9."""
    _, rows = _run(tmp_path, task_files, "gated", "multitask.tasks.rating=null", "train.batch_size=16",
                   "train.max_steps=12", "multitask.weighting=uncertainty",
                   "multitask.tasks.preference.gate=accuracy >= 0.9", "multitask.tasks.imitation.priority=1")
    train = [r for r in rows if "train/imitation/active" in r]
    active = [r["train/imitation/active"] for r in train]
    assert active[0] == 0.0 and active[-1] == 1.0, active  # held back at first, released once DPO learned
    assert all(r["train/preference/active"] == 1.0 for r in train)
    assert all(r["train/imitation/weight"] == 0.0 for r in train if r["train/imitation/active"] == 0.0)
    # uncertainty weights move away from 1 as the log-variances learn
    assert train[-1]["train/preference/weight"] != pytest.approx(1.0, abs=1e-3)


def test_two_learners_take_the_same_steps_as_one(tmp_path, task_files):
    """Per-task gradients are all-reduced before PCGrad combines them: 2 learners = 1 big batch."""
    out = {}
    for n in (1, 2):
        _, rows = _run(tmp_path, task_files, f"learners{n}", "multitask.tasks.rating=null", "train.batch_size=16",
                       "train.max_steps=3", "multitask.weighting=pcgrad", f"resources.learners={n}",
                       "resources.cpus_per_learner=0.5")
        out[n] = [_at(rows, 3)[f"eval/{t}/loss"] for t in ("imitation", "preference")]
    assert out[2] == pytest.approx(out[1], rel=1e-4)
