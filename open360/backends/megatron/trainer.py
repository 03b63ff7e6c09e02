"""The open360 Trainer on megatron-core: same loop, data order, cadence, callbacks and checkpoint format;
steps, state and distributed checkpoints go through a MegatronEngine."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from open360.backends.megatron.engine import MegatronEngine
from open360.checkpoint.io import CheckpointError
from open360.train.trainer import Trainer, TrainingDiverged

DIST_CHECKPOINT_DIR = "megatron"  # inside checkpoints/<run>/step_N: megatron-core dist checkpoint (model + optimizer)
OPTIMIZER_MARKER = {"backend": "megatron", "state": DIST_CHECKPOINT_DIR}


class MegatronTrainer(Trainer):
    """Trainer whose model is a megatron-core GPTModel (TP/PP/DP); `engine` owns model and optimizer."""

    backend = "megatron"

    def __init__(self, engine: MegatronEngine, checkpoint_parents: tuple[Path, Path], **kwargs: Any) -> None:
        self.engine = engine
        self.checkpoint_parents = checkpoint_parents  # (published, recovery): every rank stages its shards there
        super().__init__(model=engine.model, module=engine.model, optimizer=engine.optimizer, **kwargs)

    def _accumulation_steps(self) -> int:
        return self.engine.layout.microbatches(self.settings.global_batch_size, self.settings.micro_batch_size)

    def _data_shard(self) -> tuple[int, int]:
        return self.engine.dp_rank, self.engine.layout.dp

    def train_step(self, batch: torch.Tensor, lr: float) -> tuple[float, float]:
        """megatron forward/backward over the replica's micro-batches, then its optimizer (clip, AdamW)."""
        self.engine.set_lr(lr)
        loss = self.engine.forward_backward(batch).item()
        if not math.isfinite(loss):
            raise TrainingDiverged(self._divergence_message(loss, math.nan))
        grad_norm = self.engine.optimizer_step()
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(self._divergence_message(loss, grad_norm))
        return loss, grad_norm

    def _model_optimizer_state(self, host_copy: Any = None) -> dict[str, Any]:
        # rank 0's own copies already (through gather_object): no per-tensor host copy
        return {"model": self.engine.full_native_state() or {}, "optimizer": dict(OPTIMIZER_MARKER)}

    def _live_storages(self) -> frozenset[tuple[str, int]]:
        return frozenset()  # full_native_state's tensors went through gather_object: rank 0's own copies

    def _load_model_optimizer(self, state: dict[str, Any]) -> None:
        checkpoint = Path(state["checkpoint_dir"])
        if state.get("optimizer") != OPTIMIZER_MARKER:
            raise CheckpointError(
                f"{checkpoint}: not a megatron-backend checkpoint (no {DIST_CHECKPOINT_DIR}/ distributed "
                "state); start from its weights with trainer.init_from=<checkpoint> instead of trainer.resume"
            )
        directory = checkpoint / DIST_CHECKPOINT_DIR
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: missing; re-fetch the checkpoint (open360 ckpt pull)")
        self.engine.load_distributed(directory)

    def _restart_optimizer(self) -> None:
        self.engine.restart_optimizer_state()

    def _extra_checkpoint_dirs(self, published: bool) -> dict[str, Path]:
        parent = self.checkpoint_parents[0 if published else 1]
        staging = parent / f".tmp-step_{self.progress.step}-{DIST_CHECKPOINT_DIR}"  # swept like other temp dirs
        if self.env.is_main and staging.exists():
            shutil.rmtree(staging)
        self.engine.save_distributed(staging)
        return {DIST_CHECKPOINT_DIR: staging}


def create_megatron_trainer(
    cfg: Any, initial_state: dict[str, torch.Tensor], checkpoint_parents: tuple[Path, Path], **trainer_kwargs: Any
) -> MegatronTrainer:
    """Parallel groups, engine (weights from `initial_state`, a native state dict) and trainer of a run."""
    from open360.backends.megatron.engine import initialize_parallel
    from open360.backends.megatron.layout import layout_for_run
    from open360.models.decoder import as_model_config

    env, settings = trainer_kwargs["env"], trainer_kwargs["settings"]
    model_cfg = as_model_config(cfg.model)
    layout = layout_for_run(cfg, env.world_size, settings.global_batch_size, settings.micro_batch_size)
    initialize_parallel(layout, int(cfg.trainer.seed))
    engine = MegatronEngine(
        model_cfg,
        cfg.optim,
        layout,
        initial_state,
        micro_batch_size=settings.micro_batch_size,
        seq_len=settings.seq_len,
        bf16=settings.autocast_dtype == torch.bfloat16,
    )
    return MegatronTrainer(engine, checkpoint_parents, **trainer_kwargs)
