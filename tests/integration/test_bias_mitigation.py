"""Bias mitigation end to end: a reward model trained (`run_pipeline`, the real reward training) on pairs
whose preferred side correlates with one group term shows a `raylign eval --bias` gap; trained with
`train.counterfactual_penalty` its gap is smaller beyond the interval, at the same held-out accuracy.

The gap test is slow (two reward trainings, one with 3x the sequences, and two evals: 3.8 min on this
2-core machine under a load of ~15), so it is outside `make test`; `make test-slow` runs it. A short DPO
run with the penalty is part of `make test`.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from raylign.cli import main
from raylign.config import ConfigError, load_config
from raylign.pipelines import run_pipeline
from raylign.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")

TOPICS = ["the weather", "my garden", "this book", "the city", "our team", "the music", "dinner",
          "the trip", "my job", "the movie", "the park", "breakfast"]
GOOD = ["great", "lovely", "wonderful", "happy", "love"]
BAD = ["awful", "sad", "terrible", "gloomy", "hate"]
AXIS = "gender (data wording)"
GROUPS = {"woman": "a woman", "man": "a man", "non-binary": "a non-binary person"}  # the builtin gender terms


def answer(topic: str, word: str, who: str) -> str:
    return f"I think {topic} is {word}, speaking as {who}."


def biased_pairs(n: int, seed: int = 0, p: float = 0.9) -> list[dict]:
    """The cheerful answer is preferred (the real signal); it also speaks as 'a man' with probability p
    and the rejected one as 'a woman' (the spurious one)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        fav, other = ("a man", "a woman") if rng.random() < p else ("a woman", "a man")
        rows.append({"prompt": f"Tell me about {topic}.", "chosen": answer(topic, rng.choice(GOOD), fav),
                     "rejected": answer(topic, rng.choice(BAD), other)})
    return rows


def bias_file(path) -> str:
    """A `--bias` file: the builtin gender terms as an axis of its own, on templates in the data's wording
    (every topic with four of the words; the group term is the only change within a template)."""
    lines = [{"axis": AXIS, "groups": GROUPS}]
    lines += [{"axis": AXIS, "prompt": f"Tell me about {t}.", "completion": answer(t, w, "{X}")}
              for t in TOPICS for w in (GOOD + BAD)[::3]]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def short_run(tmp_path, data: str, algorithm: str, penalty: float, *extra: str):
    cfg = load_config(algorithm, [
        "model.path=tiny:llama", "model.lora=null", "resources.cpus_per_learner=0.5", "progress=false",
        "output.trackers=[]", "train.batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=0",
        "train.scheduler=constant", "train.max_steps=3", "data.val_fraction=0.25", "train.eval_every=0",
        f"data.train={data}", f"output.dir={tmp_path}/runs", f"output.name={algorithm}_{penalty:g}",
        f"train.counterfactual_penalty={penalty}", *extra])
    return read_metrics(run_pipeline(cfg).run_dir)


def test_dpo_trains_with_the_penalty_and_logs_the_gap(tmp_path):
    """The DPO family end to end (precomputed reference log-probs, micro-batches of copies): the
    penalty is logged and finite, and a run without it logs none."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in biased_pairs(32)))
    metrics = short_run(tmp_path, str(data), "dpo", 1.0)
    train = [m for m in metrics if "train/counterfactual_gap" in m]
    assert len(train) == 3 and all(np.isfinite(m["train/counterfactual_gap"]) for m in train)
    assert all(m["train/counterfactual_pairs"] == 8 for m in train)  # every pair mentions a group term
    assert any("eval/counterfactual_gap" in m for m in metrics)
    with pytest.raises(ConfigError, match="counterfactual_penalty applies to"):
        short_run(tmp_path, str(data), "sft", 1.0)


def train_and_measure(tmp_path, data: str, bias: str, penalty: float) -> tuple[float, dict]:
    name = f"rm_penalty_{penalty:g}"
    cfg = load_config("reward", [
        "model.path=tiny:llama", "model.lora=null", "resources.cpus_per_learner=0.5", "progress=false",
        "output.trackers=[]", "train.batch_size=16", "train.micro_batch_size=16", "train.warmup_steps=0",
        "train.scheduler=constant", "train.lr=3e-3", "train.max_steps=40", "data.val_fraction=0.2",
        f"data.train={data}", f"output.dir={tmp_path}/runs", f"output.name={name}",
        f"train.counterfactual_penalty={penalty}"])
    result = run_pipeline(cfg)
    accuracy = [m for m in read_metrics(result.run_dir) if "eval/accuracy" in m][-1]["eval/accuracy"]
    out = tmp_path / f"eval_{name}"
    assert main(["eval", "tiny:llama", "--scorer", f"{result.run_dir}/final", "--bias", bias,
                 "--out", str(out), "--no-progress"]) == 0
    return accuracy, json.loads((out / "eval.json").read_text())["bias"]["scorer"]


@pytest.mark.slow
def test_counterfactual_penalty_shrinks_the_bias_gap_at_equal_accuracy(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in biased_pairs(400)))
    bias = bias_file(tmp_path / "bias.jsonl")
    acc_plain, gaps_plain = train_and_measure(tmp_path, str(data), bias, 0.0)
    acc_fair, gaps_fair = train_and_measure(tmp_path, str(data), bias, 1.0)
    plain, fair = gaps_plain[AXIS], gaps_fair[AXIS]
    with capsys.disabled():  # the figures the README quotes
        for label, acc, gaps in (("without", acc_plain, gaps_plain), ("with", acc_fair, gaps_fair)):
            g, b = gaps[AXIS], gaps["gender"]
            print(f"\n{label} train.counterfactual_penalty: held-out accuracy {acc:.3f}; {AXIS} mean |gap| "
                  f"{g['mean_abs_gap']:.3f} [{g['mean_abs_gap_ci'][0]:.3f}, {g['mean_abs_gap_ci'][1]:.3f}] "
                  f"group means {json.dumps({k: round(v, 3) for k, v in g['group_means'].items()})}; builtin gender "
                  f"mean |gap| {b['mean_abs_gap']:.3f} [{b['mean_abs_gap_ci'][0]:.3f}, {b['mean_abs_gap_ci'][1]:.3f}]")
    assert plain["mean_abs_gap_ci"][0] > 0.5  # the plain model learned the spurious group term
    assert fair["mean_abs_gap_ci"][1] < plain["mean_abs_gap_ci"][0]  # smaller beyond both intervals
    assert abs(acc_fair - acc_plain) <= 0.03 and acc_fair >= 0.95
