"""Ray Tune sweeps over raylign recipes (`raylign tune CONFIG`, `raylign tune summarize DIR`).

- `spec`: the sweep YAML (tune_configs/*.yaml): recipe, search space, scheduler, search algorithm;
- `trainable`: one recipe run per trial, reporting with `ray.tune.report` and resuming from
  `ray.tune.get_checkpoint()`;
- `objective`: the alignment objective every trial reports (reward − c·KL, pair accuracy, ...);
- `tuner`: builds or restores the Tuner; `summary`: ranked table and plot of a finished sweep.
"""
