"""`raylign annotate make` sampling a task on Ray rollout workers (tiny models): pairwise from one or two
models, human-vs-model, rating, active selection by reward-model uncertainty; user errors before Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylign.annotation.cli import main
from raylign.annotation.tasks import load_task
from tests.conftest import synthetic_pairs, write_jsonl

PROMPTS = [f"Tell me about {topic}." for topic in (
    "the weather", "my garden", "this book", "the city", "our team", "the music")]
FAST = ["--max-new-tokens", "12", "--cpus-per-worker", "0.5", "--batch-size", "4", "--no-progress"]


def chars(prompts, completions):
    """Reward for --select tests: the answer's length in characters (known margins)."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    pairs = synthetic_pairs(5, seed=3)
    gold = [{"prompt": "Which is kind?", "response_a": "Thank you!", "response_b": "Go away.", "gold": "a"}]
    return {"root": root,
            "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]),
            "pairs": write_jsonl(root / "pairs.jsonl", pairs), "pair_rows": pairs,
            "references": write_jsonl(root / "refs.jsonl", [{"prompt": "Say hi.", "reference": "Hello there!"},
                                                            {"prompt": "Say bye.", "completion": "Bye!", "label": False},
                                                            {"prompt": "Say yes.", "completion": "Yes, sure."}]),
            "gold": write_jsonl(root / "gold.jsonl", gold)}


def _make(*args: str) -> int:
    return main(["make", *args, *FAST])


def _items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def test_pairwise_two_samples_of_one_model_same_for_any_worker_count(ray_session, files, capsys):
    out1, out2 = files["root"] / "one.jsonl", files["root"] / "two.jsonl"
    common = ["--kind", "pairwise", "--prompts", files["prompts"], "--models", "tiny:llama", "--overlap", "3",
              "--gold", files["gold"], "--seed", "4"]
    assert _make(*common, "--workers", "2", "--out", str(out1)) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out1}" in printed and "+ 1 gold, overlap 3" in printed and "candidate(s) from 6 prompts" in printed
    task = load_task(out1)
    assert task.settings.overlap == 3 and task.settings.seed == 4
    gold = [i for i in task.items if i.is_gold]
    sampled = [i for i in task.items if not i.is_gold]
    assert len(gold) == 1 and 1 <= len(sampled) <= len(PROMPTS)
    for item in sampled:
        assert item.kind == "pairwise" and item.source_a == item.source_b == "tiny:llama"
        assert item.prompt in PROMPTS and item.response_a.strip() and item.response_b
        assert item.response_a.strip() != item.response_b.strip()
        assert item.meta is not None and item.prompt == PROMPTS[item.meta["prompt_index"]]
        assert "tiny" not in item.item_id  # ids appear in URLs: they name no model
    assert len({i.item_id for i in task.items}) == len(task.items)
    # the seed key is (seed, ANNOTATE, step, first prompt of the chunk): the worker count changes nothing
    assert _make(*common, "--workers", "1", "--out", str(out2)) == 0
    assert out2.read_bytes() == out1.read_bytes()


def test_pairwise_base_vs_other_model(ray_session, files):
    out = files["root"] / "ab.jsonl"
    assert _make("--kind", "pairwise", "--prompts", files["prompts"], "--models", "tiny:llama,tiny:qwen2",
                 "--size", "4", "--out", str(out)) == 0
    items = _items(out)
    assert 1 <= len(items) <= 4
    assert all({i["source_a"], i["source_b"]} == {"tiny:llama", "tiny:qwen2"} for i in items)
    assert {i["meta"]["prompt_index"] for i in items} <= {0, 1, 2, 3}  # --size 4: the first four prompts


def test_human_vs_model_from_pairs_and_references(ray_session, files):
    out = files["root"] / "hvm.jsonl"
    assert _make("--kind", "human-vs-model", "--pairs-or-references", files["pairs"], "--model", "tiny:llama",
                 "--out", str(out)) == 0
    items = _items(out)
    assert items and all({i["source_a"], i["source_b"]} == {"human", "model"} for i in items)
    for item in items:
        row = files["pair_rows"][item["meta"]["prompt_index"]]
        human = "a" if item["source_a"] == "human" else "b"
        assert item["prompt"] == row["prompt"] and item[f"response_{human}"] == row["chosen"]  # chosen = human's
        assert item["meta"]["model"] == "tiny:llama"
    out = files["root"] / "hvm_refs.jsonl"
    assert _make("--kind", "human-vs-model", "--pairs-or-references", files["references"], "--model", "tiny:llama",
                 "--out", str(out)) == 0
    humans = {(i["prompt"], i["response_a" if i["source_a"] == "human" else "response_b"]) for i in _items(out)}
    assert humans <= {("Say hi.", "Hello there!"), ("Say yes.", "Yes, sure.")}  # the label false row: skipped


def test_rating_one_answer_per_prompt_with_criteria(ray_session, files):
    out = files["root"] / "rating.jsonl"
    assert _make("--kind", "rating", "--prompts", files["prompts"], "--model", "tiny:llama",
                 "--criteria", "helpful,harmless,honest,natural", "--out", str(out)) == 0
    items = _items(out)
    assert items and all("response_b" not in i and i["source_a"] == "tiny:llama" for i in items)
    assert {tuple(i["criteria"]) for i in items} == {("helpful", "harmless", "honest", "natural")}


def test_uncertainty_keeps_the_smallest_margins_of_the_pool(ray_session, files, capsys):
    """A pool of 12 candidate pairs from the 6 prompts (2 each); the same seed with --size 12 keeps the whole
    pool, so the kept 4 must be the 4 smallest |len(a) - len(b)| of it."""
    spec = f"function:{__name__}:chars"
    common = ["--kind", "pairwise", "--prompts", files["prompts"], "--models", "tiny:llama", "--select",
              "uncertainty", "--reward-model", spec, "--pool", "12", "--seed", "1"]
    picked, everything = files["root"] / "picked.jsonl", files["root"] / "all.jsonl"
    assert _make(*common, "--size", "4", "--out", str(picked)) == 0
    printed = capsys.readouterr().out
    assert "kept the 4 with the smallest |margin| of 12" in printed
    assert _make(*common, "--size", "12", "--out", str(everything)) == 0
    kept, pool = _items(picked), _items(everything)
    assert len(kept) == 4 and len(pool) >= 4
    assert all(sum(i["meta"]["prompt_index"] == k for i in pool) <= 2 for k in range(6))
    assert {i["meta"]["sample"] for i in pool} <= {0, 1}
    for item in pool:
        m = item["meta"]
        assert m["selection"] == "uncertainty" and m["pool"] == 12 and m["reward_model"].endswith("chars")
        assert m["score_a"] == len(item["response_a"]) and m["score_b"] == len(item["response_b"])
        assert m["margin"] == pytest.approx(m["score_a"] - m["score_b"])
    key = lambda i: (i["prompt"], i["response_a"], i["response_b"])  # noqa: E731
    smallest = sorted(pool, key=lambda i: abs(i["meta"]["margin"]))[:4]
    assert sorted(abs(i["meta"]["margin"]) for i in kept) == sorted(abs(i["meta"]["margin"]) for i in smallest)
    assert {key(i) for i in kept} <= {key(i) for i in pool}


# ---- no Ray: every mistake is one line, before any actor starts ------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "pairwise"], "where do the answers come from? --items F"),
    (["--kind", "pairwise", "--items", "{pairs}", "--models", "tiny:llama"],
     "--items takes ready answers; --models sample new ones"),
    (["--kind", "human-vs-model", "--prompts", "{prompts}", "--model", "tiny:llama"],
     "give the prompts with their human answers as --pairs-or-references F"),
    (["--kind", "pairwise", "--pairs-or-references", "{pairs}", "--model", "tiny:llama"],
     "--pairs-or-references goes with --kind human-vs-model"),
    (["--kind", "pairwise", "--prompts", "{prompts}"], "give the model(s) that write the answers"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "a,b,c"], "--models takes one model"),
    (["--kind", "rating", "--prompts", "{prompts}", "--models", "a,b"], "--kind rating samples from one model"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:llama", "--criteria", "x"],
     "--criteria goes with --kind rating"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:llama", "--reward-model", "length"],
     "--reward-model and --pool go with --select uncertainty"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:llama", "--select", "uncertainty",
      "--size", "4"], "--select uncertainty needs --reward-model R"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:llama", "--select", "uncertainty",
      "--reward-model", "length"], "--select uncertainty needs --size K"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:llama", "--select", "uncertainty",
      "--reward-model", "length", "--size", "4", "--pool", "2"], "--pool (2) must be at least --size (4)"),
    (["--kind", "rating", "--prompts", "{prompts}", "--model", "tiny:llama", "--select", "uncertainty",
      "--reward-model", "length", "--size", "4"], "use it with --kind pairwise or human-vs-model"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:llama", "--temperature", "0"],
     "--temperature must be > 0"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:llama", "--top-p", "2"],
     "invalid sampling settings: top_p"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:nope"], "unknown model 'tiny:nope'"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:llama", "--select", "uncertainty",
      "--reward-model", "lexicon:nope", "--size", "2"], "unknown lexicon 'lexicon:nope'"),
    (["--kind", "pairwise", "--prompts", "{root}/missing.jsonl", "--models", "tiny:llama"], "missing.jsonl"),
    (["--kind", "pairwise", "--prompts", "{prompts}", "--models", "tiny:llama", "--gold", "{pairs}"],
     "row(s) of the --gold file have no known answer in field 'gold'"),
    (["--kind", "human-vs-model", "--pairs-or-references", "{prompts}", "--model", "tiny:llama"],
     "no human answer: give 'chosen'"),
])
def test_make_mistakes_are_one_line(files, tmp_path, capsys, args, message):
    values = {k: v for k, v in files.items() if isinstance(v, str | Path)}
    argv = [a.format(**values) for a in args]
    assert main(["make", *argv, "--out", str(tmp_path / "t.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err, err
    assert not (tmp_path / "t.jsonl").exists()
