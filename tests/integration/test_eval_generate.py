"""Evaluation generation at scale: Ray Data map_batches over a pool of generator actors."""

from __future__ import annotations

import pytest

from raylign.evaluation.generate import generate_with_ray_data

pytestmark = pytest.mark.ray


def test_2000_prompts_on_two_ray_data_actors_report_generations_per_second(ray_session):
    prompts = [f"Tell me about item number {i}." for i in range(2000)]
    kw = dict(model="tiny:llama", max_new_tokens=2, seed=3, actors=2, cpus_per_actor=0.25, batch_size=100,
              reference="tiny:llama", progress=False)
    out = generate_with_ray_data(prompts, **kw)
    assert len(out["completions"]) == len(out["tokens"]) == 2000
    assert len(out["actors"]) >= 2  # the work was spread over the actor pool
    assert out["generations_per_second"] > 0
    assert all(1 <= t <= 2 for t in out["tokens"])
    # the reference is the same model, so log π − log π_ref is ~0 on every sample
    assert max(abs(a - b) for a, b in zip(out["logp"], out["ref_logp"], strict=True)) < 1e-3
