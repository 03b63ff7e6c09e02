"""Tensor/pipeline/data-parallel layout of a megatron-core run, and the weight converters between
open360's native state dict and megatron-core GPTModel's per-rank state dicts (pure torch, no CUDA)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from open360.config.schema import ModelConfig

Tensor = torch.Tensor


class LayoutError(ValueError):
    """The parallel layout does not fit the model, the batch or the number of processes."""


@dataclass(frozen=True)
class ParallelLayout:
    """tp x pp x dp = world size; every rank of one data-parallel replica sees the same rows."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def for_run(cls, model: ModelConfig, tp: int, pp: int, world_size: int) -> ParallelLayout:
        """Validate `trainer.tensor_parallel`/`pipeline_parallel` against the model and world size."""
        if tp < 1 or pp < 1:
            raise LayoutError(f"trainer.tensor_parallel={tp} and trainer.pipeline_parallel={pp} must be >= 1")
        if world_size % (tp * pp):
            raise LayoutError(
                f"{world_size} processes cannot hold trainer.tensor_parallel={tp} x trainer.pipeline_parallel={pp}"
                f"; launch a multiple of {tp * pp} processes (torchrun --nproc-per-node)"
            )
        n_kv = model.n_kv_heads or model.n_heads
        checks = {
            f"model.n_heads={model.n_heads}": model.n_heads % tp,
            f"model.n_kv_heads={n_kv}": n_kv % tp,
            f"model.ffn_dim={model.ffn_dim}": model.ffn_dim % tp,
            f"model.vocab_size={model.vocab_size}": model.vocab_size % tp,
        }
        for what, rem in checks.items():
            if rem:
                raise LayoutError(f"{what} is not divisible by trainer.tensor_parallel={tp}")
        if model.n_layers % pp:
            raise LayoutError(
                f"model.n_layers={model.n_layers} is not divisible by trainer.pipeline_parallel={pp}"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    def microbatches(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel replica."""
        per_replica, rem = divmod(global_batch_size, self.dp)
        if rem or per_replica % micro_batch_size:
            raise LayoutError(
                f"trainer.global_batch_size={global_batch_size} must be a multiple of "
                f"trainer.micro_batch_size={micro_batch_size} x data-parallel size {self.dp}; change one of them"
            )
        return per_replica // micro_batch_size


# ----------------------------------------------------------------------------------------------
# Native (open360) <-> megatron-core names and layouts, unsharded
# ----------------------------------------------------------------------------------------------

_NORM_PARTS = ("weight", "bias")


def _qkv_to_megatron(t: Tensor, cfg: ModelConfig) -> Tensor:
    """[q heads; k heads; v heads] rows -> megatron's per-query-group [q_g..., k_g, v_g] rows."""
    h, kv, hd = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.d_model // cfg.n_heads
    rest = tuple(t.shape[1:])
    q = t[: h * hd].reshape(kv, h // kv, hd, *rest)
    k = t[h * hd : (h + kv) * hd].reshape(kv, 1, hd, *rest)
    v = t[(h + kv) * hd :].reshape(kv, 1, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_from_megatron(t: Tensor, cfg: ModelConfig) -> Tensor:
    h, kv, hd = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.d_model // cfg.n_heads
    rest = tuple(t.shape[1:])
    g = t.reshape(kv, h // kv + 2, hd, *rest)
    q = g[:, : h // kv].reshape(h * hd, *rest)
    k = g[:, h // kv].reshape(kv * hd, *rest)
    v = g[:, h // kv + 1].reshape(kv * hd, *rest)
    return torch.cat([q, k, v], dim=0)


def _layer_names(cfg: ModelConfig, i: int) -> dict[str, str]:
    """native name -> megatron name for every parameter of block i."""
    n, m = f"blocks.{i}.", f"decoder.layers.{i}."
    mlp_in, mlp_out = ("gate_up", "down") if cfg.mlp == "swiglu" else ("fc1", "fc2")
    names = {
        f"{n}attn.qkv.weight": f"{m}self_attention.linear_qkv.weight",
        f"{n}attn.out.weight": f"{m}self_attention.linear_proj.weight",
        f"{n}mlp.{mlp_in}.weight": f"{m}mlp.linear_fc1.weight",
        f"{n}mlp.{mlp_out}.weight": f"{m}mlp.linear_fc2.weight",
    }
    if cfg.attn_bias:
        names[f"{n}attn.qkv.bias"] = f"{m}self_attention.linear_qkv.bias"
        names[f"{n}attn.out.bias"] = f"{m}self_attention.linear_proj.bias"
    if cfg.mlp_bias:
        names[f"{n}mlp.{mlp_in}.bias"] = f"{m}mlp.linear_fc1.bias"
        names[f"{n}mlp.{mlp_out}.bias"] = f"{m}mlp.linear_fc2.bias"
    parts = _NORM_PARTS if cfg.norm == "layernorm" else ("weight",)
    for part in parts:
        names[f"{n}norm1.{part}"] = f"{m}input_layernorm.{part}"
        if not cfg.parallel_block:
            names[f"{n}norm2.{part}"] = f"{m}pre_mlp_layernorm.{part}"
    return names


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Every native parameter name -> its megatron-core GPTModel name (one rank holding everything)."""
    names = {"embed.weight": "embedding.word_embeddings.weight"}
    for i in range(cfg.n_layers):
        names.update(_layer_names(cfg, i))
    for part in _NORM_PARTS if cfg.norm == "layernorm" else ("weight",):
        names[f"final_norm.{part}"] = f"decoder.final_layernorm.{part}"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output_layer.weight"
    if cfg.lm_head_bias:
        names["lm_head_bias"] = "output_layer.bias"
    return names


def native_to_megatron(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A native state dict as one unsharded megatron GPTModel state dict (fused QKV re-laid per group)."""
    names = name_map(cfg)
    missing = sorted(set(names) - set(state))
    if missing:
        raise KeyError(f"native state dict lacks {missing[:5]} (model config '{cfg.name}')")
    out = {}
    for native, meg in names.items():
        t = state[native]
        out[meg] = _qkv_to_megatron(t, cfg) if ".linear_qkv." in meg else t
    return out


def megatron_to_native(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The inverse of `native_to_megatron`."""
    out = {}
    for native, meg in name_map(cfg).items():
        if meg not in state:
            raise KeyError(f"megatron state dict lacks {meg!r} (model config '{cfg.name}')")
        t = state[meg]
        out[native] = _qkv_from_megatron(t, cfg) if ".linear_qkv." in meg else t
    return out


# ----------------------------------------------------------------------------------------------
# Tensor- and pipeline-parallel sharding of megatron state dicts
# ----------------------------------------------------------------------------------------------


def _split_kind(name: str, cfg: ModelConfig) -> str:
    """How a megatron tensor is split over tensor-parallel ranks: rows, cols, swiglu rows, or replicated."""
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "cols"
    if ".linear_fc1." in name and cfg.mlp == "swiglu":
        return "swiglu"
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")):
        return "rows"
    if name.startswith(("embedding.word_embeddings.", "output_layer.")):
        return "rows"
    return "replicated"


def _stage_of(name: str, cfg: ModelConfig, pp: int) -> tuple[int | None, str]:
    """(pipeline stage or None for 'first'/'last' special tensors, name with the stage-local layer index)."""
    if name.startswith("decoder.layers."):
        i = int(name.split(".")[2])
        per_stage = cfg.n_layers // pp
        local = f"decoder.layers.{i % per_stage}." + name.split(".", 3)[3]
        return i // per_stage, local
    if name.startswith("embedding."):
        return 0, name
    return pp - 1, name  # final_layernorm, output_layer


def shard_for_rank(state: Mapping[str, Tensor], cfg: ModelConfig, layout: ParallelLayout, tp_rank: int, pp_rank: int) -> dict[str, Tensor]:
    """The slice of an unsharded megatron state dict that rank (tp_rank, pp_rank) holds.

    With tied embeddings and several pipeline stages, the last stage also holds a copy of the
    embedding as `output_layer.weight` (megatron-core keeps the two in sync).
    """
    out: dict[str, Tensor] = {}
    items = dict(state)
    if cfg.tie_embeddings and layout.pp > 1:
        items["output_layer.weight"] = items["embedding.word_embeddings.weight"]
    for name, t in items.items():
        stage, local = _stage_of(name, cfg, layout.pp)
        if stage != pp_rank:
            continue
        kind = _split_kind(name, cfg)
        if kind == "rows":
            t = t.chunk(layout.tp, dim=0)[tp_rank]
        elif kind == "cols":
            t = t.chunk(layout.tp, dim=1)[tp_rank]
        elif kind == "swiglu":
            gate, up = t.chunk(2, dim=0)
            t = torch.cat([gate.chunk(layout.tp, dim=0)[tp_rank], up.chunk(layout.tp, dim=0)[tp_rank]], dim=0)
        out[local] = t.clone()
    return out


def merge_shards(shards: Mapping[tuple[int, int], Mapping[str, Tensor]], cfg: ModelConfig, layout: ParallelLayout) -> dict[str, Tensor]:
    """Unsharded megatron state dict from every (tp_rank, pp_rank)'s local state dict."""
    expected = {(t, p) for t in range(layout.tp) for p in range(layout.pp)}
    if set(shards) != expected:
        raise LayoutError(f"merge_shards needs the shards of ranks {sorted(expected)}, got {sorted(shards)}")
    per_stage = cfg.n_layers // layout.pp
    out: dict[str, Tensor] = {}
    for pp_rank in range(layout.pp):
        for local in shards[(0, pp_rank)]:
            if local.endswith("_extra_state"):
                continue
            if cfg.tie_embeddings and local == "output_layer.weight":
                continue  # the last stage's copy of the embedding
            parts = [shards[(t, pp_rank)][local] for t in range(layout.tp)]
            kind = _split_kind(local, cfg)
            if kind == "rows":
                full = torch.cat(parts, dim=0)
            elif kind == "cols":
                full = torch.cat(parts, dim=1)
            elif kind == "swiglu":
                halves = [p.chunk(2, dim=0) for p in parts]
                full = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                full = parts[0]
            name = local
            if local.startswith("decoder.layers."):
                i = int(local.split(".")[2]) + pp_rank * per_stage
                name = f"decoder.layers.{i}." + local.split(".", 3)[3]
            out[name] = full
    return out


def check_expressible(cfg: ModelConfig) -> None:
    """ValueError for a model config that megatron-core's GPTModel (with open360's spec) cannot build."""
    if cfg.mlp_bias and not cfg.attn_bias:
        raise ValueError(
            f"model config '{cfg.name}': megatron-core puts biases on all of proj/fc1/fc2 together "
            f"(add_bias_linear); mlp_bias={cfg.mlp_bias} with attn_bias={cfg.attn_bias} is not expressible"
        )
    if cfg.attn_bias and not cfg.mlp_bias:
        raise ValueError(
            f"model config '{cfg.name}': attn_bias=true with mlp_bias=false puts a bias on the attention output "
            "projection only, which megatron-core's add_bias_linear cannot express"
        )
    if cfg.lm_head_bias and cfg.tie_embeddings:
        raise ValueError(
            f"model config '{cfg.name}': lm_head_bias with tie_embeddings is not supported on megatron"
        )


def layout_for_run(cfg: Any, world_size: int, global_batch_size: int, micro_batch_size: int) -> ParallelLayout:
    """The run's parallel layout, validated against the model, the process count and the batch geometry
    (a mismatch, or a model megatron-core cannot express, names the setting before any model is built)."""
    from open360.models.decoder import as_model_config

    model = as_model_config(cfg.model)
    check_expressible(model)
    layout = ParallelLayout.for_run(model, int(cfg.trainer.tensor_parallel), int(cfg.trainer.pipeline_parallel), world_size)
    layout.microbatches(global_batch_size, micro_batch_size)
    return layout
