"""Checkpoint format, atomic save/load, and cadence policies."""

from open360.checkpoint.cadence import CadencePolicy
from open360.checkpoint.io import (
    CheckpointContents,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model_from_checkpoint,
    load_model_weights,
    read_lineage,
    save_checkpoint,
    save_model_weights,
    verify_checkpoint,
)

__all__ = [
    "CadencePolicy",
    "CheckpointContents",
    "CheckpointError",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_from_checkpoint",
    "load_model_weights",
    "read_lineage",
    "save_checkpoint",
    "save_model_weights",
    "verify_checkpoint",
]
