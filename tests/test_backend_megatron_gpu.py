"""megatron-core backend on CUDA: loss parity with the native backend from the same weights (1 GPU), and
through the real pipeline under torchrun: TP=2 and DP=2 match one GPU, a TP=2 checkpoint resumes at DP=2
and exports to an HF folder with matching logits (2 GPUs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fakes import SyntheticOrder
from tests.test_train_gpu import Recorder, tiny_gpu_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
megatron = pytest.importorskip("megatron.core")

REPO = Path(__file__).resolve().parents[1]
STEPS = 50


def _run_native_and_megatron(
    tmp_path: Path, model_overrides: list[str], fresh_second_half: bool = False
) -> tuple[dict, dict, set[int]]:
    """Step metrics of the native and the megatron backend from the same weights and batches, and the AdamW
    step counts megatron's optimizer ends with (`fresh_second_half`: two stages, the second's optimizer fresh)."""
    import torch.distributed as dist

    from open360.backends.megatron.engine import destroy_parallel
    from open360.backends.megatron.trainer import create_megatron_trainer
    from open360.backends.native import DistEnv, parallelize
    from open360.checkpoint import CadencePolicy
    from open360.models import build_model
    from open360.train.optim import build_optimizer
    from open360.train.pipeline import build_settings
    from open360.train.schedules import Stage, build_stages
    from open360.train.trainer import StageData, Trainer

    cfg = tiny_gpu_config(STEPS, *model_overrides)
    env = DistEnv(device=torch.device("cuda"))
    torch.manual_seed(0)
    init = build_model(cfg.model).state_dict()
    order = SyntheticOrder(16, 128, 4096, starts=512)
    stages = build_stages(cfg)
    if fresh_second_half:
        half, (one,) = STEPS // 2, stages
        stages = [Stage(i, n, "r.yaml", half * i, half, one.lr, one.schedule, i == 1) for i, n in enumerate("ab")]

    def common(rec: Recorder) -> dict[str, Any]:
        return dict(
            stages=stages,
            settings=build_settings(cfg, "cuda", env),
            env=env,
            open_stage=lambda stage: StageData(order, [], {"stage": stage.name}, lambda n: {}),
            cadence=CadencePolicy("list", steps=frozenset(), save_final=False),
            writer=None,
            callbacks=[rec],
            config_yaml="",
            lineage_base={},
        )

    native_rec, mega_rec = Recorder(), Recorder()
    model = build_model(cfg.model)
    model.load_state_dict(init)
    model = model.cuda()
    Trainer(
        model=model, module=parallelize(model, env, "ddp"), optimizer=build_optimizer(model, cfg.optim), **common(native_rec)
    ).train()
    try:
        mega = create_megatron_trainer(cfg, init, (tmp_path / "pub", tmp_path / "rec"), **common(mega_rec))
        mega.train()
        adam_steps = {int(state["step"]) for states in mega.engine._inner_states() for state in states}
    finally:
        destroy_parallel()
        dist.destroy_process_group()
    return native_rec.metrics, mega_rec.metrics, adam_steps


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("amber", []),
        ("phi", ["model=phi15_tiny"]),
        ("crystalcoder_mup", ["model=crystalcoder_tiny"]),
        # model.compile=true: native compiles each block, megatron each TransformerLayer
        ("amber_compiled", ["model.compile=true"]),
        ("phi_compiled", ["model=phi15_tiny", "model.compile=true"]),
    ],
)
def test_megatron_matches_native_loss_over_50_steps(tmp_path: Path, name: str, overrides: list[str]) -> None:
    native, mega, _ = _run_native_and_megatron(tmp_path, overrides)
    losses = [(native[s]["loss"], mega[s]["loss"]) for s in range(1, STEPS + 1)]
    rel = [abs(a - b) / a for a, b in losses]
    print(name, "first", losses[0], "last", losses[-1], "max rel", max(rel))
    assert rel[0] < 5e-3  # same weights, same batch: only bf16 rounding differs
    assert max(rel) < 0.03 and sum(rel) / len(rel) < 0.01
    assert losses[-1][1] < losses[0][1] - 1.0  # it trains


def test_a_fresh_optimizer_stage_restarts_megatrons_adamw_as_the_native_one(tmp_path: Path) -> None:
    """`fresh_optimizer` (CrystalCoder's phase 3) on megatron's distributed optimizer: its AdamW shards start
    over at the stage's first step (step counts = the stage's steps), and the losses follow the native run's."""
    native, mega, adam_steps = _run_native_and_megatron(tmp_path, [], fresh_second_half=True)
    assert adam_steps == {STEPS // 2}
    rel = [abs(native[s]["loss"] - mega[s]["loss"]) / native[s]["loss"] for s in range(1, STEPS + 1)]
    assert max(rel) < 0.03 and sum(rel) / len(rel) < 0.01, max(rel)


# -- two GPUs, the real pipeline under torchrun ------------------------------------------------

needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
PIPELINE_STEPS = 12


def _train(workspace: Path, run: str, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=29531"]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [
        *launcher,
        "-m",
        "open360.train",
        "+experiment=amber_tiny",
        "trainer=gpu",
        "trainer.backend=megatron",
        "trainer.seq_len=128",
        "trainer.global_batch_size=16",
        "trainer.micro_batch_size=4",
        f"trainer.max_steps={PIPELINE_STEPS}",
        "trainer.log_every=1",
        "trainer.progress_bar=false",
        "checkpoint.policy=every_n",
        "checkpoint.every=1",
        "tracking.mlflow=false",
        "tracking.dvc=false",
        f"workspace={workspace}",
        f"run_name={run}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _losses(workspace: Path, run: str) -> dict[int, float]:
    out = {}
    for step_dir in (workspace / "checkpoints" / run).glob("step_*"):
        state = json.loads((step_dir / "trainer_state.json").read_text())
        if state["loss"] is not None:
            out[state["step"]] = state["loss"]
    return out


def _grad_norms(stdout: str) -> dict[int, float]:
    """Each step's gradient norm from the run's progress lines (`step N/M loss .. lr .. gnorm G ..`)."""
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+)/\d+ .*?gnorm (\S+)", stdout, re.M)}


def _bf16_representable(checkpoint: Path) -> bool:
    """Whether every published weight is a bf16 value (a bf16 copy, not the fp32 master weights)."""
    from open360.checkpoint.io import load_model_weights

    return all(torch.equal(w, w.bfloat16().float()) for w in load_model_weights(checkpoint / "model.safetensors").values())


def _close(a: dict[int, float], b: dict[int, float], steps: range, tol: float) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) / a[s] < tol, (s, a[s], b[s])


def test_a_resumed_megatron_run_continues_exactly_also_from_step_0(tmp_path: Path) -> None:
    """Pythia's cadence saves step 0 (before the optimizer has state); a resume from it or from a later
    step continues as the uninterrupted run does (AdamW's step count per parameter, bias correction)."""
    import torch.distributed.checkpoint  # noqa: F401 - megatron's loader needs it imported

    ws = tmp_path / "ws"
    cadence = ("checkpoint.policy=log_spaced", "checkpoint.every=1000", "trainer.max_steps=8")
    _train(ws, "full", 1, *cadence)
    full = _losses(ws, "full")
    assert sorted(p.name for p in (ws / "checkpoints" / "full").glob("step_*")) == [f"step_{s}" for s in (0, 1, 2, 4, 8)]
    for step in (0, 8):  # a bf16 run publishes its fp32 master weights (from the fp32 initial ones on)
        assert not _bf16_representable(ws / "checkpoints" / "full" / f"step_{step}"), step
    for start in (0, 2):
        run = f"from_{start}"
        _train(ws, run, 1, *cadence, f"trainer.resume={ws / 'checkpoints' / 'full' / f'step_{start}'}")
        resumed = _losses(ws, run)
        for step in (4, 8):
            assert abs(resumed[step] - full[step]) <= 1e-5 * abs(full[step]), (start, step, resumed[step], full[step])


@needs_two
def test_tp2_dp2_match_one_gpu_and_tp2_checkpoint_resumes_at_dp2_and_exports(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    printed = {run: _train(ws, run, n, *extra).stdout for run, n, extra in (
        ("one", 1, ()), ("tp2", 2, ("trainer.tensor_parallel=2",)), ("dp2", 2, ()))}
    one, tp2, dp2 = _losses(ws, "one"), _losses(ws, "tp2"), _losses(ws, "dp2")
    steps = range(1, PIPELINE_STEPS + 1)
    _close(one, tp2, steps, 0.02)
    _close(one, dp2, steps, 0.02)
    # the gradient norm (and the clipping by it) covers every TP rank's shard of the split weights
    norms = {run: _grad_norms(out) for run, out in printed.items()}
    _close(norms["one"], norms["tp2"], steps, 0.02)
    _close(norms["one"], norms["dp2"], steps, 0.02)
    # every layout publishes the fp32 master weights, each element from the data-parallel rank holding it
    from open360.checkpoint.io import load_model_weights

    final = {run: load_model_weights(ws / "checkpoints" / run / f"step_{PIPELINE_STEPS}" / "model.safetensors")
             for run in printed}
    for run, state in final.items():
        assert not _bf16_representable(ws / "checkpoints" / run / f"step_{PIPELINE_STEPS}"), run
        for name, weight in state.items():
            assert (weight - final["one"][name]).norm() <= 0.02 * final["one"][name].norm() + 1e-3, (run, name)

    # The TP=2 checkpoint of step 6 resumes under DP=2 (megatron-core reshards model and optimizer).
    resumed = ws / "checkpoints" / "tp2" / "step_6"
    lineage = json.loads((resumed / "lineage.json").read_text())
    assert lineage["backend"] == "megatron" and lineage["parallel_layout"] == {"tp": 2, "pp": 1, "dp": 1}
    assert any(name.startswith("megatron/") for name in lineage["files"])
    _train(ws, "tp2_to_dp2", 2, f"trainer.resume={resumed}")
    after = _losses(ws, "tp2_to_dp2")
    _close(tp2, after, range(7, PIPELINE_STEPS + 1), 0.02)

    # The open360 weights of a TP=2 checkpoint export to an HF folder whose logits match.
    from transformers import AutoModelForCausalLM

    from open360.checkpoint.io import load_model_from_checkpoint
    from open360.models.hf import export_hf

    final = ws / "checkpoints" / "tp2" / f"step_{PIPELINE_STEPS}"
    native, cfg = load_model_from_checkpoint(final)
    hf_dir = export_hf(native, cfg.model, None, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    ids = torch.randint(0, int(cfg.model.vocab_size) - 1, (2, 32))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, native(ids), atol=1e-4)


@needs_two
def test_pp2_matches_one_gpu_and_merges_its_stages(tmp_path: Path) -> None:
    """Pipeline parallelism (2 stages of 2 layers): same losses as one GPU; model.safetensors whole."""
    from open360.checkpoint.io import load_model_from_checkpoint

    ws = tmp_path / "ws"
    _train(ws, "one", 1)
    _train(ws, "pp2", 2, "trainer.pipeline_parallel=2")
    _close(_losses(ws, "one"), _losses(ws, "pp2"), range(1, PIPELINE_STEPS + 1), 0.02)
    one, _ = load_model_from_checkpoint(ws / "checkpoints" / "one" / "step_1")
    pp2, _ = load_model_from_checkpoint(ws / "checkpoints" / "pp2" / "step_1")
    ids = torch.randint(0, 4000, (2, 32))
    with torch.no_grad():
        assert torch.allclose(one(ids), pp2(ids), atol=0.05, rtol=0.05)


_PUBLISH_PEAK = '''
import json, sys
import torch
from open360.backends.megatron.engine import MegatronEngine, destroy_parallel, initialize_parallel
from open360.backends.megatron.layout import ParallelLayout
from open360.backends.native import init_distributed
from open360.config import compose
from open360.models import build_model
from open360.models.decoder import as_model_config

env = init_distributed("cuda")
cfg = compose(["+experiment=amber_tiny", "model.d_model=512", "model.n_heads=8", "model.ffn_dim=1376",
               "model.n_layers=8"])
torch.manual_seed(0)
init = build_model(cfg.model).state_dict()
layout = ParallelLayout(tp=1, pp=1, dp=env.world_size)
initialize_parallel(layout, 0)
engine = MegatronEngine(as_model_config(cfg.model), cfg.optim, layout, init, micro_batch_size=1, seq_len=16, bf16=True)
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
before = torch.cuda.memory_allocated()
state = engine.full_native_state()
peak = torch.cuda.max_memory_allocated() - before
if env.rank == 0:
    exact = all(torch.equal(state[k], v.float()) for k, v in init.items())
    json.dump({"peak": peak, "model_bytes": sum(v.numel() * 4 for v in init.values()), "exact": exact},
              open(sys.argv[1], "w"))
destroy_parallel()
'''


@needs_two
def test_publishing_weights_at_dp2_gathers_in_host_memory(tmp_path: Path) -> None:
    """Rank 0 gathers the published weights from data-parallel replica 0's ranks over a gloo group: over the
    default NCCL group `gather_object` allocated world size x the largest pickled shard on rank 0's GPU, for
    shards only replica 0 sends (8 x 27 GB at 7B on 8 replicas)."""
    script, out = tmp_path / "peak.py", tmp_path / "peak.json"
    script.write_text(_PUBLISH_PEAK)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29533", str(script), str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["exact"]  # the fp32 initial weights, whole, from replica 0
    assert result["peak"] < 0.25 * result["model_bytes"], result  # one parameter's fp32 copy at a time
