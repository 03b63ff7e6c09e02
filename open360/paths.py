"""Where the repository's own folders are, and how relative paths in configs are resolved."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
RECIPES_DIR = REPO_ROOT / "data_recipes"


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_name(run: str, new: bool = True) -> str:
    """`run` when it can name checkpoints/<run> and recovery/<run>, else ValueError: `../x` would reach outside
    the workspace, '' would be checkpoints/ itself, and an absolute path would make the published and
    recovery folders one, where pruning recovery checkpoints deletes published ones. A new run (`new`, the
    training config) takes one plain folder name; reading an existing run takes any single folder name."""
    run = str(run)
    if new and not RUN_NAME.fullmatch(run):
        raise ValueError(
            f"run_name={run!r}: expected one folder name of letters, digits, '.', '_' or '-' (it names "
            "checkpoints/<run_name> and recovery/<run_name> inside the workspace)"
        )
    if run in ("", ".", "..") or "/" in run or "\\" in run or Path(run).is_absolute():
        raise ValueError(f"run {run!r}: expected the name of one folder under checkpoints/, not a path")
    return run


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
    import secrets
    import socket

    return path.with_name(f"{prefix}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


def temp_siblings_of(path: Path) -> list[Path]:
    """The files `temp_sibling(path)` names, made by any host or process (those of a killed writer too)."""
    import glob

    name = re.compile(rf"\.tmp-.+-\d+-[0-9a-f]{{8}}-{re.escape(path.name)}")
    return sorted(p for p in path.parent.glob(f".tmp-*-{glob.escape(path.name)}") if name.fullmatch(p.name))


def replace_together(writers: dict[Path, Callable[[Path], object]]) -> None:
    """Write each file by its writer to a temporary sibling, then rename them all into place
    (`replaced_atomically`): a failure or Ctrl-C while they are written leaves the previous files as they
    were, none truncated or half replaced (only the renames at the end, each atomic, are not one step)."""
    with contextlib.ExitStack() as stack:
        for path, write in writers.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(stack.enter_context(replaced_atomically(path)))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, held while the block runs."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def replaced_atomically(path: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (`tmp`, else `temp_sibling(path)`) to write; when the block ends,
    flush it to the disk and rename it over `path`. On a failure (a full disk, Ctrl-C) it is removed, so
    `path` keeps what it held and no partial copy holds the space; an OSError is raised naming `path` (a
    write's own error, pyarrow's too, names no file), once: one that names a file written inside the block
    (`replace_together`'s next one) goes on as it is."""
    tmp = temp_sibling(path) if tmp is None else tmp
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not hasattr(err, "unwritten"):
            message = f"{path}: could not be written ({err})"
            named = OSError(message) if err.errno is None else OSError(err.errno, message)
            named.unwritten = path
            raise named from err
        raise


def fsync_file(path: Path) -> None:
    """Flush a written file's bytes to the disk (before a rename or a mark makes it count as done)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames into it) to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
