"""Fill-in-the-middle transform (Bavarian et al. 2022), as used for CrystalCoder's stage-2 code data."""

from __future__ import annotations

import numpy as np

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<fim_prefix>", "<fim_middle>", "<fim_suffix>"


def fim_transform(text: str, rng: np.random.Generator, spm_rate: float) -> str:
    """Cut the document at two random character positions and move the middle to the end.

    PSM: <fim_prefix>prefix<fim_suffix>suffix<fim_middle>middle; SPM puts the suffix first.
    """
    lo, hi = sorted(int(v) for v in rng.integers(0, len(text) + 1, size=2))
    prefix, middle, suffix = text[:lo], text[lo:hi], text[hi:]
    if rng.random() < spm_rate:
        return f"{FIM_PREFIX}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}{prefix}{middle}"
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}{middle}"
