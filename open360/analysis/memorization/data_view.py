"""The run's shards and data order as a memorization job reads them: sampled rows, seen ids, sequences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from open360.analysis.memorization.checkpoints import pull_lock
from open360.analysis.memorization.job_config import MemorizationJobConfig, MemorizationJobError
from open360.analysis.memorization.sample_cache import load_sample, sample_file, save_sample
from open360.analysis.memorization.sampling import chunk_offsets, sample_rows, sample_seen_rows
from open360.checkpoint.lineage import data_history, trained_data_history


class DataView:
    """The run's shards and data order, as the cells need them (cached across checkpoints).

    The shard folder is the run's first stage's (`data_history[0].shard_dir` of the checkpoint's lineage, the
    same for every checkpoint of the run), or `shards=`.
    Which sequences a checkpoint had seen comes from its lineage: the steps it completed in the stages
    that trained on these shards (`data_history[*].steps`, and those of a warm start's base), replayed
    through the data order.
    """

    def __init__(
        self,
        job: MemorizationJobConfig,
        workspace: Path,
        run_cfg: Any,
        lineage: dict[str, Any],
        samples_root: Path | None = None,
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
        # the sampled tokens, kept on disk per shard set: `samples_root` is the job's output folder
        self.samples_dir = None if samples_root is None else (
            Path(samples_root) / f"samples-{self.shards.manifest_hash[:16]}")
        self.run_cfg = run_cfg
        self._orders: dict[int, Any] = {}
        self._rows: dict[int, np.ndarray] = {}
        self._tokens: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # chunk -> (rows, their k+l tokens)
        self._seen_cache: dict[tuple[tuple[int, int], ...], tuple[int, np.ndarray]] = {}

    @staticmethod
    def _pull_shards(workspace: Path, shard_dir: Path) -> None:
        """Fetch the run's shard folder through DVC (a fresh clone of a published workspace has none)."""
        from open360.tracking.checkpoints import is_dvc_workspace
        from open360.tracking.dvc_versioning import pull_recorded

        if not is_dvc_workspace(workspace):
            return  # ShardSet.open says what is missing
        with pull_lock(workspace):
            pull_recorded(shard_dir, workspace)

    @staticmethod
    def _shard_path(job: MemorizationJobConfig, workspace: Path, lineage: dict[str, Any]) -> Path:
        from open360.paths import resolve_workspace_path

        if job.shards:
            path = resolve_workspace_path(workspace, job.shards)
            if not path.is_dir():
                raise MemorizationJobError(f"shards={job.shards!r}: no folder {path}")
            return path
        # the run's first stage, whichever checkpoints the job selected: `data` is the stage a checkpoint
        # was in, so checkpoints=latest of a multi-stage run read its last stage's shards under the same tag
        history = data_history(lineage)
        shard_dir = (history[0] if history else {}).get("shard_dir")
        if not shard_dir:
            raise MemorizationJobError(
                f"run {job.run!r}: the checkpoint's lineage.json names no shard_dir for its first stage "
                "(data_history[0]); pass shards=<folder>"
            )
        return resolve_workspace_path(workspace, shard_dir)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_sizes)

    def consumption(self, lineage: dict[str, Any]) -> tuple[tuple[int, int], ...]:
        """How a checkpoint's weights consumed these shards: (global batch size, steps) per order replayed
        over them — its own stages (the run's batch size) and those inherited through a warm start
        (`init_from`: a fine-tune's base saw its data too). Empty when they never trained on them."""
        own_batch = int(self.run_cfg.trainer.global_batch_size)
        used: set[tuple[int, int]] = set()
        for entry in trained_data_history(lineage):
            path, digest = entry.get("shard_dir"), entry.get("manifest_hash")
            same = digest == self.shards.manifest_hash if digest else (
                bool(path) and Path(self.shard_dir).resolve() == (self.workspace / path).resolve())
            if same and int(entry.get("steps", 0)) > 0:
                used.add((int(entry.get("global_batch_size", own_batch)), int(entry["steps"])))
        return tuple(sorted(used))

    def _order(self, global_batch_size: int) -> Any:
        if global_batch_size not in self._orders:
            from open360.data import DataOrder

            self._orders[global_batch_size] = DataOrder(self.shards, self.shards.seed, global_batch_size)
        return self._orders[global_batch_size]

    def _seen(self, consumption: tuple[tuple[int, int], ...]) -> tuple[int, np.ndarray]:
        """The seen set as (prefix, extra): ids < prefix, plus the sorted ids `extra`. Each order replays
        from its step 0 and, within its epoch 0, in id order (batch s = ids [s*B, (s+1)*B)): a prefix, with
        no need to materialize hundreds of millions of ids per checkpoint; beyond it, `DataOrder.seen_ids`."""
        if consumption not in self._seen_cache:
            prefix, extra = 0, np.empty(0, dtype=np.int64)
            for batch, steps in consumption:
                order = self._order(batch)
                if steps <= order.steps_per_epoch:
                    prefix = max(prefix, steps * batch)
                else:
                    extra = np.union1d(extra, np.asarray(order.seen_ids(steps), dtype=np.int64))
            self._seen_cache = {consumption: (prefix, extra[extra >= prefix])}
        return self._seen_cache[consumption]

    def rows(self, consumption: tuple[tuple[int, int], ...], chunk: int) -> np.ndarray:
        """Rows (within `chunk`) scored for this cell, in scoring order."""
        size = int(self.chunk_sizes[chunk])
        if self.job.selection != "sample":
            prefix, extra = self._seen(consumption)
            seen = np.arange(min(size, max(0, prefix - int(self.offsets[chunk]))), dtype=np.int64)
            if len(extra):  # sorted and unique: this chunk's ids are one slice of it
                lo = int(self.offsets[chunk])
                first, last = np.searchsorted(extra, [lo, lo + size])
                seen = np.union1d(seen, extra[first:last] - lo)
            if len(seen) < size:
                return sample_seen_rows(size, seen, self.job.sample, self.job.seed)
        return self.sample_rows(chunk)

    def sample_rows(self, chunk: int) -> np.ndarray:
        """The job's sample of a chunk seen whole: one permutation of it per job, not per checkpoint (~0.25 s
        for a chunk of 1.7M rows, x 360 x 360 cells at LLM360 scale)."""
        if chunk not in self._rows:
            self._rows[chunk] = sample_rows(int(self.chunk_sizes[chunk]), self.job.sample, self.job.seed)
        return self._rows[chunk]

    def seen_mask(self, consumption: tuple[tuple[int, int], ...], chunk: int, rows: np.ndarray) -> np.ndarray:
        """Whether each row had been trained on by a checkpoint that consumed these shards so."""
        ids = rows + self.offsets[chunk]
        prefix, extra = self._seen(consumption)
        if not len(extra):
            return ids < prefix
        # `extra` is sorted and unique (past a first epoch: most of the run's ids): a binary search per row,
        # not np.isin's sort of every id at each cell
        at = np.minimum(np.searchsorted(extra, ids), len(extra) - 1)
        return (ids < prefix) | (extra[at] == ids)

    def sequences(self, chunk: int, rows: np.ndarray) -> np.ndarray:
        """The first k+l tokens [n, k+l] of the given rows of `chunk` (all the scorer reads).

        With a sample, the rows of a chunk are the same at every checkpoint: their tokens are read once per
        job and kept, in memory and in the job's folder (`_sample_path`): sample x (k+l) int32 per chunk, 92 MB
        for 360 chunks of 1,000 at k=l=32. Read again per checkpoint, 1,000 rows spread over a 1.7M-row chunk
        touch ~760 of its row groups of 1,024 rows: ~6 GB decoded and hashed per cell, ~10x the GPU time of
        scoring it."""
        cached = self._tokens.get(chunk)
        if cached is not None and np.array_equal(cached[0], rows):
            return cached[1]
        width = self.job.k + self.job.l
        kept = self._sample_path(chunk, rows)
        tokens = None if kept is None else load_sample(kept, rows, width)
        if tokens is None:
            tokens = np.ascontiguousarray(
                self.shards.sequences(rows + self.offsets[chunk])[:, :width], dtype=np.int32)
            if kept is not None:
                save_sample(kept, rows, tokens)
        if self.job.sample > 0:  # bounded by `sample` rows per chunk (sample=0 would keep whole chunks)
            self._tokens[chunk] = (np.array(rows, copy=True), tokens)
        return tokens

    def _sample_path(self, chunk: int, rows: np.ndarray) -> Path | None:
        """Where the tokens of `rows` are kept on disk: only a chunk's job sample (the rows every checkpoint
        that saw the chunk whole scores), so each is read from the shards once per job, whatever the ranks
        and reruns (~6 GB decoded per chunk of 1.7M rows at LLM360 size: ~2.3 TB for 360 chunks)."""
        if self.samples_dir is None or self.job.sample <= 0:
            return None
        return sample_file(self.samples_dir, chunk) if np.array_equal(rows, self.sample_rows(chunk)) else None

    def prefetch_samples(self, chunks: list[int]) -> None:
        """Read and keep on disk the job samples of `chunks` (under torchrun each rank a share of them, before
        every rank scores every chunk of its checkpoints)."""
        for chunk in chunks:
            self.sequences(chunk, self.sample_rows(chunk))
