"""Worker groups: a placement group + N actors + fan-out/fan-in helpers (the Ray connection is in
`raylign.runtime`)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylign.runtime import ResourceError

if TYPE_CHECKING:
    from ray.actor import ActorClass


def shard_batch(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Split every array (or list) along dim 0 into n nearly equal contiguous shards, the first getting
    the extra rows: `shard_batch({"prompts": prompts}, n)` splits a list the same way as a batch."""
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
        remote_cls: ActorClass[Any] = (
            ray.remote(actor_cls) if not hasattr(actor_cls, "remote") else cast("ActorClass[Any]", actor_cls)
        )
        # Actor handles, whose methods are called by name (`getattr(w, method).remote`): ray types
        # `.remote()` as `ActorHandle | type` and `ActorHandle.__getattr__` as returning Never.
        self.workers: list[Any] = [
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

    def call_sharded_async(self, method: str, batch: dict[str, np.ndarray], **kwargs: Any) -> list[ray.ObjectRef]:
        """Shard `batch` across the actors (rank r gets shard r) and call `method(shard, **kwargs)` on each."""
        shards = shard_batch(batch, len(self.workers))
        return [getattr(w, method).remote(shard, **kwargs) for w, shard in zip(self.workers, shards, strict=True)]

    def call_sharded(self, method: str, batch: dict[str, np.ndarray], **kwargs: Any) -> list[Any]:
        return ray.get(self.call_sharded_async(method, batch, **kwargs))

    def call_sharded_dict(self, method: str, batches: dict[str, dict[str, np.ndarray]], *args: Any) -> list[Any]:
        """Shard each named batch (a multi-task step's task batches) across the actors; rank r gets
        {name: its shard r of every batch}."""
        shards = {name: shard_batch(b, len(self.workers)) for name, b in batches.items()}
        refs = [getattr(w, method).remote({name: s[r] for name, s in shards.items()}, *args)
                for r, w in enumerate(self.workers)]
        return ray.get(refs)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        remove_placement_group(self.placement_group)
