"""Which training sequences a memorization cell scores: LLM360's seeded sample per chunk, or all seen."""

from __future__ import annotations

import numpy as np


def sample_rows(chunk_size: int, sample: int, seed: int = 42) -> np.ndarray:
    """Row indices (within one chunk) of the sequences scored for that chunk, in scoring order.

    Exactly Analysis360's ``Dataset.shuffle(seed=seed).select(range(sample))`` from HF `datasets`:
    ``np.random.default_rng(seed).permutation(chunk_size)[:sample]``. The same rows are scored at every
    checkpoint, so per-sequence scores line up across checkpoints. ``sample <= 0`` or
    ``sample >= chunk_size`` takes the whole chunk in row order.
    """
    if chunk_size < 0:
        raise ValueError(f"memorization: chunk_size={chunk_size} must be >= 0")
    if sample <= 0 or sample >= chunk_size:
        return np.arange(chunk_size, dtype=np.int64)
    return np.random.default_rng(seed).permutation(chunk_size)[:sample].astype(np.int64)


def sample_seen_rows(chunk_size: int, seen: np.ndarray, sample: int, seed: int = 42) -> np.ndarray:
    """Rows scored when only the sorted rows `seen` (those a checkpoint trained on) are eligible: the chunk's
    seeded permutation (as `sample_rows`) with the unseen rows left out, first `sample` of it. So checkpoints
    share most of their sample (a row drawn at one checkpoint stays drawn at a later one until rows earlier in
    the permutation become seen), and a chunk seen whole is sampled as `sample_rows` samples it.
    ``sample <= 0`` or ``sample >= len(seen)`` takes every seen row in row order."""
    if sample <= 0 or sample >= len(seen):
        return np.asarray(seen, dtype=np.int64)
    permutation = np.random.default_rng(seed).permutation(chunk_size)
    return permutation[np.isin(permutation, seen, assume_unique=True)][:sample].astype(np.int64)


def chunk_offsets(chunk_sizes: list[int] | np.ndarray) -> np.ndarray:
    """Global id of the first sequence of each chunk (ids number the concatenation of chunks 0..N-1)."""
    sizes = np.asarray(chunk_sizes, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else sizes


def seen_rows(seen_ids: np.ndarray, chunk_sizes: list[int] | np.ndarray, chunk: int) -> np.ndarray:
    """Sorted unique row indices within `chunk` of the global ids in `seen_ids` (Pythia: all seen)."""
    sizes = np.asarray(chunk_sizes, dtype=np.int64)
    if not 0 <= chunk < len(sizes):
        raise ValueError(f"memorization: chunk {chunk} out of range; the shards have {len(sizes)} chunks")
    lo = int(chunk_offsets(sizes)[chunk])
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    ids = ids[(ids >= lo) & (ids < lo + sizes[chunk])]
    return ids - lo
