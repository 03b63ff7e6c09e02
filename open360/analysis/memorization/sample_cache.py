"""A job's sampled tokens kept in its output folder: read from the shards once per job, not once per rank or run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from open360.paths import replaced_atomically


def sample_file(samples_dir: Path, chunk: int) -> Path:
    """Where the sampled rows of `chunk` and their first k+l tokens are kept."""
    return samples_dir / f"chunk_{chunk:05d}.npz"


def load_sample(path: Path, rows: np.ndarray, width: int) -> np.ndarray | None:
    """The tokens [len(rows), width] kept at `path` for exactly these rows, or None (not there, other rows,
    or damaged: a zip member's CRC-32 is checked as it is read; the caller reads the shards again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as kept:
            kept_rows, tokens = kept["rows"], kept["tokens"]
    except Exception as err:  # any damage (a bad CRC, a zip header naming an unsupported method): not trusted
        print(f"open360.memorization: warning: {path}: unreadable ({err}); reading the shards again",
              file=sys.stderr)
        return None
    if not np.array_equal(kept_rows, rows) or tokens.shape != (len(rows), width) or tokens.dtype != np.int32:
        return None
    return tokens


def save_sample(path: Path, rows: np.ndarray, tokens: np.ndarray) -> None:
    """Keep `rows` and their `tokens` at `path` (temp file, fsync, rename: a reader sees all or nothing; the
    temp name is no other writer's, ranks of other hosts included). A failure (disk full) only warns: the job
    scores from the shards as before."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, rows=np.asarray(rows, dtype=np.int64), tokens=np.asarray(tokens, dtype=np.int32))
    except OSError as err:
        print(f"open360.memorization: warning: {path}: could not keep the sampled tokens ({err.__cause__ or err}); "
              "they are read from the shards again next time", file=sys.stderr)
