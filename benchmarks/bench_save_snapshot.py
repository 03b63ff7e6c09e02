"""Checkpoint save under FSDP/DDP: how long gathering rank 0's full state and its background-writer snapshot
stall training.

Before: torch's `full_state_dict=True, cpu_offload=True` state dicts (every tensor gathered, then copied into
fresh pageable memory, one blocking copy at a time), then the writer's snapshot of the live tensors. Now:
`full_state` gathers one tensor at a time and hands it to the writer's host copy (reused pinned buffers,
asynchronous copies), then the same snapshot. Both run side by side in one process group on the same model
and optimizer state; rank 0's two results are compared tensor by tensor.

    torchrun --nproc-per-node 2 benchmarks/bench_save_snapshot.py --mode fsdp --out save_snapshot.json  # 1.4B Amber
    torchrun --nproc-per-node 2 benchmarks/bench_save_snapshot.py --tiny --out /tmp/snap.json       # CPU smoke run

Prints a table and writes JSON; never asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from shapes import AMBER_1B4, AMBER_TINY

from open360.backends.native import (
    barrier,
    full_state,
    init_distributed,
    live_storages,
    parallelize,
    shutdown_distributed,
)
from open360.checkpoint.writer import HostSnapshot
from open360.models.decoder import Decoder


def _anon_rss_gb() -> float:
    """This process's anonymous resident memory (what the copies allocate), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _torch_cpu_offload_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state as torch gathers it with `cpu_offload` (what a save did before `full_state`)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def _same(a: Any, b: Any) -> bool:
    """Bitwise-equal nested state (tensors compared on the CPU)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--tiny", action="store_true", help="amber_tiny shape on CPU (gloo): a smoke run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    env = init_distributed(device)
    shape = AMBER_TINY if args.tiny else AMBER_1B4
    torch.manual_seed(0)
    model = Decoder(shape).to(env.device)
    module = parallelize(model, env, args.mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, shape.vocab_size, (1, 129), device=env.device)
    module(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()  # Adam's moments and step counts exist, as at any save past step 0

    rows = []
    snapshot = HostSnapshot()  # the background CheckpointWriter's
    live = live_storages(model, optimizer)
    snapshots: dict[str, Any] = {}
    for repeat in range(args.repeats):
        for variant in ("torch cpu_offload gather (before)", "full_state, pinned host_copy (now)"):
            barrier(env)
            if device == "cuda":
                torch.cuda.synchronize()
            rss0 = _anon_rss_gb()
            t0 = time.perf_counter()
            if variant.startswith("torch"):
                state = _torch_cpu_offload_state(model, optimizer)
            else:
                state = full_state(model, optimizer, env, snapshot.begin(live) if env.is_main else None)
            gathered_s = time.perf_counter() - t0
            if env.is_main:
                t1 = time.perf_counter()
                snap = snapshot(state, live)  # what CheckpointWriter.save copies before its write starts
                snapshot_s = time.perf_counter() - t1
                rows.append({
                    "variant": variant, "repeat": repeat, "gather_s": round(gathered_s, 3),
                    "snapshot_stall_s": round(snapshot_s, 3), "stall_s": round(gathered_s + snapshot_s, 3),
                    "state_gb": round(sum(t.numel() * t.element_size() for t in _tensors(snap)) / 1e9, 3),
                    "rss_growth_gb": round(_anon_rss_gb() - rss0, 3),
                })
                if repeat == args.repeats - 1:
                    snapshots[variant] = snap
                del snap
            del state
            gc.collect()
    identical = _same(*snapshots.values()) if env.is_main else None
    barrier(env)
    if env.is_main:
        result = {
            "benchmark": "save_snapshot", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "world_size": env.world_size, "mode": args.mode, "model": shape.name, "torch": torch.__version__,
            "rows": rows, "identical": identical,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"{'variant':<36} {'rep':>3} {'gather s':>9} {'snapshot s':>11} {'stall s':>8} {'state GB':>9} {'RSS +GB':>8}")
        for r in rows:
            print(f"{r['variant']:<36} {r['repeat']:>3} {r['gather_s']:>9} {r['snapshot_stall_s']:>11} {r['stall_s']:>8} "
                  f"{r['state_gb']:>9} {r['rss_growth_gb']:>8}")
        print(f"rank 0's two results bitwise identical: {identical}")
    shutdown_distributed()


if __name__ == "__main__":
    main()
