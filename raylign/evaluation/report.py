"""Reports: PNG plots (matplotlib, Agg backend: no display needed) and a markdown summary.

`write_run_report(run_dir)` turns a training run's `metrics.jsonl` into `RUN_DIR/report/`:
reward (mean and per source `reward/<source>`), KL, losses, response lengths, and the adversarial
discriminator's accuracies and fool rate when the run logged them, one PNG per panel plus
`report.md` with the first/last/min/max of every plotted series.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

ADVERSARIAL_KEYS = ("discriminator/accuracy_human", "discriminator/accuracy_policy", "discriminator/fool_rate")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _panels(keys: list[str]) -> list[tuple[str, str, list[str], str]]:
    """(title, file stem, metric keys, y label) for every panel that has data."""
    def pick(pred) -> list[str]:
        return sorted(k for k in keys if pred(k))

    panels = [
        ("Reward", "reward", pick(lambda k: k in ("reward/mean", "eval/reward", "train/chosen_reward",
                                                   "train/rejected_reward", "train/margin")), "reward"),
        ("Reward per source", "reward_sources",
         pick(lambda k: (k.startswith("reward/") and k not in ("reward/mean", "reward/std"))
              or k.startswith("eval/reward/")), "reward"),
        ("KL to the reference", "kl", pick(lambda k: k.startswith("kl/") and k != "kl/coef"
                                           or k in ("eval/kl", "policy/approx_kl")), "nats"),
        ("Loss", "loss", pick(lambda k: k.endswith("loss") and not k.startswith("perf/")), "loss"),
        ("Response length", "lengths", pick(lambda k: k.startswith("response/length") or k == "eval/response_length"),
         "tokens"),
        ("Discriminator", "discriminator", [k for k in ADVERSARIAL_KEYS if k in keys], "fraction"),
        ("Diversity", "diversity", pick(lambda k: "distinct" in k), "distinct-n"),
        ("Accuracy", "accuracy", pick(lambda k: k.endswith("accuracy") and not k.startswith("discriminator/")),
         "accuracy"),
    ]
    return [p for p in panels if p[2]]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        if _is_number(row.get(key)):
            xs.append(float(row.get("step", len(xs))))
            ys.append(float(row[key]))
    return xs, ys


def line_plot(path: Path, title: str, series: dict[str, tuple[list[float], list[float]]], ylabel: str,
              xlabel: str = "step") -> Path:
    """One PNG with a line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or title == "Discriminator":
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_plot(path: Path, title: str, labels: list[str], values: list[float],
             intervals: list[tuple[float, float]] | None = None, ylabel: str = "", hline: float | None = None) -> Path:
    """One PNG of bars with optional error bars (intervals as (low, high))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.6), dpi=100)
    yerr = None
    if intervals:
        yerr = [[max(v - lo, 0) for v, (lo, _) in zip(values, intervals, strict=True)],
                [max(hi - v, 0) for v, (_, hi) in zip(values, intervals, strict=True)]]
    ax.bar(range(len(values)), values, yerr=yerr, capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def histogram(path: Path, title: str, values: list[float], xlabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.hist(values, bins=min(30, max(5, len(set(values)))), color="#55A868")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def write_run_report(run_dir: str | Path) -> dict[str, Any]:
    """Plots and `report.md` for a training run directory; returns {report, plots, steps}."""
    from raylign.rundir import read_metrics

    run = Path(run_dir).expanduser()
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run} has no metrics.jsonl: pass a run directory written by `raylign train` "
                                "(runs/<name>/)")
    rows = read_metrics(run)
    if not rows:
        raise FileNotFoundError(f"{run / 'metrics.jsonl'} is empty: the run logged no step yet")
    out = run / "report"
    out.mkdir(exist_ok=True)
    keys = sorted({k for row in rows for k, v in row.items() if _is_number(v)} - {"step", "time"})
    plots, lines = [], []
    steps = [r["step"] for r in rows if _is_number(r.get("step"))]
    lines += [f"# Training report: {run.name}", "",
              f"{len(rows)} logged rows, steps {min(steps, default=0)}–{max(steps, default=0)}. "
              f"Source: `{run / 'metrics.jsonl'}`.", ""]
    for title, stem, panel_keys, ylabel in _panels(keys):
        series = {k: _series(rows, k) for k in panel_keys}
        series = {k: v for k, v in series.items() if v[0]}
        if not series:
            continue
        png = line_plot(out / f"{stem}.png", title, series, ylabel)
        plots.append(png)
        lines += [f"## {title}", "", f"![{title}]({png.name})", "",
                  "| metric | first | last | min | max |", "|---|---|---|---|---|"]
        for k, (_, ys) in series.items():
            lines.append(f"| `{k}` | {_fmt(ys[0])} | {_fmt(ys[-1])} | {_fmt(min(ys))} | {_fmt(max(ys))} |")
        lines.append("")
    if not plots:
        lines += ["No reward, KL, loss, length or discriminator metrics were logged in this run.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return {"report": str(report), "plots": [str(p) for p in plots], "steps": len(rows)}
