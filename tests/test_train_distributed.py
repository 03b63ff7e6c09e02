"""Native backend under torchrun on CPU (gloo): DDP and FSDP2 match a single-process run's training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from open360.checkpoint import list_checkpoints, load_checkpoint
from open360.paths import REPO_ROOT
from tests.fakes import SyntheticOrder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
OVERRIDES = (
    "+experiment=amber_tiny",
    "tracking=off",
    "trainer.max_steps=4",
    "model.n_layers=2",
    "checkpoint.policy=every_n",
    "checkpoint.every=4",
)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DDP_EVERY_2 = ("checkpoint.every=2", "trainer.distributed=ddp")  # published steps 2 and 4


@pytest.fixture(scope="module")
def shards_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shards folder for every trainer run of the session (build_shards reuses matching builds)."""
    path = tmp_path_factory.getbasetemp() / "train_shards"
    path.mkdir(exist_ok=True)
    return path


def _run(launcher: list[str], ws: Path, shards_root: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [
            *launcher,
            "-m",
            "open360.train",
            *OVERRIDES,
            f"workspace={ws}",
            f"data.shards_dir={shards_root}",
            *extra,
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    step, path = list_checkpoints(ws / "checkpoints" / "amber_tiny")[-1]
    assert step == 4
    return {"ckpt": load_checkpoint(path), "stdout": proc.stdout}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, shards_root: Path) -> dict:
    """The one-process reference run (global batch 16 as 2 micro-batches of 8)."""
    return _run([sys.executable], tmp_path_factory.mktemp("single"), shards_root)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_data_parallel_matches_one_process(
    tmp_path: Path, shards_root: Path, single: dict, mode: str
) -> None:
    multi = _run(TORCHRUN, tmp_path / mode, shards_root, f"trainer.distributed={mode}")
    a, b = single["ckpt"], multi["ckpt"]
    assert b.trainer_state["world_size"] == 2 and a.trainer_state["world_size"] == 1
    assert b.trainer_state["loss"] == pytest.approx(a.trainer_state["loss"], rel=1e-4)
    assert a.model.keys() == b.model.keys()
    for name in a.model:
        torch.testing.assert_close(b.model[name], a.model[name], rtol=1e-3, atol=1e-5, msg=name)
    # the optimizer state is keyed by parameter name, so it is portable across world sizes
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    assert len(b.rng["ranks"]) == 2


@pytest.fixture(scope="module")
def ddp_whole(tmp_path_factory: pytest.TempPathFactory, shards_root: Path) -> tuple[Path, dict]:
    """A two-rank DDP run of 4 steps publishing steps 2 and 4: its workspace and step 4."""
    ws = tmp_path_factory.mktemp("ddp_whole")
    return ws, _run(TORCHRUN, ws, shards_root, *DDP_EVERY_2)


@pytest.mark.parametrize("resumed_world", [2, 1])
def test_a_ddp_run_resumed_from_a_checkpoint_ends_bit_identical(
    tmp_path: Path, shards_root: Path, ddp_whole: tuple[Path, dict], resumed_world: int
) -> None:
    """Two ranks stopped after the checkpoint of step 2 (its folder is all a kill leaves) and resumed with
    resume=auto, on two ranks or on one (the same micro-batches of 8, accumulated there): step 4's weights,
    optimizer state and trainer state are those of the run that was not stopped, bit for bit."""
    whole_ws, whole = ddp_whole
    run_dir = tmp_path / "checkpoints" / "amber_tiny"
    run_dir.mkdir(parents=True)
    shutil.copytree(whole_ws / "checkpoints" / "amber_tiny" / "step_2", run_dir / "step_2")
    launcher = TORCHRUN if resumed_world == 2 else [sys.executable]
    resumed = _run(launcher, tmp_path, shards_root, *DDP_EVERY_2, "trainer.resume=auto")
    a, b = whole["ckpt"], resumed["ckpt"]
    assert b.lineage["resumed_from"]["step"] == 2
    assert a.model.keys() == b.model.keys()
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    for name, moments in a.optimizer["state"].items():
        for key, value in moments.items():
            assert torch.equal(b.optimizer["state"][name][key], value), (name, key)
    assert {**a.trainer_state, "world_size": resumed_world} == b.trainer_state
    assert b.lineage["data"]["sequences_seen"] == {"count": 64, "min_id": 0, "max_id": 63, "contiguous": True,
                                                    "epochs": 1}


@pytest.mark.parametrize(("dtype", "param_dtype"), [(torch.bfloat16, torch.bfloat16), (None, None)])
def test_fsdp_on_gpu_computes_in_the_configured_precision(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype | None, param_dtype: torch.dtype | None
) -> None:
    """FSDP2's mixed-precision policy follows trainer.precision: an fp32 run is not cast to bf16 (DDP is not)."""
    import torch.distributed.fsdp as fsdp

    from open360.backends.native import DistEnv, parallelize
    from open360.config import compose
    from open360.models import build_model

    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: policies.append(kw.get("mp_policy")))
    model = build_model(compose(["+experiment=amber_tiny", "model.n_layers=1"]).model)
    parallelize(model, DistEnv(rank=0, world_size=2, device=torch.device("cuda", 0)), "fsdp", dtype)
    assert len(policies) == 2
    assert all((p.param_dtype if p else None) == param_dtype for p in policies)
    assert all(p.reduce_dtype == torch.float32 for p in policies if p)


def _wait_at_barrier(rank: int, port: int, delay_s: float, out: str, wait: str) -> None:
    """One rank of a two-process gloo job whose training group times out after 2 s; rank 0 is late.
    `wait`: "barrier" (the others wait for its shard build) or "first_error" (for its checkpoint hashing)."""
    from datetime import timedelta

    import torch.distributed as dist

    from open360.backends.native import barrier, first_error, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", timeout=timedelta(seconds=2))
    env = init_distributed("cpu")
    if rank == 0:
        time.sleep(delay_s)  # building a stage's shards, pulling them, hashing a resume checkpoint
    if wait == "barrier":
        barrier(env)
    else:
        assert first_error(env, "rank 0 failed" if rank == 0 else None) == "rank 0 failed"
    (Path(out) / f"rank{rank}").touch()
    dist.destroy_process_group()


@pytest.mark.parametrize("wait", ["barrier", "first_error"])
def test_ranks_wait_for_rank_0s_host_work_longer_than_the_training_groups_timeout(tmp_path: Path, wait: str) -> None:
    """Rank 0 builds a stage's shards (hours at scale) while the others wait at `barrier`, or each node's local
    rank 0 hashes the resume checkpoint (84 GB at 7B, read by every node at once) while the others wait for its
    verdict in `first_error`: the wait is not bounded by the training group's timeout (30 minutes), which would
    stop the job."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_wait_at_barrier, args=(port, 5.0, str(tmp_path), wait), nprocs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]


def _train_three_steps(rank: int, world: int, port: int, mode: str, tied: bool, out: str) -> None:
    """Three clipped steps of a 1-layer amber_tiny, global batch 8 in micro-batches of 2: 4 accumulation
    micro-batches in one process, 2 per rank in two. Rank 0 saves every step's metrics and the weights."""
    import torch.distributed as dist

    from open360.backends.native import full_state, init_distributed, parallelize
    from open360.checkpoint import CadencePolicy
    from open360.config import compose
    from open360.models import build_model
    from open360.train.callbacks import Callback
    from open360.train.optim import build_optimizer
    from open360.train.schedules import Schedule, Stage
    from open360.train.trainer import StageData, Trainer, TrainerSettings

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
    env = init_distributed("cpu")
    cfg = compose(["+experiment=amber_tiny", "model.n_layers=1", "model.max_seq_len=16",
                   f"model.tie_embeddings={tied}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    module = parallelize(model, env, mode)
    settings = TrainerSettings(global_batch_size=8, micro_batch_size=2, seq_len=16, grad_clip=0.05,
                               autocast_dtype=None, progress_bar=False, log_every=100)
    stage = Stage(0, "main", "r.yaml", 0, 3, 1e-3, Schedule("constant", 3))
    metrics: dict[int, dict[str, float]] = {}

    class Record(Callback):
        def on_step_end(self, step: int, m: dict[str, float]) -> None:
            metrics[step] = {"loss": m["loss"], "grad_norm": m["grad_norm"]}

    order = SyntheticOrder(8, 16, 4096, starts=4096)
    trainer = Trainer(
        model=model, module=module, optimizer=build_optimizer(model, cfg.optim), stages=[stage],
        settings=settings, env=env,
        open_stage=lambda st: StageData(order, [], {"stage": st.name}, lambda n: {}),
        cadence=CadencePolicy("every_n", every=1000, save_final=False), writer=None, callbacks=[Record()],
        config_yaml="x: 1\n", lineage_base={},
    )
    assert trainer.accum == 4 // world
    trainer.train()
    state = full_state(model, trainer.optimizer, env)["model"]
    every = [None] * world
    if world > 1:
        dist.all_gather_object(every, metrics)
    if env.is_main:
        torch.save({"metrics": metrics, "every_rank": every, "model": state}, out)
    if world > 1:  # a spawned rank skips torch's teardown: ~ProcessGroupGloo (freed with DDP's reducer) joins its
        # worker threads holding the GIL while one may still wait for it to free the finished all_gather's
        # tensors, a deadlock once seen on a loaded 2-core machine (the parent then waited forever)
        os._exit(0)


@pytest.mark.parametrize(("mode", "tied"), [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_two_process_accumulation_and_clipping_match_one_process(tmp_path: Path, mode: str, tied: bool) -> None:
    """Each rank accumulates 2 micro-batches (gradient sync skipped on the first: DDP no_sync, FSDP2
    set_requires_gradient_sync) and the step is clipped (grad norm ~1.6 > 0.05): the logged loss and grad
    norm are the global ones, the same on every rank, and the weights match one process's accumulating 4.
    (The end-to-end runs above accumulate 1 micro-batch per rank and compare no grad norm.)"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _train_three_steps(0, 1, 0, mode, tied, str(tmp_path / "one.pt"))
    two_out = str(tmp_path / "two.pt")
    torch.multiprocessing.spawn(_train_three_steps, args=(2, port, mode, tied, two_out), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # the same loss and grad norm (so the same non-finite guard decision) on every rank
    assert two["every_rank"][0] == two["every_rank"][1]
    for step in (1, 2, 3):
        a, b = one["metrics"][step], two["metrics"][step]
        assert a["grad_norm"] > 1.0  # clipping is active
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), step
    assert one["model"].keys() == two["model"].keys()
    for name in one["model"]:
        torch.testing.assert_close(two["model"][name], one["model"][name], rtol=1e-3, atol=1e-4, msg=name)


def _gather_full_state(rank: int, world: int, port: int, mode: str, out: str) -> None:
    """Rank 0 records, at each `host_copy`, how many tensors handed to it before are still alive, and saves
    `full_state` beside torch's own gathered state (`full_state_dict`, `cpu_offload`)."""
    import weakref

    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from open360.backends.native import full_state, init_distributed, parallelize
    from open360.config import compose
    from open360.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    env = init_distributed("cpu")
    cfg = compose(["+experiment=amber_tiny", "model.n_layers=1", "model.max_seq_len=16", "model.tie_embeddings=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    module = parallelize(model, env, mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17))
    module(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    handed: list[weakref.ref] = []
    alive: list[int] = []

    def host_copy(key: tuple, tensor: torch.Tensor) -> torch.Tensor:
        alive.append(sum(ref() is not None for ref in handed))
        if key[-1] != "step":  # Adam's step counts are CPU tensors, not sharded: the optimizer keeps them
            handed.append(weakref.ref(tensor))
        return tensor.detach().clone()

    ours = full_state(model, optimizer, env, host_copy)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    torchs = {"model": get_model_state_dict(model, options=options),
              "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    if env.is_main:
        torch.save({"ours": ours, "torch": torchs, "alive": alive}, out)
    else:
        torch.save({"ours": ours, "alive": alive}, f"{out}.rank{rank}")
    os._exit(0)  # see _train_three_steps


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_full_state_gathers_one_tensor_at_a_time_into_the_writers_copy(tmp_path: Path, mode: str) -> None:
    """A save gathers one sharded tensor at a time and hands it to the writer's host copy before the next
    (the device never holds the gathered state: 84 GB at 7B); the result is torch's own full state dict,
    bit for bit, model and optimizer (moments and step counts keyed by name), tied weights included."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_gather_full_state, args=(2, port, mode, str(tmp_path / "s.pt")), nprocs=2)
    saved = torch.load(tmp_path / "s.pt")
    ours, torchs = saved["ours"], saved["torch"]
    # the other rank takes part in the gathers only: no host copy (a full state on every rank's host) and nothing
    # returned
    assert torch.load(tmp_path / "s.pt.rank1") == {"ours": {"model": {}, "optimizer": {}}, "alive": []}
    if mode == "fsdp":  # gathered tensors: each freed before the next is gathered
        assert len(saved["alive"]) > 10 and max(saved["alive"]) == 0
    assert ours["model"].keys() == torchs["model"].keys()
    for name, value in torchs["model"].items():
        assert torch.equal(ours["model"][name], value), name
    assert ours["optimizer"]["param_groups"] == torchs["optimizer"]["param_groups"]
    assert ours["optimizer"]["state"].keys() == torchs["optimizer"]["state"].keys()
    for name, moments in torchs["optimizer"]["state"].items():
        assert moments.keys() == ours["optimizer"]["state"][name].keys()
        for k, v in moments.items():
            assert torch.equal(ours["optimizer"]["state"][name][k], v), (name, k)
