"""Fail fast, before any data or model work, when a config cannot fit the devices at hand."""

from __future__ import annotations

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


def resolve_device(requested: str) -> str:
    """`auto` means CUDA when available, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ResourceError(f"trainer.device={requested!r}: expected one of auto, cpu, cuda")
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
        world = torch.cuda.device_count()
        have = sum(torch.cuda.get_device_properties(i).total_memory for i in range(world)) / GIB
        if have < need:
            raise ResourceError(
                f"{hint}; the {world} visible GPU(s) have {have:.0f} GiB in all. "
                "Run on more GPUs (torchrun, trainer.distributed=fsdp) or use +experiment=amber_tiny."
            )
    return device
