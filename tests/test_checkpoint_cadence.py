"""Checkpoint cadence policies: every_n, per_chunk, log_spaced (Pythia), list, ephemeral, final."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from open360.checkpoint import CadencePolicy
from open360.config import CheckpointConfig


def test_every_n_and_final() -> None:
    p = CadencePolicy("every_n", every=40)
    assert p.published_steps(0, 240) == [40, 80, 120, 160, 200, 240]
    assert p.published_steps(0, 250) == [40, 80, 120, 160, 200, 240, 250]
    assert CadencePolicy("every_n", every=40, save_final=False).published_steps(0, 250)[-1] == 240


def test_stage_ends_are_published_with_the_final_step() -> None:
    ends = {100, 200, 240}  # crystalcoder_tiny's stages
    assert CadencePolicy("every_n", every=40, stage_end_steps=ends).published_steps(0, 240) == [
        40, 80, 100, 120, 160, 200, 240
    ]
    off = CadencePolicy("every_n", every=40, save_final=False, stage_end_steps=ends)
    assert off.published_steps(0, 240) == [40, 80, 120, 160, 200, 240]


def test_log_spaced_matches_pythia() -> None:
    p = CadencePolicy("log_spaced", every=1000, log_spaced_until=512)
    steps = p.published_steps(0, 3000)
    assert steps == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000]
    assert len(p.published_steps(0, 143000)) == 154  # Pythia's 154 checkpoints


def test_per_chunk_and_list() -> None:
    p = CadencePolicy("per_chunk")
    p.add_chunk_ends([12, 24, 36])
    assert p.published_steps(1, 40) == [12, 24, 36, 40]
    q = CadencePolicy("list", steps=frozenset({3, 17}), save_final=False)
    assert q.published_steps(0, 20) == [3, 17]


def test_ephemeral() -> None:
    p = CadencePolicy("every_n", every=100, ephemeral_every=7)
    assert [s for s in range(0, 30) if p.is_ephemeral(s)] == [7, 14, 21, 28]
    assert not CadencePolicy("every_n", every=100).is_ephemeral(7)


def test_from_config_and_errors() -> None:
    cfg = OmegaConf.structured(
        CheckpointConfig(policy="list", steps=[5, 9], ephemeral_every=3, keep_ephemeral=2)
    )
    p = CadencePolicy.from_config(cfg)
    assert p.steps == frozenset({5, 9}) and p.ephemeral_every == 3 and p.keep_ephemeral == 2
    with pytest.raises(ValueError, match="checkpoint.policy='weekly'"):
        CadencePolicy("weekly")
    with pytest.raises(ValueError, match="checkpoint.every=0"):
        CadencePolicy("every_n", every=0)
