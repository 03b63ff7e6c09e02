"""Registers the schemas in Hydra's ConfigStore so composition type-checks every key."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from open360.config import schema
from open360.paths import CONFIGS_DIR, check_run_name, resolve_workspace_path

GROUP_SCHEMAS = {
    "model": schema.ModelConfig,
    "data": schema.DataConfig,
    "optim": schema.OptimConfig,
    "schedule": schema.ScheduleConfig,
    "trainer": schema.TrainerConfig,
    "checkpoint": schema.CheckpointConfig,
    "tracking": schema.TrackingConfig,
}


def register_configs() -> None:
    """Store the top-level schema as `base_config` and each group's as `<group>/base_<group>`."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=schema.Open360Config)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=node)


class ConfigKeyError(ValueError):
    """A composed config holds a key the schema does not know (a misspelling added with `+`)."""


def check_schema(cfg: DictConfig) -> None:
    """Re-validate a composed config against the schema: Hydra lets `+group.key=value` append any key,
    so `+trainer.max_stepz=5` would otherwise be carried along unused while max_steps keeps its value."""
    container = OmegaConf.to_container(cfg, resolve=False)
    try:
        # The stages one by one first: an error inside a list element names its key from the element down.
        for i, stage in enumerate(container.get("stages") or []):
            try:
                OmegaConf.merge(OmegaConf.structured(schema.StageConfig), stage)
            except OmegaConfBaseException as err:
                err.full_key = f"stages.{i}.{getattr(err, 'full_key', '') or '?'}"
                raise
        OmegaConf.merge(OmegaConf.structured(schema.Open360Config), container)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigKeyError(
            f"config key '{key}': {str(err).splitlines()[0]} (a key added with '+' must still exist in the "
            "schema, open360/config/schema.py; check its spelling)"
        ) from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigKeyError(f"config keys {missing} have no value (???); set them, e.g. {missing[0]}=<value>")
    try:  # a new run's name follows the strict rule; an existing run named before it can still be resumed
        resuming = not schema.resume_is_off(OmegaConf.select(cfg, "trainer.resume", default="none"))
        existing = resuming and (resolve_workspace_path(cfg.workspace, "checkpoints") / str(cfg.run_name)).is_dir()
        check_run_name(cfg.run_name, new=not existing)
    except ValueError as err:
        raise ConfigKeyError(str(err)) from err


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the config tree outside of `@hydra.main` (tests, analysis jobs, notebooks)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    check_schema(cfg)
    return cfg
