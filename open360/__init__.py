"""open360: fully open, reproducible LLM pretraining releases (data, code, checkpoints, metrics, analysis)."""

__version__ = "0.1.0"
