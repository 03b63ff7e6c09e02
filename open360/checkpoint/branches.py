"""Branches of a run: resuming an earlier step moves the later checkpoints aside, journaled so that an
interrupted move is finished by whoever next looks at the run (a resume, `ckpt list`, `ckpt pull`)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from open360.checkpoint.io import fsync_dir, list_checkpoints
from open360.paths import replaced_atomically

PENDING_GLOB = ".branch-pending-*.json"


def branch_folder(step: int, published_dir: Path, recovery_dir: Path) -> str:
    """Where a branch from `step` puts the checkpoints it replaces: `superseded/<this>/` (timestamped), a folder
    no earlier branch used: a second branch from the same step within the same second gets a `-<n>` suffix, else
    its moves would meet the first one's step_N folders there and fail at every later start."""
    stamp = f"from_step_{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    folder, n = stamp, 1
    while (Path(recovery_dir) / PENDING_GLOB.replace("*", folder)).exists() or any(
        (Path(parent) / "superseded" / folder).exists() for parent in (published_dir, recovery_dir)
    ):
        n += 1
        folder = f"{stamp}-{n}"
    return folder


def supersede_later_checkpoints(step: int, published_dir: Path, recovery_dir: Path, folder: str) -> dict[int, Path]:
    """Move this run's checkpoints after `step` (published and recovery) into `superseded/<folder>/` beside
    them: resuming from an earlier step starts a new branch, and those belong to the one it replaces. Kept,
    not deleted; out of the way of `resume=auto` and of recovery pruning, which both go by step number.
    Idempotent (what is already moved stays). Returns {step: new path} of what this call moved."""
    moved: dict[int, Path] = {}
    for parent in (published_dir, recovery_dir):
        later = [(s, path) for s, path in list_checkpoints(parent) if s > step]
        if not later:
            continue
        target = Path(parent) / "superseded" / folder
        target.mkdir(parents=True, exist_ok=True)
        for s, path in later:
            try:
                moved[s] = Path(path).rename(target / Path(path).name)
            except FileNotFoundError:  # moved meanwhile by another process finishing the same branch
                continue
        for folder_moved in (target, Path(parent)):  # the moves are on disk before the journal entry goes
            fsync_dir(folder_moved)
    return moved


def write_pending_branch(recovery_dir: Path, step: int, folder: str) -> Path:
    """Journal a branch before anything moves (in the recovery folder, which DVC does not track)."""
    recovery_dir = Path(recovery_dir)
    recovery_dir.mkdir(parents=True, exist_ok=True)
    marker = recovery_dir / PENDING_GLOB.replace("*", folder)
    with replaced_atomically(marker) as tmp:  # on disk, whole, before anything moves: a power cut must not
        tmp.write_text(json.dumps({"from_step": int(step), "superseded": folder}))  # leave an empty entry
    fsync_dir(recovery_dir)
    return marker


def _journal_age(marker: Path) -> tuple[str, int, str]:
    """Sort key of a journal by when its branch began: the folder's UTC stamp, then its same-second suffix (a
    name sort would put from_step_10 before from_step_4 whatever their times)."""
    found = re.search(r"-(\d{8}T\d{6}Z)(?:-(\d+))?\.json$", marker.name)
    return (found.group(1), int(found.group(2) or 1), marker.name) if found else ("", 0, marker.name)


def pending_branches(recovery_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The journaled branches of a run not yet finished, oldest first: (marker, {from_step, superseded})."""
    out = []
    markers = Path(recovery_dir).glob(PENDING_GLOB) if Path(recovery_dir).is_dir() else []
    for marker in sorted(markers, key=_journal_age):
        try:
            out.append((marker, json.loads(marker.read_text())))
        except (OSError, ValueError):  # a marker cut by a crash before its rename cannot exist; skip junk
            continue
    return out
