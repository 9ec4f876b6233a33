"""One local Ray per test session; a private RAYLIGN_HOME so tests never touch the user cache."""

from __future__ import annotations

import os
import tempfile

import pytest

_HOME = os.environ.get("RAYLIGN_TEST_HOME") or tempfile.mkdtemp(prefix="raylign-test-home-")
os.environ["RAYLIGN_HOME"] = _HOME
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
