"""Git revision of a directory's repository (with a -dirty suffix), for checkpoint records and lineage."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_revision(path: Path) -> str | None:
    """`<sha>` or `<sha>-dirty` (tracked files modified) of the repository holding `path`; None if none."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
