"""The run's checkpoints a memorization job scores: which steps, and a local copy of each (DVC pull)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from open360.analysis.memorization.job_config import (
    MemorizationJobConfig,
    MemorizationJobError,
    int_list,
    is_all,
    range_bounds,
)
from open360.paths import replaced_atomically


def run_checkpoint_dir(workspace: Path, run: str) -> Path:
    """`<workspace>/checkpoints/<run>`."""
    from open360.tracking.checkpoints import run_dirs

    return run_dirs(workspace, run)[0]


def resolve_steps(job: MemorizationJobConfig, workspace: Path, known: list[int]) -> list[int]:
    """Steps to analyse: all / latest / explicit list, of the run's `known` steps (local checkpoints plus
    DVC-recorded ones, pulled later)."""
    value = job.checkpoints
    if isinstance(value, str) and value.strip().lower() == "latest":
        if not known:
            raise MemorizationJobError(
                f"checkpoints=latest: run {job.run!r} has no checkpoints in {workspace}"
            )
        return [known[-1]]
    if is_all(value):
        if not known:
            raise MemorizationJobError(
                f"run {job.run!r}: no checkpoints under {run_checkpoint_dir(workspace, job.run)} and none "
                "tracked by DVC; check run= and workspace="
            )
        return known
    return _select_steps(value, known, job.run)


def _select_steps(value: Any, known: list[int], run: str) -> list[int]:
    """Steps named one by one must exist; a range a-b selects the existing steps inside it."""
    items = list(value) if isinstance(value, list | tuple) else str(value).split(",")
    chosen: set[int] = set()
    for item in items:
        text = str(item).strip()
        if "-" in text.lstrip("-"):  # the run's steps inside it (not every integer: 100000-999999999 is fine)
            lo, hi = range_bounds(text, "checkpoints", value)
            inside = {s for s in known if lo <= s <= hi}
            if not inside:
                raise MemorizationJobError(f"checkpoints={value!r}: run {run!r} has no checkpoint in {text}; "
                                           f"its steps: {known}")
            chosen.update(inside)
        else:
            chosen.update(int_list(text, "checkpoints") or [])
    if not chosen:
        raise MemorizationJobError(f"checkpoints={value!r} selects nothing; use all, latest, 3, 0-7 or 1,5,9")
    missing = sorted(chosen - set(known))
    if missing:
        raise MemorizationJobError(
            f"checkpoints={value!r}: run {run!r} has no checkpoint at steps {missing} (on disk or tracked by "
            f"DVC); its steps: {known}"
        )
    return sorted(chosen)


@contextlib.contextmanager
def pull_lock(workspace: Path) -> Iterator[None]:
    """Serialize DVC pulls of several ranks/jobs on one workspace (DVC holds a repository lock)."""
    import fcntl

    lock_dir = workspace / ".dvc" / "tmp" if (workspace / ".dvc").is_dir() else workspace
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "open360-memorization-pull.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_checkpoint(
    job: MemorizationJobConfig, workspace: Path, step: int, weights: bool = True
) -> tuple[Path, list[Path] | None]:
    """A folder holding what scoring checkpoint `step` reads (its weights, config, lineage and trainer state;
    without `weights` all but the weights: its metadata), fetching them through DVC when the checkpoint is not
    local: (folder, None) when nothing was fetched, else (folder, the DVC cache files this call added:
    `release_checkpoint` deletes them with the folder).

    A local checkpoint is its own folder. A fetched one is a scoring copy, `<workspace>/analysis/<run>/
    memorization/.pulled/step_N-<its DVC md5>/`, of links to the cache files: the optimizer state (two thirds of a
    checkpoint) is never transferred, and the run's checkpoints/ holds no partial folder that a resume or a
    listing would take for a checkpoint. Named by the record's md5, a copy of a step a branch since replaced
    is not taken for the new one."""
    from open360.checkpoint.io import CONFIG_FILE, LINEAGE_FILE, MODEL_FILE, TRAINER_STATE_FILE, step_dir_name

    path = run_checkpoint_dir(workspace, job.run) / step_dir_name(step)
    if (path / MODEL_FILE).is_file():
        return path, None
    if not job.pull:
        raise MemorizationJobError(
            f"{path}: checkpoint not present locally and pull=false; pull it or set pull=true"
        )
    from open360.tracking.checkpoints import recorded_checkpoint

    names = [CONFIG_FILE, LINEAGE_FILE, TRAINER_STATE_FILE, *([MODEL_FILE] if weights else [])]
    with pull_lock(workspace):
        if (path / MODEL_FILE).is_file():
            return path, None
        store, entry = recorded_checkpoint(workspace, job.run, step)
        assert entry.tracked is not None
        view = pulled_root(workspace, job.run) / f"{step_dir_name(step)}-{entry.tracked.md5[:12]}"
        if all((view / name).is_file() for name in names):  # made by another rank or an earlier job
            return view, None
        cached, fetched = store.fetch(path, names)
        try:
            view.mkdir(parents=True, exist_ok=True)
            _ignored_by_git(view.parent)
            for name, source in cached.items():
                _link(source, view / name)
        except BaseException:  # a full disk, Ctrl-C during a copy: the caller never learns of `fetched` to free it
            shutil.rmtree(view, ignore_errors=True)
            for file in fetched:
                file.unlink(missing_ok=True)
            raise
    return view, fetched


def pulled_root(workspace: Path, run: str) -> Path:
    """Where a job keeps the scoring copies of the checkpoints it fetched through DVC."""
    return Path(workspace) / "analysis" / run / "memorization" / ".pulled"


def _ignored_by_git(folder: Path) -> None:
    """`folder` and all it holds are ignored by git: the scoring copies (weights) sit under analysis/<run>/,
    beside the reports that are committed, and `git add analysis` must not take them."""
    ignore = folder / ".gitignore"
    if not ignore.is_file():
        ignore.write_text("*\n")


def _link(source: Path, target: Path) -> None:
    """`target` holds the cache file `source`: a hard link, a copy where the cache is on another filesystem
    (not a symbolic link: a release of another step that fetched the same file, a config.yaml, deletes it)."""
    if target.is_file():
        return
    try:
        os.link(source, target)
    except OSError:
        with replaced_atomically(target) as tmp:  # never a partial copy that a later job takes for whole
            shutil.copyfile(source, tmp)


def release_checkpoint(workspace: Path, path: Path, fetched: list[Path]) -> None:
    """Delete a checkpoint the job pulled: its folder and the cache files its pull added (DVC links or copies
    every pulled file into its cache, so the folder alone frees nothing; the remote still holds them).
    Under `pull_lock`: a pull beside it (another rank or job) that found one of these files in the cache
    (a config.yaml equal to this step's) checks it out only after transferring the rest."""
    with pull_lock(workspace):
        shutil.rmtree(path, ignore_errors=True)
        for file in fetched:
            file.unlink(missing_ok=True)
