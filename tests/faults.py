"""Helpers for tests that break a run on purpose: find a run's actors by their role."""

from __future__ import annotations

import time


def run_actor(run_name: str, role: str, timeout_s: float = 60.0):
    """The actor `<role>` (e.g. "rollout-0", "learner-1") of the live run named `run_name`: actor names
    are `raylign-<run name>-<unique id>-<role>` (rundir.RunDir.actor_prefix)."""
    import ray

    deadline = time.time() + timeout_s
    while True:
        names = [a["name"] if isinstance(a, dict) else a for a in ray.util.list_named_actors(all_namespaces=False)]
        found = [n for n in names if n.startswith(f"raylign-{run_name}-") and n.endswith(f"-{role}")]
        if found:
            return ray.get_actor(found[0])
        if time.time() > deadline:
            raise LookupError(f"no actor {role} of run {run_name} among {names}")
        time.sleep(0.1)
