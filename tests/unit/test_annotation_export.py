"""`annotate export`: current judgments as pairs / unpaired / ratings / judgments files raylign reads."""

from __future__ import annotations

import json

import pytest

from raylign.annotation.cli import main
from raylign.annotation.errors import AnnotationError
from raylign.annotation.export import export
from raylign.annotation.store import Store
from raylign.annotation.tasks import Task, TaskItem, TaskSettings
from raylign.data import load_dataset


def _pair(item_id: str, **kw) -> TaskItem:
    return TaskItem(item_id=item_id, kind="pairwise", prompt=f"Question {item_id}?", response_a=f"A of {item_id}",
                    response_b=f"B of {item_id}", source_a="policy", source_b="reference", **kw)


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    items = [
        _pair("win-a", meta={"category": "food"}),  # a, a, b -> a wins 2/3
        _pair("win-b"),                              # b, b, skip -> b wins 2/2
        _pair("tied"),                               # tie, tie, a -> majority tie: no pair
        _pair("split"),                              # a, b -> split: no pair
        _pair("skipped"),                            # skip only
        _pair("unjudged"),
        _pair("gold", gold="a"),                     # attention check: left out by default
        TaskItem(item_id="chat", kind="human-vs-model", prompt=[{"role": "user", "content": "Hi"}],
                 response_a="Hello!", response_b="hi", source_a="model", source_b="human"),
        TaskItem(item_id="r1", kind="rating", prompt="Rate it", response_a="A text.", criteria=["helpful", "kind"]),
    ]
    store.load_task(Task(TaskSettings(overlap=5), items, "t"))
    ann = [store.add_annotator(n)[0] for n in ("ann", "bob", "cy")]
    votes = {"win-a": ["a", "a", "b"], "win-b": ["b", "b", "skip"], "tied": ["tie", "tie", "a"],
             "split": ["a", "b", None], "skipped": ["skip", None, None], "gold": ["a", "a", "b"],
             "chat": ["a", "a", "a"]}
    for item_id, choices in votes.items():
        for a, choice in zip(ann, choices, strict=True):
            if choice is not None:
                store.record(a, item_id, choice=choice, strength=2 if choice in ("a", "b") else None,
                             written_by="b" if item_id == "chat" and a is ann[1] else None)
    store.record(ann[0], "win-a", choice="b")  # ...
    store.record(ann[0], "win-a", choice="a", strength=3)  # ... corrected back: only the latest counts
    for a, (h, k) in zip(ann, [(6, 7), (6, 5), (2, 7)], strict=True):
        store.record(a, "r1", ratings={"helpful": h, "kind": k})
    return store


def test_pairs_majority(store, tmp_path):
    out = tmp_path / "pairs.jsonl"
    summary = export(store, "pairs", str(out))
    assert summary["dropped"] == {"tie": 1, "split": 1, "only_skips": 1, "unjudged": 1}
    rows = {r["item_id"]: r for r in load_dataset(str(out), "pairs").to_pylist()}
    assert set(rows) == {"win-a", "win-b", "chat"}  # gold left out
    a = rows["win-a"]
    assert (a["chosen"], a["rejected"]) == ("A of win-a", "B of win-a")
    assert a["annotators"] == ["ann", "bob"] and a["agreement"] == pytest.approx(2 / 3)
    assert a["votes"] == {"a": 2, "b": 1, "tie": 0} and a["n_judgments"] == 3 and a["strength"] == 2.5
    assert (a["source_chosen"], a["source_rejected"]) == ("policy", "reference") and a["meta"] == {"category": "food"}
    b = rows["win-b"]
    assert b["chosen"] == "B of win-b" and b["agreement"] == 1.0 and b["n_judgments"] == 2
    chat = rows["chat"]
    assert chat["prompt"] == [{"role": "user", "content": "Hi"}] and chat["source_chosen"] == "model"
    assert chat["item_kind"] == "human-vs-model"
    with_gold = export(store, "pairs", str(tmp_path / "g.jsonl"), include_gold=True)
    assert with_gold["rows"] == 4


def test_pairs_all_and_unpaired(store, tmp_path):
    out = tmp_path / "all.jsonl"
    summary = export(store, "pairs", str(out), aggregate="all")
    rows = load_dataset(str(out), "pairs").to_pylist()
    # win-a 3, win-b 2, tied 1 (the a), split 2, chat 3; tie judgments give none
    assert len(rows) == summary["rows"] == 11 and summary["dropped"]["tie_judgments"] == 2
    split = [r for r in rows if r["item_id"] == "split"]
    assert sorted(r["chosen"] for r in split) == ["A of split", "B of split"]
    assert all(r["agreement"] == 0.5 and len(r["annotators"]) == 1 for r in split)
    unpaired = tmp_path / "kto.jsonl"
    export(store, "unpaired", str(unpaired))
    table = load_dataset(str(unpaired), "unpaired").to_pylist()
    assert len(table) == 6 and [r["label"] for r in table[:2]] == [True, False]
    assert table[0]["completion"] == "A of win-a" and table[0]["annotators"] == ["ann", "bob"]


def test_ratings(store, tmp_path):
    out = tmp_path / "ratings.jsonl"
    export(store, "ratings", str(out))
    rows = load_dataset(str(out), "ratings").to_pylist()
    by = {r["criterion"]: r for r in rows}
    assert by["helpful"]["rating"] == 6.0 and by["helpful"]["agreement"] == pytest.approx(2 / 3)
    assert by["kind"]["rating"] == 7.0 and by["kind"]["completion"] == "A text." and by["kind"]["prompt"] == "Rate it"
    one = tmp_path / "helpful.jsonl"
    export(store, "ratings", str(one), aggregate="all", criterion="helpful")
    assert sorted(r["rating"] for r in load_dataset(str(one), "ratings").to_pylist()) == [2.0, 6.0, 6.0]
    with pytest.raises(AnnotationError, match="no rating item has criterion 'honest'"):
        export(store, "ratings", str(one), criterion="honest")


def test_judgments_rows(store, tmp_path):
    out = tmp_path / "judgments.jsonl"
    export(store, "judgments", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(store.current_judgments()) == 21
    first = next(r for r in rows if r["item_id"] == "win-a" and r["annotator"] == "ann")
    assert first["choice"] == "a" and first["strength"] == 3 and first["shown_left"] in ("a", "b")
    assert {"item_id", "annotator", "choice", "strength", "ratings", "shown_left", "written_by", "time"} <= set(first)
    chat = {r["annotator"]: r["written_by"] for r in rows if r["item_id"] == "chat"}
    assert chat == {"ann": None, "bob": "b", "cy": None}
    assert any(r["gold"] for r in rows) and any(r["ratings"] == {"helpful": 6, "kind": 7} for r in rows)


def test_nothing_to_export_is_one_message(tmp_path, capsys):
    store = Store(tmp_path / "empty.sqlite")
    store.load_task(Task(TaskSettings(), [_pair("x")], "t"))
    out = tmp_path / "none.jsonl"
    assert main(["export", str(tmp_path / "empty.sqlite"), "--kind", "pairs", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nothing to export as pairs" in err and "1 unjudged" in err and not out.exists()
    assert main(["export", str(tmp_path / "missing.sqlite"), "--kind", "pairs", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
