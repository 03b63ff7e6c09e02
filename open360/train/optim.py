"""AdamW over the model's parameter groups (weight decay and muP LR/eps scaling from the model)."""

from __future__ import annotations

import math
from typing import Any

import torch

LR_SCALE_KEY = "lr_scale"  # per-group multiplier of the schedule's LR (muP: 1/width_mult for hidden matrices)


def adam_betas(optim_cfg: Any) -> tuple[float, float]:
    """`optim.betas` as Adam's (beta1, beta2); ValueError unless exactly two values in [0, 1)."""
    betas = [float(b) for b in optim_cfg.betas]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"optim.betas={betas}: expected two values in [0, 1), e.g. [0.9, 0.95]")
    return betas[0], betas[1]


def check_optimizer_values(optim_cfg: Any) -> None:
    """ValueError naming the `optim.*` key whose value AdamW cannot take (eps 0 gives 0/0 = NaN on a
    parameter without gradient at its first step)."""
    if optim_cfg.name != "adamw":
        raise ValueError(f"optim.name={optim_cfg.name!r}: only 'adamw' is implemented")
    adam_betas(optim_cfg)
    if not (math.isfinite(float(optim_cfg.eps)) and float(optim_cfg.eps) > 0):
        raise ValueError(f"optim.eps={optim_cfg.eps}: must be > 0 and finite (e.g. 1e-8)")
    if not (math.isfinite(float(optim_cfg.weight_decay)) and float(optim_cfg.weight_decay) >= 0):
        raise ValueError(f"optim.weight_decay={optim_cfg.weight_decay}: must be >= 0 and finite")
    if not (math.isfinite(float(optim_cfg.grad_clip)) and float(optim_cfg.grad_clip) >= 0):
        raise ValueError(
            f"optim.grad_clip={optim_cfg.grad_clip}: must be >= 0 and finite (0 = no clipping, as in megatron)"
        )


def build_optimizer(model: Any, optim_cfg: Any) -> torch.optim.AdamW:
    """AdamW over `model.param_groups(optim_cfg)`; each group remembers its LR relative to optim.lr.

    Build it after parallelizing the model: FSDP2 replaces the parameters with sharded ones.
    """
    check_optimizer_values(optim_cfg)
    base_lr = float(optim_cfg.lr)
    groups = model.param_groups(optim_cfg)
    prepared = []
    for i, group in enumerate(groups):
        group = dict(group)
        group["params"] = list(group.get("params") or [])  # counting an iterator would leave AdamW none
        if not group["params"]:
            raise ValueError(f"param group {i} ({group.get('name', '?')}) has no parameters")
        group["lr"] = float(group.get("lr", base_lr))
        group[LR_SCALE_KEY] = float(group.get(LR_SCALE_KEY, group["lr"] / base_lr if base_lr else 1.0))
        prepared.append(group)
    n_grouped = sum(len(g["params"]) for g in prepared)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if n_grouped != n_trainable:
        raise ValueError(
            f"param_groups cover {n_grouped} tensors but the model has {n_trainable} trainable ones; "
            "Decoder.param_groups must place every parameter in exactly one group"
        )
    return torch.optim.AdamW(
        prepared,
        lr=base_lr,
        betas=adam_betas(optim_cfg),
        eps=float(optim_cfg.eps),
        weight_decay=float(optim_cfg.weight_decay),
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to `lr` times the group's muP scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_SCALE_KEY, 1.0)


@torch.no_grad()
def restart_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Put every parameter's AdamW state back where a new optimizer starts: step 0, zero moments (in place,
    so sharded or pinned state keeps its layout; the next step is then a fresh AdamW's first, bias
    correction included), and a step count kept per group (apex's and Transformer Engine's FusedAdam, which
    megatron-core takes when either is installed) to 0. Hyperparameters and parameter groups stay."""
    for state in optimizer.state.values():
        for key, value in state.items():
            state[key] = _zeroed(value)
    for group in optimizer.param_groups:
        if group.get("step") is not None:
            group["step"] = _zeroed(group["step"])


def _zeroed(value: Any) -> Any:
    """A tensor zeroed in place, or a number's 0 of its type (a step count kept as a number)."""
    return value.zero_() if isinstance(value, torch.Tensor) else type(value)(0)
