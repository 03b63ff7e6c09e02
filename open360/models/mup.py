"""muP coordinate check: activation scale vs width over a few AdamW steps, standard vs maximal-update parametrization."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from open360.config.schema import ModelConfig, MupConfig, OptimConfig
from open360.models.decoder import Decoder, apply_rotary


@dataclass(frozen=True)
class CoordCheckSetup:
    """Shape and training knobs shared by every width of one coordinate check."""

    n_layers: int = 2
    n_heads: int = 4  # fixed, so head_dim grows with width (exercises muP's 1/d attention scale)
    vocab_size: int = 256
    seq_len: int = 32
    batch_size: int = 8
    steps: int = 4
    lr: float = 1e-2
    init_std: float = 0.02
    embedding_multiplier: float = 10.0
    output_multiplier: float = 1.0
    seed: int = 0


def coord_check_config(width: int, mup: bool, base_width: int, setup: CoordCheckSetup) -> ModelConfig:
    """A small Amber-style decoder of `width`, with muP on or off (everything else identical)."""
    return ModelConfig(
        name=f"coord_{'mup' if mup else 'sp'}_{width}",
        vocab_size=setup.vocab_size,
        n_layers=setup.n_layers,
        d_model=width,
        n_heads=setup.n_heads,
        ffn_dim=4 * width,
        max_seq_len=setup.seq_len,
        init_std=setup.init_std,
        mup=MupConfig(
            enabled=mup,
            base_width=base_width,
            embedding_multiplier=setup.embedding_multiplier,
            output_multiplier=setup.output_multiplier,
            attn_scale_by_d=True,
        ),
    )


def _attention_logit_scale(block: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> float:
    """Mean |q·k| * scale of a block's attention (before masking and softmax)."""
    attn = block.attn
    B, T, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).view(B, T, -1, attn.head_dim)
    qk = apply_rotary(qkv[:, :, : attn.n_heads + attn.n_kv_heads], cos, sin)
    q, k = qk[:, :, : attn.n_heads].transpose(1, 2), qk[:, :, attn.n_heads :].transpose(1, 2)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    return ((q @ k.transpose(-1, -2)) * attn.scale).abs().mean().item()


def _record(model: Decoder, tokens: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Mean |coordinate| of the embedding output, layer 0's attention logits, every block output and the
    logits; plus the loss."""
    scales: dict[str, float] = {}
    x = model.embed(tokens[:, :-1]) * model.embedding_multiplier
    scales["embedding"] = x.abs().mean().item()
    cos, sin = model.rotary.cos[: x.shape[1]], model.rotary.sin[: x.shape[1]]
    for i, block in enumerate(model.blocks):
        if i == 0:
            scales["attn_logits_0"] = _attention_logit_scale(block, x, cos, sin)
        x = block(x, cos, sin)
        scales[f"block_{i}"] = x.abs().mean().item()
    logits = model.logits(model.final_norm(x))
    scales["logits"] = logits.abs().mean().item()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    return scales, loss


def coord_check(
    widths: Sequence[int], mup: bool, setup: CoordCheckSetup = CoordCheckSetup()
) -> list[dict[str, float | int | str]]:
    """Train one model per width for `setup.steps` AdamW steps on the same fixed batch; record scales.

    Returns rows {parametrization, width, step, activation, scale}; step t is measured before update t+1.
    """
    base_width = min(widths)
    generator = torch.Generator().manual_seed(setup.seed)
    tokens = torch.randint(0, setup.vocab_size, (setup.batch_size, setup.seq_len + 1), generator=generator)
    rows: list[dict[str, float | int | str]] = []
    for width in widths:
        torch.manual_seed(setup.seed)
        model = Decoder(coord_check_config(width, mup, base_width, setup))
        optim_cfg = OptimConfig(lr=setup.lr, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0)
        optimizer = torch.optim.AdamW(model.param_groups(optim_cfg), betas=(0.9, 0.95))
        for step in range(setup.steps + 1):
            scales, loss = _record(model, tokens)
            rows += [
                {"parametrization": "mup" if mup else "sp", "width": width, "step": step, "activation": k, "scale": v}
                for k, v in scales.items()
            ]
            if step < setup.steps:
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return rows


def growth(rows: Sequence[dict], activation: str, step: int) -> float:
    """scale(widest) / scale(narrowest) of one activation at one step (1.0 = flat across width)."""
    picked = sorted((r["width"], r["scale"]) for r in rows if r["activation"] == activation and r["step"] == step)
    if len(picked) < 2:
        raise ValueError(f"no rows for activation={activation!r} step={step} at two or more widths")
    return picked[-1][1] / picked[0][1]


def plot_coord_check(rows: Sequence[dict], out_png: Path | str) -> Path:
    """One panel per parametrization × activation: scale vs width (log-log), one line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({r["parametrization"] for r in rows}, reverse=True)
    activations = list(dict.fromkeys(r["activation"] for r in rows))
    steps = sorted({r["step"] for r in rows})
    fig, axes = plt.subplots(
        len(params), len(activations), figsize=(3.2 * len(activations), 3.0 * len(params)), squeeze=False
    )
    cmap = plt.get_cmap("viridis")
    for i, p in enumerate(params):
        for j, a in enumerate(activations):
            ax = axes[i][j]
            for s in steps:
                pts = sorted((r["width"], r["scale"]) for r in rows if (r["parametrization"], r["activation"], r["step"]) == (p, a, s))
                ax.plot([w for w, _ in pts], [v for _, v in pts], marker="o", color=cmap(s / max(steps[-1], 1)), label=f"step {s}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'muP' if p == 'mup' else 'standard'}: {a}", fontsize=9)
            ax.set_xlabel("width (d_model)")
            if j == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

