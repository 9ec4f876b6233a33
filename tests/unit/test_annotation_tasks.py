"""TASK.jsonl: reading it with file:line errors, and `annotate make` from ready answers."""

from __future__ import annotations

import json

import pytest

from raylign.annotation.cli import main
from raylign.annotation.errors import TaskError
from raylign.annotation.tasks import load_task, make_items
from tests.conftest import write_jsonl


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_load_task_reads_header_and_every_kind(tmp_path):
    path = _write(tmp_path / "task.jsonl", [
        {"raylign_task": 1, "overlap": 3, "seed": 7, "instructions": "Pick the kinder answer."},
        {"item_id": "c1", "kind": "pairwise", "prompt": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hi?"}],
         "response_a": "Hello.", "response_b": "Hey!", "source_a": "m1", "source_b": "m2", "meta": {"topic": "x"}},
        {"item_id": "h1", "kind": "human-vs-model", "prompt": "Say hi", "response_a": "hi", "response_b": "hello",
         "source_a": "model", "source_b": "human", "gold": "tie"},
        {"item_id": "r1", "kind": "rating", "response_a": "A text rated on its own."},
    ])
    task = load_task(path)
    assert (task.settings.overlap, task.settings.seed) == (3, 7)
    assert task.settings.instructions == "Pick the kinder answer."
    c1, h1, r1 = task.items
    assert [t.role for t in c1.prompt] == ["system", "user"] and c1.meta == {"topic": "x"}
    assert h1.is_gold and h1.human_side() == "b" and not c1.is_gold
    assert r1.criteria == ["overall"] and r1.prompt is None and r1.response_b is None


def test_task_without_header_gets_defaults(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"item_id": "a", "kind": "pairwise", "prompt": "p", "response_a": "x",
                                          "response_b": "y"}])
    task = load_task(path)
    assert task.settings.overlap == 1 and task.settings.seed == 0 and len(task.items) == 1


def test_every_problem_is_listed_with_its_line(tmp_path):
    good = {"item_id": "ok", "kind": "pairwise", "prompt": "p", "response_a": "x", "response_b": "y"}
    path = _write(tmp_path / "bad.jsonl", [
        good,
        "{not json",
        {**good, "item_id": "two", "respons_b": "typo"},
        {**good, "item_id": "three", "response_b": "  "},
        {**good, "item_id": "ok"},
        {**good, "item_id": "hv", "kind": "human-vs-model", "source_a": "m", "source_b": "m2"},
        {**good, "item_id": "bad id!"},
        {"item_id": "r", "kind": "rating", "response_a": "t", "gold": {"nope": 3}},
        {"raylign_task": 1, "overlap": 2},
    ])
    with pytest.raises(TaskError) as err:
        load_task(path)
    message = str(err.value)
    for expected in (f"{path}:2: not a JSON line", f"{path}:3: field 'respons_b': unknown field",
                     f"{path}:4: field 'response_b': a pairwise item needs", "item_id 'ok' is already used at", f"{path}:6:",
                     "exactly one of them must be \"human\"", f"{path}:7: field 'item_id'", f"{path}:8: field 'gold'",
                     f"{path}:9: the header"):
        assert expected in message, (expected, message)


def test_missing_task_file_says_how_to_make_one(tmp_path):
    with pytest.raises(TaskError, match="raylign annotate make"):
        load_task(tmp_path / "nope.jsonl")


def test_make_from_a_pairs_file_with_gold(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Tell me about dinner.", "chosen": "Dinner is lovely.", "rejected": "Dinner is awful.",
         "category": "food"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."},
    ])
    gold = write_jsonl(tmp_path / "gold.jsonl", [
        {"prompt": "Is 2+2 4?", "response_a": "Yes.", "response_b": "No, 5.", "gold": "a"}])
    out = tmp_path / "task.jsonl"
    assert main(["make", "--items", pairs, "--kind", "pairwise", "--overlap", "3", "--gold", gold,
                 "--out", str(out)]) == 0
    task = load_task(out)
    assert task.settings.overlap == 3
    first, second, check = task.items
    assert (first.response_a, first.response_b) == ("Dinner is lovely.", "Dinner is awful.")
    assert (first.source_a, first.source_b) == ("chosen", "rejected") and first.meta == {"category": "food"}
    assert second.prompt[0].content == "Hi"
    assert check.is_gold and check.gold == "a" and check.item_id.startswith("pairwise-")
    assert len({i.item_id for i in task.items}) == 3


def test_make_human_vs_model_and_rating_shapes(tmp_path):
    hv = write_jsonl(tmp_path / "hv.jsonl", [{"prompt": "Say hi", "human": "hi there", "model": "hello",
                                             "model_name": "policy"}])
    (item,) = make_items(hv, "human-vs-model")
    assert (item.source_a, item.source_b, item.human_side()) == ("human", "policy", "a")
    ratings = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "completion": "c"}, {"text": "just text"}])
    a, b = make_items(ratings, "rating", criteria=["helpful", "harmless"])
    assert a.response_a == "c" and a.criteria == ["helpful", "harmless"]
    assert b.prompt is None and b.response_a == "just text"


def test_make_errors_are_one_message(tmp_path, capsys):
    items = write_jsonl(tmp_path / "i.jsonl", [{"prompt": "p", "response_a": "x", "response_b": "y"}])
    gold = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "response_a": "x", "response_b": "y"}])
    out = tmp_path / "task.jsonl"
    assert main(["make", "--items", items, "--kind", "pairwise", "--gold", gold, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs its known answer in field 'gold'" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["make", "--items", items, "--kind", "pairwise", "--criteria", "x", "--out", str(out)]) == 2
    assert "--criteria goes with --kind rating" in capsys.readouterr().err
    assert main(["make", "--items", items, "--kind", "pairwise", "--overlap", "0", "--out", str(out)]) == 2
    assert "--overlap" in capsys.readouterr().err
    assert main(["make", "--items", str(tmp_path / "missing.jsonl"), "--kind", "pairwise", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_importing_the_commands_is_light():
    """`raylign --help` imports the annotate parser: it must not pull in the web stack, torch or Ray."""
    import subprocess
    import sys

    code = ("import sys, raylign.annotation.cli as c, argparse; p = argparse.ArgumentParser(); "
            "c.add_annotate_parser(p.add_subparsers()); "
            "print(sorted({'fastapi', 'uvicorn', 'jinja2', 'torch', 'ray', 'pyarrow', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_raylign_command_runs_annotate(tmp_path, capsys):
    import argparse

    from raylign import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "annotate" not in sub.choices:
        pytest.skip("raylign/cli.py does not add the annotate commands yet (add_annotate_parser(sub) in build_parser)")
    items = write_jsonl(tmp_path / "i.jsonl", [{"prompt": "p", "response_a": "x", "response_b": "y"}])
    assert cli.main(["annotate", "make", "--items", items, "--kind", "pairwise", "--out", str(tmp_path / "t.jsonl")]) == 0
    assert cli.main(["annotate", "export", str(tmp_path / "none.sqlite"), "--kind", "pairs", "--out",
                     str(tmp_path / "p.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
