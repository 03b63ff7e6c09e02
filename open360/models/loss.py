"""LM head + cross-entropy fused over row chunks, so fp32 logits never exist for the whole batch at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ROWS = 4096


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes, chunk by chunk, the loss and d(loss)/d(logits) in the compute dtype; backward does the
    two GEMMs. Saved state: bf16 (or fp32 on CPU) gradient of the logits, the cast hidden states — no fp32 [N, V]."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        multiplier: float,
        ignore_index: int,
        chunk_rows: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h = (hidden * multiplier if multiplier != 1.0 else hidden).to(compute_dtype)
            w = weight.to(compute_dtype)
            b = None if bias is None else (bias * multiplier).to(compute_dtype)
            valid = targets != ignore_index
            n_valid = valid.sum().clamp(min=1).float()
            safe_targets = torch.where(valid, targets, 0)[:, None]
            need_grad = any(ctx.needs_input_grad[:3])
            grad_logits = torch.empty(h.shape[0], w.shape[0], dtype=compute_dtype, device=h.device) if need_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk_rows):
                end = min(start + chunk_rows, h.shape[0])
                logits = F.linear(h[start:end], w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                chunk_valid = valid[start:end]
                target_logit = logits.gather(1, safe_targets[start:end]).squeeze(1)
                total += torch.where(chunk_valid, lse - target_logit, 0.0).sum()
                if need_grad:
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs.scatter_add_(1, safe_targets[start:end], torch.full_like(target_logit[:, None], -1.0))
                    probs.mul_((chunk_valid.float() / n_valid)[:, None])
                    grad_logits[start:end] = probs
        if need_grad:
            ctx.save_for_backward(grad_logits, h, w)
            ctx.multiplier, ctx.has_bias = multiplier, bias is not None
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_logits, h, w = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_out.float() * ctx.multiplier
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ w).to(hidden_dtype) * scale.to(hidden_dtype)
        if ctx.needs_input_grad[1]:
            # h already carries the multiplier, so d(loss)/dW = g^T h
            grad_weight = (grad_logits.t() @ h).to(weight_dtype) * grad_out.to(weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = (grad_logits.sum(0, dtype=torch.float32) * scale).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    multiplier: float = 1.0,
    ignore_index: int = -100,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """mean CE of `(hidden @ weight.T + bias) * multiplier` against targets; hidden [N, d], targets [N].

    Matmuls run in the autocast dtype when autocast is on (else hidden's dtype); log-sum-exp in fp32.
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, d] and targets [N]; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if not torch.is_grad_enabled():  # eval: needs_input_grad stays True for parameters under no_grad,
        # which would build the [N, V] gradient of the logits for nothing
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, float(multiplier), ignore_index, chunk_rows, compute_dtype
    )
