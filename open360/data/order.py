"""`DataOrder`: the exact global batch order, a pure function of (manifest, seed, epoch, step)."""

from __future__ import annotations

from typing import Any

import numpy as np

from open360.data.shards import ShardSet

STATE_VERSION = 1


class DataOrderMismatchError(ValueError):
    """A loader state from a checkpoint does not fit these shards / seed / batch size."""


class DataOrder:
    """Which sequence ids make up the global batch of every step.

    Epoch 0 walks the build-time shuffled chunks in order (batch s = ids [s*B, (s+1)*B)), so a checkpoint
    taken at `chunk_end_steps()[k]` has seen chunks 0..k. Epoch e >= 1 is a permutation drawn from
    numpy's PCG64 seeded with (seed, e). A trailing partial batch of each epoch is skipped.
    """

    def __init__(self, shards: ShardSet, seed: int, global_batch_size: int) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if shards.num_sequences < global_batch_size:
            raise ValueError(
                f"{shards.path}: {shards.num_sequences} sequences are fewer than one batch of "
                f"{global_batch_size}; build more data or lower trainer.global_batch_size"
            )
        self.shards = shards
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.steps_per_epoch = shards.num_sequences // self.global_batch_size
        self._perm_cache: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order of all sequence ids in an epoch."""
        if epoch == 0:
            return np.arange(self.shards.num_sequences, dtype=np.int64)
        perm = self._perm_cache.get(epoch)  # one lookup: the prefetch thread and a checkpoint's seen_ids
        if perm is None:  # may both be here; the cache they replace is never read again by the other
            perm = self._permutation(epoch)
            self._perm_cache = {epoch: perm}
        return perm

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order drawn afresh (int64 already: no second 4.9 GB copy at LLM360 scale)."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.shards.num_sequences).astype(np.int64, copy=False)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def batch_ids(self, step: int) -> np.ndarray:
        """Global sequence ids of the batch at `step` (0-based), shape [global_batch_size]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        b = self.global_batch_size
        if epoch == 0:  # ids in order: no array of every id (~5 GB at LLM360 scale) built for each batch
            return np.arange(within * b, (within + 1) * b, dtype=np.int64)
        return self.epoch_order(epoch)[within * b : (within + 1) * b].copy()

    def batch(self, step: int, part: tuple[int, int] = (0, 1)) -> np.ndarray:
        """Token rows [global_batch_size / count, seq_len + 1] (int64) of part `index` of `count` equal parts
        of the batch at `step`, `part` = (index, count): a data-parallel rank reads only its own rows."""
        index, count = part
        ids = self.batch_ids(step)
        rows = len(ids) // count
        return self.shards.sequences(ids[index * rows : (index + 1) * rows])

    def seen_ids(self, step: int) -> np.ndarray:
        """Sorted unique ids of every sequence consumed by steps 0..step-1."""
        if step <= 0:
            return np.empty(0, dtype=np.int64)
        full_epochs, within = divmod(step, self.steps_per_epoch)
        b, per_epoch = self.global_batch_size, self.steps_per_epoch * self.global_batch_size
        if full_epochs == 0:
            return np.arange(within * b, dtype=np.int64)
        # epoch 0 sees all but the trailing partial batch; later epochs add ids until every one is seen, so
        # the work is a few epochs at most, not one permutation per epoch of a long multi-epoch run
        seen = np.zeros(self.shards.num_sequences, dtype=bool)
        seen[:per_epoch] = True
        for e in range(1, full_epochs + 1):
            if seen.all() or (e == full_epochs and within == 0):
                break
            # the current epoch's order is the one its batches read (cached); an earlier epoch's is drawn
            # without caching, so that a checkpoint in epoch >= 2 does not evict the order the next batch
            # needs (a 615M-id permutation drawn again after every checkpoint at LLM360 scale)
            perm = self.epoch_order(e) if e == full_epochs else self._perm_cache.get(e)
            if perm is None:
                perm = self._permutation(e)
            seen[perm[: per_epoch if e < full_epochs else within * b]] = True
        return np.flatnonzero(seen).astype(np.int64, copy=False)

    def chunk_end_steps(self) -> list[int]:
        """For each chunk, the step count after which all of it has been consumed in epoch 0.

        With chunk sizes a multiple of the batch size (recipe `chunk_multiple`), seen_ids at that step is
        exactly chunks 0..k; otherwise it also includes the first ids of chunk k+1. The last chunk is
        capped at steps_per_epoch (its remainder beyond the last full batch is never consumed).
        """
        ends = np.cumsum(self.shards.chunk_sizes)
        return [min(int(-(-int(e) // self.global_batch_size)), self.steps_per_epoch) for e in ends]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "manifest_hash": self.shards.manifest_hash,
            "tokenizer_hash": self.shards.tokenizer_hash,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_sequences": self.shards.num_sequences,
        }

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: the fingerprint (the order itself is recomputed, never saved)."""
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accept a checkpointed loader state only if it describes this exact data order."""
        if state.get("version") != STATE_VERSION:
            raise DataOrderMismatchError(
                f"loader state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        saved, mine = state.get("fingerprint", {}), self.fingerprint()
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in mine if saved.get(k) != mine[k]
        ]
        if diffs:
            raise DataOrderMismatchError(
                f"cannot resume: the data order differs from the checkpoint's ({'; '.join(diffs)}). "
                "Resume with the same shards (recipe + seed), tokenizer, data seed and global batch size, "
                "or start a new run"
            )
