"""The `raylign` command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from raylign.evaluation.settings import EvalSettings
    from raylign.pipelines.annotate_settings import AnnotateSettings

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so the same clean-up runs (exit 143)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _stop_local_ray() -> None:
    """After an interrupt: stop the Ray this process started (attached clusters are only disconnected)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


# ---- commands ------------------------------------------------------------------------------------


def cmd_recipes(args: argparse.Namespace) -> None:
    from raylign.config import list_recipes, load_config, recipe_text

    if args.action == "list":
        table = Table(title="built-in recipes", show_lines=False)
        recipes = list_recipes()
        table.add_column("name", style="bold cyan", no_wrap=True, min_width=max(map(len, recipes)))
        table.add_column("description")
        for name, desc in recipes.items():
            table.add_row(name, desc)
        console.print(table)
        return
    if not args.name:
        raise SystemExit("usage: raylign recipes show NAME")
    load_config(args.name)  # validate before showing
    console.print(recipe_text(args.name)[1], markup=False, highlight=False)


def cmd_models(args: argparse.Namespace) -> None:
    from raylign.models import list_models, pull_model

    if args.action == "list":
        models = list_models()
        table = Table(title="models raylign can load without a model hub")
        table.add_column("name", style="bold cyan", no_wrap=True, min_width=max(len(m["name"]) for m in models))
        for col in ("kind", "cached", "description"):
            table.add_column(col)
        for m in models:
            table.add_row(m["name"], m["kind"], "yes" if m["cached"] else "no", m["description"])
        console.print(table)
        console.print("Any Hugging Face id or local model directory works too.")
        return
    if not args.name:
        raise SystemExit("usage: raylign models pull NAME")
    path = pull_model(args.name)
    console.print(f"[green]ready:[/green] {args.name} -> {path}")


def cmd_data(args: argparse.Namespace) -> None:
    from raylign.data import format_summary, summarize

    tokenizer = None
    if args.tokenizer:
        from raylign.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    summary = summarize(args.file, args.kind, tokenizer=tokenizer)
    console.print(format_summary(summary), markup=False, highlight=False)
    console.print(f"[green]valid:[/green] {args.file} as {args.kind}")


def annotate_settings(args: argparse.Namespace) -> AnnotateSettings:
    """The `AnnotateSettings` of a parsed `raylign data annotate` command line (one ConfigError if bad)."""
    from raylign.pipelines.annotate_settings import settings_from

    return settings_from({
        "prompts": args.prompts, "model": args.model, "annotator": args.annotator, "out": args.out,
        "n": args.n, "seed": args.seed, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker, "batch_size": args.batch_size, "min_margin": args.min_margin,
        "progress": not args.no_progress,
    })


def cmd_data_annotate(args: argparse.Namespace) -> None:
    from raylign.pipelines.annotate import run_annotate

    run_annotate(annotate_settings(args), console=console)


def cmd_data_scrub(args: argparse.Namespace) -> None:
    from raylign.data.scrub import run_scrub_command

    run_scrub_command(args, echo=lambda line: console.print(line, markup=False, highlight=False))


def cmd_data_augment(args: argparse.Namespace) -> None:
    from raylign.data.augment import run_augment_command

    run_augment_command(args, echo=lambda line: console.print(line, markup=False, highlight=False))


def cmd_train(args: argparse.Namespace) -> None:
    import json

    from raylign.config import load_config
    from raylign.pipelines import run_pipeline

    # --name goes through the same validation as output.name (a JSON string is a YAML string).
    name = [f"output.name={json.dumps(args.name)}"] if args.name else []
    config = load_config(args.recipe, [*args.overrides, *name])
    if args.resume_force and not args.resume:
        raise SystemExit("--resume-force goes with --resume")
    result = run_pipeline(config, resume=args.resume, resume_force=args.resume_force, console=console)
    console.print(result.summary_line())


def cmd_quickstart(args: argparse.Namespace) -> None:
    from raylign.pipelines.quickstart import run_quickstart

    run_quickstart(args.overrides, console=console)


def cmd_serve(args: argparse.Namespace) -> None:
    from raylign.serving.launch import serve_forever
    from raylign.serving.settings import API_KEY_ENV, ServeError, auth_settings, settings_from

    if args.api_key is not None:  # deprecated: the key is then in the process list for every user to read
        if args.api_key_file or args.no_api_key:
            raise ServeError("--api-key cannot be combined with --api-key-file or --no-api-key; give one")
        err_console.print(f"[yellow]warning:[/yellow] --api-key puts the key in the process list (ps) for every "
                          f"user of this machine to read, and is deprecated: use --api-key-file PATH or ${API_KEY_ENV}",
                          highlight=False)
        os.environ[API_KEY_ENV] = args.api_key  # this process's environment: the Ray it starts inherits it
    attach = bool(args.ray_address or os.environ.get("RAY_ADDRESS"))
    auth = auth_settings(args.host, api_key_file=args.api_key_file, no_api_key=args.no_api_key, attach=attach)
    autoscale = args.min_replicas is not None or args.max_replicas is not None
    settings = settings_from({
        "model": args.model, "served_model_name": args.served_model_name, "reward_model": args.reward_model,
        "dtype": args.dtype, "trust_remote_code": args.trust_remote_code, "merge_lora": not args.no_merge_lora,
        "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
        "prefill_chunk_tokens": args.prefill_chunk_tokens,
        "max_tokens_limit": args.max_tokens_limit, "default_max_tokens": args.default_max_tokens,
        "max_request_tokens": args.max_request_tokens, "request_timeout_s": args.timeout, **auth,
        "num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica, "num_replicas": args.replicas,
        "min_replicas": (args.min_replicas if args.min_replicas is not None else 1) if autoscale else None,
        "max_replicas": (args.max_replicas if args.max_replicas is not None else args.replicas) if autoscale else None,
        "max_ongoing_requests": args.max_ongoing_requests, "max_queued_requests": args.max_queued_requests,
    })
    serve_forever(settings, host=args.host, port=args.port, ray_address=args.ray_address,
                  echo=lambda line: console.print(line, markup=False, highlight=False))


def cmd_tune(args: argparse.Namespace) -> None:
    if args.config == "summarize":
        from raylign.tuning.summary import load_summary, plot_summary, print_summary

        if len(args.overrides) != 1:
            raise SystemExit("usage: raylign tune summarize DIR [--metric M]")
        summary = load_summary(args.overrides[0], args.metric)
        print_summary(summary, console)
        console.print(f"plot: {plot_summary(summary)}")
        return
    from raylign.tuning.spec import load_spec
    from raylign.tuning.summary import load_summary, plot_summary, print_summary
    from raylign.tuning.tuner import run_tune

    spec = load_spec(args.config, args.overrides)
    sweep_dir = run_tune(spec, console=console, restart=args.restart, dashboard=not args.no_dashboard,
                         ray_address=args.ray_address)
    summary = load_summary(sweep_dir)
    print_summary(summary, console)
    console.print(f"plot: {plot_summary(summary)}")


def cmd_dashboard(args: argparse.Namespace) -> None:
    import subprocess
    from pathlib import Path

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"no such run or sweep directory: {args.dir}")
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", args.dir, "--host", args.host, "--port", str(args.port)]
    console.print(f"TensorBoard on http://{args.host}:{args.port}/  ({' '.join(cmd[2:])}); Ctrl-C stops it")
    raise SystemExit(subprocess.call(cmd))


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    """The `EvalSettings` of a parsed `raylign eval` command line (one ConfigError if bad)."""
    from raylign.evaluation.settings import settings_from

    return settings_from({
        "model": args.model, "out": args.out, "pairs": args.pairs, "ratings": args.ratings, "bias": args.bias,
        "prompts": args.prompts, "reference": args.reference, "references": args.references,
        "embedder": args.embedder, "checkpoints": args.checkpoints, "proxy": args.proxy, "gold": args.gold,
        "human": args.human,
        "scorer": args.scorer, "judge": args.judge, "beta": args.beta, "limit": args.limit,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor, "batch_size": args.batch_size,
        "bias_generate": args.bias_generate, "seed": args.seed, "progress": not args.no_progress,
        "explain": args.explain,
    })


def cmd_eval(args: argparse.Namespace) -> None:
    from raylign.evaluation.runner import run_eval

    settings = eval_settings(args)
    human = None
    if settings.human:
        from raylign.annotation.export import human_majority

        human = human_majority(settings.human)
    run_eval(settings, console=console, human=human)


def cmd_report(args: argparse.Namespace) -> None:
    from raylign.evaluation.report import write_run_report

    out = write_run_report(args.run_dir)
    console.print(f"[green]wrote[/green] {out['report']} with {len(out['plots'])} plot(s) from {out['steps']} rows")


# ---- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylign", description="Align language models with human preferences, on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="pull a small real model and align it end to end on this machine")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the quickstart recipe")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("train", help="run a recipe: raylign train RECIPE_OR_YAML [key=value ...]")
    p.add_argument("recipe", help="built-in recipe name (see `raylign recipes list`) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 resources.learners=2")
    p.add_argument("--resume", action="store_true", help="continue the run directory from its last checkpoint")
    p.add_argument("--resume-force", action="store_true",
                   help="with --resume: continue even though the model, algorithm, data or seed changed")
    p.add_argument("--name", help="run name (same as output.name=...)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="list or show built-in recipes")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("models", help="list or pull builtin/tiny models")
    p.add_argument("action", choices=["list", "pull"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="validate a data file, or annotate prompts into preference pairs")
    data_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = data_sub.add_parser("validate", help="check every row of a data file and print a summary")
    p.add_argument("file", help="JSONL, Parquet, CSV, a local HF datasets dir, or builtin:<name>")
    p.add_argument("--kind", required=True, choices=["prompts", "pairs", "unpaired", "ratings", "text"])
    p.add_argument("--tokenizer", help="model whose tokenizer measures lengths in tokens")
    p.set_defaults(func=cmd_data)
    _add_annotate_parser(data_sub)
    _add_scrub_augment_parsers(data_sub)
    _add_eval_parsers(sub)
    from raylign.evaluation.explain import add_explain_parser

    add_explain_parser(sub)
    _add_serve_parser(sub)
    from raylign.annotation.cli import add_annotate_parser

    add_annotate_parser(sub)
    _add_tune_parsers(sub)
    from raylign.localcluster import add_cluster_parser

    add_cluster_parser(sub)
    return parser


def _add_tune_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="Ray Tune sweep: raylign tune CONFIG [key=value ...]; raylign tune summarize DIR",
        description="Run the sweep in CONFIG (a YAML in tune_configs/): every trial runs the sweep's recipe with "
        "sampled values, reporting its metrics and the alignment objective to Tune (ASHA, PBT or none; random, "
        "Optuna or grid search). Overrides of sweep keys (num_samples=8, scheduler.type=pbt) change the sweep; "
        "any other key=value is a recipe override for every trial (model.path=tiny:llama). Running the same "
        "command again resumes an interrupted sweep. `raylign tune summarize DIR` prints the ranked trials and "
        "writes DIR/sweep.png.",
    )
    p.add_argument("config", help="sweep YAML (e.g. tune_configs/multitask_weights.yaml), or 'summarize'")
    p.add_argument("overrides", nargs="*", help="key=value overrides (sweep or recipe keys); for summarize: DIR")
    p.add_argument("--restart", action="store_true", help="delete an existing sweep directory and start over")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local Ray)")
    p.add_argument("--ray-address", help="Ray cluster to run the trials on (default: $RAY_ADDRESS, else local)")
    p.add_argument("--metric", help="summarize: rank by this metric instead of the sweep's")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("dashboard", help="start TensorBoard on a run or sweep directory")
    p.add_argument("dir", help="runs/<name> or a sweep directory")
    p.add_argument("--port", type=int, default=6006)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_dashboard)


def _add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="measure agreement with humans, bias and drift; write eval.json and a report",
        description="Evaluate MODEL_OR_RUN (a run directory = its final/ model, a local dir, HF id, builtin:/tiny:) "
        "on what you give: --pairs (pairwise agreement with human labels, bootstrap 95%% CI, per category), "
        "--ratings (Spearman/Kendall with human ratings), --bias (counterfactual gaps across groups), --prompts "
        "(generations with Ray Data: lengths, diversity, reward, and with --reference KL and win rate), "
        "--references (cosine similarity of generations to human answers, MiniLM embeddings), --human DB "
        "(agreement with the majority of an annotations database), --checkpoints "
        "with --prompts/--gold[/--proxy] on a run directory (proxy and gold reward vs sqrt(KL) across its "
        "checkpoints: reward over-optimisation). Writes OUT/eval.json, OUT/report.md and PNG plots.",
    )
    p.add_argument("model", metavar="MODEL_OR_RUN", help="runs/<name>, a model directory, HF id, builtin:/tiny:")
    p.add_argument("--out", required=True, help="output directory for eval.json, report.md and plots")
    p.add_argument("--pairs", help="pairs file {prompt, chosen, rejected[, category]}")
    p.add_argument("--ratings", help="ratings file {text | prompt+completion, rating}")
    p.add_argument("--bias", help="'builtin' (gender, names, nationality, religion, age) or a JSONL file extending it")
    p.add_argument("--prompts", help="prompts file (or builtin:everyday-prompts) to generate from")
    p.add_argument("--reference", help="reference model (DPO scorer, KL, win rate); default for a run: its base model")
    p.add_argument("--references", help="file of prompts with human answers: pairs (chosen is the answer) or unpaired "
                   "(completions labelled true); scores generation-vs-answer embedding similarity")
    p.add_argument("--human", metavar="DB", help="annotations database (raylign annotate): agreement of --scorer with "
                   "the human majority on its pairwise items (ties and splits left out, as the pairs export does)")
    p.add_argument("--embedder", default="builtin:minilm-l6",
                   help="sentence encoder for --references (default builtin:minilm-l6)")
    p.add_argument("--checkpoints", action="store_true",
                   help="MODEL_OR_RUN is a run dir: proxy and gold reward and sqrt(KL) at each of its checkpoints "
                   "on --prompts (reward over-optimisation curves)")
    p.add_argument("--proxy", help="with --checkpoints: the reward trained on (default: the run's reward.sources)")
    p.add_argument("--gold", help="with --checkpoints: a held-out gold reward source (lexicon:vader, a reward model dir, ...)")
    p.add_argument("--scorer", default="loglik-mean",
                   help="loglik-mean (default), loglik-sum, dpo, or a reward source (lexicon:vader, a reward model dir, ...)")
    p.add_argument("--judge", default="lexicon:vader", help="reward source judging generations (default lexicon:vader)")
    p.add_argument("--beta", type=float, default=0.1, help="β of the DPO implicit reward (default 0.1)")
    p.add_argument("--limit", type=int, help="use only the first N rows of each file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0: unbiased KL)")
    p.add_argument("--actors", type=int, default=2, help="Ray Data generator actors (default 2)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per generator actor (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    p.add_argument("--bias-generate", action="store_true", help="also compare the judge's score of generations per group")
    p.add_argument("--explain", type=int, metavar="N", help="with --pairs: token attributions (Integrated Gradients) "
                   "of the N pairs with the largest |margin| into OUT/explain/ (reward model, discriminator or dpo scorer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="plots and a markdown summary of a training run: RUN_DIR/report/")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with metrics.jsonl (runs/<name>)")
    p.set_defaults(func=cmd_report)


def _add_scrub_augment_parsers(data_sub: argparse._SubParsersAction) -> None:
    kinds = ["prompts", "pairs", "unpaired", "ratings", "text"]
    p = data_sub.add_parser(
        "scrub", help="replace personal data in every text field by keyed pseudonyms, with a report",
        description="Scrub IN into OUT (JSONL, atomic): each e-mail, phone, credit card (Luhn), IBAN, IP, URL, US SSN "
        "and date Presidio finds, and with --spacy each person, location and organisation, becomes <ENTITY_xxxxxxxx>, "
        "an HMAC of the value under your secret key (--key-file or $RAYLIGN_SCRUB_KEY, never written out), the same in "
        "every field and row. The JSON report has counts per entity, field and split, rows touched, the recognizers, "
        "a second pass on OUT and, for pairs, the chosen-vs-rejected asymmetry. Needs raylign[privacy]; downloads nothing.",
    )
    p.add_argument("file", metavar="IN", help="data file (JSONL, JSON, CSV, Parquet, a datasets dir)")
    p.add_argument("--kind", required=True, choices=kinds)
    p.add_argument("--out", required=True, help="scrubbed copy (.jsonl)")
    p.add_argument("--report", help="report JSON (default: OUT's name with .report.json)")
    p.add_argument("--key-file", help="file holding the secret pseudonym key (default: $RAYLIGN_SCRUB_KEY)")
    p.add_argument("--spacy", metavar="PATH_OR_PACKAGE", help="spaCy pipeline (directory or installed package) "
                   "for PERSON, LOCATION, ORGANIZATION; without it names are NOT removed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data_scrub)

    p = data_sub.add_parser(
        "augment", help="add counterfactual copies (group terms swapped) of every row that mentions one",
        description="Write IN's rows to OUT (JSONL, atomic), each row mentioning a group term of a bias axis followed "
        "by its counterfactual copies (the term exchanged for each other group's in every text field, the label kept). "
        "Axes: those of `raylign eval --bias` (builtin), or a JSONL file of {axis, groups} lines extending them.",
    )
    p.add_argument("file", metavar="IN", help="data file (pairs, unpaired, ratings, prompts or text)")
    p.add_argument("--counterfactual", required=True, metavar="builtin|F", help="'builtin' or a bias-set JSONL file")
    p.add_argument("--out", required=True, help="augmented file (.jsonl)")
    p.add_argument("--kind", choices=kinds, help="data kind (default: from the columns)")
    p.add_argument("--axes", help="comma-separated axes to use (default: all)")
    p.add_argument("--max-per-axis", type=int, help="at most N copies per row and axis (default: every other group)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_augment)


def _add_annotate_parser(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser(
        "annotate",
        help="sample n answers per prompt, score them with an annotator, write best-vs-worst pairs",
        description="Sample --n completions per prompt from --model on Ray rollout workers, score them with "
        "--annotator and write {prompt, chosen, rejected, margin, chosen_score, rejected_score} pairs "
        "(best vs worst; prompts whose scores all tie are skipped). Annotators: lexicon:vader, length, "
        "module:function (your f(prompts, completions) -> floats), or a reward model directory/name.",
    )
    p.add_argument("--prompts", required=True, help="prompts file (JSONL, Parquet, CSV, ...) or builtin:everyday-prompts")
    p.add_argument("--model", required=True, help="model that writes the answers: HF id, local dir, builtin:/tiny:")
    p.add_argument("--annotator", required=True,
                   help="reward source that scores them: lexicon:vader, length, [function:]module:attr, or a reward model")
    p.add_argument("--out", required=True, help="output pairs file (.jsonl), written atomically")
    p.add_argument("--n", type=int, default=2, help="samples per prompt (>= 2; default 2)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed gives the same file (default 0)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=48, help="default 48")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--workers", type=int, default=1, help="rollout actors sharing the prompts (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per rollout actor (default 1.0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="keep only pairs whose annotator scores differ by at least this (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_annotate)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over HTTP with Ray Serve (OpenAI-compatible, batched, streaming)",
        description="Serve MODEL (a run's final/ dir, a local HF dir, an HF id, builtin:<name>, tiny:<arch>) at "
        "/v1/completions, /v1/chat/completions (stream: true for server-sent events), /v1/models, /v1/score "
        "(with --reward-model) and /health, on Ray Serve replicas that batch concurrent requests. Runs until "
        "Ctrl-C. Off 127.0.0.1, and on an existing Ray (--ray-address, $RAY_ADDRESS), an API key is required "
        "(--api-key-file PATH or $RAYLIGN_API_KEY) unless --no-api-key. A replica works on --max-ongoing-requests "
        "requests, queues --max-queued-requests more and answers any beyond with 429 (Retry-After); a request "
        "not answered within --timeout of reaching a replica, queued time included, gets 408.",
    )
    p.add_argument("model", help="model to serve: runs/<name>/final, a local dir, HF id, builtin:/tiny:")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--served-model-name", help="the model name clients send (default: MODEL as given)")
    p.add_argument("--reward-model", help="reward source for /v1/score: a reward model dir, discriminator, "
                   "lexicon:vader, module:function, ...")
    p.add_argument("--replicas", type=int, default=1, help="replicas (default 1)")
    p.add_argument("--min-replicas", type=int, help="autoscale: fewest replicas (with --max-replicas)")
    p.add_argument("--max-replicas", type=int, help="autoscale: most replicas")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica = its torch threads (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (default 0)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows (prompts x n) per forward pass (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill (default 10)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=256, metavar="N",
                   help="while requests decode, prefill a longer new prompt N tokens per decode step so running "
                   "streams keep going (default 256; 0: each prompt at once)")
    p.add_argument("--max-ongoing-requests", type=int, help="requests a replica works on at once "
                   "(default 2 x max batch size)")
    p.add_argument("--max-queued-requests", type=int, help="requests a replica holds waiting beyond those; more "
                   "get 429 with Retry-After (default: --max-ongoing-requests)")
    p.add_argument("--max-request-tokens", type=int, default=65_536, help="per-request budget: prompt tokens x n + "
                   "max_tokens x n (default 65536; more get 400)")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask (default 512)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="chat max_tokens when a request gives none")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds, time queued "
                   "included (default 120)")
    p.add_argument("--api-key-file", metavar="PATH", help="require 'Authorization: Bearer KEY', KEY read from PATH "
                   "(on a cluster: a path every node can read; default: $RAYLIGN_API_KEY if set)")
    p.add_argument("--api-key", help="deprecated (shows the key in ps): use --api-key-file or $RAYLIGN_API_KEY")
    p.add_argument("--no-api-key", action="store_true", help="serve without auth even on a non-local --host "
                   "or an existing Ray")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    p.add_argument("--no-merge-lora", action="store_true", help="apply a LoRA adapter at run time instead of merging it")
    p.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    if main_thread:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        func(args)
    except KeyboardInterrupt as exc:
        # Actors and the run directory were released on the way out (pipelines/loop.py).
        for sig in saved:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        _stop_local_ray()
        terminated = isinstance(exc, Terminated)
        err_console.print(f"[yellow]{'terminated' if terminated else 'interrupted'}[/yellow]")
        return 143 if terminated else 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line, the rest re-raise
        from raylign.errors import UserError

        if isinstance(exc, (UserError, FileNotFoundError)):
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            return 2
        raise
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: a handler not set from Python, nothing to restore
                signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
