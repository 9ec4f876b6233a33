"""Sharded learners on PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): the `fsdp` learner strategy.

ZeRO-3 style sharding (Rajbhandari et al. 2020, "ZeRO"; Zhao et al. 2023, "PyTorch FSDP"): each of
the N ranks keeps 1/N of every parameter (a dim-0 shard, as a `DTensor`), of its gradient
(reduce-scattered after backward) and of the optimizer state (AdamW built on the shards). A
transformer block's full parameters exist only while that block runs forward or backward. Each
block is its own FSDP unit, the root holds the rest (embeddings, final norm, heads).

Everything here is a collective: every rank of the group must make the same calls in the same order
(see `lockstep_count`). Checkpoints use `torch.distributed.checkpoint` (DCP), whose files record each
tensor's global shape, so a checkpoint written by N ranks loads on M. `final/` and the weights the
rollout workers get are gathered into full tensors on rank 0 (`full_state_dict`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

SHARDED_STATE = "sharded"  # a learner checkpoint's DCP directory under fsdp (model + optimizer shards)


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device) -> None:
    """gloo on CPU, NCCL on GPU; TCP rendezvous at rank 0's address."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size)


def device_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over every rank of the default process group."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def mixed_precision(model: nn.Module, device: torch.device) -> MixedPrecisionPolicy:
    """Off on CPU (compute in the weights' dtype). On a GPU with bfloat16, a float32 model computes
    in bfloat16 and reduces gradients in float32 while the sharded master weights stay float32."""
    dtype = next(model.parameters()).dtype
    if device.type == "cuda" and dtype == torch.float32 and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules transformers says must not be split across devices (`_no_split_modules` of every
    `PreTrainedModel` inside `model`: decoder layers), outermost first. Works through peft wrappers
    and raylign's `ScalarHeadModel`, whose backbones are ordinary transformers models."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def shard_model(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                frozen: bool = False) -> nn.Module:
    """`fully_shard` each transformer block, then the root (children before parents, as FSDP2 needs).

    The root keeps its parameters gathered from forward to backward (FSDP2's default for the root);
    a `frozen` model (the reference) never runs backward, so there every unit reshards after forward.
    Returns the same module, now an `FSDPModule` whose parameters are sharded `DTensor`s."""
    for block in reversed(transformer_blocks(model)):  # innermost first when blocks nest
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=True if frozen else None)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Gradient accumulation: reduce-scatter only on a step's last backward (FSDP2's `no_sync`)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def tensor_bytes(t: torch.Tensor) -> int:
    local = local_tensor(t)
    return local.numel() * local.element_size()


def sharded_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of model state this rank holds, from the local shards of the DTensors (whole tensors for
    an unsharded model): `parameters` (all, frozen included), `trainable_parameters` (those with
    requires_grad), `gradients` (the `.grad`s present now), `optimizer_state` (every tensor in the
    optimizer's state: AdamW's exp_avg and exp_avg_sq, sharded like their parameter, and its `step`
    counters, a 4-byte float32 scalar per parameter tensor on every rank), and their `total`
    (parameters + gradients + optimizer_state). Transient gathered copies of a block's parameters
    during its forward/backward are not counted."""
    params = list(model.parameters())
    out = {
        "parameters": sum(tensor_bytes(p) for p in params),
        "trainable_parameters": sum(tensor_bytes(p) for p in params if p.requires_grad),
        "gradients": sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer_state": 0 if optimizer is None else sum(
            tensor_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)),
    }
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer_state"]
    return out


def as_float(value: torch.Tensor | float) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ of DTensor gradients returns one) as a float."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def lockstep_count(count: int, device: torch.device) -> int:
    """The largest `count` over the ranks. FSDP gathers each block's parameters inside its forward and
    backward, so every rank must run as many passes as the others: a rank with fewer micro-batches
    (shards differ by a row) adds stand-in passes up to this count."""
    n = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on some rank (so every rank takes the same branch)."""
    n = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return bool(n.item())


# ---- checkpoints (DCP) and full weights ---------------------------------------------------------

_SHARDED_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each rank writes its shards of the trainable parameters and the optimizer state (DCP).

    Frozen parameters (a LoRA base model) are not written: they come from the model's own path."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_SHARDED_OPTIONS)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a `save_sharded` checkpoint written by any number of ranks into this rank's shards
    (DCP reshards by the global shapes it recorded). An optimizer that has not stepped yet gets its
    state tensors created first, so they can be filled in."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_SHARDED_OPTIONS)
    state: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))  # fills the tensors in place
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Every (or only every trainable) parameter and buffer gathered whole onto rank 0's CPU; the other
    ranks get {}. Under LoRA `trainable_only` gathers the adapter alone (what rollout workers need)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))


def meta_copy(model: nn.Module) -> nn.Module:
    """An unsharded copy of `model` that holds no memory (its tensors on the meta device): the shape
    `materialize` later fills with gathered weights, for saving in Hugging Face format."""
    return copy.deepcopy(model).to("meta")


def materialize(template: nn.Module, state: dict[str, torch.Tensor], live: nn.Module) -> nn.Module:
    """`template` (a `meta_copy`) holding the gathered `state` (no copy: assigned), its non-persistent
    buffers (rotary tables) copied from the `live` model, where FSDP leaves buffers unsharded."""
    template.load_state_dict(state, strict=False, assign=True)
    tie = getattr(template, "tie_weights", None)
    if callable(tie):
        tie()  # tied embeddings share one tensor again (assign gave each key its own)
    live_buffers = dict(live.named_buffers())
    for name, buf in list(template.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            template.get_submodule(owner)._buffers[leaf] = live_buffers[name].detach().cpu().clone()
    left = [n for n, p in template.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"{len(left)} parameter(s) were not gathered, e.g. {left[:3]}")
    return template
