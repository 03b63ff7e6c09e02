"""Tracking callbacks: MLflow metrics, DVC versioning of shards and checkpoints, lineage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

if TYPE_CHECKING:
    from open360.train.callbacks import Callback


def build_callbacks(cfg: DictConfig, workspace: Path, is_main: bool) -> list[Callback]:
    """The tracking callbacks a run asks for (MLflow logger, DVC versioner); [] off rank 0 or when off.

    When both are on, each DVC-versioned checkpoint's record (path, DVC md5, git revision, pushed) is
    also attached to the MLflow run, so the metrics at step S link to the checkpoint of step S.
    """
    tracking = cfg.tracking
    if not is_main or not (tracking.mlflow or tracking.dvc):
        return []
    callbacks: list[Callback] = []
    logger = None
    if tracking.mlflow:
        from open360.tracking.mlflow_logger import MlflowLogger

        logger = MlflowLogger(
            tracking_uri=str(tracking.mlflow_uri),
            experiment=str(tracking.experiment),
            run_name=str(cfg.run_name),
            workspace=Path(workspace),
            buffer_steps=int(tracking.metric_buffer_steps),
            system_metrics=bool(tracking.system_metrics),
        )
        logger.record_local_checkpoints = not tracking.dvc
    if tracking.dvc:
        from open360.tracking.dvc_callback import DvcVersioner

        versioner = DvcVersioner(Path(workspace), remote=tracking.dvc_remote, push=bool(tracking.dvc_push))
        if logger is not None:
            versioner.listeners.append(logger.record_checkpoint)
        # First: its on_run_end drains the pending pushes, whose records still go to the open MLflow run.
        callbacks.append(versioner)
    if logger is not None:
        callbacks.append(logger)
    return callbacks


def version_shards(shard_dir: Path, workspace: Path, cfg: Any) -> None:
    """Add a built shard folder to `shards.dvc` (granular) and push it; no-op when tracking.dvc is off."""
    if not cfg.tracking.dvc:
        return
    from open360.tracking.dvc_versioning import version_shards as _version_shards

    _version_shards(shard_dir, workspace, cfg)


def pull_shards(shard_dir: Path, workspace: Path, cfg: Any) -> bool:
    """Fetch a shard folder that the workspace's `shards.dvc` records but this machine lacks (a fresh clone
    of a published workspace), so that a run reads the published shards instead of rebuilding them. When
    the pull fails, say so and return False: the build that follows writes the same shards from the same
    inputs (a checkpoint's recorded manifest hash tells, and a resume checks it)."""
    if not cfg.tracking.dvc:
        return False
    import sys

    from open360.tracking.dvc_versioning import VersioningError, pull_recorded

    try:
        pulled = pull_recorded(shard_dir, workspace, cfg.tracking.dvc_remote)
    except VersioningError as err:
        print(f"open360.tracking: could not pull {shard_dir} ({err}); building it from the recipe instead",
              file=sys.stderr)
        return False
    if pulled:
        print(f"open360.tracking: pulled the versioned shards {shard_dir} through DVC", file=sys.stderr)
    return pulled


def pull_checkpoint(workspace: Path, run: str, step: int | str) -> Path:
    """Fetch one checkpoint of `run` through DVC (step number, "latest" or "~N" nearest) and return its path."""
    from open360.tracking.checkpoints import pull_checkpoints

    (path,) = pull_checkpoints(Path(workspace), run, str(step))
    return path
