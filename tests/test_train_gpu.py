"""The Trainer on CUDA: bf16 autocast, background checkpoint writes from a CPU snapshot, MFU metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from open360.backends.native import DistEnv, parallelize
from open360.checkpoint import CadencePolicy, list_checkpoints, load_checkpoint
from open360.checkpoint.writer import CheckpointWriter
from open360.config import compose
from open360.models import build_model
from open360.train.callbacks import Callback
from open360.train.optim import build_optimizer
from open360.train.pipeline import build_settings
from open360.train.schedules import build_stages
from open360.train.trainer import StageData, Trainer
from tests.fakes import SyntheticOrder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


class Recorder(Callback):
    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics[step] = metrics


def tiny_gpu_config(steps: int, *overrides: str) -> Any:
    """amber_tiny on one GPU: 16 x 128-token sequences per step (2 micro-batches), lr 1e-3."""
    return compose(
        [
            "+experiment=amber_tiny",
            "trainer=gpu",
            "trainer.seq_len=128",
            "trainer.global_batch_size=16",
            "trainer.micro_batch_size=8",
            f"trainer.max_steps={steps}",
            "optim.lr=1e-3",
            *overrides,
        ]
    )


def _trainer(tmp_path: Path, steps: int, rec: Recorder) -> Trainer:
    cfg = tiny_gpu_config(steps)
    device = torch.device("cuda")
    env = DistEnv(device=device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    module = parallelize(model, env, "ddp")
    order = SyntheticOrder(16, 128, 4096, starts=512)

    def open_stage(stage: Any) -> StageData:
        return StageData(
            order, [], {"stage": stage.name, "manifest_hash": "m", "tokenizer_hash": "t"}, lambda n: {}
        )

    return Trainer(
        model=model,
        module=module,
        optimizer=build_optimizer(model, cfg.optim),
        stages=build_stages(cfg),
        settings=build_settings(cfg, "cuda", env),
        env=env,
        open_stage=open_stage,
        cadence=CadencePolicy("every_n", every=10),
        writer=CheckpointWriter(tmp_path / "pub", tmp_path / "rec", 1, background=True),
        callbacks=[rec],
        config_yaml="x: 1\n",
        lineage_base={},
    )


def test_bf16_training_with_background_checkpoints(tmp_path: Path) -> None:
    rec = Recorder()
    trainer = _trainer(tmp_path, 30, rec)
    assert trainer.settings.autocast_dtype is torch.bfloat16
    summary = trainer.train()
    assert summary["final_loss"] < rec.metrics[1]["loss"] - 1.0
    assert [s for s, _ in list_checkpoints(tmp_path / "pub")] == [10, 20, 30]
    ckpt = load_checkpoint(tmp_path / "pub" / "step_30")
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ckpt.model.values())
    if trainer.settings.peak_flops:
        assert 0 < rec.metrics[30]["mfu"] < 1
