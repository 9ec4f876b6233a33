"""`raylign tune summarize DIR`: a ranked table of a sweep's trials and a PNG of how they went.

Reads what Tune wrote (experiment state, each trial's result.json) through `ExperimentAnalysis`; the
ranking uses each trial's last reported value of the sweep's metric (what ASHA compared), and shows
its best value and the iterations it ran, so trials stopped early stand out. The plot has one panel
of the metric over iterations per trial and one panel of the metric against each searched parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raylign.config import ConfigError
from raylign.tuning.trainable import RUN_SUBDIR
from raylign.tuning.tuner import SPEC_FILE

PLOT_FILE = "sweep.png"


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str
    iterations: int
    last: float | None
    best: float | None
    history: list[tuple[int, float]] = field(default_factory=list)
    path: str = ""
    checkpoint: str | None = None


@dataclass
class SweepSummary:
    sweep_dir: Path
    metric: str
    mode: str
    params: list[str]
    max_iterations: int
    rows: list[TrialRow]

    @property
    def best(self) -> TrialRow | None:
        return self.rows[0] if self.rows and self.rows[0].last is not None else None

    @property
    def stopped_early(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status == "TERMINATED" and r.iterations < self.max_iterations]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def load_summary(sweep_dir: str | Path, metric: str | None = None) -> SweepSummary:
    from ray.tune import ExperimentAnalysis

    path = Path(sweep_dir).resolve()
    spec_file = path / SPEC_FILE
    if not spec_file.is_file():
        raise ConfigError(f"{path} is not a raylign sweep directory (no {SPEC_FILE}); pass the directory "
                          "`raylign tune` printed as 'results:'")
    spec = yaml.safe_load(spec_file.read_text())
    metric = metric or spec["metric"]
    mode = spec["mode"]
    params = list(spec["search_space"])
    try:
        analysis = ExperimentAnalysis(str(path), default_metric=metric, default_mode=mode)
    except Exception as exc:  # noqa: BLE001 - Tune raises several kinds for a missing/partial state
        raise ConfigError(f"cannot read the Tune experiment in {path}: {exc}") from None
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        trial_path = trial.path  # None only for a trial without storage; ones read back from disk have it
        if trial_path is None:
            raise ConfigError(f"trial {trial.trial_id} in {path} has no directory")
        df = frames.get(trial.trial_id)
        if df is None:
            df = frames.get(trial_path)
        history: list[tuple[int, float]] = []
        if df is not None and metric in df.columns:
            for it, value in zip(df["training_iteration"], df[metric], strict=True):
                v = _num(value)
                if v is not None:
                    history.append((int(it), v))
        iterations = int(df["training_iteration"].max()) if df is not None and len(df) else 0
        values = [v for _, v in history]
        best = (max(values) if mode == "max" else min(values)) if values else None
        # A servable model: the run's final/ or, for a trial stopped early, its last checkpoint's model/.
        final = Path(trial_path) / RUN_SUBDIR / "final"
        ckpt = str(final) if final.is_dir() else None
        if ckpt is None and trial.checkpoint is not None:
            model_dir = Path(trial.checkpoint.path) / "model"
            ckpt = str(model_dir) if model_dir.is_dir() else trial.checkpoint.path
        rows.append(TrialRow(trial.trial_id, {k: trial.config.get(k) for k in params}, trial.status, iterations,
                             values[-1] if values else None, best, history, trial_path, ckpt))
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (r.last is None, sign * (r.last if r.last is not None else 0.0)))
    return SweepSummary(path, metric, mode, params, int(spec["iterations"]), rows)


def short_name(param: str) -> str:
    """`multitask.tasks.rating.weight` -> `rating.weight`; `train.lr` stays."""
    return ".".join(param.split(".")[-2:])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(summary: SweepSummary, console) -> None:
    from rich.table import Table

    table = Table(title=f"sweep {summary.sweep_dir.name}: {summary.metric} ({summary.mode}), "
                  f"ranked by the last reported value")
    table.add_column("rank", justify="right")
    table.add_column("trial", no_wrap=True)
    for p in summary.params:
        table.add_column(short_name(p), justify="right")
    for col in (summary.metric, "best", "iterations", "status"):
        table.add_column(col, justify="right")
    for rank, row in enumerate(summary.rows, 1):
        early = row.status == "TERMINATED" and row.iterations < summary.max_iterations
        table.add_row(str(rank), row.trial_id, *(_fmt(row.params[p]) for p in summary.params),
                      _fmt(row.last) if row.last is not None else "-", _fmt(row.best) if row.best is not None else "-",
                      f"{row.iterations}/{summary.max_iterations}",
                      row.status.lower() + (" (stopped early)" if early else ""))
    if not console.is_terminal:  # a log or a pipe: do not squeeze the table into 80 columns
        from rich.console import Console

        console = Console(file=console.file, width=max(console.width, 200), soft_wrap=True)
    console.print(table)
    best = summary.best
    if best is not None:
        console.print(f"best trial: {best.trial_id}  {summary.metric}={best.last:.4g}  "
                      + "  ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()))
        if best.checkpoint:
            console.print(f"best checkpoint: {best.checkpoint}")
            console.print(f"serve it:        raylign serve {best.checkpoint}")


def plot_summary(summary: SweepSummary, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or summary.sweep_dir / PLOT_FILE
    n = 1 + len(summary.params)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    ax = axes[0][0]
    for row in summary.rows:
        if not row.history:
            continue
        its, values = zip(*row.history, strict=True)
        early = row.status == "TERMINATED" and row.iterations < summary.max_iterations
        ax.plot(its, values, marker="o", markersize=3, linestyle="--" if early else "-",
                label=f"{row.trial_id}{' (stopped)' if early else ''}")
    ax.set_xlabel("iteration")
    ax.set_ylabel(summary.metric)
    ax.set_title(f"{summary.metric} per trial")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    for i, param in enumerate(summary.params, 1):
        ax = axes[0][i]
        xs = [(row.params[param], row.last) for row in summary.rows
              if row.last is not None and isinstance(row.params[param], (int, float))]
        if xs:
            x, y = zip(*xs, strict=True)
            ax.scatter(x, y)
            if min(x) > 0 and max(x) / min(x) >= 20:
                ax.set_xscale("log")
        ax.set_xlabel(param, fontsize=8)
        ax.set_ylabel(summary.metric)
        ax.set_title(f"{summary.metric} vs {short_name(param)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
