"""Fail fast, before any data or model work, when a config cannot fit the devices at hand."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from open360.models.flops import count_parameters

# bf16/fp32 mixed-precision AdamW: fp32 weights (4) + fp32 grads (4) + two fp32 moments (8).
BYTES_PER_PARAM_TRAINING = 16
GIB = 1024**3


class ResourceError(RuntimeError):
    """The requested run cannot run on this machine."""


def training_memory_gib(cfg: DictConfig) -> float:
    """Weights, gradients and AdamW moments of the model (activations come on top)."""
    return count_parameters(cfg.model) * BYTES_PER_PARAM_TRAINING / GIB


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> str:
    """`auto` means CUDA when available, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in DEVICES:
        raise ResourceError(f"trainer.device={requested!r}: expected one of {', '.join(DEVICES)}")
    return requested


def check_resources(cfg: DictConfig) -> str:
    """Return the device to train on, or raise ResourceError naming the memory the run needs."""
    import torch

    device = resolve_device(cfg.trainer.device)
    need = training_memory_gib(cfg)
    params_b = count_parameters(cfg.model) / 1e9
    hint = (
        f"'{cfg.run_name}' ({params_b:.2f}B parameters) needs about {need:.0f} GiB of GPU memory for weights, "
        f"gradients and AdamW states ({BYTES_PER_PARAM_TRAINING} bytes/parameter) plus activations, "
        "summed over the GPUs it is sharded on"
    )
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ResourceError(
                f"{hint}, but no CUDA GPU is visible on this machine. "
                "For a CPU run of the same family use +experiment=amber_tiny "
                "(or crystalcoder_tiny / phi15_tiny)."
            )
        # One process per GPU: a run without torchrun uses one GPU; DDP keeps a full replica on each;
        # FSDP (and megatron-core: TP x PP plus its distributed optimizer) shard over at most the world.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local > torch.cuda.device_count():
            raise ResourceError(
                f"torchrun started {local} processes on this machine (--nproc-per-node), one per GPU, but it has "
                f"{torch.cuda.device_count()} visible GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}); "
                "start at most that many"
            )
        sharded = str(cfg.trainer.backend) == "megatron" or str(cfg.trainer.distributed) == "fsdp"
        shards = world if sharded else 1
        per_gpu = min(
            torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
        ) / GIB
        have = per_gpu * shards
        if have < need:
            raise ResourceError(
                f"{hint}; it is sharded over {shards} GPU(s) of {per_gpu:.0f} GiB ({have:.0f} GiB in all; "
                f"WORLD_SIZE={world}, trainer.distributed={cfg.trainer.distributed}). "
                "Run on more GPUs (torchrun, trainer.distributed=fsdp) or use +experiment=amber_tiny."
            )
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        except (ValueError, OSError, AttributeError):  # a platform without these: not checked
            have = float("inf")
        # torchrun's processes on this machine share its RAM: DDP keeps a full replica in each, FSDP a 1/world shard
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        need *= local / world if str(cfg.trainer.distributed) == "fsdp" else local
        if have < need:
            raise ResourceError(
                f"'{cfg.run_name}' ({params_b:.2f}B parameters) needs about {need:.0f} GiB of memory for weights, "
                f"gradients and AdamW states on the CPU ({local} process(es) on this machine, "
                f"trainer.distributed={cfg.trainer.distributed}), but this machine has {have:.0f} GiB of RAM. "
                "Use +experiment=amber_tiny (or crystalcoder_tiny / phi15_tiny) or trainer.device=cuda."
            )
    return device
