"""Explanations (raylign.evaluation.explain): IG completeness on tiny models, the deletion/AOPC math
on hand cases, word grouping, target resolution, and HTML escaping of markup-carrying tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raylign.config import ConfigError
from raylign.evaluation import explain as E

pytest.importorskip("captum", reason="captum is not installed: pip install 'raylign[explain]' -c constraints-cpu.txt")

PROMPT = "Tell me about the park."
COMPLETION = "I think the park is lovely today."


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two contended ones; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- pure pieces ------------------------------------------------------------------------------


def test_baseline_replaces_all_but_special_tokens_by_pad():
    assert E.baseline_ids([1, 7, 8, 2, 9], special_ids={1, 2, 0}, pad_id=0) == [1, 0, 0, 2, 0]


def test_group_words_joins_pieces_up_to_white_space_and_splits_at_special_tokens():
    pieces = ["<s>", "Hello", " wor", "ld", "!", " ", "ok", "</s>", "\n"]
    special = [True, False, False, False, False, False, False, True, False]
    assert E.group_words(pieces, special) == [[0], [1], [2, 3, 4], [5], [6], [7], [8]]


def test_deletion_helpers_on_a_hand_case():
    attributions = [0.0, 0.5, -0.2, 0.9, 0.1]
    assert E.top_positions(attributions, [1, 2, 3, 4], 2) == [1, 3]
    assert E.top_positions([0.0, 0.3, 0.3, 0.3], [1, 2, 3], 2) == [1, 2]  # ties: the earlier position
    assert [E.tokens_to_delete(8, f) for f in E.ERASER_FRACTIONS] == [1, 1, 1, 2, 4]  # ⌈f·8⌉, at least 1
    assert E.tokens_to_delete(3, 0.5) == 2 and E.tokens_to_delete(1, 0.5) == 1
    assert E.delete_positions([10, 11, 12, 13], [1, 3]) == [10, 12]
    assert E.largest_margins([0.1, -2.0, 1.0, 2.0], 3) == [1, 3, 2]


def test_aopc_is_the_mean_score_drop_over_the_bins():
    # F(x) = 1; after the three deletions F = 0.5, 0.2, -0.1: drops 0.5, 0.8, 1.1 -> mean 0.8.
    assert E.aopc(1.0, [0.5, 0.2, -0.1]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        E.aopc(1.0, [])


def test_aopc_against_random_difference_and_interval():
    r = E.aopc_against_random([0.8, 0.6], [0.1, 0.2], n_boot=200, seed=0)
    assert r["aopc_top"] == pytest.approx(0.7) and r["aopc_random"] == pytest.approx(0.15)
    assert r["difference"] == pytest.approx(0.55)
    # Resampling two differences (0.7, 0.4) gives means in {0.4, 0.55, 0.7}.
    assert 0.4 - 1e-12 <= r["ci_low"] <= r["ci_high"] <= 0.7 + 1e-12 and r["beats_random"]
    worse = E.aopc_against_random([0.1, 0.3, 0.0], [0.2, 0.1, 0.1], n_boot=200)
    assert worse["ci_low"] < 0 and not worse["beats_random"]
    with pytest.raises(ValueError):
        E.aopc_against_random([0.1], [0.1, 0.2])


# ---- Integrated Gradients on tiny models ------------------------------------------------------


def _reward_target():
    import torch

    from raylign.rewards.model import RewardModelSource

    torch.manual_seed(0)  # the fresh sequence-classification head of tiny:llama
    source = RewardModelSource("tiny:llama", max_length=128, max_prompt_length=64)
    return source, E.RewardTarget(source)


def test_ig_completeness_on_a_tiny_reward_model(one_thread):
    import torch

    source, target = _reward_target()
    ex = E.explain_text(target, PROMPT, COMPLETION, steps=32, max_steps=512, tolerance=0.01)
    # F(x) is the reward source's own score (input ids, batched path), not only this module's forward.
    assert ex.score == pytest.approx(float(source.score([PROMPT], [COMPLETION])[0]), abs=1e-5)
    # F(baseline) computed here, independently of captum: pad embeddings, special tokens kept.
    base = E.baseline_ids(ex.ids, set(source.tokenizer.all_special_ids), source.tokenizer.pad_token_id)
    emb = source.model.get_input_embeddings()
    with torch.no_grad():
        f_base = float(source.model(inputs_embeds=emb(torch.tensor([base]))).logits[0, 0])
    assert ex.baseline_score == pytest.approx(f_base, abs=1e-5)
    total = sum(ex.attributions)
    # Completeness within the reported delta, and the delta within the tolerance asked for.
    assert total - (ex.score - f_base) == pytest.approx(ex.delta, abs=1e-5)
    assert abs(ex.delta) <= 0.01 * abs(ex.score - f_base)
    assert abs(total - (ex.score - f_base)) <= 0.01 * abs(ex.score - f_base)
    # Kept special tokens have exactly zero attribution; some real token has not.
    assert all(a == 0.0 for a, s in zip(ex.attributions, ex.special, strict=True) if s) and any(ex.special)
    assert max(abs(a) for a in ex.attributions) > 0
    assert "".join(ex.pieces).endswith(COMPLETION + "<|im_end|>\n")
    assert "".join(w["text"] for w in ex.words() if w["response"]).startswith(COMPLETION)


def test_ig_steps_double_until_the_delta_is_within_tolerance(one_thread):
    _, target = _reward_target()
    ids, start = target.encode(PROMPT, COMPLETION)
    few = E.integrated_gradients(target, ids, start, steps=2, max_steps=2)
    adaptive = E.integrated_gradients(target, ids, start, steps=2, max_steps=256, tolerance=1e-3)
    assert few[4] == 2 and adaptive[4] > 2
    assert abs(adaptive[3]) <= max(1e-3 * abs(adaptive[1] - adaptive[2]), abs(few[3]))


def test_ig_completeness_of_the_dpo_implicit_reward(one_thread):
    import torch

    from raylign.evaluation.scorers import DPOImplicitScorer

    scorer = DPOImplicitScorer("tiny:llama", "tiny:llama", beta=0.5, max_length=128, max_prompt_length=64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy moves away from the reference
        for p in scorer.policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    target = E.target_from_scorer(scorer)
    assert isinstance(target, E.DPOTarget) and len(target.embedding_layers()) == 2
    ex = E.explain_text(target, PROMPT, COMPLETION, steps=32, max_steps=512, tolerance=0.01)
    assert ex.score == pytest.approx(float(scorer.score([PROMPT], [COMPLETION])[0]), rel=1e-4, abs=1e-5)
    assert sum(ex.attributions) - (ex.score - ex.baseline_score) == pytest.approx(ex.delta, abs=1e-5)
    assert abs(ex.delta) <= 0.01 * abs(ex.score - ex.baseline_score)
    assert "".join(ex.pieces[ex.response_start:]).startswith(COMPLETION)  # the response is what DPO scores


def test_deletion_scores_and_summary_on_a_tiny_reward_model(one_thread):
    _, target = _reward_target()
    rows = [{"prompt": PROMPT, "chosen": COMPLETION, "rejected": "The park is closed and dirty."}]
    exs = E.explain_items(target, E.pair_items(rows), random_draws=3, progress=False, steps=32)
    d = exs[0].deletion
    assert d["tokens"] == [E.tokens_to_delete(len(exs[0].eligible()), f) for f in E.ERASER_FRACTIONS]
    assert d["aopc_top"] == pytest.approx(np.mean([exs[0].score - s for s in d["top"]]))
    # The scores after deletion are the model's scores of the shortened texts.
    k = d["tokens"][-1]
    short = E.delete_positions(exs[0].ids, E.top_positions(exs[0].attributions, exs[0].eligible(), k))
    assert d["top"][-1] == pytest.approx(float(target.score_ids([short], exs[0].response_start)[0]), abs=1e-6)
    s = E.summarize(exs, n_boot=50)
    assert s["texts"] == 2 and s["deletion"]["n"] == 2 and len(s["deletion"]["curve_top"]) == len(E.ERASER_FRACTIONS)


# ---- reports and HTML -------------------------------------------------------------------------

MARKUP = '<script>window.pwned = 1</script><img src=x onerror="alert(1)">'


def _hand_explanation(side: str, completion_pieces: list[str], values: list[float], index: int = 0) -> E.Explanation:
    pieces = ["<|im_start|>", "Hi", "<|im_end|>", *completion_pieces]
    special = [True, False, True] + [False] * len(completion_pieces)
    attributions = [0.0, 0.05, 0.0, *values]
    return E.Explanation(prompt="Hi", completion="".join(completion_pieces), ids=list(range(len(pieces))),
                         pieces=pieces, special=special, response_start=3, attributions=attributions,
                         score=sum(attributions) + 0.1, baseline_score=0.1, delta=1e-4, steps=64,
                         meta={"index": index, "side": side},
                         deletion={"fractions": [0.5], "tokens": [1], "top": [0.0], "random": [0.1],
                                   "aopc_top": 0.3, "aopc_random": 0.2})


def test_html_shows_markup_tokens_as_text_with_values_on_hover(tmp_path):
    from raylign.evaluation.explain_html import render_attributions

    exs = [_hand_explanation("chosen", ["Nice", " ", MARKUP], [0.25, 0.0, -0.125]),
           _hand_explanation("rejected", ["Bad", ' "quoted"'], [-0.5, -0.0625])]
    html = render_attributions(exs, {"model": "<b>m</b>", "target": "rm", "kind": "reward",
                                     "completeness": {"max_abs_delta": 1e-4}})
    assert "<script>" not in html and "<img" not in html and "<b>m</b>" not in html
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert 'title="Nice: +0.25 (1 token)"' in html and 'title="&#34;quoted&#34;: -0.0625 (1 token)"' in html
    assert "margin " + f"{exs[0].score - exs[1].score:+.4f}" in html
    assert "rgba(0, 114, 178, 0.425)" in html  # +0.25 of the pair's max |0.5|, blue
    assert "rgba(230, 159, 0, 0.850)" in html  # -0.5, the strongest orange


def test_write_explanations_writes_the_report_files(tmp_path):
    exs = [_hand_explanation("chosen", ["Nice", " day"], [0.25, 0.125]),
           _hand_explanation("rejected", ["Bad", " day"], [-0.5, 0.0625])]
    summary = E.write_explanations(tmp_path, exs, {"model": "m", "target": "rm:m", "kind": "reward"}, n_boot=20)
    for name in ("explain.json", "attributions.html", "report.md", "top_tokens.png", "deletion.png"):
        assert (tmp_path / name).is_file(), name
    assert [w["word"] for w in summary["top_words"]][:2] == ["bad", "nice"]
    day = next(w for w in summary["top_words"] if w["word"] == "day")
    assert day["count"] == 2 and day["mean"] == pytest.approx((0.125 + 0.0625) / 2)
    report = (tmp_path / "report.md").read_text()
    assert "| `bad` | 1 | -0.5000 | -0.5000 |" in report and "beats random" in report
    saved = json.loads((tmp_path / "explain.json").read_text())
    assert saved["explanations"][0]["words"][1]["text"] == "Hi"
    assert not list(tmp_path.glob("*.tmp"))


# ---- resolving what to explain and the command line -------------------------------------------


def _run(tmp_path, algorithm: str, **extra) -> str:
    run = tmp_path / algorithm
    (run / "final").mkdir(parents=True)
    cfg = {"algorithm": algorithm, "model": {"path": "tiny:llama"}, **extra}
    (run / "config.yaml").write_text(json.dumps(cfg))
    return str(run)


def test_resolve_target_reads_the_run_algorithm(tmp_path):
    reward = _run(tmp_path, "reward")
    assert E.resolve_target(reward) == E.TargetSpec("reward", str(tmp_path / "reward" / "final"))
    dpo = E.resolve_target(_run(tmp_path, "dpo", preference={"beta": 0.3}))
    assert (dpo.kind, dpo.reference, dpo.beta) == ("dpo", "tiny:llama", 0.3)
    assert E.resolve_target(str(tmp_path / "dpo"), reference="other", beta=1.0).reference == "other"
    multi = _run(tmp_path, "multitask")
    head = tmp_path / "multitask" / "final" / "rating_heads" / "stars"
    head.mkdir(parents=True)
    (head / "score_head.json").write_text("{}")
    assert E.resolve_target(multi) == E.TargetSpec("rating", str(head))
    with pytest.raises(ConfigError, match="no rating head 'nope'.*stars"):
        E.resolve_target(multi, "rating:nope")
    with pytest.raises(ConfigError, match="holds no discriminator"):
        E.resolve_target(reward, "discriminator")
    with pytest.raises(ConfigError, match="unknown --scorer"):
        E.resolve_target(reward, "shap")
    causal = tmp_path / "policy"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="--reference"):
        E.resolve_target(str(causal))
    assert E.resolve_target("tiny:llama").kind == "reward"
    assert E.resolve_target("tiny:llama", reference="tiny:llama").kind == "dpo"


def test_target_from_scorer_refuses_a_non_differentiable_scorer():
    from raylign.rewards import build_reward_source

    with pytest.raises(ConfigError, match="differentiable"):
        E.target_from_scorer(build_reward_source("length"))


def test_cli_and_settings():
    from raylign.cli import build_parser, eval_settings
    from raylign.evaluation.settings import settings_from

    args = build_parser().parse_args(["explain", "runs/rm", "--pairs", "p.jsonl", "--out", "x", "--steps", "16"])
    s = E.explain_settings(args)
    assert (s.model, s.pairs, s.steps, s.scorer) == ("runs/rm", "p.jsonl", 16, "auto") and args.func is E.cmd_explain
    with pytest.raises(ConfigError, match="exactly one"):
        E.explain_settings(build_parser().parse_args(["explain", "m", "--pairs", "p", "--texts", "t", "--out", "x"]))
    with pytest.raises(ConfigError, match="max-steps"):
        E.explain_settings(build_parser().parse_args(["explain", "m", "--texts", "t", "--out", "x", "--steps", "64",
                                                      "--max-steps", "8"]))
    ev = eval_settings(build_parser().parse_args(["eval", "m", "--pairs", "p", "--scorer", "dpo", "--explain", "3",
                                                  "--out", "o"]))
    assert ev.explain == 3
    with pytest.raises(ConfigError, match="give --pairs"):
        settings_from({"model": "m", "out": "o", "ratings": "r", "explain": 2})
    with pytest.raises(ConfigError, match="differentiable"):
        settings_from({"model": "m", "out": "o", "pairs": "p", "explain": 2})  # default scorer loglik-mean


def test_building_the_explain_parser_is_light():
    """`raylign --help` builds the explain parser: it must not pull in numpy, torch, captum or jinja2."""
    import subprocess
    import sys

    code = ("import sys, argparse; from raylign.evaluation.explain import add_explain_parser; "
            "p = argparse.ArgumentParser(); add_explain_parser(p.add_subparsers()); "
            "print(sorted({'numpy', 'torch', 'ray', 'captum', 'jinja2', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
