"""The Trainer in process: NaN guard, loss-spike log, grad accumulation, state_dict round trip."""

from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from open360.backends.native import DistEnv, parallelize
from open360.checkpoint import CadencePolicy, list_checkpoints
from open360.checkpoint.writer import CheckpointWriter
from open360.config import compose
from open360.models import build_model
from open360.train.callbacks import Callback
from open360.train.optim import build_optimizer
from open360.train.schedules import Schedule, Stage
from open360.train.state import capture_rng_state
from open360.train.trainer import StageData, Trainer, TrainerSettings, TrainingDiverged, TrainingError
from tests.fakes import SyntheticOrder


class ScriptedLoss(nn.Module):
    """A 'model' whose loss follows a script (value per optimizer step), with a real gradient."""

    def __init__(self, values: list[float], accum: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.values, self.accum, self.calls = values, accum, 0

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = self.values[self.calls // self.accum]
        self.calls += 1
        return (self.w**2).sum() * 1e-3 + value


class OneSecondSteps(ScriptedLoss):
    """ScriptedLoss whose two micro-batches move a fake clock (`clock[0]`) by one second per step."""

    def __init__(self, values: list[float], clock: list[float]) -> None:
        super().__init__(values, accum=2)
        self.clock = clock

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.clock[0] += 0.5
        return super().forward(input_ids, targets)


class Recorder(Callback):
    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics[step] = metrics


def _trainer(
    model: nn.Module,
    module: nn.Module,
    steps: int,
    settings: TrainerSettings,
    tmp_path: Path | None = None,
    callbacks: list[Callback] | None = None,
    every: int = 1000,
    stages: list[Stage] | None = None,
    save_final: bool = False,
) -> Trainer:
    stages = stages or [Stage(0, "main", "r.yaml", 0, steps, 1e-3, Schedule("constant", steps))]
    order = SyntheticOrder(settings.global_batch_size, settings.seq_len, 64)

    def open_stage(st: Stage) -> StageData:
        return StageData(
            order, [], {"stage": st.name, "manifest_hash": "m", "tokenizer_hash": "t"}, lambda n: {}
        )

    writer = CheckpointWriter(tmp_path / "pub", tmp_path / "rec", 1, background=False) if tmp_path else None
    return Trainer(
        model=model,
        module=module,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        stages=stages,
        settings=settings,
        env=DistEnv(),
        open_stage=open_stage,
        cadence=CadencePolicy("every_n", every=every, save_final=save_final),
        writer=writer,
        callbacks=callbacks or [],
        config_yaml="x: 1\n",
        lineage_base={},
    )


def _settings(**kw: Any) -> TrainerSettings:
    base = dict(
        global_batch_size=4, micro_batch_size=2, seq_len=8, grad_clip=1.0, autocast_dtype=None, log_every=100
    )
    return TrainerSettings(**{**base, **kw})


TINY = ["+experiment=amber_tiny", "model.n_layers=1", "model.max_seq_len=16"]


def _decoder_trainer(steps: int, optim: Any = None, callbacks: list[Callback] | None = None, **kw: Any) -> Trainer:
    """A seeded 1-layer amber_tiny Trainer over SyntheticOrder batches (`optim`: another optim config)."""
    cfg = compose(TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    t = _trainer(model, parallelize(model, DistEnv(), "ddp"), steps, _settings(seq_len=16, **kw), callbacks=callbacks)
    t.optimizer = build_optimizer(model, optim or cfg.optim)
    return t


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    values = [2.0, 1.9, 1.8, 1.7, float("nan"), 1.5]
    model = ScriptedLoss(values, accum=2)
    trainer = _trainer(model, model, steps=6, settings=_settings(), tmp_path=tmp_path, every=2)
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    msg = str(err.value)
    assert "diverged at step 5" in msg and "loss=nan" in msg
    assert str(tmp_path / "pub" / "step_4") in msg and "(step 4)" in msg
    assert [s for s, _ in list_checkpoints(tmp_path / "pub")] == [2, 4]
    assert trainer.progress.step == 4


def test_a_diverged_rank_other_than_0_does_not_claim_that_no_checkpoint_was_saved() -> None:
    """Under torchrun only rank 0 holds the checkpoint writer, and every rank prints the divergence: the others
    said "no checkpoint was saved" (7 of 8 lines on 8 GPUs) while rank 0 named the checkpoint to resume from."""
    model = ScriptedLoss([2.0, float("nan")], accum=2)
    trainer = _trainer(model, model, steps=2, settings=_settings())
    trainer.env = DistEnv(rank=1, world_size=2)  # the message only; no collective runs
    msg = trainer._divergence_message(float("nan"), float("nan"))
    assert "no checkpoint was saved" not in msg and "rank 0's message names the last good checkpoint" in msg
    trainer.env = DistEnv()
    assert "no checkpoint was saved" in trainer._divergence_message(float("nan"), float("nan"))


def test_the_end_of_each_stage_is_published_with_the_final_step(tmp_path: Path) -> None:
    """save_final keeps each stage's last step whatever the grid (crystalcoder_tiny: every 40, stages of
    100/100/40 steps): the stage transitions of a multi-stage run are part of its release."""
    stages = [Stage(i, name, "r.yaml", 3 * i, 3, 1e-3, Schedule("constant", 3)) for i, name in enumerate("ab")]
    for save_final, published in ((True, [3, 4, 6]), (False, [4])):
        model = ScriptedLoss([2.0] * 6, accum=2)
        out = tmp_path / str(save_final)
        _trainer(model, model, 6, _settings(), out, every=4, stages=stages, save_final=save_final).train()
        assert [s for s, _ in list_checkpoints(out / "pub")] == published


def test_the_divergence_message_names_a_runnable_batch_command(tmp_path: Path) -> None:
    """The `open360 data batch` command the message suggests carries the arguments that command requires."""
    import argparse
    import re
    from types import SimpleNamespace

    from open360.data.cli import _order_args, _parse_order_args

    model = ScriptedLoss([2.0, float("inf")], accum=2)
    trainer = _trainer(model, model, steps=2, settings=_settings())
    trainer.stage_data(trainer.stages[0]).order.shards = SimpleNamespace(path=tmp_path / "shards" / "r-abc")
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    command = re.search(r"open360 data batch ([^)]*)\)", str(err.value)).group(1).split()
    ap = argparse.ArgumentParser()
    _order_args(ap)
    args = _parse_order_args(ap, command)
    assert (args.shards, args.global_batch_size, args.step) == (str(tmp_path / "shards" / "r-abc"), 4, 1)


def test_loss_spike_is_logged_not_fatal(capsys: pytest.CaptureFixture[str]) -> None:
    values = [2.0] * 14 + [9.0] + [2.0] * 5
    model = ScriptedLoss(values, accum=2)
    rec = Recorder()
    summary = _trainer(model, model, steps=20, settings=_settings(), callbacks=[rec]).train()
    assert summary["status"] == "finished" and summary["loss_spikes"] == 1
    assert [s for s, m in rec.metrics.items() if m["loss_spike"]] == [15]
    assert "loss spike at step 15" in capsys.readouterr().out
    assert set(rec.metrics[1]) >= {
        "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "tokens_seen", "step_time_s"
    }


def test_a_checkpoint_save_is_not_counted_in_the_next_steps_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """step_time_s / tokens_per_s (and MFU) of the step after a checkpoint measure that step, not the save
    (on a clock the save moves by 100 s and nothing else moves: no wall-clock bound)."""
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    class SlowSave(Recorder):
        def on_checkpoint_start(self, step: int, published: bool) -> None:
            clock[0] += 100.0

    rec = SlowSave()
    model = OneSecondSteps([2.0] * 4, clock)
    _trainer(model, model, steps=4, settings=_settings(), tmp_path=tmp_path, callbacks=[rec], every=2).train()
    assert [s for s, _ in list_checkpoints(tmp_path / "pub")] == [2, 4]
    assert [rec.metrics[s]["step_time_s"] for s in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 1.0]


def test_opening_a_stage_is_not_counted_in_its_first_steps_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next stage's shards are built when its first step asks for its batch: step_time_s / tokens_per_s (and
    MFU) of that step, and the summary's throughput, measure the step, not the build (on a clock the build moves
    by 100 s and each step by one second: no wall-clock bound)."""
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    rec = Recorder()
    model = OneSecondSteps([2.0] * 6, clock)
    stages = [Stage(i, name, "r.yaml", 3 * i, 3, 1e-3, Schedule("constant", 3)) for i, name in enumerate("ab")]
    t = _trainer(model, model, 6, _settings(), tmp_path, callbacks=[rec], stages=stages)
    open_stage = t._open_stage

    def slow_build(st: Stage) -> StageData:
        clock[0] += 100.0
        return open_stage(st)

    t._open_stage = slow_build
    summary = t.train()
    assert [rec.metrics[s]["step_time_s"] for s in range(1, 7)] == [1.0] * 6
    assert summary["tokens_per_s"] == 4 * 8 / 1.0

class WarmingUp(ScriptedLoss):
    """A ScriptedLoss whose first forward (of this process: CUDA warmup, torch.compile) is slow."""

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.calls == 0:
            time.sleep(0.5)
        return super().forward(input_ids, targets)


def test_the_summary_throughput_is_the_per_step_metrics_without_the_first_step_and_the_saves(tmp_path: Path) -> None:
    """The summary's tokens_per_s measures the training steps as the per-step metric does: a slow first step
    (CUDA warmup, torch.compile) and the checkpoint saves were averaged into it (tokens / wall time)."""

    rec = Recorder()
    model = WarmingUp([2.0] * 4, accum=2)
    summary = _trainer(model, model, 4, _settings(), tmp_path=tmp_path, callbacks=[rec], every=2).train()
    later_s = sum(rec.metrics[s]["step_time_s"] for s in (2, 3, 4))
    assert summary["tokens_per_s"] == pytest.approx(3 * 4 * 8 / later_s)
    assert summary["tokens_per_s_per_gpu"] == summary["tokens_per_s"]


def test_the_summary_throughput_of_a_resumed_a_one_step_and_a_finished_run() -> None:
    """A resumed run leaves out its own first step (its process warms up again), a one-step run measures its one
    step, and a run resumed at its last step (nothing left to train) reports 0 instead of dividing by zero."""
    first = _trainer(ScriptedLoss([2.0] * 4, accum=2), ScriptedLoss([2.0] * 4, accum=2), 4, _settings())
    first.final_step = 2
    first.train()
    rec, model = Recorder(), WarmingUp([2.0] * 2, accum=2)
    resumed = _trainer(model, model, 4, _settings(), callbacks=[rec])
    resumed.load_state_dict(first.state_dict())
    summary = resumed.train()
    assert (summary["steps_this_run"], sorted(rec.metrics)) == (2, [3, 4])
    assert summary["tokens_per_s"] == pytest.approx(4 * 8 / rec.metrics[4]["step_time_s"])
    rec, model = Recorder(), ScriptedLoss([2.0], accum=2)
    one = _trainer(model, model, 1, _settings(), callbacks=[rec]).train()
    assert one["tokens_per_s"] == pytest.approx(rec.metrics[1]["tokens_per_s"])
    done = _trainer(ScriptedLoss([2.0] * 4, accum=2), ScriptedLoss([2.0] * 4, accum=2), 4, _settings())
    done.load_state_dict(resumed.state_dict())
    finished = done.train()
    assert (finished["steps_this_run"], finished["tokens_per_s"]) == (0, 0.0)


def test_tokens_per_s_per_gpu_divides_the_global_throughput_by_the_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLM360 publishes tokens/s/GPU: tokens_per_s counts the global batch of all ranks, the per-GPU figure
    divides it by the world size (metric and summary)."""
    monkeypatch.setattr("open360.train.trainer.all_reduce_mean", lambda value, env: value)  # rank 0 of 2
    rec = Recorder()
    model = ScriptedLoss([2.0] * 3, accum=1)
    trainer = _trainer(model, model, 3, _settings(), callbacks=[rec])
    trainer.env = DistEnv(rank=0, world_size=2)
    trainer.accum = trainer._accumulation_steps()
    summary = trainer.train()
    for m in rec.metrics.values():
        assert m["tokens_per_s"] == pytest.approx(4 * 8 / m["step_time_s"])
        assert m["tokens_per_s_per_gpu"] == pytest.approx(m["tokens_per_s"] / 2)
    assert summary["tokens_per_s_per_gpu"] == pytest.approx(summary["tokens_per_s"] / 2)


def test_batch_geometry_error() -> None:
    with pytest.raises(
        TrainingError, match=r"global_batch_size=10 must be a multiple of .*micro_batch_size=4"
    ):
        _settings(global_batch_size=10, micro_batch_size=4).accumulation_steps(1)


def test_grad_accumulation_matches_one_big_micro_batch() -> None:
    cfg = compose(["+experiment=amber_tiny", "model.n_layers=1", "model.max_seq_len=16"])
    results = []
    for micro in (8, 2):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        recorder = Recorder()
        trainer = _trainer(
            model,
            parallelize(model, DistEnv(), "ddp"),
            2,
            _settings(global_batch_size=8, micro_batch_size=micro, seq_len=16),
            callbacks=[recorder],
        )
        trainer.optimizer = build_optimizer(model, cfg.optim)
        summary = trainer.train()
        norms = [m["grad_norm"] for m in recorder.metrics.values()]
        results.append((summary["final_loss"], norms, {k: v.clone() for k, v in model.state_dict().items()}))
    (loss_a, norms_a, wa), (loss_b, norms_b, wb) = results
    assert math.isclose(loss_a, loss_b, rel_tol=1e-5)
    # the weights alone cannot tell: clipping and Adam undo a gradient scaled by the micro-batch count
    assert norms_b == pytest.approx(norms_a, rel=1e-5)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_state_dict_round_trip_continues_identically() -> None:
    fresh = _decoder_trainer

    full = fresh(6)
    full.train()
    first = fresh(6)
    first.final_step = 3
    first.train()
    state = first.state_dict()
    second = fresh(6)
    second.load_state_dict(state)
    assert second.progress.step == 3
    second.train()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    # every counter too (tokens_seen, the loss EMA that spike detection reads, the spike count): the resumed
    # run's trainer_state.json and metrics are the uninterrupted run's
    assert full.progress == second.progress and full.progress.loss_ema is not None
    assert full.state_dict()["trainer"] == second.state_dict()["trainer"]
    spiky = copy.deepcopy(state)
    spiky["trainer"]["loss_spikes"] = 2  # (no spike in 3 steps) a run that had logged two carries the count on
    third = fresh(6)
    random.random(), np.random.rand(), torch.rand(1)  # RNGs moved on since the save: the load puts them back
    third.load_state_dict(spiky)
    assert third.state_dict()["trainer"] == spiky["trainer"]
    saved_rng, now_rng = spiky["rng"]["ranks"][0], capture_rng_state()
    assert torch.equal(now_rng.pop("torch"), saved_rng["torch"])
    assert torch.equal(now_rng["numpy"].pop("keys"), saved_rng["numpy"]["keys"])
    assert now_rng == {k: v for k, v in saved_rng.items() if k != "torch"} | {
        "numpy": {k: v for k, v in saved_rng["numpy"].items() if k != "keys"}
    }


def test_only_the_writing_rank_computes_the_data_history_of_a_save(tmp_path: Path) -> None:
    """Past a first epoch a checkpoint's data history lists the ids seen (`seen_ids`: a permutation per epoch
    at LLM360 size); ranks without the writer take part in the collectives of a save, not in that."""
    calls: list[int] = []

    def counting(trainer: Trainer) -> Trainer:
        opened = trainer._open_stage

        def open_stage(st: Stage) -> StageData:
            data = opened(st)
            return StageData(data.order, data.chunk_end_steps, data.lineage, lambda n: calls.append(n) or {})

        trainer._open_stage = open_stage
        return trainer

    model = ScriptedLoss([2.0, 1.9, 1.8, 1.7], accum=2)
    counting(_trainer(model, model, steps=4, settings=_settings(), every=2)).train()  # no writer: not rank 0
    assert calls == []
    model = ScriptedLoss([2.0, 1.9, 1.8, 1.7], accum=2)
    counting(_trainer(model, model, steps=4, settings=_settings(), tmp_path=tmp_path, every=2)).train()
    assert calls == [2, 4]


def test_a_background_save_writes_the_weights_of_its_step_while_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background writer (every CUDA run) writes from a snapshot of the live parameters and optimizer
    state, not from tensors the next steps update in place: the write of step 2 starts only after step 3."""
    import threading

    import open360.checkpoint.writer as writer_module
    from open360.checkpoint import load_checkpoint

    real = writer_module.save_checkpoint
    weights = []
    for background in (False, True):
        stepped = threading.Event()

        class Step3(Callback):
            def on_step_end(self, step: int, metrics: dict[str, float], _done: Any = stepped) -> None:
                if step == 3:
                    _done.set()

        def after_step_3(parent: Path, step: int, contents: Any, _done: Any = stepped) -> Path:
            assert _done.wait(60)
            return real(parent, step, contents)

        monkeypatch.setattr(writer_module, "save_checkpoint", after_step_3)
        model = ScriptedLoss([2.0, 1.9, 1.8], accum=2)
        trainer = _trainer(model, model, steps=3, settings=_settings(), callbacks=[Step3()], every=2)
        if background:
            trainer.writer = CheckpointWriter(tmp_path / "bg", tmp_path / "rec", 1, background=True)
        else:  # written at once, before step 3 (the wait is for a step that has not run yet: none)
            monkeypatch.setattr(writer_module, "save_checkpoint", real)
            trainer.writer = CheckpointWriter(tmp_path / "fg", tmp_path / "rec", 1, background=False)
        trainer.train()
        weights.append(load_checkpoint(tmp_path / ("bg" if background else "fg") / "step_2").model["w"])
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[1], trainer.model.w.detach())  # step 3 did move the weights


def test_a_save_names_to_the_writer_the_tensors_training_writes_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background snapshot copies only the tensors in the storages training goes on writing and keeps the
    rest (FSDP/DDP's gathered CPU copies: 84 GB on rank 0 at 7B) as they are: a save must name those storages
    (every parameter and optimizer state tensor), else every tensor is copied again."""
    from open360.checkpoint.writer import storage_key

    given: list[Any] = []
    real, real_host_copy = CheckpointWriter.save, CheckpointWriter.host_copy

    def spy(self: CheckpointWriter, step: int, contents: Any, published: bool, live: Any = None) -> None:
        given.append(live)
        real(self, step, contents, published, live)

    def host_copy_spy(self: CheckpointWriter, live: Any) -> Any:  # the state is gathered into the writer's copy
        given.append(live)
        return real_host_copy(self, live)

    monkeypatch.setattr(CheckpointWriter, "save", spy)
    monkeypatch.setattr(CheckpointWriter, "host_copy", host_copy_spy)
    model = ScriptedLoss([2.0, 1.9, 1.8, 1.7], accum=2)
    trainer = _trainer(model, model, steps=4, settings=_settings(), tmp_path=tmp_path, every=2)
    trainer.train()
    state = [v for st in trainer.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert len(given) == 4 and given[0] is given[1] and given[2] is given[3] and state
    for live in given:
        assert isinstance(live, frozenset)
        assert {storage_key(t) for t in [*trainer.model.parameters(), *state]} <= live


def test_checkpoint_start_comes_before_the_folder_and_saved_after(tmp_path: Path) -> None:
    """`on_checkpoint_start` runs while the step's folder does not exist yet (what it persists is in place
    before a run can resume from the checkpoint); `on_checkpoint_saved` once it is complete."""
    events: list[tuple[str, int, bool]] = []

    class Order(Callback):
        def on_checkpoint_start(self, step: int, published: bool) -> None:
            events.append(("start", step, (tmp_path / "pub" / f"step_{step}").exists()))

        def on_checkpoint_saved(self, step: int, path: Path, published: bool) -> None:
            events.append(("saved", step, (path / "lineage.json").is_file()))

    model = ScriptedLoss([2.0, 1.9, 1.8, 1.7], accum=2)
    _trainer(model, model, steps=4, settings=_settings(), tmp_path=tmp_path, callbacks=[Order()], every=2).train()
    assert events == [("start", 2, False), ("saved", 2, True), ("start", 4, False), ("saved", 4, True)]


def test_a_step_0_checkpoint_and_changed_hyperparameters_on_resume() -> None:
    """Saving before the first step leaves training as it would have been (torch's state-dict helpers
    would otherwise run a zero-gradient step that starts Adam's step count at 1), a resume from it is
    identical too, and a resume keeps the optimizer moments but takes this config's hyperparameters."""
    fresh = _decoder_trainer
    full = fresh(6)
    full.train()
    zero = fresh(6)
    at_zero = copy.deepcopy(zero.state_dict())  # what a checkpoint at step 0 saves (not live tensors)
    assert at_zero["optimizer"]["state"] == {} and not zero.optimizer.state
    zero.train()
    resumed = fresh(6)
    resumed.load_state_dict(at_zero)
    assert not resumed.optimizer.state
    resumed.train()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, zero.model.state_dict()[k]) and torch.equal(v, resumed.model.state_dict()[k]), k

    first = fresh(6)
    first.final_step = 3
    first.train()
    changed = compose([*TINY, "optim.weight_decay=0.0", "optim.eps=1e-6", "optim.betas=[0.8,0.9]"]).optim
    other = fresh(6, changed)
    other.load_state_dict(first.state_dict())
    assert all(g["weight_decay"] == 0.0 or g["name"] in ("embedding", "norms_biases") for g in other.optimizer.param_groups)
    assert {g["betas"] for g in other.optimizer.param_groups} == {(0.8, 0.9)}
    assert all(g["eps"] == 1e-6 for g in other.optimizer.param_groups)
    assert other.optimizer.state  # the moments came along


def test_grad_clip_0_is_no_clipping() -> None:
    runs = []
    for clip in (0.0, 1e9):
        recorder = Recorder()
        t = _decoder_trainer(3, callbacks=[recorder], grad_clip=clip)
        t.train()
        runs.append((t.model.state_dict(), recorder.metrics))
    (a, ma), (b, mb) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["grad_norm"] for m in ma.values()] == [m["grad_norm"] for m in mb.values()]


@pytest.mark.parametrize(
    ("batch", "max_steps", "warned"),
    [
        (7, 100_000, ("more than one epoch", "not a multiple of the global batch (7)")),
        (4, 1, ("within its 20 warmup steps",)),
        (4, 30, ()),
    ],
)
def test_stage_data_warns_of_a_second_epoch_ragged_chunks_and_an_endless_warmup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], batch: int, max_steps: int, warned: tuple[str, ...]
) -> None:
    """A stage longer than its shards' epoch, and per-chunk checkpoints over chunks that are not batch
    multiples (a checkpoint would hold the next chunk's first sequences), and a stage that ends inside
    its warmup (its peak learning rate never reached) are said before training."""
    from open360.train.pipeline import ShardProvider
    from open360.train.schedules import build_stages

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: small\nsources:\n  - {name: s, type: jsonl, path: data_recipes/corpus/shakespeare.jsonl.gz, "
        "max_docs: 60}\ntokenizer: {kind: train, vocab_size: 300}\nseq_len: 16\nnum_chunks: 2\n"
        "chunk_multiple: 4\nvalidation: {fraction: 0.0, max_sequences: 0}\n"
    )
    cfg = compose(
        [
            "+experiment=amber_tiny",
            f"workspace={tmp_path}",
            "tracking=off",
            f"data.recipe={recipe}",
            "trainer.seq_len=16",
            "model.max_seq_len=16",
            f"trainer.global_batch_size={batch}",
            f"trainer.micro_batch_size={batch}",
            f"trainer.max_steps={max_steps}",
        ]
    )
    stage = build_stages(cfg)[0]
    data = ShardProvider(cfg, tmp_path, DistEnv()).open(stage)
    assert data.order.batch(0).shape == (batch, 17)
    err = capsys.readouterr().err
    warnings = ("more than one epoch", f"not a multiple of the global batch ({batch})", "within its 20 warmup steps")
    assert [w for w in warnings if w in err] == list(warned), err


def test_per_chunk_steps_are_global_and_each_has_seen_its_whole_chunk(tmp_path: Path) -> None:
    """The per-chunk checkpoints of a stage that starts at step S are S + its chunk ends (a later stage of a
    multi-stage run keeps its per-chunk checkpoints), and with chunks that are not batch multiples each
    such checkpoint has seen all of its chunk (LLM360: checkpoint N has seen chunks 0..N)."""
    import dataclasses

    from open360.train.pipeline import ShardProvider
    from open360.train.schedules import build_stages

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: small\nsources:\n  - {name: s, type: jsonl, path: data_recipes/corpus/shakespeare.jsonl.gz, "
        "max_docs: 60}\ntokenizer: {kind: train, vocab_size: 300}\nseq_len: 16\nnum_chunks: 2\n"
        "chunk_multiple: 4\nvalidation: {fraction: 0.0, max_sequences: 0}\n"
    )
    batch = 7  # chunks are multiples of 4: ragged against the batch
    cfg = compose(
        [
            "+experiment=amber_tiny", f"workspace={tmp_path}", "tracking=off", f"data.recipe={recipe}",
            "trainer.seq_len=16", "model.max_seq_len=16", f"trainer.global_batch_size={batch}",
            f"trainer.micro_batch_size={batch}", "trainer.max_steps=100000",
        ]
    )
    stage = build_stages(cfg)[0]
    provider = ShardProvider(cfg, tmp_path, DistEnv())
    first = provider.open(stage)
    shards = first.order.shards
    assert any(n % batch for n in shards.chunk_sizes)
    ends = first.chunk_end_steps
    assert len(ends) == len(shards.chunk_sizes) and ends == sorted(ends)
    bounds = np.cumsum(shards.chunk_sizes)
    for k, step in enumerate(ends):
        seen = first.order.seen_ids(step)
        assert len(seen) >= bounds[k] or step == first.order.steps_per_epoch, (k, step)  # all of chunk k
        assert len(first.order.seen_ids(step - 1)) < bounds[k], (k, step)  # the first step that has
    later = provider.open(dataclasses.replace(stage, index=1, start=50))
    assert later.chunk_end_steps == [50 + s for s in ends]


def test_a_resume_from_step_0_leaves_that_checkpoint_as_it_was(tmp_path: Path) -> None:
    """A log-spaced cadence publishes step 0; a run resumed from it must not write step 0 again (its
    lineage would name itself as what it resumed from, and a published record would change)."""
    from open360.checkpoint import load_checkpoint

    def trainer(steps: int) -> Trainer:
        model = ScriptedLoss([2.0, 1.9, 1.8, 1.7], accum=2)
        t = _trainer(model, model, steps=steps, settings=_settings(), tmp_path=tmp_path)
        t.cadence = CadencePolicy("log_spaced", every=2, save_final=False)
        t.lineage_base = {"resumed_from": "previous run"} if steps > 1 else {}
        return t

    first = trainer(1)
    first.final_step = 0
    first.train()
    step0 = tmp_path / "pub" / "step_0"
    before = {p.name: p.read_bytes() for p in step0.iterdir()}
    contents = load_checkpoint(step0)
    resumed = trainer(2)
    resumed.load_state_dict(
        {"model": contents.model, "optimizer": contents.optimizer, "trainer": contents.trainer_state,
         "rng": contents.rng, "checkpoint_dir": step0}
    )
    resumed.train()
    assert {p.name: p.read_bytes() for p in step0.iterdir()} == before
    assert [s for s, _ in list_checkpoints(tmp_path / "pub")] == [0, 1, 2]


def test_every_callback_ends_even_when_a_signal_interrupts_one() -> None:
    """A SIGTERM while one callback drains its queue (DVC) still lets the others end (MLflow closes its
    run); the interrupt is raised after them."""
    from open360.train.pipeline import end_callbacks

    ended: list[str] = []

    class Draining(Callback):
        def on_run_end(self, summary: dict[str, Any]) -> None:
            ended.append("dvc")
            raise KeyboardInterrupt("signal 15")

    class Closing(Callback):
        def on_run_end(self, summary: dict[str, Any]) -> None:
            ended.append(f"mlflow:{summary['status']}")

    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        end_callbacks([Draining(), Closing()], {"status": "finished"})
    assert ended == ["dvc", "mlflow:finished"]


def test_a_signal_during_the_callbacks_start_ends_the_ones_started_as_interrupted() -> None:
    """Ctrl-C or SIGTERM while a callback starts (a long DVC catch-up, a slow MLflow server): the ones already
    started, and that one, end the run as interrupted (their workers drained, their runs closed), and the
    interrupt goes on. A second signal while one of them ends does not stop the others from ending, nor
    replace the first error."""
    from types import SimpleNamespace

    from open360.train.pipeline import start_callbacks

    ended: list[tuple[str, str]] = []

    class Ends(Callback):
        def __init__(self, name: str, start: BaseException | None = None, end: BaseException | None = None) -> None:
            self.name, self.start, self.end = name, start, end

        def on_run_start(self, info: Any) -> None:
            if self.start is not None:
                raise self.start

        def on_run_end(self, summary: dict[str, Any]) -> None:
            ended.append((self.name, summary["status"]))
            if self.end is not None:
                raise self.end

    info = SimpleNamespace(run_name="r", start_step=4)
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        start_callbacks([Ends("dvc"), Ends("mlflow", start=KeyboardInterrupt("signal 15")), Ends("later")], info)
    assert ended == [("dvc", "interrupted"), ("mlflow", "interrupted")]
    ended.clear()
    try:  # a KeyboardInterrupt escaping here would end pytest's session, not fail this test
        start_callbacks([Ends("dvc", end=KeyboardInterrupt("second signal")), Ends("mlflow"),
                         Ends("fails", start=RuntimeError("refused"))], info)
    except BaseException as err:  # noqa: BLE001
        raised: BaseException | None = err
    else:
        raised = None
    assert type(raised) is RuntimeError and str(raised) == "refused", repr(raised)
    assert ended == [("dvc", "failed"), ("mlflow", "failed"), ("fails", "failed")]


def test_a_next_stage_that_fails_to_open_keeps_the_step_and_checkpoint_that_end_the_stage_before(
    tmp_path: Path,
) -> None:
    """The next stage's data opens (builds its shards) at its own first step, not while the stage before
    still has its last step and its end-of-stage checkpoint to go: a failure there loses neither."""
    t = _decoder_trainer(6)
    t.stages = [Stage(i, name, "r.yaml", 3 * i, 3, 1e-3, Schedule("constant", 3)) for i, name in enumerate("ab")]
    t.final_step = 6

    def open_stage(st: Stage) -> StageData:
        if st.index == 1:
            raise TrainingError("stage 'b': its shards could not be built")
        lineage = {"stage": st.name, "manifest_hash": "m", "tokenizer_hash": "t"}
        return StageData(SyntheticOrder(4, 16, 64), [], lineage, lambda n: {})

    t._open_stage = open_stage
    t.writer = CheckpointWriter(tmp_path / "pub", tmp_path / "rec", 1, background=False)
    t.cadence = CadencePolicy("every_n", every=3, save_final=False)
    with pytest.raises(TrainingError, match="stage 'b'"):
        t.train()
    assert t.progress.step == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "pub")] == [3]


def _two_stage_trainer(tmp_path: Path, tokenizers: str, warm_start: str = "") -> Trainer:
    """Stages 'a' and 'b' of 3 steps each whose shards carry the tokenizer hashes `tokenizers[0]`, `[1]`;
    `warm_start`: the tokenizer hashes of the data the initial weights were trained on, one stage each, in order
    (none: from scratch)."""
    stages = [Stage(i, name, "r.yaml", 3 * i, 3, 1e-3, Schedule("constant", 3)) for i, name in enumerate("ab")]
    model = ScriptedLoss([2.0] * 6, accum=2)
    t = _trainer(model, model, 6, _settings(), tmp_path, every=3, stages=stages)
    if warm_start:
        t.lineage_base["init_from"] = {"checkpoint": "base/step_9", "data_history": [
            {"stage": "main", "shard_dir": "shards/base"},
            *({"stage": f"more{i}", "tokenizer_hash": tok * 64} for i, tok in enumerate(warm_start))]}

    def open_stage(st: Stage) -> StageData:
        lineage = {"stage": st.name, "shard_dir": f"shards/{st.name}", "manifest_hash": st.name,
                   "tokenizer_hash": tokenizers[st.index] * 64}
        return StageData(SyntheticOrder(4, 8, 64), [], lineage, lambda n: {"count": 4 * n})

    t._open_stage = open_stage
    return t


def test_a_stage_whose_shards_have_another_tokenizer_is_refused_when_it_opens(tmp_path: Path) -> None:
    """A stage recipe that trains its own tokenizer on other sources (a code-only stage 3) gives other token
    ids for the same text: the model, trained on the first stage's, must not go on reading them silently."""
    t = _two_stage_trainer(tmp_path / "other", "tu")
    with pytest.raises(TrainingError, match=r"stage 'b' reads shards/b tokenized with tokenizer u{12}, stage 'a'"):
        t.train()
    assert t.progress.step == 3 and [s for s, _ in list_checkpoints(tmp_path / "other" / "pub")] == [3]
    same = _two_stage_trainer(tmp_path / "same", "tt")
    same.train()
    assert same.progress.step == 6


def test_a_resume_into_a_stage_of_another_tokenizer_than_the_finished_stages_is_refused(tmp_path: Path) -> None:
    first = _two_stage_trainer(tmp_path, "tt")
    first.final_step = 4
    first.train()
    state = first.state_dict()
    assert [h["tokenizer_hash"][0] for h in state["trainer"]["data_history"]] == ["t", "t"]
    state["trainer"]["data_history"][0]["tokenizer_hash"] = "v" * 64  # stage 'a' was trained on another one
    with pytest.raises(TrainingError, match=r"stage 'b' reads shards/b tokenized with tokenizer t{12}, stage 'a'"):
        _two_stage_trainer(tmp_path / "resumed", "tt").load_state_dict(state)
    del state["trainer"]["data_history"][0]["tokenizer_hash"]  # a stage that recorded none: nothing to compare
    _two_stage_trainer(tmp_path / "unrecorded", "tt").load_state_dict(state)


def test_a_warm_start_onto_shards_of_another_tokenizer_is_refused(tmp_path: Path) -> None:
    """trainer.init_from: the weights learned the base run's token ids; shards of another tokenizer (of the same
    vocabulary size, so the architecture check passes) would be read as other tokens."""
    other = _two_stage_trainer(tmp_path / "other", "tt", warm_start="v")
    with pytest.raises(TrainingError, match=r"stage 'a' reads shards/a tokenized with tokenizer t{12}, the warm start "
                                            r"base/step_9 trained with v{12}"):
        other.train()
    assert other.progress.step == 0
    same = _two_stage_trainer(tmp_path / "same", "tt", warm_start="t")
    same.train()
    assert same.progress.step == 6


def test_a_warm_start_is_checked_against_the_tokenizer_its_weights_last_trained_with(tmp_path: Path) -> None:
    """A base whose own history holds two tokenizers (written before such runs were refused: a warm start onto
    other shards, a stage that retrained its BPE) last trained on `t`: a warm start onto `t` shards continues it,
    one onto the base's first tokenizer `v` is refused naming the base's last one (was: every warm start refused,
    blaming the base's own shard folder as one this run reads)."""
    same = _two_stage_trainer(tmp_path / "same", "tt", warm_start="vt")
    same.train()
    assert same.progress.step == 6
    other = _two_stage_trainer(tmp_path / "other", "vv", warm_start="vt")
    with pytest.raises(TrainingError, match=r"stage 'a' reads shards/a tokenized with tokenizer v{12}, the warm start "
                                            r"base/step_9 trained with t{12}"):
        other.train()


def test_lineages_without_a_tokenizer_hash_are_not_compared(tmp_path: Path) -> None:
    """A warm start from, or a resume of, a checkpoint whose lineage predates tokenizer hashes trains on: there
    is nothing to compare (was: a KeyError if such an entry came first)."""
    warm = _two_stage_trainer(tmp_path / "warm", "tt")
    warm.lineage_base["init_from"] = {"checkpoint": "old/step_9", "data_history": [{"stage": "main"}]}
    warm.train()
    assert warm.progress.step == 6
    first = _two_stage_trainer(tmp_path / "first", "tt")
    first.final_step = 4
    first.train()
    state = first.state_dict()
    del state["trainer"]["data_history"][0]["tokenizer_hash"]  # stage 'a' written by an older open360
    resumed = _two_stage_trainer(tmp_path / "resumed", "tt")
    resumed.load_state_dict(state)
    resumed.train()
    assert resumed.progress.step == 6


def test_a_fresh_optimizer_stage_steps_as_a_new_optimizer_would_also_when_resumed() -> None:
    """`fresh_optimizer` (CrystalCoder's phase 3): at the stage's first step AdamW's moments and step count
    start over, bitwise as a newly built optimizer's would; a resume from the checkpoint that ends the stage
    before restarts them too, a resume inside the stage does not."""

    def two_stages(fresh: bool, final_step: int = 6) -> Trainer:
        t = _decoder_trainer(6)
        t.stages = [Stage(i, name, "r.yaml", 3 * i, 3, 1e-3, Schedule("linear", 3, 1), fresh and i == 1)
                    for i, name in enumerate("ab")]
        t.final_step = final_step
        return t

    full = two_stages(fresh=True)
    full.train()
    assert {int(st["step"]) for st in full.optimizer.state.values()} == {3}  # stage b's steps only

    class NewOptimizer(Callback):  # the reference: a newly built optimizer after stage a's last step
        def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
            if step == 3:
                reference.optimizer = build_optimizer(reference.model, compose(TINY).optim)

    reference = two_stages(fresh=False)
    reference.callbacks = [NewOptimizer()]
    reference.train()
    carried = two_stages(fresh=False)
    carried.train()
    weights = full.model.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in reference.model.state_dict().items())
    assert not all(torch.equal(v, weights[k]) for k, v in carried.model.state_dict().items())
    for stop in (3, 4):  # at the boundary checkpoint, and inside the fresh stage
        first = two_stages(fresh=True, final_step=stop)
        first.train()
        resumed = two_stages(fresh=True)
        resumed.load_state_dict(first.state_dict())
        resumed.train()
        assert all(torch.equal(v, weights[k]) for k, v in resumed.model.state_dict().items()), stop


def test_a_resume_that_flips_fresh_optimizer_of_a_begun_stage_is_refused(tmp_path: Path) -> None:
    """`fresh_optimizer` acts at the stage's first step: a resume from inside the stage with the flag flipped
    cannot restart (or un-restart) what has already run, and its checkpoints would record the flipped config
    as the run's; refused, naming the key. From the checkpoint that ends the stage before, the flag still acts."""
    from omegaconf import OmegaConf

    from open360.checkpoint import CheckpointError
    from open360.train.pipeline import resume

    def two_stages(fresh: bool, folder: Path) -> Trainer:
        t = _decoder_trainer(6)
        t.stages = [Stage(i, name, "r.yaml", 3 * i, 3, 1e-3, Schedule("linear", 3, 1), fresh and i == 1)
                    for i, name in enumerate("ab")]
        t.writer = CheckpointWriter(folder / "pub", folder / "rec", 1, background=False)
        t.cadence = CadencePolicy("every_n", every=1, save_final=False)
        cfg = OmegaConf.to_container(compose(TINY))
        cfg["stages"] = [{"name": name, "steps": 3, "fresh_optimizer": fresh and name == "b"} for name in "ab"]
        t.config_yaml = OmegaConf.to_yaml(cfg)
        return t

    first = two_stages(False, tmp_path / "first")
    first.final_step = 4
    first.train()
    ckpts = dict(list_checkpoints(tmp_path / "first" / "pub"))
    flipped = two_stages(True, tmp_path / "flipped")
    with pytest.raises(CheckpointError, match=r"stage 'b' began at step 3 without a fresh optimizer state, the "
                                              r"config now sets stages.1.fresh_optimizer=True"):
        resume(flipped, ckpts[4])
    assert flipped.progress.step == 0
    same = two_stages(False, tmp_path / "same")
    resume(same, ckpts[4])
    same.train()
    assert {int(st["step"]) for st in same.optimizer.state.values()} == {6}
    at_boundary = two_stages(True, tmp_path / "boundary")
    resume(at_boundary, ckpts[3])
    at_boundary.train()
    assert {int(st["step"]) for st in at_boundary.optimizer.state.values()} == {3}
