"""Create a git + DVC training workspace laid out like the repository root (checkpoints.dvc, a remote)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from open360.tracking.dvc_versioning import DvcWorkspace

GITIGNORE = (
    "/checkpoints\n/shards/\n/recovery/\n/mlflow.db\n/mlruns/\n/mlartifacts/\n/outputs/\n/.dvc-storage/\n"
)


def _git(ws: Path, *args: str) -> None:
    done = subprocess.run(["git", "-C", str(ws), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {ws} failed: {done.stderr.strip()}")


def init_workspace(path: Path, remote_url: str | None = None, remote_name: str = "local") -> Path:
    """`git init` + `dvc init` at `path`, a default remote, checkpoints.dvc tracking an empty checkpoints/.

    `remote_url` defaults to `<path>/.dvc-storage` (the repository's own convention). Returns the path.
    """
    from dvc.repo import Repo

    ws = Path(path).expanduser().resolve()
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / ".git").exists():
        _git(ws, "init", "-q")
        _git(ws, "config", "user.email", "open360@localhost")
        _git(ws, "config", "user.name", "open360")
    if not (ws / ".dvc").exists():
        Repo.init(str(ws)).close()
    with Repo(str(ws)) as repo, repo.config.edit() as conf:
        conf["core"]["autostage"] = True
        conf["core"]["remote"] = remote_name
        conf["cache"]["type"] = "reflink,hardlink,copy"
        conf["remote"][remote_name] = {"url": remote_url or str(ws / ".dvc-storage")}
    gitignore = ws / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(GITIGNORE)
    DvcWorkspace(ws).ensure_tracked_root(ws / "checkpoints")
    _git(ws, "add", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore", "checkpoints.dvc")
    _git(ws, "commit", "-q", "-m", "open360 workspace")
    return ws
