"""Worker groups: a placement group + N actors + fan-out/fan-in helpers (the Ray connection is in
`raylign.runtime`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylign.errors import UserError
from raylign.runtime import ResourceError, RunStopped

# `resources.*_placement` words; anything else names a node resource (node_a from `raylign cluster up`).
PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}
NODE_RESOURCE_SHARE = 0.001  # what one actor asks of a node resource: any number of actors fit on the node

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


def gather(refs: Sequence[ray.ObjectRef], labels: Sequence[str], timeout_s: float | None = None) -> list[Any]:
    """`ray.get(refs)` that fails fast: the first failed call raises at once (a dead actor is not
    hidden behind a live one waiting for it in a collective), a call still running after `timeout_s`
    raises `RunStopped` naming it, and a user error raised inside an actor surfaces as itself, without
    the remote traceback. `labels[i]` names call i ("learners[1].train_step")."""
    refs = list(refs)
    if not refs:
        return []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        if not ready:
            late = ", ".join(labels[refs.index(r)] for r in pending[:4])
            raise RunStopped(f"{late} did not return within resources.call_timeout_s={timeout_s:g}s; the run "
                             "stopped (resume from the last checkpoint after fixing the hung call, or raise "
                             "the timeout)")
        _raise_if_failed(ready[0], labels[refs.index(ready[0])])
    return ray.get(refs)


def _raise_if_failed(ref: ray.ObjectRef, label: str) -> None:
    try:
        ray.get(ref, timeout=0)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        raise
    except RayActorError as exc:
        raise RunStopped(f"{label}: the worker died ({type(exc).__name__}: {_first_line(exc)}); the run stopped. "
                         "Look at its log above (out of memory? killed?), then --resume from the last "
                         "checkpoint") from None
    except GetTimeoutError:  # pragma: no cover - ray.wait said it was ready
        pass


def placement_options(placement: str, bundle: dict[str, float]) -> tuple[str, dict[str, float]]:
    """(placement-group strategy, bundle) for one of a group's actors under `placement`:
    `pack` -> PACK (as few nodes as fit), `spread` -> SPREAD (one actor per node where possible), a node
    resource name -> PACK with a sliver of that resource in every bundle, so each actor lands on a node
    offering it (`ray start --resources '{"node_b": 1}'`, which `raylign cluster up` gives every node)."""
    strategy = PLACEMENT_STRATEGIES.get(placement)
    if strategy is not None:
        return strategy, dict(bundle)
    from raylign.config import check_placement

    return "PACK", {**bundle, check_placement(placement): NODE_RESOURCE_SHARE}


def check_node_resource(placement: str, group: str, cluster_resources: dict[str, float]) -> None:
    """A placement naming a node resource that no node offers can never be met: say so at once."""
    if placement in PLACEMENT_STRATEGIES or placement in cluster_resources:
        return
    offered = sorted(k for k in cluster_resources if k.startswith("node_"))
    raise ResourceError(
        f"the {group} group is placed on '{placement}', but no node of the cluster offers that resource "
        f"({'node resources: ' + ', '.join(offered) if offered else 'no node_* resources at all'}); use pack, spread "
        "or one of those (`raylign cluster up` names its nodes node_a, node_b, ...)")


def _node_id(actor: Any) -> str:
    """Run inside an actor (`__ray_call__`): the id of the node it runs on."""
    return ray.get_runtime_context().get_node_id()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


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
        call_timeout_s: float | None = None,
        placement: str = "pack",
    ):
        """`threads`: torch threads per actor (default: its CPU reservation); passed to the actor as its
        `num_cpus`. `actor_name_prefix`: name the actors `<prefix>-<rank>` (findable with ray.get_actor).
        `call_timeout_s`: how long `call`/`get` wait for a remote call before the run stops.
        `placement`: pack | spread | a node resource name (`placement_options`)."""
        self.name = name
        self.call_timeout_s = call_timeout_s
        self.placement = placement
        self.node_ids: list[str] = []  # where each actor runs, once `locate` has asked them
        if placement not in PLACEMENT_STRATEGIES:
            check_node_resource(placement, name, ray.cluster_resources())
        strategy, bundle = placement_options(placement, {"CPU": num_cpus} | ({"GPU": num_gpus} if num_gpus else {}))
        # Unique: several runs share one cluster (Ray Tune trials), and placement group names must differ.
        pg_name = f"{name}-{uuid.uuid4().hex[:8]}"
        self.placement_group = placement_group([bundle] * num_workers, strategy=strategy, name=pg_name)
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

    def ready_async(self) -> list[ray.ObjectRef]:
        """One ref per actor that resolves when its constructor has finished (a model loaded)."""
        return [w.__ray_ready__.remote() for w in self.workers]

    def locate(self) -> list[str]:
        """Ask every actor for the id of the node it runs on (rank order); kept in `node_ids`."""
        refs = [w.__ray_call__.remote(_node_id) for w in self.workers]
        self.node_ids = self.get(refs, "node_id")
        return self.node_ids

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self.get(self.call_async(method, *args, **kwargs), method)

    def get(self, refs: Sequence[ray.ObjectRef], method: str, ranks: Sequence[int] | None = None) -> list[Any]:
        """The results of `method` called on this group's actors (`ranks`, default all, in order):
        `gather` under this group's call timeout, failures named `<group>[rank].<method>`."""
        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        return gather(refs, [f"{self.name}[{r}].{method}" for r in ranks], self.call_timeout_s)

    def call_sharded_async(self, method: str, batch: dict[str, np.ndarray], **kwargs: Any) -> list[ray.ObjectRef]:
        """Shard `batch` across the actors (rank r gets shard r) and call `method(shard, **kwargs)` on each."""
        shards = shard_batch(batch, len(self.workers))
        return [getattr(w, method).remote(shard, **kwargs) for w, shard in zip(self.workers, shards, strict=True)]

    def call_sharded(self, method: str, batch: dict[str, np.ndarray], **kwargs: Any) -> list[Any]:
        return self.get(self.call_sharded_async(method, batch, **kwargs), method)

    def call_sharded_dict(self, method: str, batches: dict[str, dict[str, np.ndarray]], *args: Any) -> list[Any]:
        """Shard each named batch (a multi-task step's task batches) across the actors; rank r gets
        {name: its shard r of every batch}."""
        shards = {name: shard_batch(b, len(self.workers)) for name, b in batches.items()}
        refs = [getattr(w, method).remote({name: s[r] for name, s in shards.items()}, *args)
                for r, w in enumerate(self.workers)]
        return self.get(refs, method)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        remove_placement_group(self.placement_group)
