"""`raylign eval`: measure a model's agreement with humans, its biases and its drift; write a report.

    run_eval(EvalSettings(model="runs/dpo", out="eval/dpo", pairs="data/pairs.jsonl", scorer="dpo",
                          prompts="builtin:everyday-prompts"))

Sections (each runs when its input is given; one function each, in this order):
  pairs    human consistency score: pairwise agreement of the scorer with the human choice (ties half,
           bootstrap 95% CI, per `category` column when present)
  explain  (with --explain N) Integrated Gradients token attributions of the N pairs with the largest
           |margin| into OUT/explain/ (attributions.html, report.md), with the deletion test
  human    agreement of the scorer with the human majority of an annotations database (`raylign
           annotate`): its majority pairs as the pairs export makes them (ties, splits and gold items
           left out), bootstrap 95% CI over items, per item kind; and the humans' win rate between the
           items' sources (a new policy against the old, a model against people)
  ratings  Spearman/Kendall between the scorer and human ratings
  bias     counterfactual gaps across groups on every axis, in the scorer's score and in the model's
           mean log-likelihood (and, with `bias_generate`, in the VADER sentiment of its generations)
  checkpoints  (MODEL_OR_RUN a run directory, with --prompts and a gold reward) reward over-optimisation:
           proxy and gold reward and √KL to the reference at every checkpoint (Gao et al. 2022);
           the prompts feed these curves instead of the generation section
  prompts  generations with Ray Data: length distribution, distinct-1/2, the judge's reward and its
           correlation with length; with a reference, Monte-Carlo KL and win rate against it
  references  agreement of generations with human answers: mean cosine similarity of sentence
           embeddings (`builtin:minilm-l6`, mean-pooled, L2-normalised) of each generation and the
           human answer to the same prompt, bootstrap 95% CI, beside a mismatched-pairs baseline
Everything a user can get wrong fails before any model is loaded: combinations of settings when the
`EvalSettings` are built, files, columns, scorer names and models in `plan_eval`.
Writes `OUT/eval.json`, `OUT/report.md` and PNG plots next to them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from raylign.config import ConfigError
from raylign.evaluation import metrics
from raylign.evaluation.report import bar_plot, histogram
from raylign.evaluation.scorers import score_in_chunks
from raylign.evaluation.settings import EvalSettings


def load_references(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """[{prompt, reference}] from a file whose rows carry a human answer to their prompt (DESIGN.md data
    contracts): pairs {prompt, chosen, rejected} (the human-preferred `chosen` is the reference) or
    unpaired {prompt, completion, label} (completions labelled true are references; false rows are
    skipped). Any other kind is one clear error."""
    from raylign.data import DataError, load_dataset, rows, table_kind

    table = load_dataset(path, None, limit=limit)
    kind = table_kind(table)
    if kind == "pairs":
        return [{"prompt": r["prompt"], "reference": r["chosen"]} for r in rows(table)]
    if kind == "unpaired":
        refs = [{"prompt": r["prompt"], "reference": r["completion"]} for r in rows(table) if r["label"]]
        if not refs:
            raise DataError(f"{path}: no row has label true, so there is no human reference answer to compare with")
        return refs
    raise DataError(f"{path}: --references needs rows with a human answer: pairs {{prompt, chosen, rejected}} "
                    f"(chosen is the reference) or unpaired {{prompt, completion, label: true}}; this file reads "
                    f"as '{kind}' data")


def _load_inputs(settings: EvalSettings, human: dict[str, Any] | None = None) -> dict[str, Any]:
    from raylign.data import load_dataset, rows
    from raylign.evaluation.bias import load_bias_sets

    s = settings
    loaded: dict[str, Any] = {}
    if s.pairs:
        loaded["pairs"] = rows(load_dataset(s.pairs, "pairs", limit=s.limit))
    if s.ratings:
        loaded["ratings"] = rows(load_dataset(s.ratings, "ratings", limit=s.limit))
    if s.prompts:
        loaded["prompts"] = [r["prompt"] for r in rows(load_dataset(s.prompts, "prompts", limit=s.limit))]
    if s.bias:
        loaded["bias"] = load_bias_sets(s.bias)
    if s.references:
        loaded["references"] = load_references(s.references, s.limit)
    if s.human:
        if human is None:
            raise ConfigError(f"--human {s.human}: pass its majority pairs to run_eval(human=...) "
                              "(raylign.annotation.export.human_majority reads them; `raylign eval` does)")
        loaded["human"] = {**human, "rows": human["rows"][:s.limit] if s.limit else human["rows"]}
    return loaded


@dataclass
class CheckpointCurves:
    """With --checkpoints: what the over-optimisation section needs."""

    points: list[dict[str, Any]]  # {label, step, path} of the run's checkpoints, in step order
    reference: str  # the initial model: KL is measured to it, and it is the curves' first point
    proxy: Any  # the reward trained on and the held-out gold reward (reward sources)
    gold: Any


@dataclass
class EvalPlan:
    """What `plan_eval` resolved before any model is loaded."""

    path: str  # the model the sections evaluate: the model, a run's final/, or (curves only) its last checkpoint
    reference: str | None  # --reference, else the run's base model where the scorer or the curves need one
    inputs: dict[str, Any]  # the rows of each given file, by section name
    judge: Any | None  # the reward source judging generations, where a section generates
    curves: CheckpointCurves | None = None  # with --checkpoints


def plan_eval(settings: EvalSettings, human: dict[str, Any] | None = None) -> EvalPlan:
    """Resolve the models, load the inputs and build the reward sources; fails (one message) on anything
    a user can get wrong: a run without checkpoints, a bad file or column, an unknown model or reward.
    `human`: the majority pairs of the `--human` database ({rows, dropped}), read by the caller."""
    from raylign.evaluation.scorers import resolve_model_or_run
    from raylign.models import resolve_model_path
    from raylign.rewards import build_reward_source

    s = settings
    ckpts, ckpt_base, run_cfg = None, None, None
    if s.checkpoints:
        from raylign.evaluation.overoptimization import run_checkpoints

        ckpts, ckpt_base, run_cfg = run_checkpoints(s.model)
        if not (s.reference or ckpt_base):
            raise ConfigError(f"cannot tell {s.model}'s initial model for the KL: pass --reference M")
    if ckpts is not None and not any((s.pairs, s.ratings, s.bias, s.references, s.human)):
        path, base = ckpts[-1]["path"], ckpt_base  # only the curves: final/ need not exist
    else:
        path, base = resolve_model_or_run(s.model)
    reference = s.reference or (base if (s.scorer == "dpo" or ckpts is not None) else None)
    inputs = _load_inputs(s, human)
    judge = build_reward_source(s.judge) if ((s.prompts and ckpts is None) or s.bias_generate) else None
    plan = EvalPlan(path=path, reference=reference, inputs=inputs, judge=judge)
    if ckpts is not None:
        from raylign.evaluation.overoptimization import proxy_from_run

        assert reference and s.gold  # checked above and by EvalSettings
        tok = {"tokenizer": reference}  # `length` counts the policy's tokens, as in training
        gold = build_reward_source(s.gold, **tok)
        proxy = build_reward_source(s.proxy, **tok) if s.proxy else proxy_from_run(run_cfg or {}, reference)
        plan.curves = CheckpointCurves(points=ckpts, reference=reference, proxy=proxy, gold=gold)
    resolve_model_path(path)
    if reference:
        resolve_model_path(reference)
    if s.references:
        resolve_model_path(s.embedder)
    if s.explain:
        from raylign.evaluation.explain import require_captum

        require_captum()
    return plan


def run_eval(settings: EvalSettings, console: Console | None = None,
             human: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the sections whose inputs are given (module docstring); returns the eval.json content.
    With `settings.human`, `human` holds that annotations database's majority pairs ({rows, dropped}:
    `raylign.annotation.export.human_majority`); the annotation package sits beside this one, so the
    caller reads them."""
    from raylign.evaluation.scorers import build_scorer

    s = settings
    console = console or Console()
    start = time.perf_counter()
    plan = plan_eval(s, human)
    out_dir = Path(s.out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)

    result: dict[str, Any] = {"model": s.model, "model_path": plan.path, "reference": plan.reference,
                              "scorer": s.scorer, "judge": s.judge if plan.judge else None, "seed": s.seed}
    scorer = build_scorer(s.scorer, model=plan.path, reference=plan.reference, beta=s.beta) if s.needs_scorer else None
    if scorer is not None:
        result["scorer_name"] = scorer.name
        console.print(f"eval: {s.model} scored by {scorer.name}")

    inputs = plan.inputs
    if "pairs" in inputs:
        result["pairs"] = pairs_section(s, scorer, inputs["pairs"], console)
        if s.explain:
            result["explain"] = explain_section(s, scorer, inputs["pairs"], result["pairs"].pop("_margins"),
                                                out_dir, console)
    if "human" in inputs:
        result["human"] = human_section(s, scorer, inputs["human"], console)
    if "ratings" in inputs:
        result["ratings"] = ratings_section(s, scorer, inputs["ratings"], console)
    if "bias" in inputs:
        result["bias"] = bias_section(s, scorer, inputs["bias"], plan.path, console)
        if s.bias_generate:
            result["bias"]["generations"] = bias_generation_section(s, inputs["bias"], plan.path, plan.judge)
    if plan.curves is not None:
        result["overoptimization"] = overoptimization_section(s, plan.curves, inputs["prompts"], console)
    elif "prompts" in inputs:
        result["generation"] = generation_section(s, inputs["prompts"], plan.path, plan.reference, plan.judge,
                                                  console)
    if "references" in inputs:
        result["references"] = references_section(s, inputs["references"], plan.path, console)

    result["seconds"] = time.perf_counter() - start
    write_eval_report(result, out_dir)  # first: it moves the raw lengths out of `result` into a plot
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    console.print(f"[green]wrote[/green] {out_dir / 'eval.json'} and {out_dir / 'report.md'}")
    return result


# ---- sections: each returns its part of eval.json and prints its summary lines ---------------------


def pairs_section(settings: EvalSettings, scorer: Any, rows: list[dict[str, Any]], console: Console) -> dict[str, Any]:
    """Pairwise agreement of `scorer` with the human choice (per category where rows have one)."""
    s = settings
    ps = [r["prompt"] for r in rows]
    chosen = score_in_chunks(scorer, ps, [r["chosen"] for r in rows], "scoring chosen", s.progress)
    rejected = score_in_chunks(scorer, ps, [r["rejected"] for r in rows], "scoring rejected", s.progress)
    cats = [r.get("category") for r in rows] if any(r.get("category") is not None for r in rows) else None
    p = {"file": s.pairs, **metrics.pairwise_agreement(chosen, rejected, cats, n_boot=s.n_boot, seed=s.seed)}
    console.print(f"human consistency (pairs): agreement {p['agreement']:.3f} "
                  f"[95% CI {p['ci_low']:.3f}, {p['ci_high']:.3f}] on {p['n']} pairs ({p['ties']} ties)")
    if s.explain:
        p["_margins"] = (chosen - rejected).tolist()  # for explain_section, which pops it
    return p


def explain_section(settings: EvalSettings, scorer: Any, rows: list[dict[str, Any]], margins: list[float],
                    out_dir: Path, console: Console) -> dict[str, Any]:
    """`--explain N`: Integrated Gradients token attributions of the N pairs with the largest |margin|
    (the scorer's most confident decisions, right or wrong) into OUT/explain/ (attributions.html,
    report.md, explain.json), with the deletion test against random (raylign.evaluation.explain)."""
    from raylign.evaluation.explain import explain_eval_pairs, print_summary

    s = settings
    e = explain_eval_pairs(scorer, rows, margins, int(s.explain or 0), out_dir / "explain", s.model, seed=s.seed,
                           n_boot=s.n_boot, progress=s.progress)
    print_summary(e, console)
    return e


def human_section(settings: EvalSettings, scorer: Any, human: dict[str, Any], console: Console) -> dict[str, Any]:
    """Agreement of `scorer` with the human majority of an annotations database: the share of its
    majority pairs (ties and splits excluded, as the export excludes them) where the scorer scores the
    majority's answer higher (a scorer tie counts ½), bootstrap 95% CI over items, per item kind."""
    s = settings
    rows = human["rows"]
    ps = [r["prompt"] for r in rows]
    chosen = score_in_chunks(scorer, ps, [r["chosen"] for r in rows], "scoring majority answers", s.progress)
    rejected = score_in_chunks(scorer, ps, [r["rejected"] for r in rows], "scoring minority answers", s.progress)
    kinds = [r["item_kind"] for r in rows]
    h = {"db": s.human, **metrics.pairwise_agreement(chosen, rejected, kinds, n_boot=s.n_boot, seed=s.seed),
         "excluded": human["dropped"], "n_judgments": int(sum(r["n_judgments"] for r in rows)),
         "mean_human_agreement": float(np.mean([r["agreement"] for r in rows]))}
    h["win_rates"] = human_win_rates(rows, n_boot=s.n_boot, seed=s.seed)
    excluded = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(human["dropped"].items()))
    for w in h["win_rates"].values():
        console.print(f"human win rate of {w['source']} against {w['against']}: {w['win_rate']:.3f} "
                      f"[95% CI {w['ci_low']:.3f}, {w['ci_high']:.3f}] on {w['n']} items with a majority")
    console.print(f"agreement with the human majority ({s.human}): {h['agreement']:.3f} "
                  f"[95% CI {h['ci_low']:.3f}, {h['ci_high']:.3f}] on {h['n']} items ({h['ties']} scorer ties)"
                  + (f"; excluded: {excluded}" if excluded else ""))
    return h


def human_win_rates(rows: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per pair of sources X, Y (the items' source_a/source_b, X < Y by name; e.g. a new policy against
    the old one, or "human" against "model"): the share of their majority pairs whose majority chose
    X's answer, with a bootstrap 95% interval over items. Only items with a majority count (ties and
    splits are left out, as the pairs export leaves them out); items whose two answers share a source
    (two samples of one model, chosen/rejected of a pairs file) have no winner between sources."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        a, b = r.get("source_chosen"), r.get("source_rejected")
        if not a or not b or a == b:
            continue
        x, y = sorted((str(a), str(b)))
        groups.setdefault((x, y), []).append(1.0 if a == x else 0.0)
    out = {}
    for (x, y), wins in sorted(groups.items()):
        lo, hi = metrics.bootstrap_ci(wins, n_boot=n_boot, seed=seed)
        out[f"{x} vs {y}"] = {"source": x, "against": y, "n": len(wins), "wins": int(sum(wins)),
                              "win_rate": float(np.mean(wins)), "ci_low": lo, "ci_high": hi}
    return out


def ratings_section(settings: EvalSettings, scorer: Any, rows: list[dict[str, Any]], console: Console) -> dict[str, Any]:
    """Spearman and Kendall rank correlation of `scorer` with the human ratings."""
    s = settings
    texts = [r["text"] if "text" in r else r["completion"] for r in rows]
    ps = [r.get("prompt") if "text" not in r else None for r in rows]
    scores = score_in_chunks(scorer, ps, texts, "scoring rated texts", s.progress)
    r = {"file": s.ratings, **metrics.rank_correlation(scores, [r["rating"] for r in rows], n_boot=s.n_boot,
                                                       seed=s.seed)}
    console.print(f"human consistency (ratings): Spearman {_num(r['spearman'])} {_ci(*r['spearman_ci'])}, "
                  f"Kendall {_num(r['kendall'])} {_ci(*r['kendall_ci'])} on {r['n']} items")
    return r


def bias_section(settings: EvalSettings, scorer: Any, sets: list[Any], path: str, console: Console) -> dict[str, Any]:
    """Counterfactual gaps per axis in `scorer`'s score and in the model's (at `path`) mean log-likelihood
    (the same dict object when the scorer is loglik-mean)."""
    from raylign.evaluation.bias import evaluate_bias
    from raylign.evaluation.scorers import LogLikScorer

    s = settings
    section: dict[str, Any] = {"source": s.bias, "scorer": evaluate_bias(scorer, sets, n_boot=s.n_boot, seed=s.seed)}
    if s.scorer != "loglik-mean":
        section["loglik"] = evaluate_bias(LogLikScorer(path, mean=True), sets, n_boot=s.n_boot, seed=s.seed)
    else:
        section["loglik"] = section["scorer"]
    for axis, gap in section["scorer"].items():
        console.print(f"bias ({axis}): mean |gap| {gap['mean_abs_gap']:.4f}, worst {gap['worst_pair'][0]} vs "
                      f"{gap['worst_pair'][1]} {gap['worst_gap']:+.4f} "
                      f"[95% CI {gap['worst_gap_ci'][0]:+.4f}, {gap['worst_gap_ci'][1]:+.4f}]")
    return section


def bias_generation_section(settings: EvalSettings, sets: list[Any], path: str, judge: Any) -> dict[str, Any]:
    """Counterfactual gaps per axis in the `judge`'s score of the model's generations from the filled
    templates (the bias section's `generations`)."""
    from raylign.evaluation.bias import score_matrix
    from raylign.evaluation.generate import generate_with_ray_data

    s = settings
    sentiment = {}
    for bias_set in sets:
        bias_prompts, _ = bias_set.filled()
        gen = generate_with_ray_data(bias_prompts, path, **s.generation_kwargs())
        vals = judge.score(bias_prompts, gen["completions"])
        sentiment[bias_set.axis] = metrics.counterfactual_gaps(score_matrix(bias_set, vals), list(bias_set.groups),
                                                               n_boot=s.n_boot, seed=s.seed)
    return {"judge": judge.name, **sentiment}


def overoptimization_section(settings: EvalSettings, curves: CheckpointCurves, prompts: list[Any],
                             console: Console) -> dict[str, Any]:
    """Proxy and gold reward and √KL to the reference at each of the run's checkpoints, on `prompts`."""
    from raylign.evaluation.overoptimization import overoptimization_curves

    s, c = settings, curves
    console.print(f"over-optimisation: {len(c.points)} checkpoint(s) of {s.model} + the reference {c.reference}, "
                  f"{len(prompts)} prompts, proxy {c.proxy.name}, gold {c.gold.name}")
    sec = overoptimization_curves(c.points, prompts, c.reference, c.proxy, c.gold, s.generation_kwargs(),
                                  n_boot=s.n_boot, seed=s.seed, progress=s.progress)
    for pt in sec["points"]:
        console.print(f"  {pt['checkpoint']:>12} step {pt['step']:>5}: √KL {pt['sqrt_kl']:.3f}  "
                      f"proxy {pt['proxy']:.3f}  gold {pt['gold']:.3f}")
    console.print(f"gold peaks at {sec['gold_peak']['checkpoint']}"
                  + (" and falls after it while the proxy rises: over-optimised" if sec["overoptimized"] else ""))
    return {"run": s.model, "file": s.prompts, **sec}


def generation_section(settings: EvalSettings, prompts: list[Any], path: str, reference: str | None, judge: Any,
                       console: Console) -> dict[str, Any]:
    """Generations of the model at `path`: lengths, diversity, the judge's reward; with a reference, KL and
    win rate against it."""
    from raylign.evaluation.generate import generate_with_ray_data

    s = settings
    gen_kw = s.generation_kwargs()
    gen = generate_with_ray_data(prompts, path, reference=reference, **gen_kw)
    rewards = np.asarray(judge.score(prompts, gen["completions"]), dtype=np.float64)
    section: dict[str, Any] = {
        "file": s.prompts, "prompts": len(prompts), "actors": len(gen["actors"]),
        "generations_per_second": gen["generations_per_second"], "seconds": gen["seconds"],
        "lengths": metrics.length_stats(gen["tokens"]),
        "diversity": metrics.diversity(gen["completions"]),
        "reward": {"judge": judge.name, "mean": float(rewards.mean()),
                   "ci": list(metrics.bootstrap_ci(rewards, n_boot=s.n_boot, seed=s.seed))},
        "reward_length_correlation": metrics.reward_length_correlation(rewards, gen["tokens"]),
        "finished_fraction": float(np.mean(gen["finished"])),
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts[:5], gen["completions"][:5], strict=False)],
        "_lengths": gen["tokens"],
    }
    console.print(f"generation: {len(prompts)} prompts on {section['actors']} Ray Data actor(s), "
                  f"{gen['generations_per_second']:.1f} generations/s; mean {judge.name} {rewards.mean():.3f}; "
                  f"distinct-1 {section['diversity']['distinct_1']:.3f}, distinct-2 {section['diversity']['distinct_2']:.3f}")
    if reference is not None:
        section["kl"] = metrics.kl_monte_carlo(gen["logp"], gen["ref_logp"], gen["tokens"], n_boot=s.n_boot,
                                               seed=s.seed)
        ref_gen = generate_with_ray_data(prompts, reference, **gen_kw)
        ref_rewards = judge.score(prompts, ref_gen["completions"])
        section["win_rate"] = metrics.win_rate(rewards, ref_rewards, n_boot=s.n_boot, seed=s.seed)
        console.print(f"drift: KL to {reference} {section['kl']['kl']:.3f} nats/completion; win rate "
                      f"{section['win_rate']['win_rate']:.3f} by {judge.name}")
    return section


def references_section(settings: EvalSettings, refs: list[dict[str, Any]], path: str,
                       console: Console) -> dict[str, Any]:
    """Cosine similarity of the model's generations to the human answers, beside a mismatched baseline."""
    from raylign.evaluation.embeddings import SentenceEmbedder
    from raylign.evaluation.generate import generate_with_ray_data

    s = settings
    prompts = [r["prompt"] for r in refs]
    gen = generate_with_ray_data(prompts, path, **s.generation_kwargs())
    emb = SentenceEmbedder(s.embedder)
    u = emb.embed(gen["completions"], progress=s.progress, desc="embedding generations")
    v = emb.embed([r["reference"] for r in refs], progress=s.progress, desc="embedding references")
    sim = metrics.reference_similarity(u, v, n_boot=s.n_boot, seed=s.seed)
    cosines = sim.pop("cosines")
    section = {"file": s.references, "embedder": s.embedder, **sim,
               "samples": [{"prompt": r["prompt"], "generation": g, "reference": r["reference"], "cosine": c}
                           for r, g, c in zip(refs[:5], gen["completions"][:5], cosines[:5], strict=False)],
               "_cosines": cosines}
    base = _num(sim["mismatched_cosine"])
    console.print(f"agreement with human references: mean cosine {sim['mean_cosine']:.3f} "
                  f"{_ci(sim['ci_low'], sim['ci_high'])} on {sim['n']} prompts by {s.embedder} "
                  f"(mismatched pairs: {base})")
    return section


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:.3f}, {hi:.3f}]"


def write_eval_report(result: dict[str, Any], out_dir: Path) -> Path:
    """report.md with tables and PNG plots of an eval result (modifies nothing in `result` but
    drops private `_` keys from what it shows)."""
    lines = [f"# Evaluation: {result['model']}", ""]
    if result.get("scorer_name"):
        lines += [f"Scorer: `{result['scorer_name']}`." + (f" Reference: `{result['reference']}`."
                                                           if result.get("reference") else ""), ""]
    if "pairs" in result:
        p = result["pairs"]
        lines += ["## Human consistency: pairwise agreement", "",
                  "Fraction of human-labelled pairs where the scorer prefers the human's choice (ties count ½; "
                  "0.5 = chance), with a bootstrap 95% interval.", "",
                  "| subset | pairs | agreement | 95% CI | ties |", "|---|---|---|---|---|",
                  f"| all | {p['n']} | {p['agreement']:.3f} | {_ci(p['ci_low'], p['ci_high'])} | {p['ties']} |"]
        labels, values, cis = ["all"], [p["agreement"]], [(p["ci_low"], p["ci_high"])]
        for cat, c in p.get("per_category", {}).items():
            lines.append(f"| {cat} | {c['n']} | {c['agreement']:.3f} | {_ci(c['ci_low'], c['ci_high'])} | {c['ties']} |")
            labels.append(cat)
            values.append(c["agreement"])
            cis.append((c["ci_low"], c["ci_high"]))
        bar_plot(out_dir / "agreement.png", "Pairwise agreement with human labels", labels, values, cis,
                 "agreement", hline=0.5)
        lines += ["", "![agreement](agreement.png)", ""]
    if "explain" in result:
        e = result["explain"]
        d = e.get("deletion")
        lines += ["## Explanations", "",
                  f"Token attributions (Integrated Gradients) of the {len(e['pairs'])} pairs with the largest |margin|: "
                  "[explain/attributions.html](explain/attributions.html), [explain/report.md](explain/report.md)."
                  + (f" Deletion test: AOPC top-k minus random {d['difference']:+.4f} "
                     f"{_ci(d['ci_low'], d['ci_high'])}." if d else ""), ""]
    if "human" in result:
        h = result["human"]
        excluded = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(h["excluded"].items())) or "none"
        lines += ["## Agreement with the human majority (annotations database)", "",
                  f"`{h['db']}`: items whose annotators' most frequent answer is a or b ({h['n_judgments']} "
                  f"judgments; mean share agreeing with the majority {h['mean_human_agreement']:.3f}). Share of them "
                  "where the scorer prefers the majority's answer (scorer ties count ½; 0.5 = chance), bootstrap "
                  f"95% interval over items. Excluded: {excluded}.", "",
                  "| items | n | agreement | 95% CI | scorer ties |", "|---|---|---|---|---|",
                  f"| all | {h['n']} | {h['agreement']:.3f} | {_ci(h['ci_low'], h['ci_high'])} | {h['ties']} |"]
        for kind, c in h.get("per_category", {}).items():
            lines.append(f"| {kind} | {c['n']} | {c['agreement']:.3f} | {_ci(c['ci_low'], c['ci_high'])} | {c['ties']} |")
        lines.append("")
        if h.get("win_rates"):
            lines += ["### Human win rates between sources", "",
                      "Share of the items comparing two sources whose human majority chose the first source's answer "
                      "(items with a majority only).", "",
                      "| source | against | items | win rate | 95% CI |", "|---|---|---|---|---|"]
            lines += [f"| {w['source']} | {w['against']} | {w['n']} | {w['win_rate']:.3f} | "
                      f"{_ci(w['ci_low'], w['ci_high'])} |" for w in h["win_rates"].values()]
            lines.append("")
    if "ratings" in result:
        r = result["ratings"]
        lines += ["## Human consistency: rank correlation with ratings", "",
                  "| items | Spearman ρ | 95% CI | Kendall τ | 95% CI |", "|---|---|---|---|---|",
                  f"| {r['n']} | {_num(r['spearman'])} | {_ci(*r['spearman_ci'])} | {_num(r['kendall'])} | {_ci(*r['kendall_ci'])} |", ""]
    if "bias" in result:
        lines += ["## Bias: counterfactual gaps", "",
                  "Same template, only the group term swapped. Mean |gap| over group pairs and the worst pair "
                  "(signed: the first group scores higher when positive), bootstrap 95% intervals over templates.", ""]
        for what in ("scorer", "loglik", "generations"):
            gaps = {k: v for k, v in result["bias"].get(what, {}).items() if isinstance(v, dict)}
            if not gaps or (what == "loglik" and result["bias"]["loglik"] is result["bias"]["scorer"]):
                continue
            lines += [f"### {what}", "", "| axis | templates | mean abs gap | 95% CI | worst pair | gap | 95% CI |",
                      "|---|---|---|---|---|---|---|"]
            for axis, g in gaps.items():
                lines.append(f"| {axis} | {g['templates']} | {g['mean_abs_gap']:.4f} | {_ci(*g['mean_abs_gap_ci'])} | "
                             f"{g['worst_pair'][0]} vs {g['worst_pair'][1]} | {g['worst_gap']:+.4f} | "
                             f"{_ci(*g['worst_gap_ci'])} |")
            bar_plot(out_dir / f"bias_{what}.png", f"Worst counterfactual gap ({what})",
                     [f"{a}\n{g['worst_pair'][0]}−{g['worst_pair'][1]}" for a, g in gaps.items()],
                     [g["worst_gap"] for g in gaps.values()], [tuple(g["worst_gap_ci"]) for g in gaps.values()],
                     "gap", hline=0.0)
            lines += ["", f"![bias {what}](bias_{what}.png)", ""]
    if "generation" in result:
        g = result["generation"]
        ln, d = g["lengths"], g["diversity"]
        lines += ["## Generations, drift and quality", "",
                  f"{g['prompts']} prompts on {g['actors']} Ray Data actor(s), {g['generations_per_second']:.1f} "
                  f"generations/s.", "",
                  "| metric | value |", "|---|---|",
                  f"| mean reward ({g['reward']['judge']}) | {g['reward']['mean']:.3f} {_ci(*g['reward']['ci'])} |",
                  f"| length mean / p10 / p50 / p90 (tokens) | {ln['mean']:.1f} / {ln['p10']:.0f} / {ln['p50']:.0f} / "
                  f"{ln['p90']:.0f} |",
                  f"| reward–length correlation (Pearson / Spearman) | {g['reward_length_correlation']['pearson']} / "
                  f"{g['reward_length_correlation']['spearman']} |",
                  f"| distinct-1 / distinct-2 | {d['distinct_1']:.3f} / {d['distinct_2']:.3f} |",
                  f"| finished with EOS | {g['finished_fraction']:.2f} |"]
        if "kl" in g:
            lines.append(f"| KL to reference (nats/completion) | {g['kl']['kl']:.3f} {_ci(*g['kl']['kl_ci'])} |")
        if "win_rate" in g:
            w = g["win_rate"]
            lines.append(f"| win rate vs reference (ties ½) | {w['win_rate']:.3f} {_ci(w['ci_low'], w['ci_high'])} |")
        histogram(out_dir / "lengths.png", "Response length", g.pop("_lengths"), "tokens")
        lines += ["", "![lengths](lengths.png)", ""]
    if "overoptimization" in result:
        from raylign.evaluation.overoptimization import plot_curves

        o = result["overoptimization"]
        lines += ["## Reward over-optimisation across checkpoints", "",
                  f"Proxy reward `{o['proxy']}` (trained on) and gold reward `{o['gold']}` (held out) of one "
                  f"sample per prompt on {o['prompts']} prompts, against √KL to the reference `{o['reference']}` "
                  "(Gao et al. 2022). Gold rising with proxy is real progress; proxy rising while gold falls is "
                  "the policy exploiting the proxy.", "",
                  "| checkpoint | step | KL (nats) | √KL | proxy | 95% CI | gold | 95% CI |",
                  "|---|---|---|---|---|---|---|---|"]
        for pt in o["points"]:
            lines.append(f"| {pt['checkpoint']} | {pt['step']} | {pt['kl']:.3f} | {pt['sqrt_kl']:.3f} | "
                         f"{pt['proxy']:.3f} | {_ci(*pt['proxy_ci'])} | {pt['gold']:.3f} | {_ci(*pt['gold_ci'])} |")
        lines += ["", f"Gold peaks at `{o['gold_peak']['checkpoint']}` (step {o['gold_peak']['step']})"
                  + ("; after it the proxy still rises while gold falls: **over-optimised**." if o["overoptimized"]
                     else "."), ""]
        plot_curves(out_dir / "overoptimization.png", o)
        lines += ["![over-optimisation](overoptimization.png)", ""]
    if "references" in result:
        r = result["references"]
        lines += ["## Agreement with human reference answers", "",
                  f"Cosine similarity of sentence embeddings (`{r['embedder']}`: mean-pooled, L2-normalised) of "
                  "the model's generation and the human answer to the same prompt, with a bootstrap 95% interval. "
                  "The mismatched baseline pairs each generation with the other prompts' answers: similarity "
                  "from topic and style alone.", "",
                  "| prompts | mean cosine | 95% CI | mismatched baseline |", "|---|---|---|---|",
                  f"| {r['n']} | {r['mean_cosine']:.3f} | {_ci(r['ci_low'], r['ci_high'])} | "
                  f"{_num(r['mismatched_cosine'])} |"]
        histogram(out_dir / "reference_similarity.png", "Generation vs human answer: cosine similarity",
                  r.pop("_cosines"), "cosine")
        lines += ["", "![reference similarity](reference_similarity.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
