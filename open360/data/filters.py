"""Normalize, exact dedup, MinHash/LSH near-dedup and heuristic quality rules for documents."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

from open360.data.recipe import HeuristicSpec, NearDedupSpec

_WORD = re.compile(r"\w+", re.UNICODE)
_NON_LETTER = re.compile(r"[\W\d_]+", re.UNICODE)
_SPACE = re.compile(r"\s+", re.UNICODE)


def _shingle_hash(data: bytes) -> int:
    """32-bit hash of a shingle (crc32: C-speed and identical on every machine)."""
    return zlib.crc32(data)


def normalize(text: str) -> str:
    """Unicode NFC, Unix newlines, no NUL bytes, no trailing whitespace at the end of the document."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return unicodedata.normalize("NFC", text).rstrip()


def content_hash(text: str) -> bytes:
    """sha256 of the normalized text: the identity of a document for dedup and validation splits."""
    return hashlib.sha256(text.encode("utf-8")).digest()


class ExactDedup:
    """Remembers content hashes; `seen(h)` is True for the second and later copies."""

    def __init__(self) -> None:
        self._hashes: set[bytes] = set()

    def seen(self, digest: bytes) -> bool:
        if digest in self._hashes:
            return True
        self._hashes.add(digest)
        return False


class NearDedup:
    """MinHash over word n-gram shingles with an LSH index; a document LSH pairs with an earlier one is a dup."""

    def __init__(self, spec: NearDedupSpec) -> None:
        self.spec = spec
        self._lsh = MinHashLSH(threshold=spec.threshold, num_perm=spec.num_perm)
        self._n = 0

    def _minhash(self, words: list[str]) -> MinHash:
        k = self.spec.shingle_words
        shingles = {" ".join(words[i : i + k]).encode("utf-8") for i in range(max(1, len(words) - k + 1))}
        m = MinHash(num_perm=self.spec.num_perm, seed=1, hashfunc=_shingle_hash)
        m.update_batch(sorted(shingles))
        return m

    def is_duplicate(self, text: str) -> bool:
        """True if LSH pairs it with an indexed document (bands tuned to the threshold); else index it. A document
        without words (symbols, emoji) has no shingles to compare: never a near-duplicate and not indexed (every
        such document made one empty shingle, so all after the first were dropped; exact dedup finds copies)."""
        words = _WORD.findall(text.lower())
        if not words:
            return False
        m = self._minhash(words)
        if self._lsh.query(m):
            return True
        self._lsh.insert(str(self._n), m)
        self._n += 1
        return False


def heuristic_reject(text: str, spec: HeuristicSpec) -> str | None:
    """The name of the first rule the document fails, or None if it passes them all."""
    n = len(text)
    if n < spec.min_chars:
        return "too_short"
    if n > spec.max_chars:
        return "too_long"
    lines = text.split("\n")
    if max(len(ln) for ln in lines) > spec.max_line_chars:
        return "long_line"
    words = _WORD.findall(text)
    if len(words) < spec.min_words:
        return "few_words"
    if len("".join(words)) / len(words) > spec.max_mean_word_chars:
        return "long_words"
    non_space = len(_SPACE.sub("", text))
    alpha = len(_NON_LETTER.sub("", text))
    if alpha / max(1, non_space) < spec.min_alpha_fraction:
        return "few_letters"
    content_lines = [ln.strip() for ln in lines if ln.strip()]
    if content_lines:
        repeated = len(content_lines) - len(set(content_lines))
        if repeated / len(content_lines) > spec.max_duplicate_line_fraction:
            return "repeated_lines"
    return None


def validation_draw(seed: int, digest: bytes) -> float:
    """A uniform number in [0, 1) fixed by (seed, document content): the held-out split ignores order."""
    h = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + digest).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def doc_rng(seed: int, digest: bytes, salt: bytes) -> np.random.Generator:
    """A generator seeded by (seed, salt, document content), for per-document decisions such as FIM."""
    h = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + salt + digest).digest()
    return np.random.default_rng(int.from_bytes(h[:16], "little"))
