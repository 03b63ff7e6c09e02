"""Decoder model zoo (Amber/LLaMA, CrystalCoder with muP, phi-1.5), FLOP counts and HF interop."""

from open360.models.decoder import (
    Decoder,
    KVCache,
    as_model_config,
    build_model,
    inference_config,
    model_with_weights,
)
from open360.models.flops import count_parameters, training_flops_per_token

__all__ = ["Decoder", "KVCache", "as_model_config", "build_model", "count_parameters", "inference_config",
           "model_with_weights", "training_flops_per_token"]
