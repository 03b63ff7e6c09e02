"""Execution backends: native PyTorch (single process, DDP/FSDP) and megatron-core."""
