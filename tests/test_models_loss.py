"""Fused chunked LM-head cross-entropy equals the plain logits → F.cross_entropy path, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from open360.models.loss import fused_linear_cross_entropy

torch.set_num_threads(2)


def inputs(seed: int = 0, n: int = 37, d: int = 16, v: int = 53):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g).mul_(0.3).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("multiplier", [1.0, 0.37])
def test_matches_plain_cross_entropy(with_bias: bool, multiplier: float) -> None:
    hidden, weight, bias, targets = inputs()
    b = bias if with_bias else None
    ref = F.cross_entropy(F.linear(hidden, weight, b) * multiplier, targets, ignore_index=-100)
    ref_grads = torch.autograd.grad(2.0 * ref, [hidden, weight] + ([bias] if with_bias else []))
    out = fused_linear_cross_entropy(hidden, weight, b, targets, multiplier, chunk_rows=8)  # 5 chunks
    grads = torch.autograd.grad(2.0 * out, [hidden, weight] + ([bias] if with_bias else []))
    assert torch.allclose(out, ref, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_no_grad_path_and_bf16_autocast() -> None:
    hidden, weight, bias, targets = inputs(1)
    with torch.no_grad():
        ref = F.cross_entropy(F.linear(hidden, weight, bias), targets)
        assert torch.allclose(fused_linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=4), ref, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_cross_entropy(hidden, weight, bias, targets)
    out.backward()
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 0.05
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32


def test_all_targets_ignored_gives_zero_not_nan() -> None:
    hidden, weight, bias, targets = inputs(2)
    out = fused_linear_cross_entropy(hidden, weight, bias, torch.full_like(targets, -100))
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_no_grad_builds_no_logit_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad (evaluation), the [N, V] gradient buffer of the logits is never allocated."""
    sizes = []
    real_empty = torch.empty

    def spy(*shape, **kw):  # noqa: ANN002, ANN003, ANN202
        sizes.append(tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
        return real_empty(*shape, **kw)

    hidden, weight, bias, targets = inputs(2)
    monkeypatch.setattr(torch, "empty", spy)
    with torch.no_grad():
        fused_linear_cross_entropy(hidden, weight, bias, targets, 1.0, chunk_rows=8)
    assert (37, 53) not in sizes
    fused_linear_cross_entropy(hidden, weight, bias, targets, 1.0, chunk_rows=8)  # with grad: it is built
    assert (37, 53) in sizes
