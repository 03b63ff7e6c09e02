"""Native PyTorch backend: process-group setup under torchrun, DDP/FSDP2 applied to a plain model from
outside, and full (unsharded, CPU) state dicts for checkpoints."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

DISTRIBUTED_MODES = ("ddp", "fsdp")
HOST_WAIT_TIMEOUT = timedelta(days=7)  # ranks waiting at `barrier` for rank 0's shard build, DVC pull or push


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size and its torch device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    wait_group: Any = None  # the gloo group `barrier` waits on (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    wait_group = dist.new_group(backend="gloo", timeout=HOST_WAIT_TIMEOUT) if world > 1 else None
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=torch_device, wait_group=wait_group)


def shutdown_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in one process) for as long as rank 0's host-side work takes (building a
    stage's shards can take hours): on a gloo group with HOST_WAIT_TIMEOUT, not on the training group, whose
    30-minute timeout would stop the job."""
    if env.distributed:
        dist.barrier(group=env.wait_group)


def first_error(env: DistEnv, error: str | None) -> str | None:
    """The first rank's error message of those that have one, on every rank (so that all raise together
    instead of the others waiting forever for a rank that failed alone). Exchanged on the host-wait group,
    as `barrier`: the others wait here for as long as a rank's host-side work takes (hashing an 84 GB
    resume checkpoint on a shared filesystem), which the training group's 30-minute timeout would cut."""
    return next((e for e in gather_objects(error, env, group=env.wait_group) if e), None)


class LossModule(nn.Module):
    """`forward(input_ids, targets) -> loss` around a model with `.loss`, so DDP/FSDP hooks see the call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(input_ids, targets)


def parallelize(
    model: nn.Module, env: DistEnv, mode: str, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """The module to train through: `forward(input_ids, targets) -> loss`, data-parallel when under torchrun.

    `model` stays the plain module owning the parameters (optimizer groups and checkpoints use it).
    DDP wraps it; FSDP2 (`fully_shard`) shards each transformer block and then the root, in place.
    `compute_dtype`: the autocast dtype (None = fp32), which FSDP2 on GPU gathers the parameters in.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"trainer.distributed={mode!r}: expected one of {', '.join(DISTRIBUTED_MODES)}")
    module = LossModule(model)
    if not env.distributed:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = env.device.type == "cuda" and compute_dtype is not None  # fp32 (trainer.precision) stays fp32
    kwargs = (
        {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)}
        if mixed
        else {}
    )
    for block in getattr(model, "blocks", []):
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for accumulation micro-batches (`enabled=False`)."""
    if enabled:
        yield
        return
    if hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


HostCopy = Callable[[tuple[Any, ...], torch.Tensor], torch.Tensor]


def live_storages(model: nn.Module, optimizer: torch.optim.Optimizer) -> frozenset[tuple[str, int]]:
    """The storages training writes in place (parameters, buffers, optimizer state: Adam's `step` counts are
    CPU tensors even on GPU), as `storage_key`s: a state-dict tensor outside them is a private copy."""
    from open360.checkpoint.writer import storage_key

    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return frozenset(storage_key(t.to_local() if isinstance(t, DTensor) else t) for t in tensors)


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, host_copy: HostCopy | None = None
) -> dict[str, Any]:
    """Unsharded model and optimizer state (optimizer state keyed by parameter name: portable across world
    sizes), complete on rank 0 and empty elsewhere; every rank calls it.

    Under FSDP each sharded tensor is all-gathered here, one at a time, in the state dict's order (the same on
    every rank), and rank 0 passes it to `host_copy(key, tensor)` (the checkpoint writer's pinned buffers;
    default: `tensor.cpu()`) before the next is gathered: the device holds one gathered tensor at a time, and
    the copy to the host runs asynchronously at pinned bandwidth. torch's own `full_state_dict` + `cpu_offload`
    gathers into fresh pageable memory with one blocking copy per tensor (11.7-23.3 s per save at 1.4B on
    2x H200; this way 0.33-0.38 s per save after the first, which allocates the pinned buffers:
    benchmarks/RESULTS.md).

    An optimizer that has not stepped yet (a checkpoint at step 0) is saved with an empty state, and left
    without one: torch's state-dict helpers fill an empty optimizer by running one zero-gradient step,
    which would set Adam's step count to 1 before the first real step and shift every later update."""
    from open360.checkpoint.writer import map_tensors

    fresh = not optimizer.state
    sharded = StateDictOptions(full_state_dict=False)  # DTensors under FSDP; the tensors themselves otherwise
    state = {
        "model": get_model_state_dict(model, options=sharded),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=sharded),
    }
    if fresh:
        optimizer.state.clear()
        state["optimizer"] = {**state["optimizer"], "state": {}}

    def gather(key: tuple[Any, ...], tensor: torch.Tensor) -> torch.Tensor | None:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective on every rank
        if not env.is_main:
            return None
        return host_copy(key, full) if host_copy is not None else full.detach().cpu()

    gathered = map_tensors(state, gather)
    return gathered if env.is_main else {"model": {}, "optimizer": {}}


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    env: DistEnv,
) -> None:
    """Load unsharded model and optimizer state (every rank passes the full dicts). The optimizer's
    moments and step counts come from the checkpoint; its hyperparameters (betas, eps, weight decay, the
    muP lr scale) stay those of this run's config, which is what its checkpoints record."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)
    if not optimizer_state.get("state"):  # saved before the first step: no zero-gradient step's state
        optimizer.state.clear()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in one process)."""
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def gather_objects(obj: Any, env: DistEnv, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in one process); `group`: None = the default."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj, group=group)
    return out
