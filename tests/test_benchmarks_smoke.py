"""The speed benchmarks run: CPU smoke modes end to end (no speed asserted), GPU-only scripts import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_train_step_benchmark_tiny(tmp_path: Path) -> None:
    _run("bench_train_step.py", "--tiny", "--out", str(tmp_path / "t.json"))
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["model"]["name"] == "amber_tiny"
    assert {r["name"] for r in out["results"]} >= {"hf_llama_sdpa", "open360_eager"}
    assert all(r["status"] == "ok" and r["train_tokens_per_s"] > 0 for r in out["results"])


def test_memorization_benchmark_tiny_matches_hf(tmp_path: Path) -> None:
    _run("bench_memorization.py", "--tiny", "--out", str(tmp_path / "m.json"))
    out = json.loads((tmp_path / "m.json").read_text())
    assert not out["errors"]
    assert {"open360_greedy", "open360_tf", "hf_generate", "analysis360"} <= set(out["results"])
    assert out["parity"]["fp32_identical_scores"] == 1.0
    cells, percell = out["results"]["open360_greedy_b64_cells40"], out["results"]["open360_greedy_b64_percell40"]
    assert cells["token_match"] == percell["token_match"] and cells["sequences"] == percell["sequences"]
    swapped = out["checkpoint_swaps"]["swapped"]
    assert len(swapped) == 2 and all(r["identical_to_fresh"] for r in swapped)
    rounds = out["interleaved_rounds"]["rounds"]
    assert len(rounds) == 2 and all(r["ratio"] > 0 for r in rounds)
    assert out["interleaved_rounds"]["ratio_min"] <= out["interleaved_rounds"]["ratio_median"]


def test_save_snapshot_benchmark_tiny_under_torchrun(tmp_path: Path) -> None:
    """2 CPU ranks (gloo, FSDP): torch's cpu_offload gather and `full_state`'s one-tensor-at-a-time gather give
    rank 0 the same state, bit for bit, and the table has both."""
    import os

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29633",
           str(BENCH / "bench_save_snapshot.py"), "--tiny", "--repeats", "1", "--out", str(tmp_path / "s.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "s.json").read_text())
    rows = {r["variant"].split(" (")[1]: r for r in result["rows"]}
    assert rows.keys() == {"before)", "now)"} and rows["before)"]["state_gb"] == rows["now)"]["state_gb"] > 0
    assert result["identical"] is True


@pytest.mark.parametrize("script", ["bench_megatron.py", "bench_trainer_gpu.py", "bench_memorization_floors.py", "bench_decode_attention_sm.py"])
def test_gpu_only_benchmarks_import(script: str) -> None:
    assert "usage:" in _run(script, "--help").stdout


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokenize_benchmark_times_each_baseline_cold() -> None:
    """One `datasets` cache per corpus size: a run list with two x1 baselines (--repeat 1) timed a cache hit."""
    plan = _bench_module("bench_tokenize").planned_runs
    for repeat in (1, 2, 3):
        runs = plan(repeat)
        assert len(runs) == len(set(runs)), runs
        assert {("baseline", 1), ("open360", 1), ("baseline", repeat), ("open360", repeat)} <= set(runs)
