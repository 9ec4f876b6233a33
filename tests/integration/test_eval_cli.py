"""`raylign eval` and `raylign report` end to end on tiny models."""

from __future__ import annotations

import json
import random

import pytest

from raylign.cli import main
from tests.conftest import write_jsonl

pytestmark = pytest.mark.ray


def _separable_pairs(n: int) -> list[dict]:
    """Chosen is clearly better by the scorer used below: a full sentence against a one-word answer."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        topic = rng.choice(["tea", "rain", "maths", "music", "trains"])
        rows.append({"prompt": f"Tell me about {topic}.",
                     "chosen": f"{topic.capitalize()} is something many people enjoy for good reasons, number {i}.",
                     "rejected": "no",
                     "category": "short" if i % 2 else "long"})
    return rows


def test_eval_on_separable_pairs_reports_near_one_with_interval_and_plots(tmp_path, ray_session, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _separable_pairs(40))
    out = tmp_path / "eval"
    rc = main(["eval", "tiny:llama", "--pairs", pairs, "--scorer", "length", "--bias", "builtin",
               "--prompts", "builtin:everyday-prompts", "--limit", "24", "--max-new-tokens", "4",
               "--actors", "2", "--cpus-per-actor", "0.25", "--batch-size", "8", "--reference", "tiny:llama",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    p = result["pairs"]
    assert p["agreement"] >= 0.99 and p["n"] == 24
    assert p["ci_low"] <= p["agreement"] <= p["ci_high"]
    assert set(p["per_category"]) == {"short", "long"}
    # `length` does not see the group term except through its own length: small, finite gaps per axis
    assert set(result["bias"]["scorer"]) == {"gender", "names", "nationality", "religion", "age"}
    g = result["generation"]
    assert g["prompts"] == 24 and 1 <= g["actors"] <= 2 and g["generations_per_second"] > 0
    assert abs(g["kl"]["kl"]) < 1e-3  # the reference is the model itself
    assert 0 <= g["win_rate"]["win_rate"] <= 1
    assert 0 < g["diversity"]["distinct_1"] <= 1
    report = (out / "report.md").read_text()
    for png in ("agreement.png", "bias_scorer.png", "bias_loglik.png", "lengths.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    assert "agreement" in capsys.readouterr().out


def test_eval_loglik_mean_ties_identical_answers_and_reads_a_run_dir(tmp_path, ray_session):
    rows = [{"prompt": "Hi", "chosen": "hello there", "rejected": "hello there"}] * 5
    out = tmp_path / "eval"
    assert main(["eval", "tiny:llama", "--pairs", write_jsonl(tmp_path / "p.jsonl", rows),
                 "--out", str(out), "--no-progress"]) == 0
    p = json.loads((out / "eval.json").read_text())["pairs"]
    assert p["agreement"] == 0.5 and p["ties"] == 5  # the same text scores the same: ties count half


def test_eval_user_errors_are_one_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b"}])
    assert main(["eval", "tiny:llama", "--pairs", bad, "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert main(["eval", "tiny:llama", "--pairs", good, "--scorer", "loglik-man", "--out", str(tmp_path / "o")]) == 2
    assert "Did you mean 'loglik-mean'" in capsys.readouterr().err
    bias = tmp_path / "bias.jsonl"
    bias.write_text('{"axis": "x", "groups": {"a": "A"}}\n')
    assert main(["eval", "tiny:llama", "--bias", str(bias), "--out", str(tmp_path / "o")]) == 2
    assert f"{bias}:1" in capsys.readouterr().err
    assert main(["eval", "tiny:llama", "--out", str(tmp_path / "o")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_report_on_a_finished_tiny_run_writes_plots(tmp_path, capsys):
    from raylign.config import load_config
    from raylign.rundir import RunDir

    cfg = load_config("grpo", [f"output.dir={tmp_path}", "output.name=run", "output.trackers=[]"])
    run = RunDir(cfg)
    for step in range(1, 6):  # the keys the online/adversarial loops log
        run.log_metrics(step, {"reward/mean": 0.1 * step, "reward/lexicon:vader": 0.2 * step, "reward/length": -step,
                               "kl/seq_mean": 0.05 * step, "policy/loss": 1.0 / step, "response/length_mean": 10 + step,
                               "discriminator/accuracy_human": 0.9, "discriminator/accuracy_policy": 0.8 - 0.1 * step,
                               "discriminator/fool_rate": 0.2 + 0.1 * step})
    run.close()
    assert main(["report", str(run.path)]) == 0
    report = (run.path / "report" / "report.md").read_text()
    for stem in ("reward", "reward_sources", "kl", "loss", "lengths", "discriminator"):
        assert (run.path / "report" / f"{stem}.png").stat().st_size > 1000
        assert f"({stem}.png)" in report
    assert "`discriminator/fool_rate` | 0.3 | 0.7 |" in report
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
