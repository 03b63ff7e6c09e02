"""Run-level job: the checkpoints x chunks memorization matrix of a run, resumable, one parquet per cell.

    python -m open360.analysis.memorization run=<run> [checkpoints=all|latest|<s1>,<s2>] [chunks=all|0-7|0,3]
        [workspace=.] [k=32] [l=32] [sample=1000] [selection=sample|seen] [mode=greedy|teacher_forced]
        [release_local=true] [config=analysis/memorization/<job>.yaml]
    torchrun --nproc-per-node 8 -m open360.analysis.memorization run=<run>   # cells split over ranks

Each (checkpoint, chunk) cell is written atomically to
``<workspace>/analysis/<run>/memorization/<tag>/cells/step_<N>-chunk_<C>.parquet`` (one row per scored
sequence); a cell that reads whole and was scored with this job's settings, shards, dtype and the
checkpoint's current weights is reused, so an interrupted job continues where it stopped (a damaged
cell, or one of replaced weights, is scored again; one of other settings stops the job).
``<tag>`` names the mode and the parameters (``greedy-k32-l32-sample1000-seed42``), so a
teacher-forced screen never mixes with exact greedy scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from open360.analysis.memorization.engine import DTYPES, MODES
from open360.analysis.memorization.sampling import chunk_offsets, sample_rows, seen_rows
from open360.checkpoint.lineage import data_history

SELECTIONS = ("sample", "seen")
DTYPE_CHOICES = ("auto", *DTYPES)
CELL_RE_FMT = "step_{step}-chunk_{chunk:05d}.parquet"


class MemorizationJobError(RuntimeError):
    """The job cannot run as configured; the message says which key or file and what to do."""


@dataclass
class MemorizationJobConfig:
    """Settings of one memorization job (key=value on the command line, or a YAML via config=)."""

    run: str = MISSING  # checkpoints/<run>/ under the workspace
    workspace: str = "."
    checkpoints: Any = "all"  # all | latest | list of steps | "s1,s2"
    chunks: Any = "all"  # all | list of chunk indices | "a-b" | "a,b"
    k: int = 32  # prompt tokens
    l: int = 32  # noqa: E741 - continuation tokens (LLM360's k and l)
    sample: int = 1000  # sequences per chunk (seeded); 0 = every sequence of the selection
    seed: int = (
        42  # numpy default_rng(seed).permutation(chunk_size)[:sample] (Analysis360's datasets shuffle)
    )
    selection: str = (
        "sample"  # sample: rows of the whole chunk | seen: only rows seen by the checkpoint (Pythia)
    )
    mode: str = "greedy"  # greedy (exact) | teacher_forced (screen: exact full_match, estimated token_match)
    batch_size: int = 0  # 0 = auto: as many as fit in GPU memory (<= 4096), 64 on CPU
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    cuda_graphs: bool = True
    compile: bool = False
    shards: str | None = None  # shard folder; default: the one the checkpoint's lineage names
    pull: bool = True  # fetch checkpoints missing locally through DVC
    release_local: bool = False  # delete checkpoints this job pulled once their cells are scored
    save_tokens: bool = False  # also store each greedy continuation (l int32 per row)
    out_dir: str | None = None  # default <workspace>/analysis/<run>/memorization/<tag>
    report: bool = True  # render PNGs + report.md when the matrix is complete
    mlflow: bool = True  # log the report to the run's MLflow run when lineage names one
    progress: bool = True
    max_cells: int = 0  # stop after scoring this many cells (0 = all); for smoke tests and time slices


HELP = (
    __doc__
    + "\nKeys (defaults):\n"
    + "\n".join(
        f"  {f.name}={f.default if f.default is not MISSING else '<required>'}"
        for f in dataclasses.fields(MemorizationJobConfig)
    )
)


# ----------------------------------------------------------------------------------------------
# Config parsing
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> MemorizationJobConfig:
    """key=value overrides (Hydra style) on top of an optional `config=<yaml>` and the defaults."""
    schema = OmegaConf.structured(MemorizationJobConfig)
    overrides = []
    for arg in argv:
        if "=" not in arg:
            raise MemorizationJobError(f"argument {arg!r} is not key=value; try --help for the keys")
        key, value = arg.split("=", 1)
        if key.lstrip("+") in ("checkpoints", "chunks") and not value.strip():
            raise MemorizationJobError(f"{arg!r} selects nothing; use all, latest (checkpoints), 3, 0-7 or 1,5,9")
        if key.lstrip("+") == "config":
            path = Path(value).expanduser()
            if not path.is_file():
                from open360.paths import resolve_repo_path

                path = resolve_repo_path(value)
            if not path.is_file():
                raise MemorizationJobError(f"config={value}: no such file (relative paths: cwd or repo root)")
            try:
                schema = OmegaConf.merge(schema, OmegaConf.load(path))
            except (OmegaConfBaseException, yaml.YAMLError) as err:
                raise MemorizationJobError(f"{path}: " + " ".join(str(err).split())) from err
        else:
            overrides.append(f"{key.lstrip('+')}={value}")
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(overrides))
        job = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise MemorizationJobError("bad memorization argument: " + " ".join(str(err).split())) from err
    assert isinstance(job, MemorizationJobConfig)
    validate(job)
    return job


def validate(job: MemorizationJobConfig) -> None:
    """Raise MemorizationJobError naming the key when a value is out of range."""
    if job.mode not in MODES:
        raise MemorizationJobError(f"mode={job.mode!r}: expected one of {MODES}")
    if job.selection not in SELECTIONS:
        raise MemorizationJobError(f"selection={job.selection!r}: expected one of {SELECTIONS}")
    if job.k < 1 or job.l < 1:
        raise MemorizationJobError(f"k={job.k}, l={job.l}: both must be >= 1")
    if job.sample < 0:
        raise MemorizationJobError(f"sample={job.sample}: must be >= 0 (0 = all sequences)")
    if job.batch_size < 0:
        raise MemorizationJobError(f"batch_size={job.batch_size}: must be >= 0 (0 = auto)")
    if job.device not in ("auto", "cpu", "cuda") and not job.device.startswith("cuda:"):
        raise MemorizationJobError(f"device={job.device!r}: expected auto, cpu or cuda")
    if job.dtype not in DTYPE_CHOICES:
        raise MemorizationJobError(f"dtype={job.dtype!r}: expected one of {DTYPE_CHOICES}")


def job_tag(job: MemorizationJobConfig) -> str:
    """Folder name that identifies what a cell file holds: mode, k, l, selection, sample size, seed (and
    the shard folder when `shards=` names one)."""
    size = f"{job.sample}" if job.sample else "all"
    tag = f"{job.mode}-k{job.k}-l{job.l}-{job.selection}{size}-seed{job.seed}"
    return f"{tag}-{Path(job.shards).name}" if job.shards else tag  # one stage's shards of several


def _int_list(value: Any, key: str) -> list[int] | None:
    """None for "all"; otherwise a list of ints from an int, a list, "a,b,c" or "a-b" (inclusive)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    if isinstance(value, int):
        return [value]
    items: list[Any] = list(value) if isinstance(value, list | tuple) else str(value).split(",")
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        try:
            if "-" in text.lstrip("-"):
                lo, hi = (int(x) for x in text.split("-", 1))
                if hi < lo:
                    raise MemorizationJobError(f"{key}={value!r}: the range {text} runs backwards; write {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            elif text:
                out.append(int(text))
        except ValueError as err:
            raise MemorizationJobError(
                f"{key}={value!r}: {text!r} is not an integer or a range a-b; use all, 3, 0-7 or 1,5,9"
            ) from err
    if not out:
        raise MemorizationJobError(f"{key}={value!r} selects nothing; use all, 3, 0-7 or 1,5,9")
    return sorted(set(out))


# ----------------------------------------------------------------------------------------------
# Checkpoints: local listing, DVC pull, release
# ----------------------------------------------------------------------------------------------


def run_checkpoint_dir(workspace: Path, run: str) -> Path:
    """`<workspace>/checkpoints/<run>`."""
    return workspace / "checkpoints" / run


def _tracked_steps(workspace: Path, run: str) -> list[int]:
    """Steps of `run` on disk or recorded in checkpoints.dvc (maybe not pulled); [] without tracking."""
    try:
        from open360.tracking.checkpoints import run_checkpoints
    except ImportError:
        return []
    try:
        return [entry.step for entry in run_checkpoints(workspace, run)]
    except Exception as err:  # a broken DVC setup must not hide the local checkpoints
        print(f"memorization: could not list DVC-tracked steps of {run}: {err}", file=sys.stderr)
        return []


def resolve_steps(job: MemorizationJobConfig, workspace: Path) -> list[int]:
    """Steps to analyse: all / latest / explicit list, from local checkpoints plus DVC-tracked ones."""
    from open360.checkpoint import list_checkpoints

    local = [step for step, _ in list_checkpoints(run_checkpoint_dir(workspace, job.run))]
    known = sorted(set(local) | set(_tracked_steps(workspace, job.run)))  # tracked: listed, not pulled
    value = job.checkpoints
    if isinstance(value, str) and value.strip().lower() == "latest":
        if not known:
            raise MemorizationJobError(
                f"checkpoints=latest: run {job.run!r} has no checkpoints in {workspace}"
            )
        return [known[-1]]
    if _int_list(value, "checkpoints") is None:
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
        steps = _int_list(text, "checkpoints") or []  # a range expands to every integer in it
        if "-" in text.lstrip("-"):
            inside = set(steps) & set(known)
            if not inside:
                raise MemorizationJobError(f"checkpoints={value!r}: run {run!r} has no checkpoint in {text}; "
                                           f"its steps: {known}")
            chosen.update(inside)
        else:
            chosen.update(steps)
    missing = sorted(chosen - set(known))
    if missing:
        raise MemorizationJobError(
            f"checkpoints={value!r}: run {run!r} has no checkpoint at steps {missing} (on disk or tracked by "
            f"DVC); its steps: {known}"
        )
    return sorted(chosen)


@contextlib.contextmanager
def _pull_lock(workspace: Path) -> Iterator[None]:
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


def ensure_checkpoint(job: MemorizationJobConfig, workspace: Path, step: int) -> tuple[Path, bool]:
    """Local path of checkpoint `step`, pulling it through DVC when absent: (path, pulled_by_us)."""
    from open360.checkpoint.io import MODEL_FILE, step_dir_name

    path = run_checkpoint_dir(workspace, job.run) / step_dir_name(step)
    if (path / MODEL_FILE).is_file():
        return path, False
    if not job.pull:
        raise MemorizationJobError(
            f"{path}: checkpoint not present locally and pull=false; pull it or set pull=true"
        )
    try:
        from open360.tracking import pull_checkpoint
    except ImportError as err:
        raise MemorizationJobError(
            f"{path}: checkpoint not present locally and open360.tracking.pull_checkpoint "
            f"is unavailable ({err})"
        ) from err
    with _pull_lock(workspace):
        if (path / MODEL_FILE).is_file():
            return path, False
        pulled = Path(pull_checkpoint(workspace, job.run, step))
    if not (pulled / MODEL_FILE).is_file():
        raise MemorizationJobError(f"{pulled}: DVC pull finished but {MODEL_FILE} is missing")
    return pulled, True


# ----------------------------------------------------------------------------------------------
# Data: shards, sampled rows, seen ids
# ----------------------------------------------------------------------------------------------


class DataView:
    """The run's shards and data order, as the cells need them (cached across checkpoints).

    The shard folder is the one the first checkpoint's lineage names (`data.shard_dir`), or `shards=`.
    Which sequences a checkpoint had seen comes from its lineage: the steps it completed in the stage
    that trained on these shards (`data_history[*].steps`), replayed through `DataOrder.seen_ids`.
    """

    def __init__(
        self, job: MemorizationJobConfig, workspace: Path, run_cfg: Any, lineage: dict[str, Any]
    ) -> None:
        from open360.data import ShardSet

        self.job = job
        self.workspace = workspace
        self.shard_dir = self._shard_path(job, workspace, lineage)
        if job.pull and not (self.shard_dir / "manifest.json").is_file():
            self._pull_shards(workspace, self.shard_dir)
        self.shards = ShardSet.open(self.shard_dir)
        self.chunk_sizes = np.asarray(self.shards.chunk_sizes, dtype=np.int64)
        self.offsets = chunk_offsets(self.chunk_sizes)
        self.run_cfg = run_cfg
        self._order: Any = None
        self._rows: dict[int, np.ndarray] = {}
        self._seen: dict[int, np.ndarray] = {}

    @staticmethod
    def _pull_shards(workspace: Path, shard_dir: Path) -> None:
        """Fetch the run's shard folder through DVC (a fresh clone of a published workspace has none)."""
        from open360.tracking.checkpoints import is_dvc_workspace
        from open360.tracking.dvc_versioning import DvcWorkspace

        if not is_dvc_workspace(workspace):
            return  # ShardSet.open says what is missing
        with _pull_lock(workspace):
            DvcWorkspace(workspace).pull([shard_dir])

    @staticmethod
    def _shard_path(job: MemorizationJobConfig, workspace: Path, lineage: dict[str, Any]) -> Path:
        from open360.paths import resolve_workspace_path

        if job.shards:
            path = resolve_workspace_path(workspace, job.shards)
            if not path.is_dir():
                raise MemorizationJobError(f"shards={job.shards!r}: no folder {path}")
            return path
        shard_dir = (lineage.get("data") or {}).get("shard_dir")
        if not shard_dir:
            raise MemorizationJobError(
                f"run {job.run!r}: the checkpoint's lineage.json names no data.shard_dir; "
                "pass shards=<folder>"
            )
        return resolve_workspace_path(workspace, shard_dir)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_sizes)

    def steps_in_these_shards(self, lineage: dict[str, Any]) -> int:
        """Optimizer steps a checkpoint took on these shards (0 when its stages never used them)."""
        done = 0
        for entry in data_history(lineage):
            path, digest = entry.get("shard_dir"), entry.get("manifest_hash")
            same = digest == self.shards.manifest_hash if digest else (
                bool(path) and Path(self.shard_dir).resolve() == (self.workspace / path).resolve())
            if same:  # each stage replays the order from its step 0: the union is the longest prefix
                done = max(done, int(entry.get("steps", 0)))
        return done

    def order(self) -> Any:
        """The run's DataOrder over these shards (seed and global batch size from the run config)."""
        if self._order is None:
            from open360.data import DataOrder

            self._order = DataOrder(
                self.shards, self.shards.seed, int(self.run_cfg.trainer.global_batch_size)
            )
        return self._order

    def _epoch0_prefix(self, steps_done: int) -> int | None:
        """Within epoch 0 the order is the id order (batch s = ids [s*B, (s+1)*B)), so the seen set is
        ids < steps_done*B: no need to materialize hundreds of millions of ids per checkpoint."""
        order = self.order()
        if steps_done <= order.steps_per_epoch:
            return steps_done * order.global_batch_size
        return None

    def seen_ids(self, steps_done: int) -> np.ndarray:
        """Sorted unique ids consumed by the first `steps_done` steps here (`DataOrder.seen_ids`)."""
        if steps_done not in self._seen:
            self._seen = {steps_done: np.asarray(self.order().seen_ids(steps_done), dtype=np.int64)}
        return self._seen[steps_done]

    def rows(self, steps_done: int, chunk: int) -> np.ndarray:
        """Rows (within `chunk`) scored for this cell, in scoring order."""
        size = int(self.chunk_sizes[chunk])
        if self.job.selection == "sample":
            if chunk not in self._rows:
                self._rows[chunk] = sample_rows(size, self.job.sample, self.job.seed)
            return self._rows[chunk]
        prefix = self._epoch0_prefix(steps_done)
        if prefix is not None:
            seen = np.arange(min(size, max(0, prefix - int(self.offsets[chunk]))), dtype=np.int64)
        else:
            seen = seen_rows(self.seen_ids(steps_done), self.chunk_sizes, chunk)
        return seen[sample_rows(len(seen), self.job.sample, self.job.seed)]

    def seen_mask(self, steps_done: int, chunk: int, rows: np.ndarray) -> np.ndarray:
        """Whether each row had been trained on by a checkpoint that took `steps_done` steps here."""
        ids = rows + self.offsets[chunk]
        prefix = self._epoch0_prefix(steps_done)
        if prefix is not None:
            return ids < prefix
        seen = self.seen_ids(steps_done)
        if not len(seen):
            return np.zeros(len(rows), dtype=bool)
        pos = np.minimum(np.searchsorted(seen, ids), len(seen) - 1)
        return seen[pos] == ids

    def sequences(self, chunk: int, rows: np.ndarray) -> np.ndarray:
        """Token sequences [n, seq_len+1] of the given rows of `chunk`."""
        return np.asarray(self.shards.sequences(rows + self.offsets[chunk]))


# ----------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------


def cell_path(out_dir: Path, step: int, chunk: int) -> Path:
    """`<out_dir>/cells/step_<N>-chunk_<C>.parquet`."""
    return out_dir / "cells" / CELL_RE_FMT.format(step=step, chunk=chunk)


def write_cell(path: Path, table: Any) -> None:
    """Write a pyarrow table atomically: temp file in the same folder, fsync, rename."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MemorizationJobError(
            f"{path}: could not write the cell ({err}); the cells already written are kept - free disk "
            "space and run the same command again"
        ) from err


def cell_table(
    job: MemorizationJobConfig,
    step: int,
    chunk: int,
    rows: np.ndarray,
    offset: int,
    seen: np.ndarray,
    result: Any,
    meta: dict[str, Any],
) -> Any:
    """One row per scored sequence, with the cell's parameters in the schema metadata."""
    import pyarrow as pa

    n = len(rows)
    columns = {
        "step": pa.array(np.full(n, step, dtype=np.int64)),
        "chunk": pa.array(np.full(n, chunk, dtype=np.int32)),
        "row": pa.array(rows.astype(np.int64)),
        "seq_id": pa.array((rows + offset).astype(np.int64)),
        "matched": pa.array(result.matched.astype(np.int16)),
        "score": pa.array(result.score.astype(np.float32)),
        "prefix_match": pa.array(result.prefix_match.astype(np.int16)),
        "seen": pa.array(seen.astype(bool)),
    }
    if job.save_tokens:
        columns["continuation"] = pa.array(list(result.predicted), type=pa.list_(pa.int32()))
    table = pa.table(columns)
    return table.replace_schema_metadata({"open360.memorization": json.dumps(meta, sort_keys=True)})


# What a cell's metadata must hold for this job to reuse it (the job's tag, field by field).
JOB_FIELDS = ("run", "mode", "k", "l", "sample", "seed", "selection")


@functools.lru_cache(maxsize=1024)
def _model_sha256(lineage_file: str, mtime_ns: int) -> str | None:
    """The weights' sha256 a checkpoint's lineage.json records (cached: one read per checkpoint)."""
    from open360.checkpoint.io import MODEL_FILE

    return (json.loads(Path(lineage_file).read_text()).get("files") or {}).get(MODEL_FILE)


def cell_is_done(job: MemorizationJobConfig, path: Path, workspace: Path, scored_on: dict[str, Any]) -> bool:
    """Whether the cell file at `path` can be reused: it exists, reads whole, was scored with this job's
    settings, on the shards (`scored_on["manifest_hash"]`) and in the dtype (`scored_on["dtype"]`) this
    job uses, and (when the checkpoint is on disk) with the weights the checkpoint holds now. A damaged
    cell, one of a retrained checkpoint or one written before its shards/dtype were recorded is scored
    again (with a warning); cells of other settings, shards or dtype in the same out_dir are an error,
    since the job would mix two analyses."""
    if not path.is_file():
        return False
    import pyarrow.parquet as pq

    from open360.checkpoint.io import LINEAGE_FILE, step_dir_name

    try:
        table = pq.read_table(path)  # every page: a damaged cell must not pass for a done one
        meta = json.loads((table.schema.metadata or {})[b"open360.memorization"])
    except Exception as err:  # truncated, damaged, emptied or foreign file
        warnings.warn(f"{path}: unreadable cell ({type(err).__name__}: {err}); scoring it again", stacklevel=2)
        return False
    want = {key: getattr(job, key) for key in JOB_FIELDS} | scored_on
    got = {key: meta.get(key) for key in JOB_FIELDS} | {key: meta.get(key) for key in scored_on}
    if job.save_tokens and "continuation" not in table.column_names:
        warnings.warn(f"{path}: written without continuations (save_tokens=false); scoring it again", stacklevel=2)
        return False
    unrecorded = [key for key in scored_on if got[key] is None]
    if unrecorded:
        warnings.warn(f"{path}: written without {unrecorded} recorded; scoring it again", stacklevel=2)
        return False
    if got != want:
        differ = {key: (got[key], want[key]) for key in want if got[key] != want[key]}
        short = next((name for name, dt in DTYPES.items() if str(dt) == f"torch.{got['dtype']}"), got["dtype"])
        same_dtype = f", or pass dtype={short}" if "dtype" in differ else ""
        raise MemorizationJobError(
            f"{path}: scored with other settings (cell, job: {differ}); give this job its own out_dir= "
            f"or remove {path.parent} to score again{same_dtype}"
        )
    lineage = run_checkpoint_dir(workspace, job.run) / step_dir_name(int(meta["step"])) / LINEAGE_FILE
    retrained = (
        meta.get("model_sha256")
        and lineage.is_file()
        and _model_sha256(str(lineage), lineage.stat().st_mtime_ns) != meta["model_sha256"]
    )
    if retrained:
        warnings.warn(
            f"{path}: scored on other weights than checkpoint step {meta['step']} now holds (the run was "
            "retrained?); scoring it again",
            stacklevel=2,
        )
        return False
    return True


def _assign(pending: list[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's cells: whole checkpoints round-robin when there are enough, else cells round-robin."""
    if world == 1:
        return pending
    steps = sorted({s for s, _ in pending})
    if len(steps) >= world:
        mine = set(steps[rank::world])
        return [c for c in pending if c[0] in mine]
    return pending[rank::world]


def _device(job: MemorizationJobConfig, local_rank: int) -> str:
    import torch

    if job.device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if job.device == "cuda":
        if not torch.cuda.is_available():
            raise MemorizationJobError("device=cuda but no CUDA device is visible; use device=cpu or auto")
        return f"cuda:{local_rank}"
    return job.device


@dataclass
class JobResult:
    """What a job did: where its files are and which cells it computed or found done."""

    out_dir: Path
    steps: list[int]
    chunks: list[int]
    computed: list[tuple[int, int]]
    skipped: list[tuple[int, int]]
    complete: bool
    report: Path | None = None


def _dist_info() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def run_job(job: MemorizationJobConfig) -> JobResult:
    """Compute every missing cell of the checkpoints x chunks matrix (this rank's share under torchrun)."""
    import torch

    validate(job)
    rank, world, local_rank = _dist_info()
    device = _device(job, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # graphs, streams and NCCL use the current device
    own_group = world > 1 and not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        return _run_cells(job, rank, world, device)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _scorer_for(
    job: MemorizationJobConfig, path: Path, device: str, current: tuple[Any, dict[str, Any]] | None
) -> tuple[Any, dict[str, Any]]:
    """A scorer holding checkpoint `path`'s weights, with its model config. The current scorer when the
    architecture is unchanged (the usual case within a run), its weights swapped in place: no model
    build, compile or CUDA graph capture per checkpoint. Else a new scorer (the old one is released).
    The weights and config are checked against the sha256 lineage.json records before they are read:
    a damaged file must not score silently."""
    from omegaconf import OmegaConf

    from open360.analysis.memorization.engine import MemorizationScorer
    from open360.checkpoint.io import (
        CONFIG_FILE,
        MODEL_FILE,
        load_model_weights,
        model_with_weights,
        read_config,
        verify_checkpoint,
    )

    verify_checkpoint(path, only=(MODEL_FILE, CONFIG_FILE))
    model_cfg = OmegaConf.to_container(read_config(path).model, resolve=True)
    weights = load_model_weights(path / MODEL_FILE)
    if current is not None and current[1] == model_cfg:
        current[0].load_weights(weights)
        return current
    if current is not None:
        current[0].release()
    scorer = MemorizationScorer(
        model_with_weights(model_cfg, weights),
        k=job.k,
        l=job.l,
        batch_size=job.batch_size,
        mode=job.mode,
        device=device,
        dtype=job.dtype,
        cuda_graphs=job.cuda_graphs,
        compile=job.compile,
    )
    return scorer, model_cfg


def _chunk_sequences(
    data: DataView, steps_done: int, chunks: list[int]
) -> Iterator[tuple[tuple[int, np.ndarray], np.ndarray]]:
    """((chunk, selected rows), their sequences) per chunk, read only when the scorer asks for them
    (about one batch is held at a time)."""
    for chunk in chunks:
        rows = data.rows(steps_done, chunk)
        yield (chunk, rows), data.sequences(chunk, rows)


def _run_cells(job: MemorizationJobConfig, rank: int, world: int, device: str) -> JobResult:
    import torch
    from tqdm.auto import tqdm

    from open360.checkpoint import read_lineage
    from open360.checkpoint.io import MODEL_FILE

    workspace = Path(job.workspace).expanduser().resolve()
    out_dir = (
        Path(job.out_dir) if job.out_dir else workspace / "analysis" / job.run / "memorization" / job_tag(job)
    )
    steps = resolve_steps(job, workspace)
    if not job.pull:
        from open360.checkpoint.io import MODEL_FILE, step_dir_name

        run_dir = run_checkpoint_dir(workspace, job.run)
        missing = [s for s in steps if not (run_dir / step_dir_name(s) / MODEL_FILE).is_file()]
        if missing:
            raise MemorizationJobError(
                f"run {job.run!r}: checkpoints {missing} are not under {run_dir} and pull=false; "
                "set pull=true to fetch them through DVC, or choose other checkpoints="
            )

    # The data view comes from the first checkpoint's config and lineage (all of a run share them).
    first_path, first_pulled = ensure_checkpoint(job, workspace, steps[0])
    from open360.checkpoint.io import read_config

    lineage = read_lineage(first_path)
    data = DataView(job, workspace, read_config(first_path), lineage)
    from open360.analysis.memorization.report import mlflow_target

    mlflow_run = mlflow_target(workspace, job.run) if job.mlflow else None  # before release_local
    seq_len = int(data.shards.seq_len)
    if job.k + job.l > seq_len + 1:
        raise MemorizationJobError(
            f"k + l = {job.k + job.l} exceeds the sequence length {seq_len} of {data.shard_dir} "
            "(+1 target token); lower k or l"
        )
    trained_with = {entry.get("tokenizer_hash") for entry in data_history(lineage)} - {None}
    if trained_with and data.shards.tokenizer_hash not in trained_with:
        raise MemorizationJobError(
            f"{data.shard_dir}: tokenized with {data.shards.tokenizer_hash[:12]}, but run {job.run!r} was "
            f"trained with {sorted(h[:12] for h in trained_with)}; pass shards= of this run"
        )
    chunks = _int_list(job.chunks, "chunks")
    chunks = list(range(data.num_chunks)) if chunks is None else chunks
    bad = [c for c in chunks if not 0 <= c < data.num_chunks]
    if bad:
        raise MemorizationJobError(
            f"chunks={job.chunks!r}: {bad} out of range; the shards have {data.num_chunks}"
        )
    cells = [(s, c) for s in steps for c in chunks]
    # What the numbers depend on besides the job's keys: the shards read and the dtype scored in.
    from open360.analysis.memorization.engine import resolve_dtype

    scored_on = {
        "manifest_hash": data.shards.manifest_hash,
        "dtype": str(resolve_dtype(job.dtype, torch.device(device))).removeprefix("torch."),
    }
    done = [cell for cell in cells if cell_is_done(job, cell_path(out_dir, *cell), workspace, scored_on)]
    done_set = set(done)
    pending = [cell for cell in cells if cell not in done_set]
    if world > 1:  # the split below needs the same `pending` on every rank: nothing is written before this
        torch.distributed.barrier(
            device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None
        )
    mine = _assign(pending, rank, world)
    shared_steps = {s for s, _ in pending} - _whole_steps(pending, set(mine))
    if job.max_cells:
        mine = mine[: job.max_cells]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "job.json").write_text(json.dumps(dataclasses.asdict(job), indent=2, default=str) + "\n")

    computed: list[tuple[int, int]] = []
    pulled_here = {steps[0]} if first_pulled else set()
    by_step: dict[int, list[int]] = {}
    for s, c in mine:
        by_step.setdefault(s, []).append(c)
    bar = tqdm(
        total=len(mine),
        desc=f"memorization[{rank}]" if world > 1 else "memorization",
        unit="cell",
        disable=not job.progress,
        position=rank if world > 1 else None,
    )
    scoring: tuple[Any, dict[str, Any]] | None = None  # the scorer and its model config, kept across steps
    try:
        for step, step_chunks in by_step.items():
            path, pulled = ensure_checkpoint(job, workspace, step)
            if pulled:
                pulled_here.add(step)
            scoring = _scorer_for(job, path, device, scoring)
            scorer = scoring[0]
            lineage = read_lineage(path)
            trainer_state = _trainer_state(path)
            steps_done = data.steps_in_these_shards(lineage)
            # The chunks of one checkpoint share batches (score_groups): only its last batch is padded.
            for (chunk, rows), result in scorer.score_groups(_chunk_sequences(data, steps_done, step_chunks)):
                bar.set_postfix_str(f"step {step} chunk {chunk}")
                meta = {
                    "run": job.run,
                    "step": step,
                    "chunk": chunk,
                    "tag": job_tag(job),
                    "mode": job.mode,
                    "k": job.k,
                    "l": job.l,
                    "sample": job.sample,
                    "seed": job.seed,
                    "selection": job.selection,
                    "seconds": result.seconds,
                    "engine": result.info,
                    "tokens_seen": trainer_state.get("tokens_seen"),
                    **scored_on,  # the shards actually read (shards= may name another folder), the dtype
                    "model_sha256": (lineage.get("files") or {}).get(MODEL_FILE),
                    "chunk_size": int(data.chunk_sizes[chunk]),
                    "num_chunks": data.num_chunks,
                    "rank": rank,
                    "world_size": world,
                }
                seen = data.seen_mask(steps_done, chunk, rows)
                write_cell(
                    cell_path(out_dir, step, chunk),
                    cell_table(job, step, chunk, rows, int(data.offsets[chunk]), seen, result, meta),
                )
                computed.append((step, chunk))
                bar.update(1)
            if job.release_local and step in pulled_here and step not in shared_steps:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        bar.close()
        if scoring is not None:
            scoring[0].release()
        scoring = None
    if world > 1:
        torch.distributed.barrier(
            device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None
        )
    if job.release_local:  # the rest this rank pulled (split across ranks, or pulled for metadata only)
        from open360.checkpoint.io import step_dir_name

        for step in sorted(pulled_here):
            shutil.rmtree(run_checkpoint_dir(workspace, job.run) / step_dir_name(step), ignore_errors=True)
    # Cells left damaged or stale (max_cells, another rank's failure) are neither complete nor merged.
    valid = set(done) | set(computed)
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, sorted(valid))
        valid = {tuple(c) for part in gathered for c in part}
    valid_cells = [cell for cell in cells if cell in valid]
    complete = len(valid_cells) == len(cells)
    report = None
    if rank == 0:
        from open360.analysis.memorization.report import merge_cells, render_report

        merge_cells(out_dir, valid_cells)  # this job's matrix only: other cells in out_dir may be stale
        if complete and job.report:
            report = render_report(out_dir, run=job.run, workspace=workspace, log_mlflow=job.mlflow, cells=cells,
                                   mlflow_run=mlflow_run)
    return JobResult(out_dir, steps, chunks, computed, done, complete, report)


def _whole_steps(pending: list[tuple[int, int]], mine: set[tuple[int, int]]) -> set[int]:
    """Steps all of whose pending cells are this rank's: only those may be released by it."""
    split = {s for s, c in pending if (s, c) not in mine}
    return {s for s, _ in mine} - split


def _trainer_state(path: Path) -> dict[str, Any]:
    from open360.checkpoint.io import TRAINER_STATE_FILE

    file = path / TRAINER_STATE_FILE
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except json.JSONDecodeError:
        return {}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m open360.analysis.memorization` and `open360 analysis memorization`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(HELP)
        return 0
    from open360.checkpoint.io import CheckpointError
    from open360.data import ShardError
    from open360.tracking.dvc_versioning import VersioningError

    try:
        job = parse_args(args)
        started = time.perf_counter()
        result = run_job(job)
    except (MemorizationJobError, ShardError, VersioningError, CheckpointError, OSError) as err:
        print(f"open360 analysis memorization: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("open360 analysis memorization: interrupted; the cells written so far are kept - run the same "
              "command again to continue", file=sys.stderr)
        return 130
    rank = _dist_info()[0]
    if rank == 0:
        state = "complete" if result.complete else "incomplete (run again to continue)"
        print(
            f"memorization: {len(result.computed)} cells computed, {len(result.skipped)} already done, "
            f"matrix {len(result.steps)} checkpoints x {len(result.chunks)} chunks {state} "
            f"in {time.perf_counter() - started:.1f}s -> {result.out_dir}"
        )
        if result.report:
            print(f"report: {result.report}")
    return 0
