"""The `raylign annotate` commands: make, serve, add-annotator, export, report, simulate.

`add_annotate_parser(subparsers)` adds them to the `raylign` command's parser; `main(argv)` runs them on
their own (`python -m raylign.annotation.cli serve TASK.jsonl --db annotations.sqlite`). Importing
this module imports nothing heavy: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def _print(line: str) -> None:
    print(line, flush=True)


def _num(value: float | None) -> str:
    """A statistic for a terminal line: 3 decimals, or n/a where it is undefined (null)."""
    return "n/a" if value is None else f"{value:.3f}"


SAMPLING_FLAGS = {"prompts": "--prompts", "references": "--pairs-or-references", "models": "--models",
                  "size": "--size", "select": "--select", "reward_model": "--reward-model", "pool": "--pool",
                  "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
                  "workers": "--workers", "cpus_per_worker": "--cpus-per-worker", "batch_size": "--batch-size",
                  "ray_address": "--ray-address"}


def _sampled_settings(args: argparse.Namespace, criteria: list[str] | None) -> Any:
    from raylign.annotation.sampling import settings_from

    values: dict[str, Any] = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    if "models" in values:
        values["models"] = [m.strip() for m in values["models"].split(",")]
    else:
        values["models"] = []
    return settings_from({**values, "kind": args.kind, "criteria": criteria, "gold": args.gold, "seed": args.seed,
                          "progress": not args.no_progress})


def cmd_make(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from raylign.annotation.errors import TaskError
    from raylign.annotation.tasks import TaskSettings, make_items, write_task

    criteria = [c.strip() for c in args.criteria.split(",")] if args.criteria else None
    if criteria is not None and args.kind != "rating":
        raise TaskError("--criteria goes with --kind rating")
    given = [flag for key, flag in SAMPLING_FLAGS.items() if getattr(args, key) is not None]
    if args.items and given:
        raise TaskError(f"--items takes ready answers; {', '.join(given)} sample new ones: give one or the other")
    if not args.items and not (args.prompts or args.references):
        raise TaskError("where do the answers come from? --items F (ready answers), or sample them: --prompts P "
                        "--models A[,B] (pairwise, rating) or --pairs-or-references F --model M (human-vs-model)")
    try:
        settings = TaskSettings(overlap=args.overlap, seed=args.seed, claim_minutes=args.claim_minutes,
                                instructions=args.instructions or "")
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise TaskError(f"invalid task settings: {problems}") from None
    summary: dict[str, Any] | None = None
    if args.items:
        items = make_items(args.items, args.kind, args.gold, criteria)
    else:
        from raylign.annotation.sampling import sample_task_items

        items, summary = sample_task_items(_sampled_settings(args, criteria))
    path = write_task(settings, items, args.out)
    gold = sum(item.is_gold for item in items)
    _print(f"wrote {path}: {len(items) - gold} {args.kind} items + {gold} gold, overlap {settings.overlap}, "
           f"seed {settings.seed}")
    if summary is not None:
        skipped = ", ".join(f"{v} {k}" for k, v in summary["skipped"].items() if v)
        line = (f"sampled {summary['candidates']} candidate(s) from {summary['prompts']} prompts in "
                f"{summary['seconds']:.1f}s" + (f" ({skipped} skipped)" if skipped else ""))
        if summary["selected"]:
            line += (f"; kept the {summary['items']} with the smallest |margin| of {summary['pool']}: mean |margin| "
                     f"{_num(summary['margin_kept'])} kept vs {_num(summary['margin_pool'])} in the pool")
        _print(line)
    _print(f"next: raylign annotate serve {path} --db annotations.sqlite")


def cmd_serve(args: argparse.Namespace) -> None:
    from raylign.annotation.app import serve
    from raylign.annotation.store import Store
    from raylign.annotation.tasks import load_task

    task = load_task(args.task)
    store = Store(args.db)
    counts = store.load_task(task)
    _print(f"annotate: {args.db}: {counts['added']} new items loaded, {counts['kept']} already there")
    serve(store, host=args.host, port=args.port, proxy_headers=args.proxy_headers,
          forwarded_allow_ips=args.forwarded_allow_ips, echo=_print)


def cmd_add_annotator(args: argparse.Namespace) -> None:
    from raylign.annotation.store import Store

    store = Store(args.db)
    annotator, token = store.add_annotator(args.name, new_token=args.new_token)
    url = args.url.rstrip("/")
    _print(f"annotator {annotator.name} (id {annotator.id}): link {url}/a/{token}")
    _print(f"API: 'Authorization: Bearer {token}' (shown once; `add-annotator --new-token` replaces it)")


def cmd_export(args: argparse.Namespace) -> None:
    from raylign.annotation.export import export
    from raylign.annotation.store import Store

    summary = export(Store(args.db, create=False), args.kind, args.out, aggregate=args.aggregate,
                     include_gold=args.include_gold, criterion=args.criterion)
    dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(summary["dropped"].items()))
    _print(f"wrote {summary['rows']} {summary['kind']} rows to {summary['out']}"
           + (f" (no row from: {dropped})" if dropped else ""))


def cmd_report(args: argparse.Namespace) -> None:
    from raylign.annotation.report import write_report
    from raylign.annotation.store import Store

    out = write_report(Store(args.db, create=False), args.out, n_boot=args.bootstrap, seed=args.seed)
    if args.json:
        _print(json.dumps(out["report"], indent=2, ensure_ascii=False))
        return
    ch = out["report"]["choices"]
    if ch.get("n_judgments"):
        lo, hi = ch["krippendorff_alpha_ci"]
        _print(f"pair items: Krippendorff's α {_num(ch['krippendorff_alpha'])} ({_num(lo)} – {_num(hi)}), Fleiss' κ "
               f"{_num(ch['fleiss_kappa'])}, {ch['n_judgments']} judgments of {ch['n_items']} items")
    for name, stats in out["report"]["ratings"].items():
        _print(f"ratings {name}: α (interval) {_num(stats['krippendorff_alpha_interval'])}, "
               f"mean {stats['mean_rating']:.2f}")
    _print("wrote " + ", ".join(out["paths"]))


def cmd_simulate(args: argparse.Namespace) -> None:
    from raylign.annotation.simulate import simulate
    from raylign.annotation.store import Store

    summary = simulate(Store(args.db, create=False), args.url, annotators=args.annotators, noise=args.noise,
                       oracle=args.oracle, seed=args.seed, prefix=args.prefix)
    implied = summary["implied_alpha"]
    _print(f"simulated {len(summary['annotators'])} annotators ({summary['oracle']} oracle, noise {args.noise}): "
           f"{summary['judgments']} judgments posted to {summary['url']} in {summary['seconds']:.1f}s; "
           f"implied α {'n/a' if implied is None else f'{implied:.3f}'}")
    if args.json:
        _print(json.dumps(summary, indent=2))


def add_annotate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `annotate` and its actions to a `raylign` sub-command set; returns the `annotate` parser."""
    p = subparsers.add_parser(
        "annotate", help="human judgments: make a task, serve it to annotators, export pairs/ratings, report agreement",
        description="Humans in the loop. `make` writes a TASK.jsonl from ready answers; `serve` runs the web app "
        "(pages + JSON API) annotators use; `add-annotator` gives someone a link; `export` writes raylign data files "
        "(pairs, ratings, unpaired, judgments); `report` computes agreement (Krippendorff's α, Fleiss' κ, position bias, "
        "annotator quality); `simulate` lets noisy simulated annotators judge through the API.",
    )
    sub = p.add_subparsers(dest="annotate_action", required=True, metavar="ACTION")

    q = sub.add_parser("make", help="write TASK.jsonl from ready answers, or sample the answers on Ray",
                       description="Write a task for `annotate serve`. From ready answers (--items F): --kind pairwise "
                       "reads rows {prompt, response_a, response_b[, source_a, source_b, item_id]} or a pairs file "
                       "{prompt, chosen, rejected}; human-vs-model reads {prompt, human, model[, model_name]} or the "
                       "response_a/b form with one source \"human\"; rating reads {prompt, completion} or {text}. "
                       "Sampled on Ray rollout workers: --kind pairwise --prompts P --models A[,B] (two samples of A, "
                       "or A against B, e.g. runs/x/final,builtin:smollm2-135m-instruct); --kind human-vs-model "
                       "--pairs-or-references F --model M (M's answer against the human one: F's chosen, reference "
                       "or completion); --kind rating --prompts P --model M --criteria helpful,harmless. --select "
                       "uncertainty --reward-model R --size K [--pool N] samples N candidate pairs, scores both answers "
                       "with R and keeps the K with the smallest |margin| (active learning). --gold adds attention "
                       "checks: rows of the same shape with their known answer in `gold` (a | b | tie, or {criterion: "
                       "1-7}). Formats: raylign/annotation/tasks.py and raylign/annotation/sampling.py.")
    q.add_argument("--kind", required=True, choices=["pairwise", "human-vs-model", "rating"])
    src = q.add_argument_group("answers (one of)")
    src.add_argument("--items", help="ready answers (JSONL, CSV, Parquet, ...)")
    src.add_argument("--prompts", help="sample: prompts file (pairwise, rating) or builtin:everyday-prompts")
    src.add_argument("--pairs-or-references", dest="references", metavar="F",
                     help="sample (human-vs-model): a pairs file (chosen = the human answer) or rows {prompt, "
                     "reference | completion}")
    smp = q.add_argument_group("sampling")
    smp.add_argument("--models", "--model", dest="models", metavar="A[,B]",
                     help="model(s) writing the answers: HF id, local dir, runs/<name>[/final], builtin:/tiny:; "
                     "pairwise: A (two samples) or A,B")
    smp.add_argument("--size", "--limit", dest="size", type=int,
                     help="items to make: the first K prompts, or with --select the K kept of the pool")
    smp.add_argument("--select", choices=["uncertainty"], help="active selection of the pairs (needs --reward-model, --size)")
    smp.add_argument("--reward-model", help="--select: reward source spec scoring the pool (a reward model dir, ...)")
    smp.add_argument("--pool", type=int, help="--select: candidate pairs to sample (default 4 x --size)")
    smp.add_argument("--max-new-tokens", type=int, help="tokens per answer (default 48)")
    smp.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    smp.add_argument("--top-p", type=float, help="nucleus sampling (default 1.0: off)")
    smp.add_argument("--workers", type=int, help="rollout actors (default 1)")
    smp.add_argument("--cpus-per-worker", type=float, help="CPUs per rollout actor (default 1)")
    smp.add_argument("--batch-size", type=int, help="prompts per generate call (default 8)")
    smp.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    smp.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--overlap", type=int, default=1, help="annotators per item, k (default 1)")
    q.add_argument("--gold", help="gold items (attention checks) mixed into every annotator's queue")
    q.add_argument("--criteria", help="rating: comma-separated criteria (default: overall)")
    q.add_argument("--seed", type=int, default=0,
                   help="seed of queue and left/right orders, and of sampling (default 0)")
    q.add_argument("--claim-minutes", type=float, default=30.0,
                   help="how long an item shown to someone is held for them (default 30)")
    q.add_argument("--instructions", help="text shown above every item")
    q.add_argument("--out", required=True, help="the task file to write (TASK.jsonl)")
    q.set_defaults(func=cmd_make)

    q = sub.add_parser("serve", help="serve a task to annotators (web pages + JSON API)",
                       description="Load TASK.jsonl into --db (created if missing; loading again adds only new items) "
                       "and serve it until Ctrl-C. Every address needs an annotator token (add-annotator prints each "
                       "annotator's link). Binds 127.0.0.1 by default: to reach people elsewhere keep it so and put a "
                       "TLS-terminating proxy in front (Caddy: `reverse_proxy 127.0.0.1:8000`; nginx: proxy_pass plus "
                       "`proxy_set_header X-Forwarded-Proto $scheme`), start with --proxy-headers, and give add-annotator "
                       "--url https://your.host. No access log is written (links hold tokens).")
    q.add_argument("task", metavar="TASK.jsonl", help="the task (raylign annotate make)")
    q.add_argument("--db", required=True, help="the annotations database (SQLite file)")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    q.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    q.add_argument("--proxy-headers", action="store_true",
                   help="behind a TLS proxy: trust its X-Forwarded-Proto/For (from --forwarded-allow-ips)")
    q.add_argument("--forwarded-allow-ips", default="127.0.0.1", help="proxies trusted with --proxy-headers")
    q.set_defaults(func=cmd_serve)

    q = sub.add_parser("add-annotator", help="add an annotator and print their link and token")
    q.add_argument("name", help="the annotator's name (shown in exports and reports)")
    q.add_argument("--db", required=True, help="the annotations database")
    q.add_argument("--url", default=DEFAULT_URL, help=f"the address annotators open (default {DEFAULT_URL})")
    q.add_argument("--new-token", action="store_true", help="replace an existing annotator's token (old link stops working)")
    q.set_defaults(func=cmd_add_annotator)

    q = sub.add_parser("export", help="write current judgments as pairs / ratings / unpaired / judgments rows",
                       description="pairs: majority answer per item (ties and splits give no row) or every a/b judgment "
                       "(--aggregate all); unpaired: the pairs as KTO rows; ratings: median rating per item and criterion "
                       "or every rating; judgments: every current judgment as one JSONL row. Rows carry annotators and "
                       "agreement columns. Details: raylign/annotation/export.py.")
    q.add_argument("db", metavar="DB", help="the annotations database")
    q.add_argument("--kind", required=True, choices=["pairs", "ratings", "unpaired", "judgments"])
    q.add_argument("--aggregate", choices=["majority", "all"], default="majority", help="default majority")
    q.add_argument("--criterion", help="ratings: only this criterion")
    q.add_argument("--include-gold", action="store_true", help="also export the gold items (attention checks)")
    q.add_argument("--out", required=True, help="the JSONL file to write")
    q.set_defaults(func=cmd_export)

    q = sub.add_parser("report", help="agreement statistics: report.md, report.json and PNG plots")
    q.add_argument("db", metavar="DB", help="the annotations database")
    q.add_argument("--out", required=True, help="directory for report.md, report.json and plots")
    q.add_argument("--json", action="store_true", help="print the statistics as JSON")
    q.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    q.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    q.set_defaults(func=cmd_report)

    q = sub.add_parser("simulate", help="simulated annotators judge through the HTTP API (an oracle plus noise)",
                       description="Create --annotators annotators with tokens of their own and let them judge their "
                       "queues through the running server at --url: the oracle (a reward source spec) prefers the "
                       "answer it scores higher; with probability --noise an answer is replaced by one drawn uniformly "
                       "from all answers (a, b, tie; ratings 1-7), which is the model of agreement.implied_alpha.")
    q.add_argument("db", metavar="DB", help="the annotations database the server at --url uses")
    q.add_argument("--url", default=DEFAULT_URL, help=f"the annotation server (default {DEFAULT_URL})")
    q.add_argument("--annotators", type=int, default=5, help="simulated annotators (default 5)")
    q.add_argument("--noise", type=float, default=0.2, help="probability an answer is replaced at random (default 0.2)")
    q.add_argument("--oracle", default="lexicon:vader", help="reward source spec (default lexicon:vader)")
    q.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    q.add_argument("--prefix", default="sim", help="annotator names: PREFIX-1, PREFIX-2, ... (default sim)")
    q.add_argument("--json", action="store_true", help="also print the summary as JSON")
    q.set_defaults(func=cmd_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
    """`raylign annotate ...` on its own: user errors are one line on stderr (exit 2)."""
    parser = argparse.ArgumentParser(prog="raylign")
    add_annotate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["annotate", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from raylign.errors import UserError

        if isinstance(exc, (UserError, FileNotFoundError)):  # an unknown model or too few CPUs too
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
