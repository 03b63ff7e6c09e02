"""A run's checkpoints as the workspace knows them (on disk and/or in checkpoints.dvc); step selection; pull."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from open360.paths import check_run_name
from open360.tracking.dvc_versioning import DvcWorkspace, TrackedDir, VersioningError, local_steps, step_of

CHECKPOINTS_DIR = "checkpoints"
RECOVERY_DIR = "recovery"


@dataclass
class CheckpointEntry:
    """One published checkpoint of a run."""

    step: int
    path: Path
    local: bool  # complete folder on disk (lineage.json present)
    tracked: TrackedDir | None  # its record in checkpoints.dvc, None when not versioned


def find_workspace(path: Path) -> Path:
    """The workspace holding `path`: the nearest parent with a `.dvc/` (else with `checkpoints/`)."""
    path = Path(path).expanduser().resolve()
    for parent in (path, *path.parents):
        if (parent / ".dvc").is_dir():
            return parent
    for parent in (path, *path.parents):
        if (parent / CHECKPOINTS_DIR).is_dir():
            return parent
    raise FileNotFoundError(f"{path}: no open360 workspace (a folder with .dvc/ or checkpoints/) above it")


def is_dvc_workspace(workspace: Path) -> bool:
    """True when the workspace is a DVC repository whose checkpoints/ is tracked."""
    return (workspace / ".dvc").is_dir() and (workspace / f"{CHECKPOINTS_DIR}.dvc").is_file()


def run_dirs(workspace: Path, run: str) -> tuple[Path, Path]:
    """(published, recovery) folders of a run: checkpoints/<run>, recovery/<run>."""
    run = check_run_name(run, new=False)  # training checked the stricter rule on its config
    return Path(workspace) / CHECKPOINTS_DIR / run, Path(workspace) / RECOVERY_DIR / run


def finish_pending_branches(workspace: Path, run: str, keep_journal: bool = False) -> dict[int, Path]:
    """Finish the branches of `run` that a crash interrupted (journaled by `write_pending_branch`): the
    checkpoints after the branch step, their folders and their checkpoints.dvc records, move to
    `superseded/<folder>/`, then the journal entry goes (`keep_journal`: the run making the branch removes
    it itself, once its tracking knows of the branch). Returns {step: new path} of the folders moved."""
    from open360.checkpoint.branches import pending_branches, supersede_later_checkpoints

    workspace = Path(workspace).expanduser().resolve()
    run_dir, recovery_dir = run_dirs(workspace, run)
    moved: dict[int, Path] = {}
    for marker, entry in pending_branches(recovery_dir):
        step, folder = int(entry["from_step"]), str(entry["superseded"])
        if not marker.exists():  # finished meanwhile by another process (the run itself); the run goes on
            continue
        moved |= supersede_later_checkpoints(step, run_dir, recovery_dir, folder)
        if is_dvc_workspace(workspace):  # only a tree rewrite: nothing is hashed or pushed
            DvcWorkspace(workspace).supersede(run_dir, step, run_dir / "superseded" / folder, pending=marker)
        if not keep_journal:
            marker.unlink(missing_ok=True)
    return moved


def run_checkpoints(workspace: Path, run: str, store: DvcWorkspace | None = None) -> list[CheckpointEntry]:
    """Every checkpoint of `run`, on disk or recorded in checkpoints.dvc, sorted by step (a branch that a
    crash interrupted is finished first, so that the replaced checkpoints are not listed as the run's)."""
    workspace = Path(workspace).expanduser().resolve()
    finish_pending_branches(workspace, run)
    run_dir = run_dirs(workspace, run)[0]
    local = {s: p for s, p in local_steps(run_dir).items() if (p / "lineage.json").is_file()}
    tracked: dict[int, TrackedDir] = {}
    if is_dvc_workspace(workspace):
        store = store or DvcWorkspace(workspace)
        try:
            children = store.tracked_children(run_dir)
        except VersioningError as err:
            if "not recorded" not in str(err):
                raise
            children = {}
        tracked = {step: d for name, d in children.items() if (step := step_of(name)) is not None}
    steps = sorted(set(local) | set(tracked))
    return [CheckpointEntry(s, run_dir / f"step_{s}", s in local, tracked.get(s)) for s in steps]


def superseded_steps(workspace: Path, run: str) -> set[int]:
    """Steps of `run` that a resume branch moved aside: `superseded/<branch>/step_N`, on disk or recorded in
    checkpoints.dvc (a clone has the record, not the folders)."""
    workspace = Path(workspace).expanduser().resolve()
    root = run_dirs(workspace, run)[0] / "superseded"
    names = [p.name for p in root.glob("*/step_*")]
    if is_dvc_workspace(workspace):
        store = DvcWorkspace(workspace)
        try:
            for branch in store.tracked_children(root):
                names += list(store.tracked_children(root / branch))
        except VersioningError as err:
            if "not recorded" not in str(err):
                raise
    return {step for name in names if (step := step_of(name)) is not None}


def known_checkpoints(workspace: Path, run: str, who: str = "open360") -> list[tuple[int, Path]]:
    """`(step, folder)` of every checkpoint of `run`: complete on disk, or recorded in checkpoints.dvc (to be
    pulled). A DVC setup that cannot be read must not hide the ones on disk: `who` warns, and they remain."""
    from open360.checkpoint.io import list_checkpoints

    workspace = Path(workspace).expanduser().resolve()
    try:  # first: it finishes a branch a crash interrupted, which moves later checkpoints aside
        tracked = [(e.step, e.path) for e in run_checkpoints(workspace, run) if e.tracked is not None]
    except Exception as err:  # noqa: BLE001 - DVC raises more than VersioningError on a broken setup
        print(f"{who}: could not list the DVC-recorded checkpoints of {run} ({err}); using those on disk",
              file=sys.stderr)
        tracked = []
    local = list_checkpoints(run_dirs(workspace, run)[0])
    return sorted((dict(tracked) | dict(local)).items())


def select_steps(entries: list[CheckpointEntry], which: str, run: str = "") -> list[CheckpointEntry]:
    """`all`, `latest`, an exact step `N`, or `~N` (the step nearest to N; ties go to the earlier one)."""
    if not entries:
        raise ValueError(f"run {run!r} has no checkpoints (neither on disk nor in checkpoints.dvc)")
    steps = [e.step for e in entries]
    which = which.strip()
    if which == "all":
        return list(entries)
    if which == "latest":
        return [entries[-1]]
    nearest = which.startswith("~")
    try:
        target = int(which[1:] if nearest else which)
    except ValueError as err:
        raise ValueError(f"step {which!r}: expected N, ~N, latest or all") from err
    if nearest:
        return [min(entries, key=lambda e: (abs(e.step - target), e.step))]
    for e in entries:
        if e.step == target:
            return [e]
    close = sorted(steps, key=lambda s: abs(s - target))[:3]
    raise ValueError(
        f"run {run!r} has no checkpoint at step {target}; nearest: {sorted(close)} (use ~{target} for the nearest)"
    )


def pull_checkpoints(
    workspace: Path, run: str, which: str, remote: str | None = None, force: bool = False
) -> list[Path]:
    """Fetch the selected checkpoints through DVC (granular: only those folders) and return their paths;
    `force` replaces local files that differ from the record."""
    store, chosen = _tracked_selection(workspace, run, which, remote)
    store.pull([e.path for e in chosen], force=force)
    return [e.path for e in chosen]


def recorded_checkpoint(workspace: Path, run: str, step: int) -> tuple[DvcWorkspace, CheckpointEntry]:
    """The DVC store of the workspace and checkpoint `step` of `run` as checkpoints.dvc records it (the store's
    `fetch` brings some of its files into the cache: a reader of the weights alone does not transfer the
    optimizer state, two thirds of a checkpoint)."""
    store, (entry,) = _tracked_selection(workspace, run, str(step))
    return store, entry


def _tracked_selection(
    workspace: Path, run: str, which: str, remote: str | None = None
) -> tuple[DvcWorkspace, list[CheckpointEntry]]:
    """The DVC store of the workspace and the checkpoints `which` selects, every one recorded in checkpoints.dvc."""
    workspace = Path(workspace).expanduser().resolve()
    if not is_dvc_workspace(workspace):
        raise VersioningError(f"{workspace}: not a DVC workspace with checkpoints.dvc; nothing to pull from")
    store = DvcWorkspace(workspace, remote=remote)
    chosen = select_steps(run_checkpoints(workspace, run, store), which, run)
    untracked = [e.step for e in chosen if e.tracked is None]
    if untracked:
        raise VersioningError(
            f"run {run!r}: steps {untracked} exist on disk but are not in checkpoints.dvc; "
            f"version them first (python -m open360.tracking.cli push {run})"
        )
    return store, chosen


def trainer_state(path: Path) -> dict:
    """The checkpoint's trainer_state.json, {} when the folder is not on disk, {"unreadable": reason} when
    the file is damaged (a listing shows the step as such instead of stopping)."""
    file = Path(path) / "trainer_state.json"
    if not file.is_file():
        return {}
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {"unreadable": f"{file}: {err}"}
    return state if isinstance(state, dict) else {"unreadable": f"{file}: not a JSON object"}


def folder_size(path: Path) -> int:
    """Bytes of the files of a folder (0 when absent)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0
