"""Checkpoint save under FSDP/DDP: what rank 0's background-writer snapshot copies, and how long it stalls training.

The gathered, CPU-offloaded state dict (weights and Adam moments) is already rank 0's own copy; the snapshot
used to copy it again (`live=None`) and now copies only the tensors training writes in place (`live`).
Both variants run side by side in one process group, on the same model and optimizer state.

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
    full_model_state,
    full_optimizer_state,
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


def _copied_bytes(state: Any, snap: Any) -> int:
    """Bytes of the snapshot's tensors that are new copies, not the state dict's own tensors."""
    own = {id(t) for t in _tensors(state)}
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in _tensors(snap)}.values() if id(t) not in own)


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
    for repeat in range(args.repeats):
        for variant, live in (("copy every tensor (before)", None), ("copy live tensors only (now)", "live")):
            barrier(env)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            state = {"model": full_model_state(model, env), "optimizer": full_optimizer_state(model, optimizer, env)}
            gathered_s = time.perf_counter() - t0
            if env.is_main:
                rss0 = _anon_rss_gb()
                t1 = time.perf_counter()
                keep = live_storages(model, optimizer) if live else None
                snap = HostSnapshot()(state, keep)
                snapshot_s = time.perf_counter() - t1
                rows.append({
                    "variant": variant, "repeat": repeat, "gather_s": round(gathered_s, 3),
                    "snapshot_stall_s": round(snapshot_s, 3), "copied_gb": round(_copied_bytes(state, snap) / 1e9, 3),
                    "state_gb": round(sum(t.numel() * t.element_size() for t in _tensors(state)) / 1e9, 3),
                    "rss_growth_gb": round(_anon_rss_gb() - rss0, 3),
                })
                del snap
            del state
            gc.collect()
    barrier(env)
    if env.is_main:
        result = {
            "benchmark": "save_snapshot", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "world_size": env.world_size, "mode": args.mode, "model": shape.name, "torch": torch.__version__,
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"{'variant':<30} {'rep':>3} {'gather s':>9} {'snapshot s':>11} {'copied GB':>10} {'state GB':>9} {'RSS +GB':>8}")
        for r in rows:
            print(f"{r['variant']:<30} {r['repeat']:>3} {r['gather_s']:>9} {r['snapshot_stall_s']:>11} "
                  f"{r['copied_gb']:>10} {r['state_gb']:>9} {r['rss_growth_gb']:>8}")
    shutdown_distributed()


if __name__ == "__main__":
    main()
