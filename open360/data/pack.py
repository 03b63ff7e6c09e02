"""Pack stage: concatenate token streams with EOS separators and cut rows of seq_len + 1 tokens."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Packer:
    """Streaming packer: feed documents' ids, get back complete rows; the tail is carried over."""

    def __init__(self, row_len: int, eos_id: int | None) -> None:
        self.row_len = row_len
        self.eos_id = eos_id
        self._carry = np.empty(0, dtype=np.int32)

    def add(self, docs: Sequence[Sequence[int]]) -> np.ndarray:
        """Append documents (each followed by EOS when eos_id is set) and return the rows completed."""
        sep = 0 if self.eos_id is None else 1
        total = len(self._carry) + sum(len(d) for d in docs) + sep * len(docs)
        flat = np.empty(total, dtype=np.int32)
        flat[: len(self._carry)] = self._carry
        pos = len(self._carry)
        for d in docs:
            n = len(d)
            flat[pos : pos + n] = d
            pos += n
            if sep:
                flat[pos] = self.eos_id
                pos += 1
        n_rows = total // self.row_len
        self._carry = flat[n_rows * self.row_len :].copy()
        return flat[: n_rows * self.row_len].reshape(n_rows, self.row_len)

    @property
    def leftover_tokens(self) -> int:
        """Tokens of the unfinished last row (dropped at the end of a source)."""
        return len(self._carry)
