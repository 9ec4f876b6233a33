"""Reward over-optimisation curves across a training run's checkpoints (Gao, Schulman & Hilton 2022,
"Scaling Laws for Reward Model Overoptimization").

A policy trained against a proxy reward R_proxy (the one it was trained on) keeps raising R_proxy,
while a held-out gold reward R_gold first rises and then falls once the policy exploits the proxy's
errors (Goodhart's law). Gao et al. plot both against the distance from the initial policy,

    d = √KL(π ‖ π_init),   KL ≈ (1/n) Σ_i [log π(y_i|x_i) − log π_init(y_i|x_i)],  y_i ~ π(·|x_i)

(the Monte-Carlo k1 estimate, nats per completion; `metrics.kl_monte_carlo`), and find the gold score
of RL policies follows R_gold(d) ≈ d(α − β log d). Here every checkpoint of a run
(`checkpoints/step_<n>/`, then `final/`), and the initial policy itself (d = 0), samples one
completion per held-out prompt in one Ray Data pass; both rewards score the samples. Reported per
point: step, KL (with a bootstrap 95% CI), √KL, and the mean proxy and gold reward (bootstrap 95% CIs);
plus the checkpoint where gold peaks and whether proxy kept rising after it (over-optimisation seen).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from raylign.evaluation import metrics


def run_checkpoints(run_dir: str) -> tuple[list[dict[str, Any]], str | None, dict[str, Any]]:
    """([{label, step, path}] in step order (checkpoints, then final/), the run's base model, its config).

    A checkpoint's model is `step_<n>/model/` (what the pipelines write) or `step_<n>/` itself when it
    is a model dir. final/'s step is the run's last logged step. Fails with one message when the
    directory is not a run or holds no model.
    """
    import yaml

    from raylign.config import ConfigError

    run = Path(run_dir).expanduser()
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--checkpoints needs a training run directory (runs/<name>/ with config.yaml); "
                          f"{run_dir} is not one")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    base = (cfg.get("model") or {}).get("path") if isinstance(cfg, dict) else None

    def model_dir(d: Path) -> Path | None:
        for cand in (d / "model", d):
            if (cand / "config.json").is_file() or (cand / "adapter_config.json").is_file():
                return cand
        return None

    points: list[dict[str, Any]] = []
    for d in (run / "checkpoints").glob("step_*") if (run / "checkpoints").is_dir() else []:
        suffix = d.name.removeprefix("step_")
        found = model_dir(d)
        if suffix.isdigit() and found is not None:
            points.append({"label": d.name, "step": int(suffix), "path": str(found)})
    points.sort(key=lambda p: p["step"])
    if (run / "final").is_dir() and model_dir(run / "final") is not None:
        last = _last_logged_step(run)
        step = max([last or 0, *(p["step"] for p in points)])
        points.append({"label": "final", "step": step, "path": str(model_dir(run / "final"))})
    if not points:
        raise ConfigError(f"{run} has no checkpoints/step_<n>/ model and no final/: train with "
                          "output.save_every=k to keep checkpoints")
    return points, base, cfg


def _last_logged_step(run: Path) -> int | None:
    steps = []
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(step, int):
                steps.append(step)
    return max(steps) if steps else None


def proxy_from_run(cfg: dict[str, Any], tokenizer: str | None) -> Any:
    """The reward the run trained on: its config's `reward.sources`, mixed by weight."""
    from raylign.config import ConfigError, RewardConfig
    from raylign.rewards import build_reward

    reward = RewardConfig(**(cfg.get("reward") or {}))
    if not reward.sources:
        raise ConfigError("the run's config has no reward.sources to use as the proxy reward: pass --proxy S "
                          "(the reward it was trained on, e.g. lexicon:vader or a reward model dir)")
    return build_reward(reward, **({"tokenizer": tokenizer} if tokenizer else {}))


def overoptimization_curves(
    points: list[dict[str, Any]],
    prompts: list[Any],
    reference: str,
    proxy: Any,
    gold: Any,
    gen_kw: dict[str, Any],
    n_boot: int = metrics.DEFAULT_BOOTSTRAP,
    seed: int = 0,
    progress: bool = True,
    include_reference: bool = True,
) -> dict[str, Any]:
    """Proxy and gold reward and KL to `reference` at every point (module docstring).

    `points` are {label, step, path}; with `include_reference` the reference itself is the first
    point (step 0, KL 0 up to sampling noise). `proxy`/`gold` are reward sources.
    """
    from raylign.evaluation.generate import generate_checkpoints_with_ray_data
    from raylign.evaluation.scorers import score_in_chunks

    pts = ([{"label": "reference", "step": 0, "path": reference}] if include_reference else []) + list(points)
    gen = generate_checkpoints_with_ray_data(prompts, [p["path"] for p in pts], reference=reference, **gen_kw)
    curve = []
    for p, g in zip(pts, gen["per_model"], strict=True):
        r_proxy = score_in_chunks(proxy, prompts, g["completions"], f"proxy reward ({p['label']})", progress)
        r_gold = score_in_chunks(gold, prompts, g["completions"], f"gold reward ({p['label']})", progress)
        kl = metrics.kl_monte_carlo(g["logp"], g["ref_logp"], g["tokens"], n_boot=n_boot, seed=seed)
        curve.append({
            "checkpoint": p["label"], "step": p["step"], "path": p["path"],
            "kl": kl["kl"], "kl_ci": kl["kl_ci"], "kl_per_token": kl.get("kl_per_token"),
            "sqrt_kl": math.sqrt(max(kl["kl"], 0.0)),  # the k1 estimate can dip below 0 by noise
            "proxy": float(r_proxy.mean()), "proxy_ci": list(metrics.bootstrap_ci(r_proxy, n_boot=n_boot, seed=seed)),
            "gold": float(r_gold.mean()), "gold_ci": list(metrics.bootstrap_ci(r_gold, n_boot=n_boot, seed=seed)),
            "mean_tokens": float(np.mean(g["tokens"])),
            "sample": {"prompt": prompts[0], "completion": g["completions"][0]} if prompts else None,
        })
    return {
        "proxy": proxy.name, "gold": gold.name, "reference": reference, "prompts": len(prompts),
        "points": curve, **gold_peak(curve),
        "actors": len(gen["actors"]), "generations_per_second": gen["generations_per_second"],
    }


def gold_peak(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """{gold_peak: the point with the highest mean gold reward, overoptimized: whether a later point
    (the last) has lower gold but higher proxy than the peak}: Goodhart's law seen in the run."""
    peak = max(range(len(curve)), key=lambda i: curve[i]["gold"])
    last = curve[-1]
    return {
        "gold_peak": {"checkpoint": curve[peak]["checkpoint"], "step": curve[peak]["step"],
                      "gold": curve[peak]["gold"], "sqrt_kl": curve[peak]["sqrt_kl"]},
        "overoptimized": bool(peak < len(curve) - 1 and last["gold"] < curve[peak]["gold"]
                              and last["proxy"] > curve[peak]["proxy"]),
    }


def plot_curves(path: Path, section: dict[str, Any]) -> Path:
    """Proxy (left axis) and gold (right axis) reward against √KL, one marker per checkpoint, with
    the 95% intervals as error bars (Gao et al. 2022, fig. 1 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = section["points"]
    x = [p["sqrt_kl"] for p in pts]
    fig, ax = plt.subplots(figsize=(6.8, 4.0), dpi=100)
    ax2 = ax.twinx()
    for axis, key, color, label in ((ax, "proxy", "#4C72B0", f"proxy: {section['proxy']}"),
                                    (ax2, "gold", "#C44E52", f"gold: {section['gold']}")):
        ys = [p[key] for p in pts]
        err = [[max(y - p[f"{key}_ci"][0], 0) for y, p in zip(ys, pts, strict=True)],
               [max(p[f"{key}_ci"][1] - y, 0) for y, p in zip(ys, pts, strict=True)]]
        axis.errorbar(x, ys, yerr=err, marker="o", markersize=4, capsize=3, color=color, label=label)
        axis.set_ylabel(f"{key} reward", color=color)
    for p, xi in zip(pts, x, strict=True):
        ax.annotate(p["checkpoint"].removeprefix("step_"), (xi, p["proxy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 4))
    ax.set_xlabel("√KL(π ‖ π_ref)  (nats^½ per completion)")
    ax.set_title("Reward over-optimisation across checkpoints")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [str(h.get_label()) for h in lines], fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
