"""The memory check before a run: what every process on this machine holds, against its RAM."""

from __future__ import annotations

import os

import pytest

from open360.config import compose
from open360.models.flops import count_parameters
from open360.train.resources import GIB, ResourceError, check_resources


@pytest.mark.parametrize(("mode", "fits"), [("ddp", False), ("fsdp", True)])
def test_cpu_check_counts_every_local_process(monkeypatch: pytest.MonkeyPatch, mode: str, fits: bool) -> None:
    """Two DDP processes on one CPU host hold two full replicas; FSDP's two hold one between them."""
    cfg = compose(["+experiment=amber_tiny", "trainer.device=cpu", f"trainer.distributed={mode}"])
    ram = 1.5 * 16 * count_parameters(cfg.model)  # one fp32 replica with its AdamW states fits, two do not
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": ram}[name])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if fits:
        assert check_resources(cfg) == "cpu"
    else:
        with pytest.raises(ResourceError, match=r"2 process\(es\)"):
            check_resources(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert check_resources(cfg) == "cpu"


def test_more_processes_per_machine_than_gpus_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc-per-node 4 on a 2-GPU machine: said before any work, not torch's "invalid device
    ordinal" from the third process."""
    import torch

    cfg = compose(["+experiment=amber_tiny", "trainer.device=cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 80 * GIB}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ResourceError, match=r"started 4 processes on this machine .* but it has 2 visible GPU"):
        check_resources(cfg)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines of two
    assert check_resources(cfg) == "cuda"


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int, gib: float) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": gib * GIB}))
    monkeypatch.setenv("WORLD_SIZE", str(count))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(count))
    monkeypatch.setattr("open360.train.resources.free_bytes", lambda path: (path, 2**60))  # a 7B checkpoint fits


def test_megatron_data_parallel_keeps_a_replica_of_the_weights_and_grads_on_each_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AMBER 7B on 8 GPUs, TP = PP = 1: megatron's distributed optimizer shards only the fp32 master copy and
    moments over the 8 data-parallel ranks; each GPU holds all bf16 weights (2 B) and fp32 grads (4 B): 6.74e9 x
    (6 + 12/8) bytes = 47 GiB, which 24 GiB GPUs cannot hold (16 bytes/parameter over 8 GPUs would be 12.5 GiB)."""
    _gpus(monkeypatch, 8, 24)
    cfg = compose(["+experiment=amber", "trainer=megatron"])
    with pytest.raises(ResourceError, match=r"about 47 GiB on each GPU .*7.5 bytes/parameter.*data-parallel 8"):
        check_resources(cfg)
    _gpus(monkeypatch, 8, 80)
    assert check_resources(cfg) == "cuda"
    _gpus(monkeypatch, 8, 24)  # TP 4 x DP 2: (6 + 12/2) / 4 = 3 bytes/parameter, 19 GiB
    assert check_resources(compose(["+experiment=amber", "trainer=megatron", "trainer.tensor_parallel=4"])) == "cuda"


@pytest.mark.parametrize(("mode", "gib", "fits"), [("ddp", 120, False), ("ddp", 141, True), ("fsdp", 16, True)])
def test_gpu_check_counts_ddp_buckets_and_fsdp_shards(
    monkeypatch: pytest.MonkeyPatch, mode: str, gib: float, fits: bool
) -> None:
    """DDP keeps a full replica and, beside its gradients, its all-reduce buckets (20 bytes/parameter: 126 GiB
    for AMBER 7B) on each GPU; FSDP a 1/8 share of 16 bytes/parameter (12.5 GiB)."""
    _gpus(monkeypatch, 8, gib)
    cfg = compose(["+experiment=amber", f"trainer.distributed={mode}"])
    if fits:
        assert check_resources(cfg) == "cuda"
    else:
        with pytest.raises(ResourceError, match=r"about 126 GiB on each GPU .*20 bytes/parameter"):
            check_resources(cfg)


@pytest.mark.parametrize(
    ("overrides", "world", "per_param"),
    [
        ([], 1, 16),  # one process: fp32 weights, grads, two moments
        (["trainer.distributed=fsdp"], 1, 16),
        (["trainer.distributed=fsdp"], 4, 4),  # a 1/4 share
        (["trainer.distributed=ddp"], 4, 20),  # a replica and its all-reduce buckets
        (["trainer=megatron", "trainer.tensor_parallel=2", "trainer.pipeline_parallel=2"], 8, 3),  # (6 + 12/2) / 4
        (["trainer=megatron", "trainer.pipeline_parallel=2"], 8, 4.5),  # (6 + 12/4) / 2: PP splits like TP
        (["trainer=megatron", "trainer.precision=fp32"], 8, 9),  # fp32 weights and grads (8) + moments (8) / 8
        (["trainer=megatron", "trainer.tensor_parallel=2", "trainer.pipeline_parallel=2"], 2, 4.5),  # DP at least 1
    ],
)
def test_bytes_per_param_of_each_layout(overrides: list[str], world: int, per_param: float) -> None:
    from open360.train.resources import bytes_per_param

    got, layout = bytes_per_param(compose(["+experiment=amber", *overrides]), world)
    assert got == pytest.approx(per_param) and layout


def test_a_workspace_that_cannot_hold_one_checkpoint_is_refused_and_a_short_one_is_warned_of(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Free space below one checkpoint (12 bytes/parameter: fp32 weights and AdamW's two moments) is refused
    before anything is built, naming the workspace; room for some but not all of the cadence's checkpoints
    is a warning at the start (the save that does not fit stops the run cleanly); the run still trains."""
    import collections
    import shutil

    from open360.train import resources
    from open360.train.pipeline import run_training

    overrides = ["+experiment=amber_tiny", f"workspace={tmp_path / 'ws' / 'new'}", "model.d_model=64",
                 "model.n_layers=2", "model.ffn_dim=128", "trainer.max_steps=4", "checkpoint=every_n",
                 "checkpoint.every=1", "tracking.dvc=false", "tracking.mlflow=false", "trainer.progress_bar=false",
                 f"data.shards_dir={tmp_path / 'shards'}"]
    cfg = compose(overrides)
    one = count_parameters(cfg.model) * 12
    usage = collections.namedtuple("usage", "total used free")
    seen: list[str] = []

    def disk_usage(path):
        seen.append(str(path))
        return usage(10 * one, 0, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    free = one - 1
    with pytest.raises(ResourceError, match=r"ws/new: its filesystem \(.*\) has .* GiB free, but one checkpoint"):
        check_resources(cfg)
    assert seen == [str(tmp_path)] and not (tmp_path / "ws").exists()  # the nearest folder that exists
    free = 3 * one  # 4 published + 1 recovery checkpoint do not fit; 1 does
    assert check_resources(cfg) == "cpu"
    assert "4 more published checkpoint(s) and keeps 1 for recovery" in resources.disk_space_warning(cfg, 4)
    assert "3 more published checkpoint(s) and keeps 1" in resources.disk_space_warning(cfg, 3)  # 4 > 3 fit
    assert resources.disk_space_warning(cfg, 2) is None
    run_training(cfg, device="cpu")
    assert "warning: the cadence writes 4 more published checkpoint(s)" in capsys.readouterr().err
    free = 3 * one  # resumed at step 4: steps 5 and 6 to come, and 1 recovery checkpoint, fit
    run_training(compose([*overrides, "trainer.max_steps=6", "trainer.resume=auto"]), device="cpu")
    assert "warning: the cadence" not in capsys.readouterr().err
    monkeypatch.setattr(shutil, "disk_usage", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
    assert check_resources(cfg) == "cpu" and resources.disk_space_warning(cfg, 4) is None  # unreadable: not checked
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    free = 0  # a run that saves nothing needs no room for checkpoints
    check_resources(compose([*overrides, "checkpoint=list", "checkpoint.steps=[]", "checkpoint.save_final=false",
                             "checkpoint.ephemeral_every=0"]))


@pytest.mark.parametrize("saves", [["checkpoint.steps=[2]", "checkpoint.save_final=false", "checkpoint.ephemeral_every=0"],
                                   ["checkpoint.steps=[]", "checkpoint.save_final=true", "checkpoint.ephemeral_every=0"],
                                   ["checkpoint.steps=[]", "checkpoint.save_final=false", "checkpoint.ephemeral_every=2"]])
def test_a_run_that_saves_any_checkpoint_needs_room_for_one(
    tmp_path, monkeypatch: pytest.MonkeyPatch, saves: list[str]
) -> None:
    """A listed step, the final save or a recovery checkpoint alone needs room for one checkpoint: less is
    refused, exactly one fits."""
    cfg = compose(["+experiment=amber_tiny", f"workspace={tmp_path}", "model.d_model=64", "model.n_layers=2",
                   "model.ffn_dim=128", "trainer.max_steps=4", "checkpoint=list", *saves])
    one = count_parameters(cfg.model) * 12
    for free, refused in ((one - 1, True), (one, False)):
        monkeypatch.setattr("open360.train.resources.free_bytes", lambda path, free=free: (path, free))
        if refused:
            with pytest.raises(ResourceError, match="but one checkpoint"):
                check_resources(cfg)
        else:
            assert check_resources(cfg) == "cpu"


def test_pipeline_stages_hold_the_embedding_and_the_output_layer_at_their_ends() -> None:
    """Megatron's PP split: n_layers / pp blocks per stage, the input embedding on the first, the final norm and
    output layer on the last (its own copy of a tied embedding): AMBER 7B's end stages hold ~4% more than the
    average at PP=4, so the memory check sizes the GPU of the largest stage, not the average."""
    from open360.models.flops import pipeline_stage_parameters
    from open360.train.resources import bytes_per_param

    amber, crystal = compose(["+experiment=amber"]).model, compose(["+experiment=crystalcoder"]).model
    stages = pipeline_stage_parameters(amber, 4)
    embedding = amber.vocab_size * amber.d_model
    assert sum(stages) == count_parameters(amber) and stages[1] == stages[2]
    assert stages[0] - stages[1] == embedding and stages[3] - stages[1] == embedding + amber.d_model  # + final norm
    assert pipeline_stage_parameters(amber, 1) == [count_parameters(amber)]
    tied = pipeline_stage_parameters(crystal, 2)  # the last stage's copy of the tied embedding is extra
    assert sum(tied) == count_parameters(crystal) + crystal.vocab_size * crystal.d_model
    per_param, layout = bytes_per_param(compose(["+experiment=amber", "trainer=megatron",
                                                 "trainer.pipeline_parallel=4"]), 8)
    assert per_param == pytest.approx((6 + 12 / 2) * max(stages) / count_parameters(amber))
    assert 1.03 < per_param / ((6 + 12 / 2) / 4) < 1.05 and "largest stage" in layout
