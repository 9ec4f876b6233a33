"""`raylign data annotate` / run_annotate: tiny:llama samples on Ray actors, VADER picks the pairs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from raylign.cli import main
from raylign.data import load_dataset
from raylign.pipelines.annotate import best_worst_pair, run_annotate, write_jsonl_atomic
from raylign.pipelines.annotate_settings import AnnotateSettings
from tests.conftest import write_jsonl

PROMPTS = [f"Tell me about {topic}." for topic in (
    "the weather", "my garden", "this book", "the city", "our team", "the music", "dinner", "the trip",
    "my job", "the movie", "the park", "breakfast")]
# 32 new tokens: enough random text that VADER finds rated words in several samples.
FAST = {"model": "tiny:llama", "annotator": "lexicon:vader", "n": 3, "max_new_tokens": 32,
        "cpus_per_worker": 0.5, "batch_size": 4, "progress": False}


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("annotate") / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


@pytest.fixture(scope="module")
def annotated(ray_session, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("annotate") / "out" / "pairs.jsonl"  # parent is created
    console = _quiet()
    summary = run_annotate(AnnotateSettings(prompts=prompts_file, out=str(out), seed=0, workers=2, **FAST), console=console)
    return out, summary, console.file.getvalue()


def test_pairs_are_valid_best_vs_worst(annotated):
    out, summary, printed = annotated
    table = load_dataset(str(out), "pairs")
    rows = table.to_pylist()
    assert summary["pairs"] == len(rows) >= 1
    assert summary["pairs"] + summary["ties"] + summary["empty"] == summary["prompts"] == len(PROMPTS)
    assert summary["samples"] == 3 * len(PROMPTS) and summary["samples_per_second"] > 0
    assert set(table.column_names) == {"prompt", "chosen", "rejected", "margin", "chosen_score", "rejected_score"}
    for row in rows:
        assert row["prompt"] in PROMPTS
        assert row["chosen_score"] > row["rejected_score"]  # all-tied prompts were skipped
        assert row["margin"] == row["chosen_score"] - row["rejected_score"]
        assert -1.0 <= row["rejected_score"] < row["chosen_score"] <= 1.0
    assert summary["mean_margin"] == pytest.approx(sum(r["margin"] for r in rows) / len(rows))
    assert not Path(str(out) + ".tmp").exists()
    assert f"{summary['pairs']} pairs" in printed and "ties skipped" in printed and "samples/s" in printed


def test_same_seed_same_file_whatever_the_worker_count(annotated, prompts_file, tmp_path):
    out, _, _ = annotated
    again = tmp_path / "again.jsonl"
    run_annotate(AnnotateSettings(prompts=prompts_file, out=str(again), seed=0, workers=1, **FAST), console=_quiet())
    assert again.read_bytes() == out.read_bytes()


def test_cli_all_ties_writes_nothing(ray_session, prompts_file, tmp_path, monkeypatch, capsys):
    """An annotator that scores everything alike gives no pairs: a one-line error, `out` left as it was."""
    (tmp_path / "flat_annotator.py").write_text("def zero(prompts, completions):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "pairs.jsonl"
    out.write_text("previous contents\n")
    rc = main(["data", "annotate", "--prompts", prompts_file, "--model", "tiny:llama", "--annotator",
               "flat_annotator:zero", "--out", str(out), "--n", "2", "--limit", "4", "--max-new-tokens", "4",
               "--cpus-per-worker", "0.5", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "gave no pairs (4 ties" in err and "nothing was written" in err and "Traceback" not in err
    assert out.read_text() == "previous contents\n"
    assert not (tmp_path / "pairs.jsonl.tmp").exists()


def test_min_margin_keeps_only_clearly_separated_pairs(ray_session, prompts_file, tmp_path):
    """A user function whose margins are known: index i scores i, so best-vs-worst margin = n - 1."""
    (tmp_path / "ramp_annotator.py").write_text(
        "def ramp(prompts, completions):\n    return [float(i % 3) for i in range(len(completions))]\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        common = dict(FAST, annotator="ramp_annotator:ramp", n=3, max_new_tokens=4)
        summary = run_annotate(AnnotateSettings(prompts=prompts_file, out=str(tmp_path / "a.jsonl"), min_margin=2.0,
                                                **common), console=_quiet())
        assert summary["pairs"] >= 1 and summary["below_margin"] == summary["ties"] == 0
        assert summary["pairs"] + summary["empty"] == len(PROMPTS)
        from raylign.data import DataError

        with pytest.raises(DataError, match=f"{summary['pairs']} below --min-margin"):
            run_annotate(AnnotateSettings(prompts=prompts_file, out=str(tmp_path / "b.jsonl"), min_margin=2.5,
                                          **common), console=_quiet())
        assert not (tmp_path / "b.jsonl").exists()
    finally:
        sys.path.remove(str(tmp_path))


# ---- no Ray needed: argument and spec errors fail before any actor starts -------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--annotator", "lexicon:nope"], "unknown lexicon 'lexicon:nope'"),
        (["--annotator", "vader"], "Did you mean 'lexicon:vader'"),
        (["--annotator", "lexicon:vader", "--n", "1"], "--n must be at least 2"),
        (["--annotator", "lexicon:vader", "--temperature", "0"], "--temperature must be > 0"),
        (["--annotator", "lexicon:vader", "--model", "tiny:nope"], "unknown model 'tiny:nope'"),
    ],
)
def test_cli_user_errors_are_one_line(prompts_file, tmp_path, capsys, extra, message):
    args = ["data", "annotate", "--prompts", prompts_file, "--model", "tiny:llama",
            "--out", str(tmp_path / "pairs.jsonl"), *extra]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "pairs.jsonl").exists()


def test_cli_data_validate_still_works(prompts_file, capsys):
    assert main(["data", "validate", prompts_file, "--kind", "prompts"]) == 0
    assert "valid:" in capsys.readouterr().out


def test_best_worst_pair_rules():
    row, why = best_worst_pair("p", ["a", "b", "c"], [0.5, 0.9, 0.1])
    assert why is None and (row["chosen"], row["rejected"]) == ("b", "c")
    assert row["margin"] == row["chosen_score"] - row["rejected_score"] and row["chosen_score"] == 0.9
    assert best_worst_pair("p", ["a", "b"], [0.3, 0.3]) == (None, "tie")
    assert best_worst_pair("p", ["a", "", "  "], [0.1, 0.9, 0.5]) == (None, "empty")
    row, _ = best_worst_pair("p", ["", "a", "b"], [9.0, 0.2, 0.1])  # empty answers never compete
    assert (row["chosen"], row["rejected"]) == ("a", "b")


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    out = tmp_path / "pairs.jsonl"
    out.write_text("old\n")
    with pytest.raises(TypeError):
        write_jsonl_atomic([{"prompt": "ok"}, {"prompt": object()}], out)
    assert out.read_text() == "old\n" and not (tmp_path / "pairs.jsonl.tmp").exists()
    write_jsonl_atomic([{"prompt": "é"}], out)
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [{"prompt": "é"}]
