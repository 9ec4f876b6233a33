"""A reward model trained (raylign's real reward training) to prefer a planted word is explained:
the word gets the largest attribution in most chosen answers, and deleting the top-attributed tokens
lowers the score more than deleting random ones, beyond the bootstrap interval. Then the same run
through the command line: `raylign explain RUN` and `raylign eval RUN --explain N`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from raylign.config import load_config
from raylign.evaluation import explain as E
from raylign.pipelines import run_pipeline
from tests.conftest import write_jsonl

pytest.importorskip("captum", reason="captum is not installed: pip install 'raylign[explain]' -c constraints-cpu.txt")
pytestmark = pytest.mark.usefixtures("ray_session")

PLANTED = "zebra"
FILLERS = ["really", "still", "just", "very"]  # the rejected side gets one too: length tells nothing
TOPICS = ["the weather", "my garden", "this book", "the city", "our team", "the music", "dinner", "the trip"]
ADJECTIVES = ["green", "quiet", "old", "small", "busy", "open", "long", "warm"]


def planted_pairs(n: int, seed: int) -> list[dict]:
    """Both answers are neutral sentences with one inserted word; the chosen one's is always PLANTED."""
    rng = random.Random(seed)

    def sentence(extra: str) -> str:
        words = f"I think {rng.choice(TOPICS)} is {rng.choice(ADJECTIVES)}.".split()
        words.insert(rng.randrange(1, len(words)), extra)  # never at the end: the word stays apart from "."
        return " ".join(words)

    return [{"prompt": f"Tell me about {rng.choice(TOPICS)}.", "chosen": sentence(PLANTED),
             "rejected": sentence(rng.choice(FILLERS))} for _ in range(n)]


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two contended ones; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, ray_session):
    d = tmp_path_factory.mktemp("planted")
    data = write_jsonl(d / "train.jsonl", planted_pairs(240, seed=0))
    cfg = load_config("reward", ["model.path=tiny:llama", "model.lora=null", "resources.cpus_per_learner=0.5",
                                 "progress=false", "output.trackers=[]", "train.batch_size=16",
                                 "train.micro_batch_size=16", "train.warmup_steps=0", "train.scheduler=constant",
                                 "data.val_fraction=0.1", "train.lr=3e-3", "train.max_steps=24",
                                 "train.eval_every=24", f"data.train={data}", f"output.dir={d}/runs",
                                 "output.name=planted"])
    result = run_pipeline(cfg)
    held_out = write_jsonl(d / "held_out.jsonl", planted_pairs(10, seed=99))
    return Path(result.run_dir), held_out, d


def test_planted_word_gets_the_largest_attribution_and_deletion_beats_random(planted_run, one_thread):
    run, held_out, _ = planted_run
    rows = [json.loads(line) for line in Path(held_out).read_text().splitlines()]
    target = E.load_target(E.resolve_target(str(run)), max_length=128, max_prompt_length=64)
    assert target.kind == "reward"
    exs = E.explain_items(target, E.pair_items(rows), random_draws=10, progress=False, steps=32, max_steps=128,
                          internal_batch_size=128)
    chosen = [e for e in exs if e.meta["side"] == "chosen"]
    assert sum(e.score > r.score for e, r in zip(exs[::2], exs[1::2], strict=True)) >= 9  # it learned the word

    def top_word(e: E.Explanation) -> str:
        words = [w for w in e.words() if w["response"] and not w["special"] and not w["blank"]]
        return max(words, key=lambda w: w["attribution"])["text"].strip()

    tops = [top_word(e) for e in chosen]
    assert sum(t == PLANTED for t in tops) >= 0.8 * len(chosen), tops
    summary = E.summarize(exs, n_boot=1000)
    # The convergence delta is reported per text (tiny Llama's pad embedding is the zero vector, where
    # RMSNorm makes the path steep: the delta is reported, not bounded, here; the MiniLM test bounds it).
    print("completeness", summary["completeness"])
    assert all(np.isfinite(e.delta) and e.steps in (32, 64, 128) for e in exs)
    d = summary["deletion"]
    print("deletion", {k: v for k, v in d.items() if not k.startswith("curve")})
    assert d["beats_random"] and d["ci_low"] > 0, d
    assert d["aopc_top"] > d["aopc_random"]


def test_explain_and_eval_explain_commands_on_the_run(planted_run, one_thread):
    from raylign.cli import main

    run, held_out, d = planted_run
    out = d / "explain"
    assert main(["explain", str(run), "--pairs", held_out, "--out", str(out), "--limit", "4", "--steps", "32",
                 "--max-steps", "64", "--no-progress"]) == 0
    saved = json.loads((out / "explain.json").read_text())
    assert saved["summary"]["kind"] == "reward" and saved["summary"]["texts"] == 8
    assert saved["summary"]["top_words"][0]["word"] == PLANTED
    html = (out / "attributions.html").read_text()
    assert html.count('class="card"') == 4 and "margin" in html
    assert "| `zebra` |" in (out / "report.md").read_text()

    ev = d / "eval"
    assert main(["eval", str(run), "--pairs", held_out, "--scorer", str(run / "final"), "--explain", "2",
                 "--out", str(ev), "--no-progress"]) == 0
    result = json.loads((ev / "eval.json").read_text())
    assert len(result["explain"]["pairs"]) == 2 and "_margins" not in result["pairs"]
    explained = json.loads((ev / "explain" / "explain.json").read_text())["explanations"]
    picked = [e["meta"]["margin"] for e in explained[::2]]
    assert abs(picked[0]) >= abs(picked[1])  # the largest |margin| first
    assert "## Explanations" in (ev / "report.md").read_text()
