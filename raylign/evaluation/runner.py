"""`raylign eval`: measure a model's agreement with humans, its biases and its drift; write a report.

    run_eval("runs/dpo", out="eval/dpo", pairs="data/pairs.jsonl", scorer="dpo", prompts="builtin:everyday-prompts")

Sections (each runs when its input is given):
  pairs    human consistency score: pairwise agreement of the scorer with the human choice (ties half,
           bootstrap 95% CI, per `category` column when present)
  ratings  Spearman/Kendall between the scorer and human ratings
  bias     counterfactual gaps across groups on every axis, in the scorer's score and in the model's
           mean log-likelihood (and, with `bias_generate`, in the VADER sentiment of its generations)
  prompts  generations with Ray Data: length distribution, distinct-1/2, the judge's reward and its
           correlation with length; with a reference, Monte-Carlo KL and win rate against it
  references  agreement of generations with human answers: mean cosine similarity of sentence
           embeddings (`builtin:minilm-l6`, mean-pooled, L2-normalised) of each generation and the
           human answer to the same prompt, bootstrap 95% CI, beside a mismatched-pairs baseline
  checkpoints  (MODEL_OR_RUN a run directory, with --prompts and a gold reward) reward over-optimisation:
           proxy and gold reward and √KL to the reference at every checkpoint (Gao et al. 2022);
           the prompts feed these curves instead of the generation section
Everything a user can get wrong (files, columns, scorer names) fails before any model is loaded.
Writes `OUT/eval.json`, `OUT/report.md` and PNG plots next to them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from raylign.evaluation import metrics
from raylign.evaluation.report import bar_plot, histogram

SCORE_CHUNK = 64


def score_in_chunks(scorer: Any, prompts: list[Any], completions: list[str], desc: str,
                    progress: bool = True) -> np.ndarray:
    """scorer.score over chunks of SCORE_CHUNK rows, with a progress bar."""
    out = np.zeros(len(completions), dtype=np.float64)
    with tqdm(total=len(completions), desc=desc, unit="text", disable=not progress) as bar:
        for i in range(0, len(completions), SCORE_CHUNK):
            out[i : i + SCORE_CHUNK] = scorer.score(prompts[i : i + SCORE_CHUNK], completions[i : i + SCORE_CHUNK])
            bar.update(len(completions[i : i + SCORE_CHUNK]))
    return out


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


def _load_inputs(pairs: str | None, ratings: str | None, prompts: str | None, bias: str | None,
                 limit: int | None, references: str | None = None) -> dict[str, Any]:
    from raylign.data import load_dataset, rows
    from raylign.evaluation.bias import load_bias_sets

    loaded: dict[str, Any] = {}
    if pairs:
        loaded["pairs"] = rows(load_dataset(pairs, "pairs", limit=limit))
    if ratings:
        loaded["ratings"] = rows(load_dataset(ratings, "ratings", limit=limit))
    if prompts:
        loaded["prompts"] = [r["prompt"] for r in rows(load_dataset(prompts, "prompts", limit=limit))]
    if bias:
        loaded["bias"] = load_bias_sets(bias)
    if references:
        loaded["references"] = load_references(references, limit)
    return loaded


def run_eval(
    model: str,
    out: str,
    pairs: str | None = None,
    ratings: str | None = None,
    bias: str | None = None,
    prompts: str | None = None,
    reference: str | None = None,
    references: str | None = None,
    embedder: str = "builtin:minilm-l6",
    checkpoints: bool = False,
    proxy: str | None = None,
    gold: str | None = None,
    scorer: str = "loglik-mean",
    judge: str = "lexicon:vader",
    beta: float = 0.1,
    limit: int | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    batch_size: int = 16,
    bias_generate: bool = False,
    seed: int = 0,
    n_boot: int = 1000,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the sections whose inputs are given (module docstring); returns the eval.json content."""
    from raylign.config import ConfigError
    from raylign.evaluation.scorers import LogLikScorer, build_scorer, resolve_model_or_run
    from raylign.models import resolve_model_path
    from raylign.rewards import build_reward_source

    console = console or Console()
    if not any((pairs, ratings, bias, prompts, references)):
        raise ConfigError("nothing to evaluate: give at least one of --pairs, --ratings, --bias, --prompts, "
                          "--references")
    start = time.perf_counter()
    ckpts = None
    if checkpoints:
        from raylign.evaluation.overoptimization import proxy_from_run, run_checkpoints

        if not (prompts and gold):
            raise ConfigError("--checkpoints draws reward over-optimisation curves: it needs --prompts F (held-out "
                              "prompts) and --gold S (a held-out reward, e.g. lexicon:vader or a reward model dir)")
        ckpts, ckpt_base, run_cfg = run_checkpoints(model)
        if not (reference or ckpt_base):
            raise ConfigError(f"cannot tell {model}'s initial model for the KL: pass --reference M")
    elif proxy or gold:
        raise ConfigError("--proxy and --gold go with --checkpoints (curves across a run's checkpoints)")
    if ckpts is not None and not any((pairs, ratings, bias, references)):
        path, base = ckpts[-1]["path"], ckpt_base  # only the curves: final/ need not exist
    else:
        path, base = resolve_model_or_run(model)
    reference = reference or (base if (scorer == "dpo" or ckpts is not None) else None)
    inputs = _load_inputs(pairs, ratings, prompts, bias, limit, references)
    judge_source = build_reward_source(judge) if ((prompts and ckpts is None) or bias_generate) else None
    if ckpts is not None:
        tok = {"tokenizer": reference}  # `length` counts the policy's tokens, as in training
        gold_source = build_reward_source(gold, **tok)
        proxy_source = build_reward_source(proxy, **tok) if proxy else proxy_from_run(run_cfg, reference)
    resolve_model_path(path)
    if reference:
        resolve_model_path(reference)
    if references:
        resolve_model_path(embedder)
    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)

    result: dict[str, Any] = {"model": model, "model_path": path, "reference": reference, "scorer": scorer,
                              "judge": judge if judge_source else None, "seed": seed}
    needs_scorer = bool(pairs or ratings or bias)
    score_src = build_scorer(scorer, model=path, reference=reference, beta=beta) if needs_scorer else None
    if score_src is not None:
        result["scorer_name"] = score_src.name
        console.print(f"eval: {model} scored by {score_src.name}")

    if "pairs" in inputs:
        rows = inputs["pairs"]
        ps = [r["prompt"] for r in rows]
        chosen = score_in_chunks(score_src, ps, [r["chosen"] for r in rows], "scoring chosen", progress)
        rejected = score_in_chunks(score_src, ps, [r["rejected"] for r in rows], "scoring rejected", progress)
        cats = [r.get("category") for r in rows] if any(r.get("category") is not None for r in rows) else None
        result["pairs"] = {"file": pairs, **metrics.pairwise_agreement(chosen, rejected, cats, n_boot=n_boot, seed=seed)}
        p = result["pairs"]
        console.print(f"human consistency (pairs): agreement {p['agreement']:.3f} "
                      f"[95% CI {p['ci_low']:.3f}, {p['ci_high']:.3f}] on {p['n']} pairs ({p['ties']} ties)")

    if "ratings" in inputs:
        rows = inputs["ratings"]
        texts = [r["text"] if "text" in r else r["completion"] for r in rows]
        ps = [r.get("prompt") if "text" not in r else None for r in rows]
        scores = score_in_chunks(score_src, ps, texts, "scoring rated texts", progress)
        result["ratings"] = {"file": ratings, **metrics.rank_correlation(scores, [r["rating"] for r in rows],
                                                                          n_boot=n_boot, seed=seed)}
        r = result["ratings"]
        console.print(f"human consistency (ratings): Spearman {_num(r['spearman'])} {_ci(*r['spearman_ci'])}, "
                      f"Kendall {_num(r['kendall'])} {_ci(*r['kendall_ci'])} on {r['n']} items")

    if "bias" in inputs:
        from raylign.evaluation.bias import evaluate_bias

        sets = inputs["bias"]
        result["bias"] = {"source": bias, "scorer": evaluate_bias(score_src, sets, n_boot=n_boot, seed=seed)}
        if scorer != "loglik-mean":
            result["bias"]["loglik"] = evaluate_bias(LogLikScorer(path, mean=True), sets, n_boot=n_boot, seed=seed)
        else:
            result["bias"]["loglik"] = result["bias"]["scorer"]
        for axis, gap in result["bias"]["scorer"].items():
            console.print(f"bias ({axis}): mean |gap| {gap['mean_abs_gap']:.4f}, worst {gap['worst_pair'][0]} vs "
                          f"{gap['worst_pair'][1]} {gap['worst_gap']:+.4f} "
                          f"[95% CI {gap['worst_gap_ci'][0]:+.4f}, {gap['worst_gap_ci'][1]:+.4f}]")

    gen_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, actors=actors,
                  cpus_per_actor=cpus_per_actor, batch_size=batch_size, progress=progress)
    if "bias" in inputs and bias_generate:
        from raylign.evaluation.bias import score_matrix
        from raylign.evaluation.generate import generate_with_ray_data

        sentiment = {}
        for s in inputs["bias"]:
            bias_prompts, _ = s.filled()
            gen = generate_with_ray_data(bias_prompts, path, **gen_kw)
            vals = judge_source.score(bias_prompts, gen["completions"])
            sentiment[s.axis] = metrics.counterfactual_gaps(score_matrix(s, vals), list(s.groups),
                                                            n_boot=n_boot, seed=seed)
        result["bias"]["generations"] = {"judge": judge_source.name, **sentiment}

    if ckpts is not None:
        from raylign.evaluation.overoptimization import overoptimization_curves

        console.print(f"over-optimisation: {len(ckpts)} checkpoint(s) of {model} + the reference {reference}, "
                      f"{len(inputs['prompts'])} prompts, proxy {proxy_source.name}, gold {gold_source.name}")
        sec = overoptimization_curves(ckpts, inputs["prompts"], reference, proxy_source, gold_source, gen_kw,
                                      n_boot=n_boot, seed=seed, progress=progress)
        result["overoptimization"] = {"run": model, "file": prompts, **sec}
        for pt in sec["points"]:
            console.print(f"  {pt['checkpoint']:>12} step {pt['step']:>5}: √KL {pt['sqrt_kl']:.3f}  "
                          f"proxy {pt['proxy']:.3f}  gold {pt['gold']:.3f}")
        console.print(f"gold peaks at {sec['gold_peak']['checkpoint']}"
                      + (" and falls after it while the proxy rises: over-optimised" if sec["overoptimized"] else ""))
    elif "prompts" in inputs:
        result["generation"] = _generation_section(inputs["prompts"], path, reference, judge_source, gen_kw,
                                                   n_boot, seed, console, prompts)

    if "references" in inputs:
        result["references"] = _references_section(inputs["references"], path, embedder, gen_kw, n_boot, seed,
                                                   console, references, progress)

    result["seconds"] = time.perf_counter() - start
    write_eval_report(result, out_dir)  # first: it moves the raw lengths out of `result` into a plot
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    console.print(f"[green]wrote[/green] {out_dir / 'eval.json'} and {out_dir / 'report.md'}")
    return result


def _generation_section(prompts: list[Any], path: str, reference: str | None, judge: Any, gen_kw: dict,
                        n_boot: int, seed: int, console: Console, source: str) -> dict[str, Any]:
    from raylign.evaluation.generate import generate_with_ray_data

    gen = generate_with_ray_data(prompts, path, reference=reference, **gen_kw)
    rewards = np.asarray(judge.score(prompts, gen["completions"]), dtype=np.float64)
    section: dict[str, Any] = {
        "file": source, "prompts": len(prompts), "actors": len(gen["actors"]),
        "generations_per_second": gen["generations_per_second"], "seconds": gen["seconds"],
        "lengths": metrics.length_stats(gen["tokens"]),
        "diversity": metrics.diversity(gen["completions"]),
        "reward": {"judge": judge.name, "mean": float(rewards.mean()),
                   "ci": list(metrics.bootstrap_ci(rewards, n_boot=n_boot, seed=seed))},
        "reward_length_correlation": metrics.reward_length_correlation(rewards, gen["tokens"]),
        "finished_fraction": float(np.mean(gen["finished"])),
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts[:5], gen["completions"][:5], strict=False)],
        "_lengths": gen["tokens"],
    }
    console.print(f"generation: {len(prompts)} prompts on {section['actors']} Ray Data actor(s), "
                  f"{gen['generations_per_second']:.1f} generations/s; mean {judge.name} {rewards.mean():.3f}; "
                  f"distinct-1 {section['diversity']['distinct_1']:.3f}, distinct-2 {section['diversity']['distinct_2']:.3f}")
    if reference is not None:
        section["kl"] = metrics.kl_monte_carlo(gen["logp"], gen["ref_logp"], gen["tokens"], n_boot=n_boot, seed=seed)
        ref_gen = generate_with_ray_data(prompts, reference, **gen_kw)
        ref_rewards = judge.score(prompts, ref_gen["completions"])
        section["win_rate"] = metrics.win_rate(rewards, ref_rewards, n_boot=n_boot, seed=seed)
        console.print(f"drift: KL to {reference} {section['kl']['kl']:.3f} nats/completion; win rate "
                      f"{section['win_rate']['win_rate']:.3f} by {judge.name}")
    return section


def _references_section(refs: list[dict[str, Any]], path: str, embedder: str, gen_kw: dict, n_boot: int,
                        seed: int, console: Console, source: str, progress: bool) -> dict[str, Any]:
    from raylign.evaluation.embeddings import SentenceEmbedder
    from raylign.evaluation.generate import generate_with_ray_data

    prompts = [r["prompt"] for r in refs]
    gen = generate_with_ray_data(prompts, path, **gen_kw)
    emb = SentenceEmbedder(embedder)
    u = emb.embed(gen["completions"], progress=progress, desc="embedding generations")
    v = emb.embed([r["reference"] for r in refs], progress=progress, desc="embedding references")
    sim = metrics.reference_similarity(u, v, n_boot=n_boot, seed=seed)
    cosines = sim.pop("cosines")
    section = {"file": source, "embedder": embedder, **sim,
               "samples": [{"prompt": r["prompt"], "generation": g, "reference": r["reference"], "cosine": c}
                           for r, g, c in zip(refs[:5], gen["completions"][:5], cosines[:5], strict=False)],
               "_cosines": cosines}
    base = _num(sim["mismatched_cosine"])
    console.print(f"agreement with human references: mean cosine {sim['mean_cosine']:.3f} "
                  f"{_ci(sim['ci_low'], sim['ci_high'])} on {sim['n']} prompts by {embedder} "
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
