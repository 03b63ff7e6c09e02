"""megatron-core GPTModel from an open360 model config: a layer spec with SDPA (flash) core attention,
phi's parallel attention+MLP block, the output-layer bias and muP multipliers, all through megatron-core's
spec system and module hooks (no fork)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from open360.backends.megatron.layout import check_expressible
from open360.config.schema import ModelConfig
from open360.models.decoder import width_mult


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """phi's "gelu_new": the tanh approximation of GELU."""
    return F.gelu(x, approximate="tanh")


class SDPAttention(MegatronModule):
    """Core attention through `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
    kernels) in place of megatron-core's unfused local DotProductAttention; causal, GQA-aware."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        **_: Any,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism (context_parallel_size=1)")
        tp = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // tp
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """[s, b, heads, d] query, [s, b, groups, d] key/value -> [s, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention bias are not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        mask = None if attention_mask is None else ~attention_mask  # megatron: True = masked out
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=self.groups != self.heads,
        )
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


_ATTENTION_KWARGS = (
    "rotary_pos_cos",
    "rotary_pos_sin",
    "attention_bias",
    "inference_context",
    "packed_seq_params",
    "sequence_len_offset",
)


class ParallelBlockLayer(TransformerLayer):
    """phi / GPT-J block: x + attn(ln(x)) + mlp(ln(x)) from one input norm (no pre-MLP norm)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        normed = self.input_layernorm(hidden_states)
        attn_kwargs = {k: kwargs[k] for k in _ATTENTION_KWARGS if k in kwargs}
        attn_out, attn_bias = self.self_attention(
            normed, attention_mask=attention_mask, rotary_pos_emb=kwargs.get("rotary_pos_emb"), **attn_kwargs
        )
        mlp_out, mlp_bias = self.mlp(normed)
        out = hidden_states + attn_out + mlp_out
        for bias in (attn_bias, mlp_bias):
            if bias is not None:
                out = out + bias
        out = make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)
        return out, kwargs.get("context")


ATTENTIONS = ("sdpa", "local")


def layer_spec(cfg: ModelConfig, attention: str = "sdpa") -> ModuleSpec:
    """megatron-core's local GPT layer spec with SDPA core attention (`attention="local"` keeps the stock
    unfused DotProductAttention, for comparison) and phi's parallel block."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTIONS}")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm")
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if cfg.parallel_block:
        spec.module = ParallelBlockLayer
        spec.submodules.pre_mlp_layernorm = IdentityOp
    return spec


def transformer_config(cfg: ModelConfig, tp: int, pp: int, bf16: bool) -> TransformerConfig:
    """The TransformerConfig of an open360 model config; raises ValueError for what megatron cannot express."""
    check_expressible(cfg)
    mup_by_d = cfg.mup.enabled and cfg.mup.attn_scale_by_d
    head_dim = cfg.d_model // cfg.n_heads
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=cfg.n_layers,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_heads,
        num_query_groups=cfg.n_kv_heads or cfg.n_heads,
        ffn_hidden_size=cfg.ffn_dim,
        kv_channels=head_dim,
        normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=cfg.mlp == "swiglu",
        activation_func=F.silu if cfg.mlp == "swiglu" else gelu_tanh,
        add_bias_linear=cfg.mlp_bias,
        add_qkv_bias=cfg.attn_bias,
        softmax_scale=1.0 / head_dim if mup_by_d else None,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        perform_initialization=False,  # weights come from the native initializer (same seed, same weights)
        use_cpu_initialization=not torch.cuda.is_available(),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=bf16,
        # megatron-core's own jit-fused kernels that need neither Transformer Engine nor apex (CUDA only)
        bias_activation_fusion=torch.cuda.is_available() and cfg.mlp == "swiglu",
        cross_entropy_loss_fusion=torch.cuda.is_available(),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity="full" if cfg.activation_checkpointing else None,
        recompute_method="uniform" if cfg.activation_checkpointing else None,
        recompute_num_layers=1 if cfg.activation_checkpointing else None,
    )


def _scale_output(multiplier: float):
    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] * multiplier, *output[1:])
        return output * multiplier

    return hook


def mark_tensor_parallel_weights(model: torch.nn.Module, config: TransformerConfig) -> None:
    """Mark each tensor-parallel weight as megatron-core's initializer does (`tensor_model_parallel`, its
    partition dim and stride): with perform_initialization=False megatron skips that initializer and the mark
    with it, and its optimizer then counts every such shard as a copy of TP rank 0's, so the global gradient
    norm (and the clipping that uses it) leaves out the other TP ranks' shards."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        if isinstance(module, ColumnParallelLinear | VocabParallelEmbedding):
            stride = 2 if config.gated_linear_unit and name.endswith("mlp.linear_fc1") else 1  # as megatron's MLP
            weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, 0, stride
        elif isinstance(module, RowParallelLinear):
            weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, 1, 1


def build_gpt_model(
    cfg: ModelConfig, config: TransformerConfig, pre_process: bool, post_process: bool, attention: str = "sdpa"
) -> GPTModel:
    """GPTModel of `cfg` for this pipeline stage, with phi's output bias and muP's multipliers."""
    check_expressible(cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg, attention),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=cfg.rotary_fraction,
        rotary_base=cfg.rotary_base,  # a float: int() would truncate a fractional base
        seq_len_interpolation_factor=cfg.rope_interpolation_factor if cfg.rope_interpolation_factor != 1.0 else None,
    )
    if post_process and cfg.lm_head_bias:
        model.output_layer = ColumnParallelLinear(
            cfg.d_model,
            cfg.vocab_size,
            config=config,
            init_method=config.init_method,
            bias=True,
            skip_bias_add=False,
            gather_output=False,
        )
    if cfg.mup.enabled:
        if pre_process:
            model.embedding.register_forward_hook(_scale_output(cfg.mup.embedding_multiplier))
        if post_process:
            model.output_layer.register_forward_hook(_scale_output(cfg.mup.output_multiplier / width_mult(cfg)))
    mark_tensor_parallel_weights(model, config)
    return model
