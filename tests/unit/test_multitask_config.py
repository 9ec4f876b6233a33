"""Multi-task config and driver helpers: clear errors, batch split, per-task summaries, gates."""

from __future__ import annotations

import math

import pytest

from raylign.config import ConfigError, load_config
from raylign.data.batches import summarize_task
from raylign.pipelines.multitask import gates_hold, multitask_score, task_batch_sizes


def test_recipe_loads_and_tasks_get_their_data_kind():
    cfg = load_config("multitask")
    tasks = cfg.multitask.tasks
    assert list(tasks) == ["imitation", "preference", "rating"]
    assert tasks["rating"].data.kind == "ratings" and tasks["rating"].data.train == "builtin:vader-ratings"
    cfg = load_config("multitask", ["multitask.tasks.rating=null", "multitask.tasks.preference.weight=0.3"])
    assert list(cfg.multitask.tasks) == ["imitation", "preference"]
    assert cfg.multitask.tasks["preference"].weight == 0.3


@pytest.mark.parametrize("override, message", [
    ("multitask.tasks.rating.weihgt=1", "Did you mean 'multitask.tasks.rating.weight'?"),
    ("multitask.tasks.rating.data.kind=pairs", "a rating task trains on data.kind ratings, not 'pairs'"),
    ("multitask.tasks.preference.gate=accuracy is high", "must look like 'accuracy >= 0.8'"),
    ("multitask.weighting=magic", "'multitask.weighting': expected one of 'static', 'uncertainty'"),
    ("multitask.tasks.rating.head=classification", "needs num_classes"),
])
def test_config_mistakes_are_one_clear_message(override, message):
    with pytest.raises(ConfigError, match=None) as exc:
        load_config("multitask", [override])
    assert message in str(exc.value)


def test_task_batch_sizes_follow_the_ratios():
    cfg = load_config("multitask", ["multitask.tasks.imitation.ratio=2", "train.batch_size=24"])
    assert task_batch_sizes(cfg.multitask.tasks, 24, 1) == {"imitation": 12, "preference": 6, "rating": 6}
    cfg = load_config("multitask", ["multitask.tasks.imitation.ratio=100"])
    assert task_batch_sizes(cfg.multitask.tasks, 24, 2)["rating"] == 2  # at least one per learner


def test_summaries_by_hand():
    tasks = load_config("multitask").multitask.tasks
    # predictions [1, 2, 3] against targets [1, 3, 2]: mse 2/3, pearson 0.5
    sums = {"loss_sum": 2.0, "examples": 3.0, "pred_sum": 6.0, "target_sum": 6.0, "pred_sq": 14.0,
            "target_sq": 14.0, "cross": 13.0}
    out = summarize_task(tasks["rating"].type, sums, "eval/rating")
    assert out["eval/rating/loss"] == pytest.approx(2 / 3)
    assert out["eval/rating/pearson"] == pytest.approx(0.5)
    out = summarize_task(tasks["imitation"].type, {"nll_sum": 20.0, "tokens": 10.0}, "train/imitation")
    assert out == {"train/imitation/loss": 2.0, "train/imitation/ppl": pytest.approx(math.exp(2.0))}
    out = summarize_task(tasks["preference"].type, {"loss_sum": 1.0, "correct": 3.0, "margin_sum": 2.0,
                                               "chosen_sum": 1.0, "rejected_sum": -1.0, "pairs": 4.0}, "eval/p")
    assert out["eval/p/accuracy"] == 0.75 and out["eval/p/loss"] == 0.25


def test_gates_and_score():
    tasks = load_config("multitask", ["multitask.tasks.preference.gate=accuracy >= 0.8",
                                      "multitask.tasks.rating.gate=loss<0.5"]).multitask.tasks
    assert gates_hold(tasks, {}) == [True, False, False]  # no value yet: a gate does not hold
    assert gates_hold(tasks, {"preference": {"accuracy": 0.85}, "rating": {"loss": 0.7}}) == [True, True, False]
    start = {"eval/a/loss": 2.0, "eval/b/loss": 1.0}
    assert multitask_score(start, {"eval/a/loss": 1.0, "eval/b/loss": 1.5}, ["a", "b"]) == pytest.approx(0.0)
    assert multitask_score(start, {}, ["a", "b"]) is None
