"""Parameter and FLOP counts of a decoder config, used for MFU, memory estimates and compute plots."""

from __future__ import annotations

from typing import Any


def count_parameters(cfg: Any) -> int:
    """Exact number of parameters of the decoder described by a ModelConfig."""
    per_layer, embed, head, norm = _parameter_parts(cfg)
    return cfg.n_layers * per_layer + embed + head + norm


def pipeline_stage_parameters(cfg: Any, pp: int) -> list[int]:
    """Parameters each of `pp` pipeline stages holds, as megatron splits the model: n_layers / pp blocks each;
    the first also holds the input embedding, the last the final norm and the output layer (with tied
    embeddings its own copy of the embedding, kept in sync by megatron)."""
    if pp <= 1:
        return [count_parameters(cfg)]
    per_layer, embed, head, norm = _parameter_parts(cfg)
    blocks = cfg.n_layers // pp * per_layer
    tied_copy = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    return [blocks + embed, *[blocks] * (pp - 2), blocks + head + tied_copy + norm]


def _parameter_parts(cfg: Any) -> tuple[int, int, int, int]:
    """(one block, the input embedding, the output layer beyond a tied embedding, the final norm)."""
    d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    head_dim = d // cfg.n_heads
    kv_dim = (cfg.n_kv_heads or cfg.n_heads) * head_dim
    norm = 2 * d if cfg.norm == "layernorm" else d
    attn = 2 * d * d + 2 * d * kv_dim + ((2 * d + 2 * kv_dim) if cfg.attn_bias else 0)
    if cfg.mlp == "swiglu":
        mlp = 3 * d * f + ((2 * f + d) if cfg.mlp_bias else 0)
    else:
        mlp = 2 * d * f + ((f + d) if cfg.mlp_bias else 0)
    per_layer = attn + mlp + (norm if cfg.parallel_block else 2 * norm)
    embed = v * d
    head = (0 if cfg.tie_embeddings else v * d) + (v if cfg.lm_head_bias else 0)
    return per_layer, embed, head, norm


def training_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6N for the weights plus 12*L*D*S for attention (PaLM's count).

    N is every parameter, an untied input embedding included, as the MFU of `../shared/BENCHMARKS.md`
    defines it and as Chinchilla counts the embedding (a one-hot matmul); the kernels do a lookup, so for
    an untied model the executed FLOPs are 6*vocab*d_model per token fewer (1.8% for AMBER 7B, ~36% for
    the CPU-sized tiny models) — the same for every run of a model, so comparisons within a size hold."""
    return 6.0 * count_parameters(cfg) + 12.0 * cfg.n_layers * cfg.d_model * seq_len

