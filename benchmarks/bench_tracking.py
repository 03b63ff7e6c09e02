"""Benchmark tracking cost: training steps/s with tracking on vs off, DVC add/push/pull vs cp, pull 1 of 5 vs 50."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from open360.tracking.dvc_versioning import DvcWorkspace
from open360.tracking.workspace import init_workspace


class _Timed:
    """Wraps a callback and sums the time its hooks take on the training thread."""

    def __init__(self, inner: Any, clock: dict[str, float]) -> None:
        self._inner, self._clock = inner, clock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not name.startswith("on_") or not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                key = "run_end" if name == "on_run_end" else "run_start" if name == "on_run_start" else "loop"
                self._clock[key] = self._clock.get(key, 0.0) + time.perf_counter() - t0

        return timed


def _train(ws: Path, run: str, steps: int, every: int, tracking: str) -> dict[str, Any]:
    import open360.tracking as tracking_module
    from open360.config import compose
    from open360.train.pipeline import run_training

    cfg = compose(
        [
            "+experiment=amber_tiny",
            f"workspace={ws}",
            f"run_name={run}",
            f"trainer.max_steps={steps}",
            "checkpoint=every_n",
            f"checkpoint.every={every}",
            "trainer.progress_bar=false",
            f"tracking={tracking}",
        ]
    )
    clock: dict[str, float] = {}
    original = tracking_module.build_callbacks
    tracking_module.build_callbacks = lambda *a: [_Timed(cb, clock) for cb in original(*a)]
    t0 = time.perf_counter()
    try:
        summary = run_training(cfg, device="cpu")
    finally:
        tracking_module.build_callbacks = original
    total = time.perf_counter() - t0
    # summary["wall_s"] is the training loop itself (steps, checkpoint saves, callbacks' per-step work);
    # on_run_start (MLflow run creation) and on_run_end (waiting for the last push) are outside it.
    return {
        "steps_per_s": summary["steps_this_run"] / summary["wall_s"],
        "loop_s": summary["wall_s"],
        "total_s": total,
        "callbacks_in_loop_s": clock.get("loop", 0.0),
        "callbacks_run_start_s": clock.get("run_start", 0.0),
        "callbacks_run_end_s": clock.get("run_end", 0.0),
    }


def bench_training(root: Path, steps: int, every: int, reps: int) -> dict[str, Any]:
    ws = init_workspace(root / "train_ws")
    _train(ws, "warmup", 2, 2, "off")  # builds the shards once; not timed
    from open360.tracking import mlflow_records as mr

    mr.client(mr.workspace_uri(ws, "sqlite:///mlflow.db")).search_experiments()  # creates the MLflow schema
    results: dict[str, list[dict[str, Any]]] = {"off": [], "local": []}
    for rep in range(reps):
        for tracking in ("off", "local"):  # interleaved, so load drift hits both alike
            results[tracking].append(_train(ws, f"bench_{tracking}_{rep}", steps, every, tracking))
    off = statistics.median(r["steps_per_s"] for r in results["off"])
    on = statistics.median(r["steps_per_s"] for r in results["local"])
    paired = [
        100.0 * (1 - b["steps_per_s"] / a["steps_per_s"])
        for a, b in zip(results["off"], results["local"], strict=True)
    ]
    in_loop = [100.0 * r["callbacks_in_loop_s"] / r["loop_s"] for r in results["local"]]
    return {
        "paired_overhead_pct": paired,
        "paired_overhead_pct_median": statistics.median(paired),
        "callbacks_on_training_thread_pct_median": statistics.median(in_loop),
        "steps": steps,
        "checkpoint_every": every,
        "reps": reps,
        "off_steps_per_s": off,
        "on_steps_per_s": on,
        "overhead_pct": 100.0 * (off - on) / off,
        "runs": results,
    }


def _make_checkpoint(path: Path, mib: int, files: int = 4) -> int:
    path.mkdir(parents=True, exist_ok=True)
    per = mib * 1024 * 1024 // files
    for i in range(files):
        (path / f"part_{i}.bin").write_bytes(os.urandom(per))
    return per * files


def _clone(ws: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ws), str(dest)], check=True)
    from dvc.repo import Repo

    with Repo(str(dest)) as repo, repo.config.edit("local") as conf:
        conf["remote"]["local"] = {"url": str(ws / ".dvc-storage")}
    return dest


def _commit(ws: Path) -> None:
    subprocess.run(["git", "-C", str(ws), "commit", "-qam", "bench"], check=True)


def bench_throughput(root: Path, mib: int) -> dict[str, Any]:
    ws = init_workspace(root / "io_ws")
    src = ws / "checkpoints" / "io" / "step_1"
    nbytes = _make_checkpoint(src, mib)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(root / "cp_copy")], check=True)
    subprocess.run(["sync"], check=True)
    cp_s = time.perf_counter() - t0
    store = DvcWorkspace(ws)
    t0 = time.perf_counter()
    store.add(src)
    add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.push([src])
    subprocess.run(["sync"], check=True)
    push_s = time.perf_counter() - t0
    _commit(ws)
    fresh = _clone(ws, root / "io_clone")
    t0 = time.perf_counter()
    DvcWorkspace(fresh).pull([fresh / "checkpoints" / "io" / "step_1"])
    subprocess.run(["sync"], check=True)
    pull_s = time.perf_counter() - t0
    mb = nbytes / 1e6
    return {
        "bytes": nbytes,
        "cp_s": cp_s,
        "add_s": add_s,
        "push_s": push_s,
        "pull_s": pull_s,
        "cp_MBps": mb / cp_s,
        "add_MBps": mb / add_s,
        "push_MBps": mb / push_s,
        "pull_MBps": mb / pull_s,
        "add_copies": os.stat(src / "part_0.bin").st_nlink < 2,
    }


def bench_pull_scaling(root: Path, counts: list[int], mib: int, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in counts:
        ws = init_workspace(root / f"scale_{n}")
        paths = []
        for step in range(n):
            path = ws / "checkpoints" / "s" / f"step_{step}"
            _make_checkpoint(path, mib, files=2)
            paths.append(path)
        store = DvcWorkspace(ws)
        for path in paths:
            store.add(path)
        store.push(paths)
        _commit(ws)
        times, cli_times = [], []
        for rep in range(reps):
            fresh = _clone(ws, root / f"scale_{n}_clone_{rep}")
            target = fresh / "checkpoints" / "s" / f"step_{n // 2}"
            t0 = time.perf_counter()
            DvcWorkspace(fresh).pull([target])
            times.append(time.perf_counter() - t0)
            assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
            fresh = _clone(ws, root / f"scale_{n}_cli_{rep}")
            t0 = time.perf_counter()
            subprocess.run(["dvc", "pull", "-q", f"checkpoints/s/step_{n // 2}"], cwd=fresh, check=True)
            cli_times.append(time.perf_counter() - t0)
        out[str(n)] = {
            "pull_one_s": statistics.median(times),
            "dvc_cli_pull_one_s": statistics.median(cli_times),
            "all_s": times,
            "dvc_cli_all_s": cli_times,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--steps", type=int, default=60, help="training steps per timed run")
    parser.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--mib", type=int, default=256, help="checkpoint size for the throughput test")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-io", action="store_true", help="only the training comparison")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    try:
        results: dict[str, Any] = {}
        if not args.skip_training:
            results["training"] = bench_training(root, args.steps, args.every, args.reps)
        if not args.skip_io:
            results["throughput"] = bench_throughput(root, args.mib)
            results["pull_scaling"] = bench_pull_scaling(root, [5, 50], 1, args.reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'measure':<44}{'value':>14}")
    if "training" in results:
        t = results["training"]
        print(f"{'training steps/s, tracking off (median)':<44}{t['off_steps_per_s']:>14.3f}")
        print(f"{'training steps/s, tracking on  (median)':<44}{t['on_steps_per_s']:>14.3f}")
        print(f"{'tracking overhead % (ratio of medians)':<44}{t['overhead_pct']:>14.2f}")
        print(f"{'tracking overhead % (median of pairs)':<44}{t['paired_overhead_pct_median']:>14.2f}")
        print(
            f"{'callback time on training thread %':<44}{t['callbacks_on_training_thread_pct_median']:>14.3f}"
        )
    io = results.get("throughput")
    if io:
        print(f"{'checkpoint size MB':<44}{io['bytes'] / 1e6:>14.1f}")
        for k in ("cp", "add", "push", "pull"):
            print(f"{k + ' MB/s':<44}{io[k + '_MBps']:>14.1f}")
    for n, r in results.get("pull_scaling", {}).items():
        print(f"{'pull 1 of ' + n + ' (open360 ckpt pull), s':<44}{r['pull_one_s']:>14.3f}")
        print(f"{'pull 1 of ' + n + ' (dvc pull CLI, incl. start), s':<44}{r['dvc_cli_pull_one_s']:>14.3f}")


if __name__ == "__main__":
    main()
