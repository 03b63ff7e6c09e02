"""The training loop as one checkpointable object: steps, grad accumulation, guards, cadence, callbacks."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from open360.backends.native import (
    DistEnv,
    HostCopy,
    all_reduce_mean,
    full_state,
    gather_objects,
    grad_sync,
    live_storages,
    load_full_state,
)
from open360.checkpoint.cadence import CadencePolicy
from open360.checkpoint.io import CheckpointContents, list_checkpoints
from open360.checkpoint.writer import CheckpointWriter, SavedCheckpoint
from open360.train.callbacks import Callback
from open360.train.optim import restart_optimizer_state, set_lr
from open360.train.progress import Progress
from open360.train.schedules import Stage, lr_at, stage_at
from open360.train.state import capture_rng_state, restore_rng_state, rng_untouched

SPIKE_WARMUP_STEPS = 10  # steps before loss-spike detection starts (the running mean must settle)
SPIKE_EMA_BETA = 0.9


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, incompatible resume, misconfigured batch geometry)."""


class TrainingDiverged(TrainingError):
    """The loss or gradient norm became NaN/Inf."""


@dataclass
class StageData:
    """A stage's opened data: the deterministic order, where its chunks end, and its provenance."""

    order: Any  # open360.data.DataOrder
    chunk_end_steps: list[int]  # global step counts after which a chunk is fully consumed
    lineage: dict[str, Any]  # stage, manifest_hash, tokenizer_hash, shard_dir, ...
    seen_range: Callable[[int], dict[str, Any]]  # steps done in the stage -> sequence ids seen


@dataclass
class TrainerSettings:
    """Batch geometry, precision and guard settings (from cfg.trainer and cfg.optim)."""

    global_batch_size: int
    micro_batch_size: int
    seq_len: int
    grad_clip: float
    autocast_dtype: torch.dtype | None  # None = fp32
    loss_spike_factor: float = 3.0
    log_every: int = 1
    progress_bar: bool = True
    flops_per_token: float | None = None
    peak_flops: float | None = None  # per device, bf16 (None in other precisions); MFU is shown when known

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; raise when the batch does not divide."""
        per_rank, rem = divmod(self.global_batch_size, world_size)
        if rem or per_rank % self.micro_batch_size:
            raise TrainingError(
                f"trainer.global_batch_size={self.global_batch_size} must be a multiple of "
                f"trainer.micro_batch_size={self.micro_batch_size} x world size {world_size}; "
                "change one of them"
            )
        return per_rank // self.micro_batch_size


@dataclass
class TrainerProgress:
    """The counters a checkpoint restores besides model/optimizer/RNG/data."""

    step: int = 0
    tokens_seen: int = 0
    last_loss: float | None = None
    loss_ema: float | None = None
    loss_spikes: int = 0


class Trainer:
    """Trains `model` through `module` (its DDP/FSDP wrapper) over `stages`; checkpointable as a whole.

    `open_stage(stage)` returns the stage's StageData (building shards when needed); `lineage_base`
    (code revision, config hash, run name) goes into every checkpoint's lineage.json.
    """

    backend = "native"  # recorded in lineage.json; a checkpoint resumes only on the backend that wrote it

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        stages: list[Stage],
        settings: TrainerSettings,
        env: DistEnv,
        open_stage: Callable[[Stage], StageData],
        cadence: CadencePolicy,
        writer: CheckpointWriter | None,
        callbacks: list[Callback],
        config_yaml: str,
        lineage_base: dict[str, Any],
    ) -> None:
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.stages = stages
        self.settings = settings
        self.env = env
        self._open_stage = open_stage
        self.cadence = cadence
        self.writer = writer
        self.callbacks = callbacks
        self.config_yaml = config_yaml
        self.lineage_base = lineage_base
        self.progress = TrainerProgress()
        self.accum = self._accumulation_steps()
        self.final_step = stages[-1].end
        cadence.stage_end_steps.update(stage.end for stage in stages)
        self._stage_data: dict[int, StageData] = {}
        self._finished_stages: dict[int, dict[str, Any]] = {}  # data history restored from a checkpoint
        self._prefetch_pool: ThreadPoolExecutor | None = None  # lives while train() runs
        self._prefetched: tuple[int, int, Future[torch.Tensor]] | None = None
        self.saved: list[SavedCheckpoint] = []
        self._resumed = False  # a resumed run never re-saves the step it resumed from

    # -- backend hooks (overridden by the megatron-core trainer) --------------------------------

    def _accumulation_steps(self) -> int:
        return self.settings.accumulation_steps(self.env.world_size)

    def _data_shard(self) -> tuple[int, int]:
        """(index, count) of this rank's slice of every global batch."""
        return self.env.rank, self.env.world_size

    def _model_optimizer_state(self, host_copy: HostCopy | None = None) -> dict[str, Any]:
        """Full model and optimizer state for the checkpoint (complete on rank 0; every rank calls it), each
        tensor passed through `host_copy` (the writer's) as it is gathered; None: `tensor.cpu()`."""
        return full_state(self.model, self.optimizer, self.env, host_copy)

    def _load_model_optimizer(self, state: dict[str, Any]) -> None:
        load_full_state(self.model, self.optimizer, state["model"], state["optimizer"], self.env)

    def _restart_optimizer(self) -> None:
        """Every parameter's optimizer state back to a new optimizer's (a stage with `fresh_optimizer`)."""
        restart_optimizer_state(self.optimizer)

    def _extra_checkpoint_dirs(self, published: bool) -> dict[str, Path]:
        """Directories written by every rank that the checkpoint takes in (none for the native backend)."""
        return {}

    # -- data ----------------------------------------------------------------------------------

    def stage_data(self, stage: Stage) -> StageData:
        """Open (once) the data of a stage and register its chunk ends with the cadence policy."""
        if stage.index not in self._stage_data:
            data = self._open_stage(stage)
            self._check_one_tokenizer({stage.index: data.lineage})
            self.cadence.add_chunk_ends(data.chunk_end_steps)
            self._stage_data[stage.index] = data
        return self._stage_data[stage.index]

    def _check_one_tokenizer(self, opening: dict[int, dict[str, Any]]) -> None:
        """Every stage reads shards of the tokenizer the weights were trained with (a warm start's last data, the
        opened stages', the finished stages' of a resumed checkpoint and `opening`'s): under another one a token
        id means another token."""
        known = {**self._finished_stages, **{i: d.lineage for i, d in self._stage_data.items()}, **opening}
        warm = self.lineage_base.get("init_from") or {}
        inherited = [h for h in warm.get("data_history") or [] if h.get("tokenizer_hash")]
        trained = [(f"the warm start {warm.get('checkpoint')}", h) for h in inherited[-1:]]
        trained += [(f"stage {self.stages[i].name!r}", h) for i, h in sorted(known.items()) if h.get("tokenizer_hash")]
        first_who, first = trained[0] if trained else ("", {})
        for who, h in trained[1:]:
            if h["tokenizer_hash"] != first["tokenizer_hash"]:
                raise TrainingError(
                    f"{who} reads {h.get('shard_dir', 'shards')} tokenized with tokenizer {h['tokenizer_hash'][:12]}, "
                    f"{first_who} trained with {first['tokenizer_hash'][:12]}: the same token ids would mean other "
                    "tokens. Give every stage's recipe that tokenizer (the same tokenizer spec and, for kind: train, "
                    "the same sources it trains on: tokenizer.train_sources; or kind: file with that tokenizer.json)"
                )

    def _load_batch(self, stage: Stage, step: int) -> torch.Tensor:
        """This rank's rows of the global batch of global step `step`, as a (pinned) CPU tensor."""
        part = self._data_shard()
        local = np.ascontiguousarray(self.stage_data(stage).order.batch(step - stage.start, part), dtype=np.int64)
        tensor = torch.from_numpy(local)
        return tensor.pin_memory() if self.env.device.type == "cuda" else tensor

    def _batch(self, step: int) -> torch.Tensor:
        """The batch of `step` (prefetched in the background while the previous step ran)."""
        stage = stage_at(self.stages, step)
        pre, self._prefetched = self._prefetched, None
        batch = (
            pre[2].result()
            if pre is not None and pre[:2] == (stage.index, step)
            else self._load_batch(stage, step)
        )
        nxt = stage_at(self.stages, step + 1) if step + 1 < self.final_step else None
        # a stage not yet open opens (builds its shards) at its own first step: its failure must not cost the
        # step and the checkpoint that end the stage before it
        if nxt is not None and nxt.index in self._stage_data and self._prefetch_pool is not None:
            self._prefetched = (
                nxt.index,
                step + 1,
                self._prefetch_pool.submit(self._load_batch, nxt, step + 1),
            )
        return batch.to(self.env.device, non_blocking=True)

    # -- one optimizer step --------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.settings.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=dtype)

    def train_step(self, batch: torch.Tensor, lr: float) -> tuple[float, float]:
        """Forward/backward over the micro-batches, clip, guard, AdamW step; returns (loss, grad_norm)."""
        set_lr(self.optimizer, lr)
        mbs = self.settings.micro_batch_size
        total = torch.zeros((), device=self.env.device, dtype=torch.float32)
        for i in range(self.accum):
            micro = batch[i * mbs : (i + 1) * mbs]
            with grad_sync(self.module, enabled=i == self.accum - 1):
                with self._autocast():
                    loss = self.module(micro[:, :-1], micro[:, 1:])
                (loss / self.accum).backward()
            total += loss.detach().float()
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf  # 0: norm only
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: DTensor norm
            grad_norm = grad_norm.full_tensor()
        mean_loss = all_reduce_mean(total / self.accum, self.env)
        loss_value, norm_value = torch.stack([mean_loss, grad_norm.float()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._divergence_message(loss_value, norm_value))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value

    def _divergence_message(self, loss: float, grad_norm: float) -> str:
        step = self.progress.step + 1
        stage = stage_at(self.stages, self.progress.step)
        on_disk = []
        if self.writer is not None:
            on_disk = list_checkpoints(self.writer.published_dir) + list_checkpoints(self.writer.recovery_dir)
        last = max(on_disk, default=None)
        if last:
            kept = f"the last good checkpoint is {last[1]} (step {last[0]})"
        elif self.writer is None and not self.env.is_main:  # rank 0 writes (and names) the checkpoints
            kept = "rank 0's message names the last good checkpoint"
        else:
            kept = "no checkpoint was saved"
        shards = getattr(getattr(self.stage_data(stage).order, "shards", None), "path", "<shard folder>")
        batch = f"--shards {shards} --global-batch-size {self.settings.global_batch_size} --step {step - 1 - stage.start}"
        return (
            f"training diverged at step {step} (stage {stage.name!r}): loss={loss}, grad_norm={grad_norm}. "
            f"Stopped without saving; {kept}. Lower optim.lr, lengthen the warmup, or check the data of this "
            f"step (open360 data batch {batch}), then resume with trainer.resume=<step>."
        )

    def _spike(self, loss: float) -> bool:
        """Update the running mean; True when this loss is a spike (logged, training goes on)."""
        p = self.progress
        spike = (
            p.step > SPIKE_WARMUP_STEPS
            and p.loss_ema is not None
            and loss > self.settings.loss_spike_factor * p.loss_ema
        )
        p.loss_ema = loss if p.loss_ema is None else SPIKE_EMA_BETA * p.loss_ema + (1 - SPIKE_EMA_BETA) * loss
        if spike:
            p.loss_spikes += 1
        return spike

    # -- checkpoint state ----------------------------------------------------------------------

    def _current_stage(self) -> Stage:
        """The stage of the last completed step (stage 0 before the first)."""
        return stage_at(self.stages, max(0, self.progress.step - 1))

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, trainer counters, data-loader state and every rank's RNG state."""
        return {**self._model_optimizer_state(), "trainer": self._trainer_state(), "rng": self._rng_states()}

    def _rng_states(self) -> dict[str, Any]:
        """Every rank's RNG state (a collective: every rank calls it)."""
        return {"ranks": gather_objects(capture_rng_state(), self.env)}

    def _trainer_state(self) -> dict[str, Any]:
        """Counters, data-loader position and data history (past a first epoch the history lists the ids seen:
        only the rank that writes the checkpoint needs to compute it)."""
        p = self.progress
        stage = self._current_stage()
        return {
            "step": p.step,
            "tokens_seen": p.tokens_seen,
            "loss": p.last_loss,
            "loss_ema": p.loss_ema,
            "loss_spikes": p.loss_spikes,
            "stage": {"index": stage.index, "name": stage.name, "step_in_stage": p.step - stage.start},
            "loader": self.stage_data(stage).order.state_dict(),
            "data_history": self._data_history(),
            "world_size": self.env.world_size,
            "global_batch_size": self.settings.global_batch_size,
            "seq_len": self.settings.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (the data-order fingerprint must match)."""
        ts = state["trainer"]
        if (
            ts["global_batch_size"] != self.settings.global_batch_size
            or ts["seq_len"] != self.settings.seq_len
        ):
            raise TrainingError(
                f"checkpoint has global_batch_size={ts['global_batch_size']}, seq_len={ts['seq_len']}; "
                f"the config has {self.settings.global_batch_size}, {self.settings.seq_len}. Resume with the "
                "original trainer.global_batch_size and trainer.seq_len"
            )
        self._load_model_optimizer(state)
        self.progress = TrainerProgress(
            step=int(ts["step"]),
            tokens_seen=int(ts["tokens_seen"]),
            last_loss=ts["loss"],
            loss_ema=ts["loss_ema"],
            loss_spikes=int(ts["loss_spikes"]),
        )
        stage = self._current_stage()
        if stage.index != ts["stage"]["index"]:
            raise TrainingError(
                f"checkpoint step {ts['step']} is in stage {ts['stage']['name']!r} but the config's stages put "
                f"it in {stage.name!r}; resume with the original `stages`"
            )
        self._check_stage_lengths(ts, stage)
        self.stage_data(stage).order.load_state_dict(ts["loader"])
        self._finished_stages = {
            h["stage_index"]: h for h in ts["data_history"] if h["stage_index"] < stage.index
        }
        self._check_one_tokenizer({})
        ranks = state["rng"]["ranks"]
        restore_rng_state(ranks[self.env.rank] if self.env.rank < len(ranks) else ranks[0])
        self._resumed = True

    def _check_stage_lengths(self, ts: dict[str, Any], stage: Any) -> None:
        """The stages before the checkpoint's must keep their lengths: the batch of a step is read at its
        offset within its stage, so a shorter or longer earlier stage would skip or repeat data silently."""
        recorded = {h["stage_index"]: h.get("steps") for h in ts["data_history"] if h["stage_index"] < stage.index}
        for st in self.stages[: stage.index]:
            if st.index in recorded and recorded[st.index] != st.steps:
                raise TrainingError(
                    f"the checkpoint's stage {st.name!r} ran {recorded[st.index]} steps, the config gives it "
                    f"{st.steps} (stages.{st.index}.steps); resume with the original `stages`"
                )
        in_stage = ts["stage"].get("step_in_stage")
        if in_stage is not None and in_stage != self.progress.step - stage.start:
            raise TrainingError(
                f"checkpoint step {ts['step']} is step {in_stage} of stage {stage.name!r}, the config's stages put "
                f"it at step {self.progress.step - stage.start} (an earlier stage's `steps` changed); resume with "
                "the original `stages`"
            )

    def _data_history(self) -> list[dict[str, Any]]:
        """Per stage up to the current one: its data provenance, steps trained and sequence ids seen.

        Finished stages restored from a checkpoint are taken as recorded, so their shards need not exist.
        """
        history = []
        for st in self.stages[: self._current_stage().index + 1]:
            if st.index in self._finished_stages:
                history.append(self._finished_stages[st.index])
                continue
            data = self.stage_data(st)
            done = min(self.progress.step, st.end) - st.start
            history.append(
                {
                    **data.lineage,
                    "stage_index": st.index,
                    "steps": done,
                    "sequences_seen": data.seen_range(done),
                }
            )
        return history

    def _lineage(self, data_history: list[dict[str, Any]]) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        with rng_untouched():
            for cb in self.callbacks:
                metadata.update(cb.run_metadata())
        return {
            **self.lineage_base,
            "data": data_history[-1],
            "data_history": data_history,
            "tokens_seen": self.progress.tokens_seen,
            "callbacks": metadata,
            **({"mlflow_run_id": metadata["mlflow_run_id"]} if "mlflow_run_id" in metadata else {}),
        }

    def save(self, published: bool) -> None:
        """Checkpoint the current step (rank 0 writes; every rank takes part in gathering state)."""
        writes = self.writer is not None and self.env.is_main
        live = self._live_storages() if writes else None
        host_copy = self.writer.host_copy(live) if writes else None  # waits for the last save
        model_optimizer = self._model_optimizer_state(host_copy)  # collectives: every rank takes part
        rng = self._rng_states()
        self.stage_data(self._current_stage())  # opening a stage is collective too (it is open by now)
        extra_dirs = self._extra_checkpoint_dirs(published)
        if not writes:
            return
        trainer_state = self._trainer_state()
        contents = CheckpointContents(
            model=model_optimizer["model"],
            optimizer=model_optimizer["optimizer"],
            trainer_state=trainer_state,
            rng=rng,
            config_yaml=self.config_yaml,
            lineage=self._lineage(trainer_state["data_history"]),
            extra_dirs=extra_dirs,
        )
        self._notify("on_checkpoint_start", self.progress.step, published)
        self.writer.save(self.progress.step, contents, published, live)

    def _live_storages(self) -> frozenset[tuple[str, int]] | None:
        """The storages training writes in place: the writer copies only the state tensors in them."""
        return live_storages(self.model, self.optimizer)

    def _report_saves(self, saves: list[SavedCheckpoint]) -> None:
        for saved in saves:
            self.saved.append(saved)
            self._notify("on_checkpoint_saved", saved.step, saved.path, saved.published)

    def _notify(self, event: str, *args: Any) -> None:
        """Call every callback's `event`; side work that leaves the training RNGs where they were."""
        with rng_untouched():
            for cb in self.callbacks:
                getattr(cb, event)(*args)

    # -- the loop ------------------------------------------------------------------------------

    def _run_tokens_per_s(self, steps: int, steps_s: float, first_step_s: float) -> float:
        """Training throughput of this run's steps as the per-step metric measures it (checkpoint saves left out),
        without the run's first step (CUDA warmup, torch.compile) when there are later ones to measure."""
        if steps > 1:
            steps, steps_s = steps - 1, steps_s - first_step_s
        tokens = steps * self.settings.global_batch_size * self.settings.seq_len
        return tokens / steps_s if steps_s > 0 else 0.0

    def train(self) -> dict[str, Any]:
        """Run from the current step to the end of the last stage; returns the run summary (its tokens_per_s is
        `_run_tokens_per_s`'s, the per-step metric's measure; wall_s is the whole loop, saves included)."""
        p = self.progress
        start_step = p.step
        progress = Progress(
            self.final_step, start_step, self.settings.log_every, self.env.is_main, self.settings.progress_bar
        )
        tokens_per_step = self.settings.global_batch_size * self.settings.seq_len
        first_loss: float | None = None
        steps_s = first_step_s = 0.0  # summed step times (saves left out) of this run, and of its first step
        t_start = time.perf_counter()
        if p.step == 0 and not self._resumed and self.cadence.is_published(0, self.final_step):
            self.stage_data(self.stages[0])
            self.save(published=True)
        self.model.train()
        self._prefetch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        try:
            t_last = time.perf_counter()
            while p.step < self.final_step:
                stage = stage_at(self.stages, p.step)
                lr = lr_at(self.stages, p.step)
                opening = stage.index not in self._stage_data  # a stage opens (builds its shards) at its first step
                batch = self._batch(p.step)
                if opening:
                    t_last = time.perf_counter()  # the step's time (tokens/s, MFU) leaves opening the stage out
                if stage.fresh_optimizer and p.step == stage.start and stage.index > 0:  # also after a resume
                    self._restart_optimizer()  # from the checkpoint that ended the stage before
                    progress.message(f"stage {stage.name!r} starts with a fresh optimizer state (fresh_optimizer)")
                loss, grad_norm = self.train_step(batch, lr)
                p.step += 1
                p.tokens_seen += tokens_per_step
                p.last_loss = loss
                first_loss = loss if first_loss is None else first_loss
                now = time.perf_counter()
                step_time, t_last = now - t_last, now
                steps_s += step_time
                first_step_s = step_time if p.step == start_step + 1 else first_step_s
                metrics = {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_seen": float(p.tokens_seen),
                    "tokens_per_s": tokens_per_step / step_time,
                    "tokens_per_s_per_gpu": tokens_per_step / step_time / self.env.world_size,
                    "step_time_s": step_time,
                    "stage": float(stage.index),
                    "loss_spike": 0.0,
                }
                if self.settings.flops_per_token and self.settings.peak_flops:
                    metrics["mfu"] = (
                        self.settings.flops_per_token
                        * metrics["tokens_per_s"]
                        / (self.settings.peak_flops * self.env.world_size)
                    )
                if self._spike(loss):
                    metrics["loss_spike"] = 1.0
                    progress.message(
                        f"loss spike at step {p.step}: {loss:.4f} > {self.settings.loss_spike_factor} x running "
                        f"mean {p.loss_ema:.4f}"
                    )
                self._notify("on_step_end", p.step, metrics)
                progress.update(p.step, metrics)
                published = self.cadence.is_published(p.step, self.final_step)
                if published or self.cadence.is_ephemeral(p.step):
                    self.save(published=published)
                    t_last = time.perf_counter()  # the next step's time (tokens/s, MFU) leaves the save out
                if self.writer is not None:
                    self._report_saves(self.writer.poll())
        finally:
            progress.close()
            self._prefetch_pool.shutdown(wait=True, cancel_futures=True)
            self._prefetch_pool, self._prefetched = None, None
            if self.writer is not None:
                self._report_saves(self.writer.close())
        wall = time.perf_counter() - t_start
        published = [s for s in self.saved if s.published]
        tokens_per_s = self._run_tokens_per_s(p.step - start_step, steps_s, first_step_s)
        return {
            "status": "finished",
            "start_step": start_step,
            "steps": p.step,
            "steps_this_run": p.step - start_step,
            "tokens_seen": p.tokens_seen,
            "first_loss": first_loss,
            "final_loss": p.last_loss,
            "loss_spikes": p.loss_spikes,
            "wall_s": wall,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / self.env.world_size,
            "checkpoints_published": len(published),
            "last_checkpoint": str(max(self.saved, key=lambda s: s.step).path) if self.saved else None,
        }

