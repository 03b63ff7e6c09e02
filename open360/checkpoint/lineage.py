"""Provenance recorded in every checkpoint's lineage.json: code revision, config and data hashes."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from open360.paths import REPO_ROOT

# Keys that may differ between an original run and its resumption without changing what is trained.
_CONFIG_HASH_EXCLUDED = (("trainer", "resume"), ("trainer", "progress_bar"))


def git_revision(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """`{"revision": sha or None, "dirty": bool or None}` of the code that runs (dirty: a tracked file
    other than DVC's `*.dvc` and `.gitignore` files differs from the commit)."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        status = subprocess.run(  # DVC's own files (*.dvc, the .gitignores it writes) are data, not code
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude,glob)**/*.dvc", ":(exclude,glob)**/.gitignore"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    return {"revision": rev, "dirty": bool(status.strip())}


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the resolved config as canonical JSON, ignoring keys that only steer resumption."""
    cfg = json.loads(json.dumps(config, sort_keys=True, default=str))
    for group, key in _CONFIG_HASH_EXCLUDED:
        if isinstance(cfg.get(group), dict):
            cfg[group].pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def data_history(lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """A checkpoint lineage's data entries, one per stage it trained (older lineages hold one `data`)."""
    return lineage.get("data_history") or ([lineage["data"]] if lineage.get("data") else [])
