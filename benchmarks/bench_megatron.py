"""megatron-core backend vs native: train-step throughput of the 1.4B Amber shape on one GPU (native eager
and compiled, megatron with SDPA attention eager and compiled, megatron's stock local spec) in one
process, and megatron data-parallel weak scaling (torchrun per world size, same per-GPU batch).

    python benchmarks/bench_megatron.py --out results/megatron.json              # one GPU, five rows
    python benchmarks/bench_megatron.py --scaling 1,2 --out results/scaling.json  # DP weak scaling
    python benchmarks/bench_megatron.py --scaling 1,2 --compile ...               # ... of compiled layers
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import AMBER_1B4, H100_BF16_PEAK  # noqa: E402
from shapes import AMBER_TINY as TINY  # noqa: E402

from open360.config.schema import ModelConfig, OptimConfig  # noqa: E402
from open360.models import build_model  # noqa: E402
from open360.models.flops import training_flops_per_token  # noqa: E402

OPTIM = OptimConfig(lr=3e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=1.0)


@dataclass
class Row:
    name: str
    status: str = "ok"
    world_size: int = 1
    micro_batch: int = 0
    seq_len: int = 0
    step_ms: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    loss: float | None = None


def _batch(cfg: ModelConfig, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (rows, seq_len + 1), generator=g).cuda()


def _time(step, warmup: int, steps: int) -> tuple[float, float]:
    """(ms per step, last loss) over `steps` timed steps after `warmup` untimed ones."""
    for _ in range(warmup):
        loss = step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / steps, float(loss)


def _finish(row: Row, cfg: ModelConfig, ms: float, loss: float) -> Row:
    tokens = row.micro_batch * row.seq_len * row.world_size
    row.step_ms, row.loss = ms, loss
    row.tokens_per_s = tokens / (ms / 1000)
    row.mfu = training_flops_per_token(cfg, row.seq_len) * row.tokens_per_s / (H100_BF16_PEAK * row.world_size)
    row.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
    return row


def native_row(cfg: ModelConfig, compiled: bool, mb: int, seq: int, warmup: int, steps: int) -> Row:
    """The native Trainer's step: bf16 autocast, model.loss, clip, AdamW (open360.train.optim)."""
    from open360.train.optim import build_optimizer

    row = Row(f"native {'compiled' if compiled else 'eager'}", micro_batch=mb, seq_len=seq)
    torch.manual_seed(0)
    model = build_model(replace(cfg, compile=compiled)).cuda()
    optimizer = build_optimizer(model, OPTIM)
    batch = _batch(cfg, mb, seq, 0)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return _finish(row, cfg, *_time(step, warmup, steps))


def megatron_row(cfg: ModelConfig, attention: str, mb: int, seq: int, warmup: int, steps: int) -> Row:
    """megatron-core GPTModel + DDP + distributed optimizer, one step = forward_backward + optimizer.step."""
    import torch.distributed as dist

    from open360.backends.megatron.engine import MegatronEngine, initialize_parallel
    from open360.backends.megatron.layout import ParallelLayout

    world = dist.get_world_size() if dist.is_initialized() else 1
    row = Row(f"megatron {attention}{' compiled' if cfg.compile else ''}", world_size=world, micro_batch=mb,
              seq_len=seq)
    layout = ParallelLayout.for_run(cfg, 1, 1, world)
    initialize_parallel(layout, seed=0)
    torch.manual_seed(0)
    engine = MegatronEngine(cfg, OPTIM, layout, build_model(cfg).state_dict(), mb, seq, bf16=True, attention=attention)
    rank = dist.get_rank()
    batch = _batch(cfg, mb, seq, rank)

    def step() -> torch.Tensor:
        engine.set_lr(3e-4)
        loss = engine.forward_backward(batch)
        engine.optimizer_step()
        return loss

    return _finish(row, cfg, *_time(step, warmup, steps))


def _guarded(fn, *args) -> Row:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - a failed row is reported, the others still run
        traceback.print_exc()
        return Row(f"{fn.__name__} {args[1]}", status=f"failed: {type(err).__name__}: {str(err)[:300]}")
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _table(rows: list[Row]) -> str:
    lines = [f"{'implementation':<22} {'GPUs':>4} {'ms/step':>9} {'tokens/s':>11} {'MFU':>6} {'mem GiB':>8}  status"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.name:<22} {r.world_size:>4} {'-':>9} {'-':>11} {'-':>6} {'-':>8}  {r.status}")
            continue
        lines.append(
            f"{r.name:<22} {r.world_size:>4} {r.step_ms:>9.1f} {r.tokens_per_s:>11.0f} {r.mfu:>6.1%} "
            f"{r.peak_memory_gib:>8.1f}  ok"
        )
    return "\n".join(lines)


def _meta(args: argparse.Namespace) -> dict:
    import megatron.core

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "model": args.model,
    }


ROWS = {
    "native-eager": (native_row, False),
    "native-compiled": (native_row, True),
    "megatron-sdpa": (megatron_row, "sdpa"),
    "megatron-local": (megatron_row, "local"),
    "megatron-sdpa-compiled": (megatron_row, "sdpa"),
}


def single(args: argparse.Namespace, cfg: ModelConfig) -> None:
    rows = []
    for name in args.rows.split(","):
        fn, variant = ROWS[name]
        row_cfg = replace(cfg, compile=name.endswith("-compiled") and fn is megatron_row)
        rows.append(_guarded(fn, row_cfg, variant, args.micro_batch, args.seq_len, args.warmup, args.steps))
    by = {r.name: r for r in rows if r.status == "ok"}
    ratios = {}
    if "megatron sdpa" in by:
        for base in ("native eager", "native compiled", "megatron local"):
            if base in by:
                ratios[f"megatron sdpa / {base}"] = by["megatron sdpa"].tokens_per_s / by[base].tokens_per_s
    if "megatron sdpa compiled" in by and "native compiled" in by:
        ratios["megatron sdpa compiled / native compiled"] = (
            by["megatron sdpa compiled"].tokens_per_s / by["native compiled"].tokens_per_s
        )
    print(_table(rows))
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**_meta(args), "rows": [asdict(r) for r in rows], "ratios": ratios}, indent=2))


def worker(args: argparse.Namespace, cfg: ModelConfig) -> None:
    """One rank of a DP weak-scaling point (under torchrun); rank 0 writes the row."""
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    row = megatron_row(replace(cfg, compile=args.compile), "sdpa", args.micro_batch, args.seq_len, args.warmup, args.steps)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(asdict(row)))
    dist.destroy_process_group()


def scaling(args: argparse.Namespace) -> None:
    rows = []
    for n in [int(x) for x in args.scaling.split(",")]:
        part = Path(args.out).with_suffix(f".dp{n}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", __file__, "--worker",
               "--model", args.model, "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(part),
               *(["--compile"] if args.compile else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not part.exists():
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            rows.append(Row(f"megatron sdpa{' compiled' if args.compile else ''}", status=f"failed (exit {proc.returncode})", world_size=n))
            continue
        rows.append(Row(**json.loads(part.read_text())))
    base = next((r for r in rows if r.world_size == 1 and r.status == "ok"), None)
    efficiency = {
        r.world_size: r.tokens_per_s / (r.world_size * base.tokens_per_s) for r in rows if base and r.status == "ok"
    }
    print(_table(rows))
    for n, e in efficiency.items():
        print(f"DP={n}: weak-scaling efficiency {e:.3f}")
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
            "command": " ".join(sys.argv), "model": args.model}
    Path(args.out).write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows], "efficiency": efficiency}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["amber_1b4", "tiny"], default="amber_1b4")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    parser.add_argument("--scaling", default="", help="comma-separated DP sizes, e.g. 1,2,4,8")
    parser.add_argument("--compile", action="store_true", help="scaling: megatron layers through torch.compile")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/megatron.json")
    args = parser.parse_args()
    cfg = AMBER_1B4 if args.model == "amber_1b4" else TINY
    if args.model == "tiny":
        args.seq_len = min(args.seq_len, TINY.max_seq_len)
    if args.worker:
        worker(args, cfg)
    elif args.scaling:
        scaling(args)
    else:
        single(args, cfg)


if __name__ == "__main__":
    main()
