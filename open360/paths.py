"""Where the repository's own folders are, and how relative paths in configs are resolved."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
RECIPES_DIR = REPO_ROOT / "data_recipes"


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_name(run: str) -> str:
    """`run` when it is one plain folder name (it names checkpoints/<run> and recovery/<run>), else ValueError:
    `../x` would write outside the workspace, '' into checkpoints/ itself, and an absolute path would make
    the published and recovery folders one, where pruning recovery checkpoints deletes published ones."""
    if not RUN_NAME.fullmatch(str(run)):
        raise ValueError(
            f"run_name={run!r}: expected one folder name of letters, digits, '.', '_' or '-' (it names "
            "checkpoints/<run_name> and recovery/<run_name> inside the workspace; set workspace=<dir> to "
            "write elsewhere)"
        )
    return str(run)


def resolve_repo_path(path: str | Path) -> Path:
    """Resolve a path from a config: absolute as is, else relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def resolve_workspace_path(workspace: str | Path, path: str | Path) -> Path:
    """Resolve a path inside the run's workspace (shards/, checkpoints/, mlflow.db)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(workspace).expanduser().resolve() / p


def temp_sibling(path: Path, prefix: str = ".tmp") -> Path:
    """A temporary name next to `path` that no other process writes, also on a filesystem that several
    hosts or PID namespaces (containers, SLURM jobs) share: host, pid and a random part."""
    import os
    import secrets
    import socket

    return path.with_name(f"{prefix}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
