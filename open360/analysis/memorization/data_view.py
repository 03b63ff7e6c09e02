"""The run's shards and data order as a memorization job reads them: sampled rows, seen ids, sequences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from open360.analysis.memorization.checkpoints import pull_lock
from open360.analysis.memorization.job_config import MemorizationJobConfig, MemorizationJobError
from open360.analysis.memorization.sampling import chunk_offsets, sample_rows, seen_rows
from open360.checkpoint.lineage import data_history


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
        with pull_lock(workspace):
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


