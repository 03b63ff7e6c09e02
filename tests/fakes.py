"""Test doubles shared by the trainer tests: seeded token rows standing in for DataOrder."""

from __future__ import annotations

from typing import Any

import numpy as np


class SyntheticOrder:
    """DataOrder's interface over seeded rows: row r of step s is a run of consecutive token ids from a
    start drawn with seed s in [0, `starts`), modulo `vocab` — learnable, and the same global batch
    whichever `part` (rank, ranks) of it is asked for."""

    def __init__(self, batch: int, seq_len: int, vocab: int, starts: int = 64) -> None:
        self.batch_size, self.seq_len, self.vocab, self.starts = batch, seq_len, vocab, starts

    def batch(self, step: int, part: tuple[int, int] = (0, 1)) -> np.ndarray:
        start = np.random.default_rng(step).integers(0, self.starts, size=(self.batch_size, 1))
        rows = (start + np.arange(self.seq_len + 1)[None, :]) % self.vocab
        n = self.batch_size // part[1]
        return rows[part[0] * n : (part[0] + 1) * n]

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": f"synthetic-{self.batch_size}x{self.seq_len}-{self.vocab}-{self.starts}"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state == self.state_dict()
