"""The memory check before a run: what every process on this machine holds, against its RAM."""

from __future__ import annotations

import os

import pytest

from open360.config import compose
from open360.train.resources import GIB, ResourceError, check_resources, training_memory_gib


@pytest.mark.parametrize(("mode", "fits"), [("ddp", False), ("fsdp", True)])
def test_cpu_check_counts_every_local_process(monkeypatch: pytest.MonkeyPatch, mode: str, fits: bool) -> None:
    """Two DDP processes on one CPU host hold two full replicas; FSDP's two hold one between them."""
    cfg = compose(["+experiment=amber_tiny", "trainer.device=cpu", f"trainer.distributed={mode}"])
    ram = 1.5 * training_memory_gib(cfg) * GIB  # one replica fits, two do not
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
