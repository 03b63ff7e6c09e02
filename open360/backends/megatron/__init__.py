"""megatron-core backend: TP/PP/DP training of open360 model configs (layout, spec, engine, trainer)."""
