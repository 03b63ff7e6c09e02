"""Parameter and FLOP counts against published sizes and transformers' own models (built on the meta device)."""

from __future__ import annotations

import pytest
import torch

from open360.config import compose
from open360.models import build_model, count_parameters, training_flops_per_token
from open360.models.decoder import as_model_config

transformers = pytest.importorskip("transformers")


def test_llama7b_shape_has_the_published_parameter_count() -> None:
    cfg = compose(["model=amber"]).model
    assert count_parameters(cfg) == 6_738_415_616  # LLaMA-7B (AMBER's shape)


@pytest.mark.parametrize("name", ["amber_1b4", "phi15", "crystalcoder"])
def test_counts_match_models_built_on_meta(name: str) -> None:
    cfg = as_model_config(compose([f"model={name}"]).model)
    with torch.device("meta"):
        ours = build_model(cfg).num_parameters()
    assert ours == count_parameters(cfg)
    if name == "amber_1b4":
        assert 1.41e9 < ours < 1.43e9  # BENCHMARKS.md: 1.42 B
    if name == "phi15":
        hf_cfg = transformers.PhiConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, partial_rotary_factor=0.5,
        )
        with torch.device("meta"):
            assert sum(p.numel() for p in transformers.PhiForCausalLM(hf_cfg).parameters()) == ours


def test_training_flops_per_token_formula() -> None:
    cfg = compose(["model=amber_1b4"]).model
    n = count_parameters(cfg)
    assert training_flops_per_token(cfg, 2048) == 6 * n + 12 * 24 * 2048 * 2048


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 989e12 * 3 / 7),  # 3 of the card's 7 compute slices
        ("NVIDIA A100-SXM4-40GB MIG 7g.40gb", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA A30 MIG 1g.6gb", None),  # a card not in the table: no MFU, also on a MIG slice
    ],
)
def test_mfu_uses_the_peak_of_the_card_it_runs_on(monkeypatch: pytest.MonkeyPatch, name: str, peak: float) -> None:
    """The PCIe and NVL H100s peak lower than the SXM one: MFU against the SXM figure would read ~25% low; a
    MIG slice has its share of the card's compute slices."""
    from open360.train.progress import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize(("precision", "peak"), [("bf16", 989e12), ("fp32", None)])
def test_mfu_is_against_the_peak_of_the_precision_the_run_trains_in(
    monkeypatch: pytest.MonkeyPatch, precision: str, peak: float | None
) -> None:
    """The table holds bf16 tensor-core peaks: an fp32 run on an H100 (67 TFLOP/s) showed an MFU ~15x too low."""
    from open360.backends.native import DistEnv
    from open360.train.pipeline import build_settings

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    cfg = compose(["+experiment=amber_tiny", f"trainer.precision={precision}"])
    settings = build_settings(cfg, "cuda", DistEnv(device=torch.device("cuda", 0)))
    assert settings.peak_flops == peak
