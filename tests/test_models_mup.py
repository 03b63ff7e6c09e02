"""muP coordinate check: activation scales stay flat across width under muP and grow under standard parametrization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from open360.models.mup import CoordCheckSetup, coord_check, growth, plot_coord_check

torch.set_num_threads(2)
WIDTHS = [64, 128, 256, 512]
SETUP = CoordCheckSetup(steps=3)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return coord_check(WIDTHS, mup=False, setup=SETUP) + coord_check(WIDTHS, mup=True, setup=SETUP)


def test_mup_scales_flat_sp_scales_grow(rows: list[dict]) -> None:
    mup = [r for r in rows if r["parametrization"] == "mup"]
    sp = [r for r in rows if r["parametrization"] == "sp"]
    last = SETUP.steps
    for act in ("embedding", "block_0", "block_1"):
        for step in range(last + 1):
            assert 0.8 < growth(mup, act, step) < 1.25, (act, step, growth(mup, act, step))
    # Logits start at O(1/sqrt(width)) under muP (the output multiplier), then stay O(1) while training.
    assert 0.4 < growth(mup, "logits", last) < 2.5
    # muP's 1/head_dim attention scale: attention logits never grow with width (they start at O(1/sqrt(d))).
    assert all(growth(mup, "attn_logits_0", step) < 1.25 for step in range(last + 1))
    assert growth(sp, "attn_logits_0", last) > 5
    # Standard parametrization: hidden activations and logits blow up with width after a few Adam steps.
    assert growth(sp, "block_0", last) > 8
    assert growth(sp, "block_1", last) > 8
    assert growth(sp, "logits", last) > 3


def test_coord_check_plot_is_written(rows: list[dict], tmp_path: Path) -> None:
    png = plot_coord_check(rows, tmp_path / "coord.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
