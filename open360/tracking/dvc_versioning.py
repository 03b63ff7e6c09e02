"""DVC versioning: granular add of each checkpoint/shard folder into its tracked parent, background push, pull."""

from __future__ import annotations

import errno
import hashlib
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from open360.credentials import mask_value

# md5 of the empty tree ("[]"): what a fresh `checkpoints.dvc` records before the first checkpoint.
EMPTY_TREE_MD5 = "d751713988987e9331980363e24189ce.dir"
STEP_DIR = re.compile(r"^step_(\d+)$")
_MD5 = re.compile(r"[0-9a-f]{32}")
_TREE_MD5 = re.compile(r"[0-9a-f]{32}\.dir")
RETRY_HINT = "retry with `python -m open360.tracking.cli push {run}` (or `dvc push {path}` in {ws})"


class VersioningError(RuntimeError):
    """A DVC operation failed; the message says where, why, and what to do. Local files are untouched."""


@dataclass(frozen=True)
class TrackedDir:
    """One folder inside a DVC-tracked directory, as recorded in its `.dvc` file."""

    path: str  # relative to the workspace, posix
    md5: str  # DVC md5 of the folder's own tree (`<hex>.dir`)
    nfiles: int
    file_md5: dict[str, str]  # relative file path → md5


def tree_md5(file_md5: dict[str, str]) -> str:
    """DVC's md5 of a folder (`<hex>.dir`) from its files' md5s (relative posix path -> md5)."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for name, md5 in file_md5.items():
        tree.add(tuple(name.split("/")), None, HashInfo("md5", md5))
    tree.digest()
    return tree.hash_info.value


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def folder_md5(folder: Path) -> str:
    """The DVC md5 a folder's files would get (what `dvc add` records), computed from the files on disk."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return tree_md5({p.relative_to(folder).as_posix(): file_md5(p) for p in files})


def dvc_mismatches(path: Path, recorded: dict[str, str]) -> list[str]:
    """Files of a checkpoint folder whose md5 differs from (or is missing against) its DVC record."""
    problems = []
    for name, md5 in sorted(recorded.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: recorded in checkpoints.dvc but missing")
        elif file_md5(file) != md5:
            problems.append(
                f"{file}: md5 differs from checkpoints.dvc ({md5}); the file is modified or truncated"
            )
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.relative_to(path).as_posix() not in recorded:
            problems.append(f"{file}: not in checkpoints.dvc (added after versioning)")
    return problems


def step_of(name: str) -> int | None:
    """`step_120` → 120; anything else → None."""
    match = STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def _link_types(configured: Sequence[str], probe_dir: Path) -> list[str]:
    """The configured cache link types, with reflink dropped where the filesystem cannot reflink.

    DVC hardlinks a new file into the cache (no copy) only when `hardlink` is the *first* type; with the
    repository's `reflink,hardlink,copy` on a filesystem without reflinks (ext4) it would copy instead.
    """
    types = [str(t) for t in configured]
    if not types or types[0] != "reflink" or "hardlink" not in types:
        return types
    from dvc_objects.fs.system import reflink

    probe_dir.mkdir(parents=True, exist_ok=True)
    src, dst = probe_dir / "open360-reflink-probe", probe_dir / "open360-reflink-probe.clone"
    try:
        src.write_bytes(b"probe")
        reflink(str(src), str(dst))
        return types
    except OSError:
        return [t for t in types if t != "reflink"]
    finally:
        for p in (src, dst):
            p.unlink(missing_ok=True)


def _check_tree(dvc_file: str, oid: str | None, tree: Any) -> None:
    """Refuse a tracked tree that could reach outside the workspace or the cache: it comes from whoever published
    the workspace, and its names are joined to the workspace, its md5s (and its own) to the cache and the
    remote, to read, write and delete there (`../` in either climbs out; DVC does not check)."""
    problems = [] if oid is None or _TREE_MD5.fullmatch(str(oid)) else [f"names tree {oid!r}, not <32 hex digits>.dir"]
    for key, _meta, hash_info in tree or []:
        if any(part in ("", ".", "..") for part in key):
            problems.append(f"records the entry {'/'.join(key)!r}, which leads outside its folder ('..', '.' or '')")
        elif hash_info is None or not _MD5.fullmatch(str(hash_info.value)):
            problems.append(f"records the entry {'/'.join(key)!r} with md5 {getattr(hash_info, 'value', None)!r}, "
                            "not 32 hex digits")
        if problems:
            break
    if problems:
        raise VersioningError(
            f"{dvc_file}: {problems[0]}; the .dvc file or its tree object {oid} is forged or corrupted, and nothing "
            "was read or written through it — restore it with `git checkout -- <file>.dvc` or ask its publisher"
        )


class _ErrorLog:
    """Collects the ERROR records DVC logs during a call (they hold the cause of a failed transfer)."""

    def __init__(self) -> None:
        import logging

        self.messages: list[str] = []
        outer = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                cause = f" ({record.exc_info[1]})" if record.exc_info and record.exc_info[1] else ""
                outer.messages.append(record.getMessage() + cause)

        self.handler = Handler(level=logging.ERROR)
        self.loggers = [logging.getLogger(name) for name in ("dvc", "dvc_data", "dvc_objects")]

    def __enter__(self) -> _ErrorLog:
        for logger in self.loggers:
            logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger in self.loggers:
            logger.removeHandler(self.handler)


def _remote_description(repo: Any, name: str | None) -> str:
    try:
        name = name or repo.config["core"].get("remote")
        url = repo.config["remote"][name]["url"]
    except (KeyError, TypeError):
        return f"remote {name!r}"
    return f"remote {name!r} ({mask_value(str(url))})"  # a URL may carry user:password@


def _explain(err: BaseException, action: str, path: Path, ws: Path, detail: str = "") -> VersioningError:
    """Turn a DVC/OS exception into a VersioningError that names the file, the cause and the fix."""
    from dvc.config import NoRemoteError, RemoteNotFoundError
    from dvc.dvcfile import FileIsGitIgnored
    from dvc.exceptions import DownloadError, NotDvcRepoError, UploadError
    from dvc.lock import LockError
    from dvc.utils.serialize import ParseError

    where = f"{action} '{path}' in DVC workspace {ws}"
    if isinstance(err, NotDvcRepoError):
        msg = f"{ws} is not a DVC repository: run `git init && dvc init` there, or set tracking.dvc=false"
    elif isinstance(err, NoRemoteError):
        msg = (
            f"{where}: no DVC remote is configured in {ws / '.dvc' / 'config'}; add one with "
            "`dvc remote add -d <name> <url>` (or set tracking.dvc_remote / tracking.dvc_push=false)"
        )
    elif isinstance(err, RemoteNotFoundError):
        msg = f"{where}: {err}; check tracking.dvc_remote against `dvc remote list` in {ws}"
    elif isinstance(err, (UploadError, DownloadError)):
        msg = f"{where}: {err}{detail or ' (remote unreachable, unwritable or full?)'}"
    elif isinstance(err, LockError):
        msg = f"{where}: the DVC repository stayed locked by another process ({err})"
    elif isinstance(err, (ParseError, FileIsGitIgnored)):
        msg = f"{where}: {err}. The .dvc file is unreadable; restore it with `git checkout -- <file>.dvc`"
    elif isinstance(err, OSError) and err.errno == errno.ENOSPC:
        msg = f"{where}: disk full ({err}); free space on the cache or remote filesystem"
    elif "could not read" in str(err) and ".dir" in str(err):
        msg = (
            f"{where}: the .dvc file names tree {str(err).split()[-1]}, which is in neither the DVC cache "
            "nor the remote: the .dvc file was edited by hand or comes from a push that never finished. "
            "Restore it with `git checkout -- <file>.dvc`"
        )
    else:
        msg = f"{where}: {type(err).__name__}: {err}"
    return VersioningError(mask_value(msg))  # DVC's own text may quote the remote URL, credentials and all


class DvcWorkspace:
    """DVC operations on one workspace through `dvc.repo.Repo`; every call opens a fresh, locked repo view."""

    def __init__(self, workspace: Path, remote: str | None = None, lock_timeout_s: float = 600.0) -> None:
        self.workspace = Path(workspace).expanduser().resolve()
        self.remote = remote
        self.lock_timeout_s = lock_timeout_s
        self._cache_types: list[str] | None = None

    # --- repository access ---------------------------------------------------------------------------
    @contextmanager
    def repo(self) -> Iterator[Any]:
        """A `dvc.repo.Repo` of the workspace with hardlink-first caching where reflinks are unavailable."""
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo

        try:
            if self._cache_types is None:
                with Repo(str(self.workspace), uninitialized=False) as probe:
                    configured = probe.config["cache"].get("type") or ["reflink", "copy"]
                    if isinstance(configured, str):
                        configured = configured.split(",")
                    self._cache_types = _link_types(configured, Path(probe.tmp_dir))
            repo = Repo(str(self.workspace), config={"cache": {"type": self._cache_types}})
        except NotDvcRepoError as err:
            raise _explain(err, "opening", self.workspace, self.workspace) from err
        try:
            yield repo
        finally:
            repo.close()

    def _retry_locked(self, fn: Callable[[Any], Any], action: str, path: Path) -> Any:
        from dvc.lock import LockError

        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.5
        while True:
            detail = ""
            try:
                with self.repo() as repo, _ErrorLog() as log:
                    try:
                        return fn(repo)
                    finally:
                        if log.messages:
                            detail = (
                                f" [{_remote_description(repo, self.remote)}: {'; '.join(log.messages[-3:])}]"
                            )
            except LockError as err:
                if time.monotonic() > deadline:
                    raise _explain(err, action, path, self.workspace) from err
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            except VersioningError:
                raise
            except Exception as err:
                raise _explain(err, action, path, self.workspace, detail) from err

    def relpath(self, path: Path) -> str:
        """`path` relative to the workspace (posix); raises when it lies outside."""
        p = Path(path)
        p = p if p.is_absolute() else self.workspace / p
        try:
            return p.resolve().relative_to(self.workspace).as_posix()
        except ValueError as err:
            raise VersioningError(f"{path} is outside the DVC workspace {self.workspace}") from err

    # --- tracking ------------------------------------------------------------------------------------
    def ensure_tracked_root(self, root: Path) -> None:
        """Make `<root>.dvc` track `root` (an empty tree to start with), so folders under it add granularly."""
        if not (self.workspace / ".dvc").is_dir():
            raise VersioningError(
                f"{self.workspace} is not a DVC repository (no .dvc/): run `git init && dvc init` there, "
                "or set tracking.dvc=false"
            )
        rel = self.relpath(root)
        dvc_file = self.workspace / f"{rel}.dvc"
        Path(self.workspace / rel).mkdir(parents=True, exist_ok=True)
        if dvc_file.exists():
            return
        if "/" in rel:
            raise VersioningError(
                f"{root}: granular DVC tracking needs the tracked folder at the top of the workspace "
                f"({self.workspace}); set its path (e.g. data.shards_dir) to a top-level folder"
            )
        dvc_file.write_text(
            f"outs:\n- md5: {EMPTY_TREE_MD5}\n  size: 0\n  nfiles: 0\n  hash: md5\n  path: {rel}\n"
        )

    def _ensure_empty_tree(self, repo: Any) -> None:
        """A fresh clone has no cache: put the (content-addressed) empty tree object in it."""
        from dvc_data.hashfile.tree import Tree

        cache = repo.cache.local
        if not cache.exists(EMPTY_TREE_MD5):
            empty = Tree()
            empty.digest()
            cache.add_bytes(empty.oid, empty.as_bytes())

    def add(self, path: Path) -> str:
        """Add one folder inside a tracked directory (updates only its entries) and return its DVC md5."""
        rel = self.relpath(path)
        if not (self.workspace / rel).is_dir():
            raise VersioningError(f"cannot version {self.workspace / rel}: not a directory")

        def run(repo: Any) -> str:
            self._ensure_empty_tree(repo)
            repo.add([str(self.workspace / rel)])
            return self._tracked_dir(repo, rel).md5

        return self._retry_locked(run, "adding", self.workspace / rel)

    def supersede(self, run_dir: Path, after_step: int, target: Path, pending: Path | None = None) -> list[int]:
        """Move the records of `run_dir`'s checkpoints after `after_step` to `target` (a folder inside
        `run_dir`) in the tracking .dvc file: a new branch replaces them (see `open360.checkpoint.branches`,
        which moves the folders on disk the same way). Only the tree is rewritten — every file keeps its
        md5, so nothing is hashed, copied or pushed again, and steps recorded but never pulled move too.
        `pending`: the branch's journal entry; gone once the lock is held, the branch was finished meanwhile
        (by the run, whose DVC worker may since have recorded the branch's own later steps): nothing moves.
        Returns the steps moved."""
        from dvc.repo import lock_repo
        from dvc_data.hashfile.meta import Meta
        from dvc_data.hashfile.tree import Tree

        rel, target_rel = self.relpath(run_dir), self.relpath(target)
        if not target_rel.startswith(rel + "/"):
            raise VersioningError(f"{target} is not inside {run_dir}")

        def run(repo: Any) -> list[int]:
            with lock_repo(repo):
                if pending is not None and not Path(pending).exists():
                    return []
                tree, prefix = self._tree(repo, rel)
                into = prefix + tuple(Path(target_rel).relative_to(rel).parts)
                moved: set[int] = set()
                new = Tree()
                for key, meta, hash_info in tree or []:
                    step = step_of(key[len(prefix)]) if len(key) > len(prefix) + 1 else None
                    if key[: len(prefix)] == prefix and step is not None and step > after_step:
                        key = into + key[len(prefix) :]
                        moved.add(step)
                    new.add(key, meta, hash_info)
                if not moved:
                    return []
                new.digest()
                repo.cache.local.add_bytes(new.oid, new.as_bytes())
                out = repo.find_outs_by_path(str(self.workspace / rel), strict=False)[0]
                out.hash_info, out.meta, out.obj = new.hash_info, Meta(isdir=True, nfiles=len(new)), new
                out.stage.dump()
                return sorted(moved)

        return self._retry_locked(run, "superseding checkpoints in", self.workspace / rel)

    def push(self, paths: Sequence[Path]) -> int:
        """Push the cached files of `paths` (and their parent's tree object) to the remote; files sent."""
        rels = [self.relpath(p) for p in paths]
        if not rels:
            return 0
        return int(
            self._retry_locked(
                lambda repo: repo.push(targets=[str(self.workspace / r) for r in rels], remote=self.remote),
                "pushing",
                self.workspace / rels[0],
            )
            or 0
        )

    def push_recorded(self, dirs: Sequence[TrackedDir]) -> None:
        """Send the files of recorded folders from DVC's cache to the remote, on disk or not (`dvc push <folder>`
        sends nothing for a folder deleted after a failed push), and the tree object of the .dvc file recording
        them; what the cache lacks is left for `missing_on_remote` to report."""
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.transfer import transfer

        def run(repo: Any) -> None:
            cache, remote = repo.cache.local, repo.cloud.get_remote_odb(self.remote, "push")
            oids = {md5 for d in dirs for md5 in d.file_md5.values() if cache.exists(md5)}
            transfer(cache, remote, {HashInfo("md5", oid) for oid in oids})
            for oid in {out.hash_info.value for d in dirs for out in repo.find_outs_by_path(
                    str(self.workspace / d.path), strict=False) if out.hash_info}:
                if cache.exists(oid) and not list(remote.oids_exist([oid])):
                    remote.add(cache.oid_to_path(oid), cache.fs, oid)

        if dirs:
            self._retry_locked(run, "pushing", self.workspace / dirs[0].path)

    def pull_files(self, files: Sequence[Path]) -> None:
        """Fetch single files of a tracked folder (a shard folder's manifest and tokenizer, not its shards) by
        DVC's own granular pull, after the tree that records them is checked (`_tree`)."""
        rels = [self.relpath(f) for f in files]

        def run(repo: Any) -> None:
            for rel in rels:
                self._tree(repo, rel)  # its names and md5s are checked before DVC follows them
            repo.pull(targets=[str(self.workspace / rel) for rel in rels], remote=self.remote)

        if rels:
            self._retry_locked(run, "pulling", self.workspace / rels[0])

    def pull(self, paths: Sequence[Path], force: bool = False) -> None:
        """Fetch and check out exactly `paths` (granular pull), in time independent of the sibling count.

        Equivalent to `dvc pull <path>...`, but reads only the parent's tree object and the files of
        `paths`: `dvc pull` first loads every entry of checkpoints.dvc into its data index, which grows
        with the number of checkpoints (see docs/VERSIONING.md). Nothing is checked out unless every file
        is in the cache. `force`: replace local files that differ from the record (a damaged checkpoint).
        """
        rels = [self.relpath(p) for p in paths]
        if rels:
            self._retry_locked(
                lambda repo: [self._pull_one(repo, rel, force) for rel in rels], "pulling", self.workspace / rels[0]
            )

    def fetch(self, path: Path, names: Sequence[str]) -> tuple[dict[str, Path], list[Path]]:
        """Bring the files `names` of the tracked folder `path` into the local DVC cache, checking out nothing
        (the folder stays as it is: absent, or whole): (where the cache holds each, the cache files this call
        added). A reader that needs some of a checkpoint's files (its weights, not its optimizer state)
        fetches only those. A fetch that fails (a file the remote lacks) leaves the cache as it found it: its
        caller, never told what it added, could not free the weights it had transferred."""
        from dvc.repo import lock_repo

        rel = self.relpath(path)

        def run(repo: Any) -> tuple[dict[str, Path], list[Path]]:
            with lock_repo(repo):
                recorded = self._tracked_dir(repo, rel).file_md5
                unknown = [n for n in names if n not in recorded]
                if unknown:
                    raise VersioningError(f"{self.workspace / rel}: {unknown} not in its .dvc record")
                wanted = {n: recorded[n] for n in names}
                cache = repo.cache.local
                absent = {md5 for md5 in wanted.values() if not cache.exists(md5)}
                try:
                    added = self._fetch_objects(repo, rel, wanted)
                except VersioningError:
                    for md5 in absent:
                        Path(cache.oid_to_path(md5)).unlink(missing_ok=True)
                    raise
                where = {n: Path(cache.oid_to_path(md5)) for n, md5 in wanted.items()}
                return where, sorted({where[n] for n, md5 in wanted.items() if md5 in added})

        return self._retry_locked(run, "fetching", self.workspace / rel)

    def _fetch_objects(self, repo: Any, rel: str, files: dict[str, str], force: bool = False) -> set[str]:
        """Transfer the objects of `files` (name -> md5) of tracked folder `rel` the cache lacks from the remote
        (verified) and return their md5s; VersioningError naming those the remote could not give. `force`:
        re-hash the cached ones."""
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.transfer import transfer

        cache = repo.cache.local
        wanted = {HashInfo("md5", md5) for md5 in files.values()}
        missing = {h for h in wanted if not cache.exists(h.value)}
        if force:  # re-hash, not through DVC's state db (it keys on inode/mtime/size, which a damaged
            # file may keep): a damaged workspace file goes, and so does its cache object when it was the
            # same file (DVC hardlinks a checkpoint's files into the cache)
            for h in wanted - missing:
                obj = Path(cache.oid_to_path(h.value))
                if file_md5(obj) != h.value:
                    obj.unlink()
                    missing.add(h)
        if missing:
            remote = repo.cloud.get_remote_odb(self.remote, "pull")
            transfer(remote, cache, missing, verify=True)
            # a file absent from the remote, or one that fails verification there, is not transferred
            # (and not always counted as failed): what matters is what the cache holds now
            absent = sorted(n for n, md5 in files.items() if not cache.exists(md5))
            if absent:
                raise VersioningError(
                    f"pulling {self.workspace / rel}: {absent} could not be fetched (absent or damaged) "
                    f"from {_remote_description(repo, self.remote)}; nothing was checked out. Were they "
                    f"pushed? (`dvc push {rel}` in the workspace that trained)"
                )
        return {h.value for h in missing}

    def _pull_one(self, repo: Any, rel: str, force: bool = False) -> None:
        from dvc.repo import lock_repo
        from dvc_data.hashfile.checkout import PromptError, checkout
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.tree import Tree

        with lock_repo(repo):
            tracked = self._tracked_dir(repo, rel)
            # DVC's checkout deletes the files a folder holds beyond its record (with force; without, it asks
            # to "replace" them): not a damaged copy of a recorded file, someone's work — named, kept, refused
            folder = self.workspace / rel
            extra = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix()
                           not in tracked.file_md5) if folder.is_dir() else []
            if extra:
                raise VersioningError(
                    f"pulling {folder}: {[str(p) for p in extra]} not in its .dvc record (added after versioning) "
                    "and left as they are, nothing was checked out; move them out of the checkpoint folder, then "
                    "pull again"
                )
            cache = repo.cache.local
            self._fetch_objects(repo, rel, tracked.file_md5, force)
            if force:  # every file is in the cache now: drop the damaged local copies the state db may vouch for
                for name, md5 in tracked.file_md5.items():
                    local = self.workspace / rel / name
                    if local.is_file() and file_md5(local) != md5:
                        local.unlink()
            tree = Tree()
            for name, md5 in tracked.file_md5.items():
                tree.add(tuple(name.split("/")), None, HashInfo("md5", md5))
            tree.digest()
            try:
                checkout(str(self.workspace / rel), repo.fs, tree, cache, relink=True, state=repo.state, force=force)
            except PromptError as err:  # DVC's "unable to remove ... without a confirmation"
                raise VersioningError(
                    f"pulling {self.workspace / rel}: {err.path} differs from its .dvc record (modified or damaged) "
                    "and was left as it is; pull again with --force (`open360 ckpt pull <run> <step> --force`) "
                    "to replace it with the recorded file"
                ) from err

    def _tree(self, repo: Any, rel: str) -> tuple[Any, tuple[str, ...]]:
        from dvc.exceptions import OutputNotFoundError

        try:
            outs = repo.find_outs_by_path(str(self.workspace / rel), strict=False)
        except OutputNotFoundError as err:
            raise VersioningError(
                f"{self.workspace / rel} is not inside any DVC-tracked directory of {self.workspace} "
                "(expected e.g. checkpoints.dvc tracking checkpoints/)"
            ) from err
        out = outs[0]
        prefix = tuple(Path(rel).relative_to(Path(out.def_path)).parts)
        oid = out.hash_info.value if out.hash_info else None
        _check_tree(out.stage.path, oid, None)  # before the tree object is fetched to the path its name gives
        if oid == EMPTY_TREE_MD5:
            self._ensure_empty_tree(repo)
        tree = out.get_dir_cache(remote=self.remote) if out.hash_info else None
        if out.hash_info and tree is None:
            raise VersioningError(self._missing_tree(repo, out.stage.path, oid))
        _check_tree(out.stage.path, oid, tree)
        return tree, prefix

    def _missing_tree(self, repo: Any, dvc_file: str, md5: str) -> str:
        """Why a tracked tree could not be read: a local remote that is not there, else a tree missing."""
        remote = _remote_description(repo, self.remote)
        try:
            name = self.remote or repo.config["core"].get("remote")
            url = str(repo.config["remote"][name]["url"])
        except (KeyError, TypeError):
            url = ""
        local = url and "://" not in url
        if local and not (self.workspace / ".dvc" / url).resolve().exists():
            return (
                f"{dvc_file}: tree {md5} is not in the DVC cache, and {remote} does not exist on this machine; "
                "point the remote at the storage (`dvc remote modify --local <name> url <path>`) and retry"
            )
        return (
            f"{dvc_file}: key outs[0].md5 names tree {md5}, which is in neither the DVC cache nor {remote}; "
            "restore the file with `git checkout` or push from the workspace that wrote it"
        )

    def _tracked_dir(self, repo: Any, rel: str) -> TrackedDir:
        tree, prefix = self._tree(repo, rel)
        files = {}
        for key, _meta, hash_info in tree or []:
            if key[: len(prefix)] == prefix:
                files["/".join(key[len(prefix) :])] = hash_info.value
        if not files:
            raise VersioningError(f"{self.workspace / rel} is not recorded in its .dvc file")
        return TrackedDir(rel, tree_md5(files), len(files), files)

    def tracked_children(self, parent: Path) -> dict[str, TrackedDir]:
        """Folders directly under `parent` recorded in the tracking .dvc file (needs no local data)."""
        rel = self.relpath(parent)

        def run(repo: Any) -> dict[str, TrackedDir]:
            # one pass over the tree for all children (not one per child: 360 checkpoints took 21 s of it)
            tree, prefix = self._tree(repo, rel)
            files: dict[str, dict[str, str]] = {}
            for key, _meta, hash_info in tree or []:
                if key[: len(prefix)] == prefix and len(key) > len(prefix) + 1:
                    files.setdefault(key[len(prefix)], {})["/".join(key[len(prefix) + 1 :])] = hash_info.value
            return {
                name: TrackedDir(f"{rel}/{name}", tree_md5(files[name]), len(files[name]), files[name])
                for name in sorted(files)
            }

        return self._retry_locked(run, "reading", self.workspace / rel)

    def tracked(self, path: Path) -> TrackedDir:
        """The .dvc record of one folder (its md5 and every file's md5)."""
        rel = self.relpath(path)
        return self._retry_locked(lambda repo: self._tracked_dir(repo, rel), "reading", self.workspace / rel)

    def cache_files(self, path: Path) -> list[Path]:
        """Where the local DVC cache keeps each file of the tracked folder `path` (present or not)."""
        rel = self.relpath(path)

        def run(repo: Any) -> list[Path]:
            cache = repo.cache.local
            return [Path(cache.oid_to_path(md5)) for md5 in self._tracked_dir(repo, rel).file_md5.values()]

        return self._retry_locked(run, "reading", self.workspace / rel)

    def missing_on_remote(self, dirs: Sequence[TrackedDir]) -> dict[str, int]:
        """For each tracked folder, how many of its files the remote lacks (0 = fully pushed)."""

        def run(repo: Any) -> dict[str, int]:
            odb = repo.cloud.get_remote_odb(self.remote, "push")
            oids = sorted({md5 for d in dirs for md5 in d.file_md5.values()})
            present = set(odb.oids_exist(oids)) if oids else set()
            return {d.path: sum(md5 not in present for md5 in d.file_md5.values()) for d in dirs}

        return self._retry_locked(run, "checking the remote for", self.workspace)

    def tree_missing_on_remote(self, path: Path) -> str | None:
        """The tree object (`<md5>.dir`) the .dvc file tracking `path` names, when the remote lacks it (None
        when it has it): without it a clone can read no entry of that .dvc file, so pulls nothing, even
        of folders whose files are all pushed. A branch's record move (`supersede`) writes a new tree locally
        only; the next push of any folder under it sends it."""
        rel = self.relpath(path)

        def run(repo: Any) -> str | None:
            out = repo.find_outs_by_path(str(self.workspace / rel), strict=False)[0]
            oid = out.hash_info.value if out.hash_info else None
            if not oid or oid == EMPTY_TREE_MD5:
                return None
            odb = repo.cloud.get_remote_odb(self.remote, "push")
            return None if list(odb.oids_exist([oid])) else oid

        return self._retry_locked(run, "checking the remote for", self.workspace / rel)


def local_steps(run_dir: Path) -> dict[int, Path]:
    """Published checkpoint folders present on disk, by step."""
    steps = {}
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            step = step_of(child.name)
            if step is not None and child.is_dir():
                steps[step] = child
    return dict(sorted(steps.items()))


def push_pending(
    store: DvcWorkspace, run_dir: Path, push: bool = True, max_step: int | None = None
) -> list[int]:
    """Add local checkpoints of a run (up to `max_step`) missing from the .dvc file, then push them all.

    Returns the steps that were added. Safe to repeat: DVC sends only what the remote lacks.
    """
    from open360.checkpoint.io import list_checkpoints

    # a `step_N` folder without lineage.json (a checkout cut short, a folder copied there) is not versioned
    # as one of the run's checkpoints
    steps = {s: p for s, p in list_checkpoints(run_dir) if max_step is None or s <= max_step}
    incomplete = sorted(s for s in local_steps(run_dir) if s not in steps and (max_step is None or s <= max_step))
    if incomplete:
        print(f"open360.tracking: {run_dir}: step folders {incomplete} have no lineage.json (incomplete, or not "
              "checkpoints); not versioned", file=sys.stderr)
    if not steps:
        return []
    store.ensure_tracked_root(store.workspace / store.relpath(run_dir).split("/")[0])
    tracked = {store.workspace / d.path for d in store.tracked_children(run_dir).values()}
    added = []
    for step, path in steps.items():
        if path.resolve() not in tracked:
            store.add(path)
            added.append(step)
    if push:
        store.push(list(steps.values()))
    return added


def version_shards(shard_dir: Path, workspace: Path, cfg: Any) -> None:
    """Add (granularly, into `<shards_root>.dvc`) and push one built shard folder; no-op when tracking.dvc is off."""
    tracking = cfg.tracking
    if not tracking.dvc:
        return
    store = DvcWorkspace(workspace, remote=tracking.dvc_remote)
    shard_dir = Path(shard_dir).resolve()
    store.ensure_tracked_root(shard_dir.parent)
    store.add(shard_dir)
    if tracking.dvc_push:
        try:
            store.push([shard_dir])
        except VersioningError as err:  # as for checkpoints: a remote that is down must not stop the run
            print(f"open360.tracking: {err}; the shards are intact and recorded in {shard_dir.parent.name}.dvc: "
                  f"retry with `dvc push {store.relpath(shard_dir)}` in {store.workspace}", file=sys.stderr)


def pull_recorded(folder: Path, workspace: Path, remote: str | None = None) -> bool:
    """Fetch `folder` when this machine lacks it (absent or empty) but its parent's .dvc file records it —
    a fresh clone of a published workspace. True when pulled; False when there is nothing to pull."""
    folder = Path(folder).expanduser().resolve()
    if folder.is_dir() and any(folder.iterdir()):
        return False
    ws = Path(workspace).expanduser().resolve()
    try:
        parent = folder.parent.relative_to(ws).as_posix()
    except ValueError:
        return False
    if not (ws / ".dvc").is_dir() or not (ws / f"{parent}.dvc").is_file():
        return False
    store = DvcWorkspace(ws, remote=remote)
    if folder.name not in store.tracked_children(folder.parent):
        return False
    store.pull([folder])
    return True
