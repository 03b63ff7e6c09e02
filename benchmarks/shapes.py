"""The model shapes and the GPU peak that the speed benchmarks share (shared/BENCHMARKS.md)."""

from __future__ import annotations

from open360.config.schema import ModelConfig
from open360.train.progress import PEAK_BF16_FLOPS

H100_BF16_PEAK = PEAK_BF16_FLOPS["H100"]  # dense bf16 FLOP/s, the MFU denominator of every benchmark
# The 1.4B Amber-shaped model of the issues' reference figures (configs/model/amber_1b4.yaml).
AMBER_1B4 = ModelConfig(
    name="amber_1b4", vocab_size=50304, n_layers=24, d_model=2048, n_heads=32, ffn_dim=5504, max_seq_len=2048,
    norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", tie_embeddings=False,
)
# amber_tiny (configs/model/amber_tiny.yaml): smoke runs of the same code paths.
AMBER_TINY = ModelConfig(
    name="amber_tiny", vocab_size=4096, n_layers=4, d_model=128, n_heads=4, ffn_dim=352, max_seq_len=128,
    norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", tie_embeddings=False,
)
