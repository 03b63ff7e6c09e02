"""AdamW over the model's parameter groups (weight decay and muP LR/eps scaling from the model)."""

from __future__ import annotations

from typing import Any

import torch

LR_SCALE_KEY = "lr_scale"  # per-group multiplier of the schedule's LR (muP: 1/width_mult for hidden matrices)


def build_optimizer(model: Any, optim_cfg: Any) -> torch.optim.AdamW:
    """AdamW over `model.param_groups(optim_cfg)`; each group remembers its LR relative to optim.lr.

    Build it after parallelizing the model: FSDP2 replaces the parameters with sharded ones.
    """
    if optim_cfg.name != "adamw":
        raise ValueError(f"optim.name={optim_cfg.name!r}: only 'adamw' is implemented")
    base_lr = float(optim_cfg.lr)
    groups = model.param_groups(optim_cfg)
    prepared = []
    for i, group in enumerate(groups):
        group = dict(group)
        if not group.get("params"):
            raise ValueError(f"param group {i} ({group.get('name', '?')}) has no parameters")
        group["lr"] = float(group.get("lr", base_lr))
        group[LR_SCALE_KEY] = float(group.get(LR_SCALE_KEY, group["lr"] / base_lr if base_lr else 1.0))
        prepared.append(group)
    n_grouped = sum(len(list(g["params"])) for g in prepared)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if n_grouped != n_trainable:
        raise ValueError(
            f"param_groups cover {n_grouped} tensors but the model has {n_trainable} trainable ones; "
            "Decoder.param_groups must place every parameter in exactly one group"
        )
    return torch.optim.AdamW(
        prepared,
        lr=base_lr,
        betas=(float(optim_cfg.betas[0]), float(optim_cfg.betas[1])),
        eps=float(optim_cfg.eps),
        weight_decay=float(optim_cfg.weight_decay),
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to `lr` times the group's muP scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_SCALE_KEY, 1.0)
