"""Config schemas and their registration in Hydra's ConfigStore; `compose` for code and tests."""

from open360.config.schema import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    MupConfig,
    Open360Config,
    OptimConfig,
    ScheduleConfig,
    StageConfig,
    TrackingConfig,
    TrainerConfig,
)
from open360.config.store import compose, register_configs

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "ModelConfig",
    "MupConfig",
    "Open360Config",
    "OptimConfig",
    "ScheduleConfig",
    "StageConfig",
    "TrackingConfig",
    "TrainerConfig",
    "compose",
    "register_configs",
]
