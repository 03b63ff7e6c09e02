"""One decoder-only transformer (Amber/LLaMA, CrystalCoder with muP, phi-1.5) whose every choice is a config field."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from open360.config.schema import ModelConfig, MupConfig
from open360.models.loss import fused_linear_cross_entropy

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
BOOL_KEYS = (
    "attn_bias", "mlp_bias", "lm_head_bias", "tie_embeddings", "parallel_block", "activation_checkpointing", "compile"
)


# ----------------------------------------------------------------------------------------------
# Config handling
# ----------------------------------------------------------------------------------------------


def as_model_config(cfg: Any) -> ModelConfig:
    """Accept a ModelConfig, an omegaconf DictConfig of one, or a plain mapping; validate it."""
    if isinstance(cfg, ModelConfig):
        validate_model_config(cfg)
        return cfg
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"model config: expected ModelConfig, DictConfig or dict, got {type(cfg).__name__}")
    fields = dict(cfg)
    mup = fields.pop("mup", None) or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"model config: unknown keys {unknown}; valid keys are {sorted(known)}")
    if not isinstance(mup, MupConfig):
        mup_known = {f.name for f in dataclasses.fields(MupConfig)}
        if set(mup) - mup_known:
            raise ValueError(f"model config: unknown keys {sorted('mup.' + k for k in set(mup) - mup_known)}")
        mup = MupConfig(**mup)
    model_cfg = ModelConfig(**fields, mup=mup)
    validate_model_config(model_cfg)
    return model_cfg


def inference_config(cfg: ModelConfig | Any) -> ModelConfig:
    """`cfg` without its training-only switches (`compile`, `activation_checkpointing`): what a loaded or
    exported model is built from, so that a release does not compile itself on every load."""
    return dataclasses.replace(as_model_config(cfg), compile=False, activation_checkpointing=False)


def _is_number(value: Any) -> bool:
    """An int or a float; not a bool (True would pass for 1) nor a string ("1e-6" compares with nothing)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the offending key when the fields do not describe a buildable decoder."""
    where = f"model config '{cfg.name}'"
    for key in ("vocab_size", "n_layers", "d_model", "n_heads", "ffn_dim", "max_seq_len"):
        if isinstance(getattr(cfg, key), bool) or not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
            raise ValueError(f"{where}: {key}={getattr(cfg, key)!r} must be a positive integer")
    n_kv = cfg.n_kv_heads
    if n_kv is not None and (isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv < 1):
        raise ValueError(f"{where}: n_kv_heads={cfg.n_kv_heads!r} must be a positive integer (or null: = n_heads)")
    for key in BOOL_KEYS:
        if not isinstance(getattr(cfg, key), bool):  # a string such as "false" would be truthy
            raise ValueError(f"{where}: {key}={getattr(cfg, key)!r} must be true or false")
    for key in ("enabled", "attn_scale_by_d"):
        if not isinstance(getattr(cfg.mup, key), bool):
            raise ValueError(f"{where}: mup.{key}={getattr(cfg.mup, key)!r} must be true or false")
    for key in ("norm_eps", "rotary_base", "init_std", "rope_interpolation_factor"):
        if not (_is_number(getattr(cfg, key)) and 0 < getattr(cfg, key) < math.inf):
            raise ValueError(f"{where}: {key}={getattr(cfg, key)!r} must be > 0 and finite")
    if not (_is_number(cfg.rotary_fraction) and 0.0 <= cfg.rotary_fraction <= 1.0):  # NaN included
        raise ValueError(f"{where}: rotary_fraction={cfg.rotary_fraction!r} must lie in [0, 1]")
    if cfg.init_truncation is not None and not (_is_number(cfg.init_truncation) and 0 < cfg.init_truncation < math.inf):
        raise ValueError(f"{where}: init_truncation={cfg.init_truncation!r} must be > 0 and finite (or null: none)")
    if cfg.mup.enabled:
        for key in ("base_width", "embedding_multiplier", "output_multiplier"):
            if not (_is_number(getattr(cfg.mup, key)) and 0 < getattr(cfg.mup, key) < math.inf):
                raise ValueError(f"{where}: mup.{key}={getattr(cfg.mup, key)!r} must be > 0 and finite")
    if cfg.norm not in NORMS:
        raise ValueError(f"{where}: norm={cfg.norm!r}, expected one of {NORMS}")
    if cfg.mlp not in MLPS:
        raise ValueError(f"{where}: mlp={cfg.mlp!r}, expected one of {MLPS}")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"{where}: d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
    n_kv = n_kv or cfg.n_heads
    if cfg.n_heads % n_kv:
        raise ValueError(f"{where}: n_heads={cfg.n_heads} is not a multiple of n_kv_heads={n_kv}")
    head_dim = cfg.d_model // cfg.n_heads
    rot = rotary_dim(cfg)
    if rot % 2 or (rot == 0 and cfg.rotary_fraction > 0):  # 0 dims would leave the model without positions
        raise ValueError(
            f"{where}: rotary_fraction={cfg.rotary_fraction} gives {rot} rotary dims of head_dim {head_dim}; "
            "it must give an even number of dims, at least 2 (or be 0: no rotary)"
        )


def rotary_dim(cfg: ModelConfig) -> int:
    """Number of leading dims of each head that rotary rotates (HF's `int(head_dim * partial_rotary_factor)`)."""
    return int((cfg.d_model // cfg.n_heads) * cfg.rotary_fraction)


def width_mult(cfg: ModelConfig) -> float:
    """muP width multiplier d_model / base_width (1.0 when muP is off)."""
    return cfg.d_model / cfg.mup.base_width if cfg.mup.enabled else 1.0


# ----------------------------------------------------------------------------------------------
# Rotary position embedding (GPT-NeoX / HF "rotate half" layout, partial, with position interpolation)
# ----------------------------------------------------------------------------------------------


class Rotary(nn.Module):
    """cos/sin tables for the first `dim` dims of each head; positions are divided by `interpolation_factor`."""

    def __init__(self, dim: int, base: float, interpolation_factor: float, max_len: int) -> None:
        super().__init__()
        self.dim, self.base, self.interpolation_factor = dim, base, interpolation_factor
        self._build(max_len)

    def reset_tables(self) -> None:
        """Recompute the tables in place of whatever they hold (e.g. after materializing from the meta device)."""
        self._build(self.cos.shape[0], device=self.cos.device)

    def _build(self, length: int, device: torch.device | None = None) -> None:
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim)
        positions = torch.arange(length, dtype=torch.float64, device=device) / self.interpolation_factor
        angles = torch.outer(positions, inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def ensure_length(self, length: int) -> None:
        """Grow the tables when a sequence or KV cache runs past the positions built so far."""
        if length > self.cos.shape[0]:
            self._build(max(length, 2 * self.cos.shape[0]), device=self.cos.device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of x [B, T, N, head_dim] in rotate-half pairs (i, i + r/2)."""
    half = cos.shape[-1]
    if half == 0:
        return x
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2, x_pass = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass), dim=-1)


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Static, preallocated keys and values [n_layers, B, n_kv_heads, max_len, head_dim] for greedy decoding.

    The buffers never change shape. Decoding with a device-tensor `start_pos` keeps every shape fixed
    (attention spans all `max_len` slots under a mask of the filled ones); an int `start_pos` attends over
    the filled slots only, which reads less and needs no mask (one fixed shape per position).
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls,
        model_or_cfg: Decoder | ModelConfig | Any,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """Zeroed cache for `batch_size` sequences of up to `max_len` tokens (prompt + generated)."""
        if isinstance(model_or_cfg, Decoder):
            cfg = model_or_cfg.cfg
            ref = model_or_cfg.embed.weight
            device = ref.device if device is None else device
            dtype = ref.dtype if dtype is None else dtype
        else:
            cfg = as_model_config(model_or_cfg)
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads or cfg.n_heads, max_len, cfg.d_model // cfg.n_heads)
        dtype = dtype or torch.float32
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def make_norm(cfg: ModelConfig) -> nn.Module:
    """RMSNorm (weight only) or LayerNorm (weight and bias) over d_model."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Attention(nn.Module):
    """Causal self-attention: one fused QKV projection, partial rotary, SDPA, output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=cfg.attn_bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.attn_bias)
        mup_by_d = cfg.mup.enabled and cfg.mup.attn_scale_by_d
        self.scale = 1.0 / self.head_dim if mup_by_d else 1.0 / math.sqrt(self.head_dim)
        # Optional fn(q, k, v, scale) -> [B, H, 1, head_dim] for single-token decode steps over the filled
        # cache slots (int positions, no mask); None uses SDPA. Set by inference engines, never in training.
        self.decode_attention: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | int | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`positions` (with `cache`): a device tensor of the T positions (fixed shapes: attention spans the
        whole cache under `mask`), or the int position of the first token (attention spans the filled slots
        0..positions+T-1 only; `mask` is then needed only when T > 1 and positions > 0)."""
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim)
        qk = apply_rotary(qkv[:, :, : H + KV], cos, sin)
        q = qk[:, :, :H].transpose(1, 2)
        k = qk[:, :, H:].transpose(1, 2)
        v = qkv[:, :, H + KV :].transpose(1, 2)
        if cache is not None:
            cache_k, cache_v = cache
            if isinstance(positions, int):  # slots positions..positions+T-1; attend over the filled ones only
                end = positions + T
                cache_k[:, :, positions:end] = k.to(cache_k.dtype)
                cache_v[:, :, positions:end] = v.to(cache_v.dtype)
                k, v = cache_k[:, :, :end].to(q.dtype), cache_v[:, :, :end].to(q.dtype)
            else:  # a device tensor of positions: fixed shapes, all max_len slots under the mask
                cache_k.index_copy_(2, positions, k.to(cache_k.dtype))
                cache_v.index_copy_(2, positions, v.to(cache_v.dtype))
                k, v = cache_k.to(q.dtype), cache_v.to(q.dtype)
        if KV != H:
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
        if self.decode_attention is not None and T == 1 and mask is None and isinstance(positions, int):
            y = self.decode_attention(q, k, v, self.scale)
        else:
            # No mask: causal among the T queries (a single query attends to every key it is given).
            causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        return self.out(y.transpose(1, 2).reshape(B, T, H * self.head_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one projection ([gate; up] rows)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))) — phi's MLP ("gelu_new" is the tanh approximation)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm block: sequential x+attn(n1(x)), then +mlp(n2(x)); or parallel x+attn(n(x))+mlp(n(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_block
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = None if cfg.parallel_block else make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | int | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.norm1(x)
        if self.parallel:
            return x + self.attn(h, cos, sin, cache, positions, mask) + self.mlp(h)
        x = x + self.attn(h, cos, sin, cache, positions, mask)
        return x + self.mlp(self.norm2(x))


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over non-ignored targets."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


_compiled_lm_loss = None


def _lm_loss_compiled(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """`_lm_loss` through torch.compile: the fp32 upcast, log-softmax and NLL fuse into one pass."""
    global _compiled_lm_loss
    if _compiled_lm_loss is None:
        _compiled_lm_loss = torch.compile(_lm_loss)
    return _compiled_lm_loss(logits, targets, ignore_index)


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------


class Decoder(nn.Module):
    """Token embedding → n_layers blocks → final norm → LM head, with optional muP multipliers."""

    def __init__(self, cfg: ModelConfig | Any) -> None:
        super().__init__()
        cfg = as_model_config(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.lm_head_bias else None
        self.rotary = Rotary(rotary_dim(cfg), cfg.rotary_base, cfg.rope_interpolation_factor, cfg.max_seq_len)
        self.width_mult = width_mult(cfg)
        self.embedding_multiplier = cfg.mup.embedding_multiplier if cfg.mup.enabled else 1.0
        self.logit_multiplier = cfg.mup.output_multiplier / self.width_mult if cfg.mup.enabled else 1.0
        self.reset_parameters()
        if cfg.compile:
            for block in self.blocks:
                block.compile()

    # -- initialization ------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) embeddings/head; hidden matrices init_std/sqrt(width_mult) (muP), residual
        output projections further /sqrt(2*n_layers); each normal truncated at +-init_truncation std when set
        (CrystalCoder: 2, as Cerebras' truncated_normal(a=-2 std, b=2 std)); biases 0; norm weights 1."""
        cfg = self.cfg
        hidden_std = cfg.init_std / math.sqrt(self.width_mult)

        def normal(weight: torch.Tensor, std: float) -> None:
            if cfg.init_truncation is None:
                nn.init.normal_(weight, std=std)
            else:
                bound = cfg.init_truncation * std
                nn.init.trunc_normal_(weight, std=std, a=-bound, b=bound)

        normal(self.embed.weight, cfg.init_std)
        if self.lm_head is not None:
            normal(self.lm_head.weight, cfg.init_std)
        if self.lm_head_bias is not None:
            nn.init.zeros_(self.lm_head_bias)
        for block in self.blocks:
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    residual_out = name in ("attn.out", "mlp.down", "mlp.fc2")
                    normal(module.weight, hidden_std / math.sqrt(2 * cfg.n_layers) if residual_out else hidden_std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm | nn.RMSNorm):
                module.reset_parameters()

    # -- forward -------------------------------------------------------------------------------

    def hidden_states(
        self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, d_model] (the LM head's input)."""
        B, T = input_ids.shape
        x = self.embed(input_ids)
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        positions = mask = None
        if not isinstance(start_pos, torch.Tensor):
            start_pos = int(start_pos)
        if kv_cache is None:
            if not isinstance(start_pos, int):
                raise TypeError("start_pos must be an int (not a tensor) when no kv_cache is given")
            self.rotary.ensure_length(start_pos + T)
            cos, sin = self.rotary.cos[start_pos : start_pos + T], self.rotary.sin[start_pos : start_pos + T]
        else:
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache holds {kv_cache.batch_size} sequences but input_ids has batch {B}")
            if isinstance(start_pos, int) and start_pos + T > kv_cache.max_len:
                raise ValueError(
                    f"positions {start_pos}..{start_pos + T - 1} run past the kv_cache's max_len={kv_cache.max_len}; "
                    "allocate a longer cache"
                )
            self.rotary.ensure_length(kv_cache.max_len)
            if isinstance(start_pos, int):
                # Attention reads only the filled slots 0..start_pos+T-1 (shapes vary with start_pos); a
                # single query or a prompt from slot 0 needs no mask, so SDPA can pick a mask-free kernel.
                positions, filled = start_pos, slice(start_pos, start_pos + T)
                cos, sin = self.rotary.cos[filled], self.rotary.sin[filled]
                if T > 1 and start_pos > 0:
                    pos = torch.arange(start_pos, start_pos + T, device=input_ids.device)
                    slots = torch.arange(start_pos + T, device=input_ids.device)
                    mask = slots[None, :] <= pos[:, None]  # [T, start_pos+T]: causal over the filled slots
            else:
                start_pos = start_pos.to(input_ids.device)
                positions = torch.arange(T, device=input_ids.device) + start_pos
                cos, sin = self.rotary.cos[positions], self.rotary.sin[positions]
                slots = torch.arange(kv_cache.max_len, device=input_ids.device)
                mask = slots[None, :] <= positions[:, None]  # [T, max_len]: causal over the filled slots
        checkpointing = self.cfg.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            if checkpointing:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, positions, mask)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over hidden states, with muP's output multiplier output_multiplier / width_mult."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        bias = self.lm_head_bias
        if self.logit_multiplier != 1.0:
            hidden = hidden * self.logit_multiplier
            bias = None if bias is None else bias * self.logit_multiplier
        return F.linear(hidden, weight, bias)

    def forward(
        self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens at positions start_pos..start_pos+T-1.

        With a kv_cache, keys/values of these positions are written into it and attention spans every
        earlier position held there. An int `start_pos` attends over the filled slots only (fastest; the
        shapes change with it); a 0-dim device tensor keeps every shape fixed (no recompiles, one CUDA
        graph for any position) at the cost of attending over all max_len slots under a mask.
        Without one, the T tokens attend causally among themselves only (start_pos just shifts rotary).
        """
        return self.logits(self.hidden_states(input_ids, kv_cache, start_pos))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of logits(input_ids) against targets [B, T] (fp32 log-sum-exp).

        Eager: LM head and loss fused over row chunks (no fp32 [B*T, vocab] tensor). Compiled: inductor
        fuses the upcast, log-softmax and NLL over the bf16 logits.
        """
        hidden = self.hidden_states(input_ids)
        if self.cfg.compile:
            return _lm_loss_compiled(self.logits(hidden), targets, ignore_index)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return fused_linear_cross_entropy(
            hidden.flatten(0, 1), weight, self.lm_head_bias, targets.flatten(), self.logit_multiplier, ignore_index
        )

    # -- optimizer groups ----------------------------------------------------------------------

    def param_groups(self, optim_cfg: Any) -> list[dict]:
        """AdamW parameter groups: decay on matrices only; under muP hidden matrices get lr and eps / width_mult.

        Groups (empty ones dropped), each with "name", "params", "lr", "lr_scale", "eps", "weight_decay":
        - hidden: 2-D weights inside the blocks — weight decay (x width_mult under muP with
          optim.mup_scale_weight_decay); muP lr x 1/width_mult, eps x 1/width_mult
        - lm_head: the untied output matrix — weight decay, base lr (muP puts 1/width_mult on the logits)
        - embedding: token embedding (and the tied head) — no decay, base lr
        - norms_biases: every norm weight/bias and every bias — no decay, base lr
        """
        lr, eps, wd = float(optim_cfg.lr), float(optim_cfg.eps), float(optim_cfg.weight_decay)
        hidden_scale = 1.0 / self.width_mult
        hidden_wd = wd * (self.width_mult if bool(getattr(optim_cfg, "mup_scale_weight_decay", False)) else 1.0)
        groups = {
            "hidden": dict(lr_scale=hidden_scale, eps=eps * hidden_scale, weight_decay=hidden_wd),
            "lm_head": dict(lr_scale=1.0, eps=eps, weight_decay=wd),
            "embedding": dict(lr_scale=1.0, eps=eps, weight_decay=0.0),
            "norms_biases": dict(lr_scale=1.0, eps=eps, weight_decay=0.0),
        }
        members: dict[str, list[nn.Parameter]] = {name: [] for name in groups}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name == "embed.weight":
                members["embedding"].append(param)
            elif name == "lm_head.weight":
                members["lm_head"].append(param)
            elif param.ndim == 2:
                members["hidden"].append(param)
            else:
                members["norms_biases"].append(param)
        return [
            {"name": name, "params": members[name], "lr": lr * spec["lr_scale"], **spec}
            for name, spec in groups.items()
            if members[name]
        ]

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig | Any) -> Decoder:
    """Initialized fp32 Decoder from a ModelConfig, an omegaconf DictConfig of one, or a dict."""
    return Decoder(as_model_config(cfg))


def model_with_weights(cfg: ModelConfig | Any, weights: dict[str, torch.Tensor]) -> Decoder:
    """A fp32 Decoder on the CPU holding `weights`, built without initializing (a 1.4B model's random init
    takes ~20 s on 2 cores): the strict load overwrites every parameter (a missing one raises), and the
    rotary tables, the only non-persistent buffers, are recomputed. Built for inference: training-only
    switches of the config (`compile`, `activation_checkpointing`) are off; callers compile as they need."""
    with torch.device("meta"):
        model = build_model(inference_config(cfg))
    model = model.to_empty(device="cpu")
    model.rotary.reset_tables()
    model.load_state_dict(weights)
    return model
