"""Fail fast, before any data or model work, when a config cannot fit the devices at hand."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from open360.models.flops import count_parameters, pipeline_stage_parameters

# AdamW on a single process, or FSDP's 1/world share of it: fp32 weights (4) + fp32 grads (4) + two fp32 moments
# (8); the native backend keeps fp32 weights under bf16 autocast.
BYTES_PER_PARAM_TRAINING = 16
# DDP (gradient_as_bucket_view off) also holds its all-reduce buckets: one more fp32 copy of the gradients.
DDP_BUCKET_BYTES = 4
# A checkpoint on disk holds at least fp32 weights (model.safetensors, 4) and AdamW's two fp32 moments
# (optimizer.pt, 8): a lower bound for every backend.
CHECKPOINT_BYTES_PER_PARAM = 12
GIB = 1024**3


class ResourceError(RuntimeError):
    """The requested run cannot run on this machine."""


def bytes_per_param(cfg: DictConfig, world: int) -> tuple[float, str]:
    """(bytes of weights, gradients and AdamW states one process holds per model parameter, how it is laid out)
    for a run of `world` processes."""
    if str(cfg.trainer.backend) == "megatron":
        # megatron-core's distributed optimizer (its distrib_optimizer table): bf16 weights (2) + fp32 grads (4), or
        # fp32 both (8), split over TP x PP; the fp32 master copy and moments (12), or the moments alone (8), also over DP
        tp, pp = int(cfg.trainer.tensor_parallel), int(cfg.trainer.pipeline_parallel)
        dp = max(1, world // (tp * pp))
        bf16 = str(cfg.trainer.precision) != "fp32"
        model, optimizer = (6, 12) if bf16 else (8, 8)
        # the GPU of the largest pipeline stage (the first or last: the embedding, the output layer) holds most
        share = max(pipeline_stage_parameters(cfg.model, pp)) / count_parameters(cfg.model)
        layout = (f"megatron, {'bf16' if bf16 else 'fp32'} weights, tensor_parallel={tp} x pipeline_parallel={pp} "
                  f"x data-parallel {dp}" + (f", its largest stage {share:.1%} of the parameters" if pp > 1 else ""))
        return (model + optimizer / dp) / tp * share, layout
    mode = str(cfg.trainer.distributed)
    if world == 1:
        return BYTES_PER_PARAM_TRAINING, "one process"
    if mode == "fsdp":
        return BYTES_PER_PARAM_TRAINING / world, f"fsdp over WORLD_SIZE={world}"
    replica = f"{mode}: a full replica and its gradient buckets on each of WORLD_SIZE={world}"
    return BYTES_PER_PARAM_TRAINING + DDP_BUCKET_BYTES, replica


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> str:
    """`auto` means CUDA when available, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in DEVICES:
        raise ResourceError(f"trainer.device={requested!r}: expected one of {', '.join(DEVICES)}")
    return requested


def check_megatron_available(device: str) -> None:
    """megatron-core runs on CUDA only (RoPE, RNG tracker, DDP buffers); say so before building anything."""
    if device != "cuda":
        raise ResourceError(
            f"trainer.backend=megatron needs CUDA GPUs (trainer.device resolved to {device!r}): megatron-core's "
            "RoPE, RNG tracker and DDP buffers are CUDA-only. Use trainer.backend=native on CPU"
        )
    try:
        import megatron.core  # noqa: F401
    except ImportError as err:
        raise ResourceError(
            "trainer.backend=megatron: megatron-core is not installed; pip install -e '.[megatron]'"
        ) from err


def check_resources(cfg: DictConfig) -> str:
    """Return the device to train on, or raise ResourceError naming the memory the run needs (or megatron's
    missing CUDA / megatron-core: found before Hydra writes outputs/, not after)."""
    import torch

    device = resolve_device(cfg.trainer.device)
    if str(cfg.trainer.backend) == "megatron":
        check_megatron_available(device)
    params = count_parameters(cfg.model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_param, layout = bytes_per_param(cfg, world)
    need = params * per_param / GIB  # on each process
    hint = (
        f"'{cfg.run_name}' ({params / 1e9:.2f}B parameters) needs about {need:.0f} GiB on each GPU for "
        f"weights, gradients and AdamW states ({per_param:.3g} bytes/parameter: {layout}) plus activations"
    )
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ResourceError(
                f"{hint}, but no CUDA GPU is visible on this machine. "
                "For a CPU run of the same family use +experiment=amber_tiny "
                "(or crystalcoder_tiny / phi15_tiny)."
            )
        # One process per GPU: a run without torchrun uses one GPU
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local > torch.cuda.device_count():
            raise ResourceError(
                f"torchrun started {local} processes on this machine (--nproc-per-node), one per GPU, but it has "
                f"{torch.cuda.device_count()} visible GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}); "
                "start at most that many"
            )
        per_gpu = min(
            torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
        ) / GIB
        if per_gpu < need:
            raise ResourceError(
                f"{hint}; its GPUs have {per_gpu:.0f} GiB. Run on more GPUs (torchrun, trainer.distributed=fsdp, "
                "or megatron's trainer.tensor_parallel / pipeline_parallel) or use +experiment=amber_tiny."
            )
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        except (ValueError, OSError, AttributeError):  # a platform without these: not checked
            have = float("inf")
        # torchrun's processes on this machine share its RAM
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        need *= local
        if have < need:
            raise ResourceError(
                f"'{cfg.run_name}' ({params / 1e9:.2f}B parameters) needs about {need:.0f} GiB of memory for weights, "
                f"gradients and AdamW states on the CPU ({local} process(es) on this machine, {per_param:.3g} "
                f"bytes/parameter each: {layout}), but this machine has {have:.0f} GiB of RAM. "
                "Use +experiment=amber_tiny (or crystalcoder_tiny / phi15_tiny) or trainer.device=cuda."
            )
    check_disk_space(cfg)
    return device


def free_bytes(path: Path) -> tuple[Path, float]:
    """(the existing folder `path` is or will be made in, the bytes free on its filesystem; infinite when that
    cannot be read, as on a folder this user may not enter: the save meets a full disk cleanly anyway)."""
    path = Path(path).expanduser().absolute()
    try:
        while not path.exists() and path != path.parent:
            path = path.parent
        return path, shutil.disk_usage(path).free
    except OSError:
        return path, float("inf")


def checkpoint_bytes(cfg: DictConfig) -> int:
    """About the bytes of one checkpoint of this run on disk (a lower bound)."""
    return count_parameters(cfg.model) * CHECKPOINT_BYTES_PER_PARAM


def check_disk_space(cfg: DictConfig) -> None:
    """The workspace's filesystem must hold one checkpoint: a run that could never save one is refused before
    its shards are built and its steps spent (a fuller disk later is met at the save, losing nothing)."""
    from open360.checkpoint.cadence import CadencePolicy
    from open360.train.schedules import build_stages

    cadence = CadencePolicy.from_config(cfg.checkpoint)
    saves = cadence.ephemeral_every > 0 or cadence.save_final
    if not saves and not cadence.published_steps(0, build_stages(cfg)[-1].end):
        return  # a run that saves nothing
    where, free = free_bytes(Path(str(cfg.workspace)))
    one = checkpoint_bytes(cfg)
    if free < one:
        raise ResourceError(
            f"workspace={cfg.workspace}: its filesystem ({where}) has {free / GIB:.2f} GiB free, but one checkpoint "
            f"of '{cfg.run_name}' takes at least {one / GIB:.2f} GiB ({CHECKPOINT_BYTES_PER_PARAM} bytes/parameter: "
            "fp32 weights and AdamW's two moments); free space or choose another workspace="
        )


def disk_space_warning(cfg: DictConfig, checkpoints_to_come: int) -> str | None:
    """A warning when the checkpoints still to be written (published ones of the cadence from here, and the
    recovery ones kept) do not fit on the workspace's filesystem, else None."""
    where, free = free_bytes(Path(str(cfg.workspace)))
    need = (checkpoints_to_come + int(cfg.checkpoint.keep_ephemeral)) * checkpoint_bytes(cfg)
    if need <= free:
        return None
    return (
        f"the cadence writes {checkpoints_to_come} more published checkpoint(s) and keeps "
        f"{cfg.checkpoint.keep_ephemeral} for recovery, at least {need / GIB:.1f} GiB, and {where} has "
        f"{free / GIB:.1f} GiB free: the run stops cleanly at the save that does not fit (every earlier checkpoint "
        "kept) unless space is freed meanwhile (pushed checkpoints can be removed locally and pulled back)"
    )
