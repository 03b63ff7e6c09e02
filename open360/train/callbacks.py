"""The trainer's callback protocol: side concerns (tracking, versioning) hook in here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunInfo:
    """What a callback learns when a run starts (or resumes)."""

    run_name: str
    workspace: Path
    checkpoint_dir: Path  # checkpoints/<run>
    config: dict[str, Any]  # resolved config as plain containers
    config_yaml: str
    start_step: int
    is_main_process: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. shard paths, manifest hash


class Callback:
    """Base class: every hook is a no-op; override what you need."""

    def preflight(self) -> None:
        """Called before any data or model work: check the services the callback needs (raise if down)."""

    def on_stage_open(self, stage: str, shard_dir: Path) -> None:
        """Called when a stage's shards open: the first (or resumed) stage before `on_run_start`, later
        stages mid-run as training reaches them."""

    def on_run_start(self, info: RunInfo) -> None:
        """Called once before the first step (after a resume has been applied)."""

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Called after every optimizer step; `step` counts completed steps (1-based)."""

    def on_checkpoint_start(self, step: int, published: bool) -> None:
        """Called before the checkpoint of `step` is written: persist here what a run resumed from it must
        find already persisted (it restarts after `step`), e.g. buffered metrics."""

    def on_checkpoint_saved(self, step: int, path: Path, published: bool) -> None:
        """Called after a checkpoint directory has been completed atomically."""

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """Called once at the end (also after a failure, with summary['status'] != 'finished')."""

    def run_metadata(self) -> dict[str, Any]:
        """Values this callback contributes to each checkpoint's lineage (e.g. MLflow run id)."""
        return {}
