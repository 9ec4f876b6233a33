"""One local Ray per test session; a private RAYLIGN_HOME so tests never touch the user cache."""

from __future__ import annotations

import os
import tempfile

import pytest

_OWN_HOME = not os.environ.get("RAYLIGN_TEST_HOME")
_HOME = os.environ.get("RAYLIGN_TEST_HOME") or tempfile.mkdtemp(prefix="raylign-test-home-")
os.environ["RAYLIGN_HOME"] = _HOME
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Every test that needs the shared Ray, directly or through another fixture, is marked `ray`
    (`make test-unit` deselects them: -m "not slow and not ray")."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_HOME:
        import shutil

        shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    """The shared local Ray: 2 CPUs, dashboard off; actors in tests ask for fractional CPUs."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
            runtime_env={"env_vars": {"RAYLIGN_HOME": _HOME, "HF_HUB_OFFLINE": "1",
                                      "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    ray.shutdown()


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose preferred answer has a learnable property: it is cheerful ('great', 'love'),
    the rejected one gloomy ('awful', 'hate'); topics vary so a model must learn the property."""
    import random

    rng = random.Random(seed)
    topics = ["the weather", "my garden", "this book", "the city", "our team", "the music", "dinner",
              "the trip", "my job", "the movie", "the park", "breakfast"]
    good = ["great", "lovely", "wonderful", "happy", "love"]
    bad = ["awful", "sad", "terrible", "gloomy", "hate"]
    rows = []
    for _ in range(n):
        topic = rng.choice(topics)
        rows.append({
            "prompt": f"Tell me about {topic}.",
            "chosen": f"I {rng.choice(['think', 'feel'])} {topic} is {rng.choice(good)}.",
            "rejected": f"I {rng.choice(['think', 'feel'])} {topic} is {rng.choice(bad)}.",
        })
    return rows


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(240))
