"""Ray connection and worker groups: a placement group + N actors + fan-out/fan-in helpers."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """The cluster cannot host the requested actors; the message says what to change."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once. Under `ray job submit` (RAY_ADDRESS set) or with an address this attaches
    to the cluster; otherwise it starts an embedded local Ray. Already connected: do nothing."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
        # One line, so a job's log shows it joined the cluster rather than starting its own Ray.
        print(f"raylign: attached to the Ray cluster at {address}", flush=True)
    else:
        # A private local instance, so a stale `ray start` cluster elsewhere on the machine is never joined.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)


def cpu_threads(num_cpus: float) -> int:
    """Threads for an actor given its CPU share: oversubscription is the first CPU performance bug."""
    return max(1, int(num_cpus))


def quiet_libraries() -> None:
    """Inside actors: no per-file progress bars or info logs from transformers (they flood the driver)."""
    import warnings

    import transformers

    # transformers' own deprecation notices about its internals are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def shard_batch(batch: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    """Split every array along dim 0 into n nearly equal contiguous shards (the first get the extra rows)."""
    sizes = {len(v) for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays have different lengths: { {k: len(v) for k, v in batch.items()} }")
    (size,) = sizes
    bounds = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(size), n)])
    return [{k: v[bounds[i] : bounds[i + 1]] for k, v in batch.items()} for i in range(n)]


class WorkerGroup:
    """N copies of one actor class, placed together, called together.

    `call` runs a method on every actor with the same arguments; `call_sharded` splits a batch of numpy
    arrays across them. Results come back in rank order.
    """

    def __init__(
        self,
        actor_cls: type,
        num_workers: int,
        num_cpus: float,
        num_gpus: float = 0.0,
        name: str = "workers",
        max_restarts: int = 0,
        ready_timeout_s: float = 120.0,
        init_kwargs: dict[str, Any] | None = None,
        threads: int | None = None,
        actor_name_prefix: str | None = None,
    ):
        """`threads`: torch threads per actor (default: its CPU reservation); passed to the actor as its
        `num_cpus`. `actor_name_prefix`: name the actors `<prefix>-<rank>` (findable with ray.get_actor)."""
        self.name = name
        bundle = {"CPU": num_cpus} | ({"GPU": num_gpus} if num_gpus else {})
        # Unique: several runs share one cluster (Ray Tune trials), and placement group names must differ.
        pg_name = f"{name}-{uuid.uuid4().hex[:8]}"
        self.placement_group = placement_group([bundle] * num_workers, strategy="PACK", name=pg_name)
        ready, _ = ray.wait([self.placement_group.ready()], timeout=ready_timeout_s)
        if not ready:
            remove_placement_group(self.placement_group)
            raise ResourceError(
                f"could not place {num_workers} x {bundle} for '{name}' within {ready_timeout_s:.0f}s; "
                f"the cluster has {ray.available_resources()}. Lower resources.* in the config."
            )
        remote_cls = ray.remote(actor_cls) if not hasattr(actor_cls, "remote") else actor_cls
        self.workers = [
            remote_cls.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=max_restarts,
                max_task_retries=-1 if max_restarts else 0,
                name=f"{actor_name_prefix}-{i}" if actor_name_prefix else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=i
                ),
            ).remote(rank=i, world_size=num_workers, num_cpus=threads or num_cpus, **(init_kwargs or {}))
            for i in range(num_workers)
        ]

    def __len__(self) -> int:
        return len(self.workers)

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return ray.get(self.call_async(method, *args, **kwargs))

    def call_sharded(self, method: str, batch: dict[str, np.ndarray], **kwargs: Any) -> list[Any]:
        shards = shard_batch(batch, len(self.workers))
        refs = [getattr(w, method).remote(shard, **kwargs) for w, shard in zip(self.workers, shards, strict=True)]
        return ray.get(refs)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        remove_placement_group(self.placement_group)
