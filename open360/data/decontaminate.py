"""Held-out rows that share a run of n tokens with training rows: found by 64-bit n-gram hashes and dropped."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# An odd 64-bit multiplier: the n-gram hash is sum(token_j * P^(n-1-j)) mod 2^64 (numpy's uint64 wraps).
_P = np.uint64(0x9E3779B97F4A7C15)
_BLOCK_ROWS = 4096  # rows hashed at a time: the windows of a block are (rows x windows) uint64, not x n


def ngram_hashes(rows: np.ndarray, n: int) -> np.ndarray:
    """(rows, L - n + 1) uint64 hashes of every run of `n` consecutive tokens of each row (rows: (R, L) ints)."""
    tokens = np.asarray(rows).astype(np.uint64)
    windows = tokens.shape[1] - n + 1
    hashes = np.zeros((tokens.shape[0], windows), dtype=np.uint64)
    with np.errstate(over="ignore"):  # the hash is taken mod 2^64
        for j in range(n):
            hashes = hashes * _P + tokens[:, j : j + windows]
    return hashes


def training_ngrams(sources: Iterable[np.ndarray], n: int) -> np.ndarray:
    """Sorted unique hashes of every n-token run of every training row (8 bytes per distinct run: a corpus of
    a few billion tokens; larger releases keep their evaluation data apart to begin with)."""
    parts = [np.unique(ngram_hashes(rows[b : b + _BLOCK_ROWS], n))
             for rows in sources for b in range(0, len(rows), _BLOCK_ROWS)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def clean_rows(rows: np.ndarray, train: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the held-out `rows` that share no n-token run with the training runs `train` (sorted
    hashes; a hash collision can only drop a clean row, never keep a contaminated one)."""
    if len(rows) == 0:
        return np.zeros(0, dtype=bool)
    return ~np.isin(ngram_hashes(rows, n), train).any(axis=1)
