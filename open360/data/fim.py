"""Fill-in-the-middle transform (Bavarian et al. 2022), as in CrystalCoder's stage-2 and stage-3 code data."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<fim_prefix>", "<fim_middle>", "<fim_suffix>"


def fim_pieces(text: str, rng: np.random.Generator, spm_rate: float, sentinel_ids: dict[str, int]) -> list[str | int]:
    """Cut the document at two random character positions and move the middle to the end: the pieces in
    order, each text piece to be encoded on its own and each sentinel as its id (never parsed from text,
    so a document that mentions `<fim_middle>` gets no sentinel of its own).

    PSM: <fim_prefix>prefix<fim_suffix>suffix<fim_middle>middle; SPM (variant 2 of the FIM paper, as in
    StarCoder's Megatron-LM): <fim_prefix><fim_suffix>suffix<fim_middle>prefix middle, prefix and middle still
    encoded apart, so the middle starts on a token boundary at the cut as it does at inference.
    """
    lo, hi = sorted(int(v) for v in rng.integers(0, len(text) + 1, size=2))
    prefix, middle, suffix = text[:lo], text[lo:hi], text[hi:]
    pre, mid, suf = (sentinel_ids[t] for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX))
    if rng.random() < spm_rate:
        return [pre, suf, suffix, mid, prefix, middle]
    return [pre, prefix, suf, suffix, mid, middle]


def join_encoded(docs: list[list[str | int]], encode: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
    """Token ids of documents given as pieces (text, or a token id inserted as is): the text pieces of all
    documents are encoded in one batch call of `encode` (texts -> ids)."""
    texts = [p for pieces in docs for p in pieces if isinstance(p, str)]
    encoded = iter(encode(texts))
    return [[t for p in pieces for t in ([p] if isinstance(p, int) else next(encoded))] for pieces in docs]
