"""Counterfactual swaps and `raylign data augment`."""

from __future__ import annotations

import json

import pytest

from raylign.cli import main
from raylign.data import DataError, load_dataset
from raylign.data.augment import augment_file
from raylign.data.counterfactual import BiasSet, counterfactual_copies, load_bias_sets, row_swaps, select_axes

GENDER = BiasSet("gender", {"woman": "a woman", "man": "a man", "non-binary": "a non-binary person"})


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_swap_is_a_transposition_of_whole_phrases_keeping_capitals():
    assert GENDER.mentioned("A man met a woman; a manager too.") == ["man", "woman"]
    assert GENDER.swap("A man met a woman; a manager too.", "man", "woman") == "A woman met a man; a manager too."
    assert GENDER.swap("a man", "man", "non-binary") == "a non-binary person"
    assert GENDER.swap("Shaman a mankind", "man", "woman") == "Shaman a mankind"  # no whole-phrase match
    assert GENDER.mentioned("nothing to see") == []


def test_row_copies_cover_every_other_group_in_every_field():
    row = {"prompt": [{"role": "system", "content": "a man"}, {"role": "user", "content": "hi"}],
           "chosen": "Yes, a man.", "rejected": "no", "label": 1}
    copies = counterfactual_copies(row, ["prompt", "chosen", "rejected"], [GENDER])
    assert [s.describe() for s, _ in copies] == ["gender:man->non-binary", "gender:man->woman"]
    swapped = copies[1][1]
    assert swapped["prompt"] == [{"role": "system", "content": "a woman"}, {"role": "user", "content": "hi"}]
    assert swapped["chosen"] == "Yes, a woman." and swapped["label"] == 1
    assert row["chosen"] == "Yes, a man."  # the original is not touched
    assert [s.target for s in row_swaps(row, ["chosen"], [GENDER], max_per_axis=1)] == ["non-binary"]


def test_builtin_terms_are_shared_with_eval_bias():
    from raylign.evaluation import bias

    assert bias.load_bias_sets is load_bias_sets
    sets = load_bias_sets()
    assert [s.axis for s in sets] == ["gender", "names", "nationality", "religion", "age"]
    assert select_axes(sets, ["age"])[0].groups["75"] == "someone aged 75"
    with pytest.raises(DataError, match="unknown bias axis"):
        select_axes(sets, ["height"])


def test_augment_pairs_keep_their_label_and_validate(tmp_path):
    src = write(tmp_path / "p.jsonl", [
        {"prompt": "My doctor is a woman.", "chosen": "A woman can be a great doctor.", "rejected": "Hm.", "margin": 2.0},
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    ])
    out = tmp_path / "aug.jsonl"
    summary = augment_file(src, str(out), "builtin", progress=False)
    assert summary["kind"] == "pairs" and summary["copies"] == 2 and summary["rows_mentioning"] == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and rows[3]["prompt"] == "What is 2+2?"
    assert rows[1] == {"prompt": "My doctor is a man.", "chosen": "A man can be a great doctor.", "rejected": "Hm.",
                       "margin": 2.0, "counterfactual": "gender:woman->man", "counterfactual_of": 0}
    table = load_dataset(str(out), "pairs")
    assert table.num_rows == 4


def test_augment_unpaired_ratings_user_axes_and_cli(tmp_path, capsys):
    axes = write(tmp_path / "axes.jsonl", [{"axis": "pet", "groups": {"cat": "my cat", "dog": "my dog"}}])
    src = write(tmp_path / "u.jsonl", [{"prompt": "About my cat", "completion": "my cat sleeps", "label": False}])
    out = tmp_path / "u_aug.jsonl"
    assert main(["data", "augment", src, "--counterfactual", axes, "--axes", "pet", "--out", str(out),
                 "--no-progress"]) == 0
    assert "1 counterfactual copies added (pet 1)" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1]["prompt"] == "About my dog" and rows[1]["completion"] == "my dog sleeps" and rows[1]["label"] is False
    ratings = write(tmp_path / "r.jsonl", [{"text": "Someone aged 75 wrote this.", "rating": 3.5}])
    summary = augment_file(ratings, str(tmp_path / "r_aug.jsonl"), axes=["age"], progress=False)
    assert summary["copies"] == 2
    assert [json.loads(x)["rating"] for x in (tmp_path / "r_aug.jsonl").read_text().splitlines()] == [3.5] * 3
    assert main(["data", "augment", src, "--counterfactual", "builtin", "--out", str(tmp_path / "x.csv")]) == 2
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "a man", "chosen": 1, "rejected": "x"}])
    with pytest.raises(DataError, match="field 'chosen'"):
        augment_file(bad, str(tmp_path / "b.jsonl"), progress=False)
    assert not (tmp_path / "b.jsonl").exists()
