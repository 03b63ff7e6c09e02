"""The cells of the checkpoints x chunks matrix: one parquet per cell, written atomically, reused when valid."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from open360.analysis.memorization.checkpoints import run_checkpoint_dir
from open360.analysis.memorization.engine import DTYPES
from open360.analysis.memorization.job_config import MemorizationJobConfig, MemorizationJobError
from open360.paths import replaced_atomically

CELL_RE_FMT = "step_{step}-chunk_{chunk:05d}.parquet"


def cell_path(out_dir: Path, step: int, chunk: int) -> Path:
    """`<out_dir>/cells/step_<N>-chunk_<C:05d>.parquet`."""
    return out_dir / "cells" / CELL_RE_FMT.format(step=step, chunk=chunk)


def write_cell(path: Path, table: Any) -> None:
    """Write a pyarrow table atomically: temp file in the same folder, fsync, rename."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replaced_atomically(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
    except OSError as err:
        raise MemorizationJobError(
            f"{path}: could not write the cell ({err.__cause__ or err}); the cells already written are kept - "
            "free disk space and run the same command again"
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


# What `seen` of a cell was computed from: 2 = the checkpoint's own stages and those it inherited through a
# warm start (`init_from`); cells without it counted only its own.
SEEN_BASIS = 2
# How selection=seen draws its sample: the chunk's permutation restricted to the seen rows (sample_seen_rows);
# cells drawn otherwise (a fresh permutation of each checkpoint's seen rows) lack this key and are scored again.
SEEN_SAMPLING = "chunk_permutation"


@functools.lru_cache(maxsize=1024)
def _lineage_facts(lineage_file: str, mtime_ns: int) -> tuple[str | None, bool]:
    """(weights' sha256, whether it inherits a base's data history) from a checkpoint's lineage.json
    (cached: one read per checkpoint)."""
    from open360.checkpoint.io import MODEL_FILE, read_lineage
    from open360.checkpoint.lineage import inherited_data_history

    lineage = read_lineage(Path(lineage_file).parent)  # damaged JSON: a CheckpointError naming the file
    return (lineage.get("files") or {}).get(MODEL_FILE), bool(inherited_data_history(lineage))


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
    got = {key: meta.get(key) for key in want}
    unrecorded = [key for key in scored_on if got[key] is None]
    # Other settings stop the job before any reason to score the cell again (and overwrite it) is taken.
    differ = {key: (got[key], want[key]) for key in want if key not in unrecorded and got[key] != want[key]}
    if differ:
        short = next((name for name, dt in DTYPES.items() if str(dt) == f"torch.{got['dtype']}"), got["dtype"])
        same_dtype = f", or pass dtype={short}" if "dtype" in differ else ""
        raise MemorizationJobError(
            f"{path}: scored with other settings (cell, job: {differ}); give this job its own out_dir= "
            f"or remove {path.parent} to score again{same_dtype}"
        )
    if unrecorded:
        warnings.warn(f"{path}: written without {unrecorded} recorded; scoring it again", stacklevel=2)
        return False
    if job.save_tokens and "continuation" not in table.column_names:
        warnings.warn(f"{path}: written without continuations (save_tokens=false); scoring it again", stacklevel=2)
        return False
    lineage = run_checkpoint_dir(workspace, job.run) / step_dir_name(int(meta["step"])) / LINEAGE_FILE
    if not lineage.is_file():
        return True
    weights, inherits = _lineage_facts(str(lineage), lineage.stat().st_mtime_ns)
    if meta.get("model_sha256") and weights != meta["model_sha256"]:
        warnings.warn(
            f"{path}: scored on other weights than checkpoint step {meta['step']} now holds (the run was "
            "retrained?); scoring it again",
            stacklevel=2,
        )
        return False
    if inherits and meta.get("seen_basis", 1) < SEEN_BASIS:
        warnings.warn(
            f"{path}: its `seen` flags leave out what the warm start's base trained on (written by an older "
            "open360); scoring it again",
            stacklevel=2,
        )
        return False
    return True


