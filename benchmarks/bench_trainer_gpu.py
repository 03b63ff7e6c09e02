"""Trainer overhead: the open360 Trainer vs a bare forward+backward+AdamW loop on the same model and GPU.

Feeds random token ids shaped like shard rows ([global_batch, seq_len + 1] int64 from a seeded numpy
generator, through the Trainer's data path: background prefetch, pinned memory, per-rank slicing)
rather than building seq-2048 shards. tracking=off: no dvc/mlflow needed.

    python benchmarks/bench_trainer_gpu.py --out trainer_gpu.json            # 1.4B Amber shape, one GPU
    python benchmarks/bench_trainer_gpu.py --tiny --out /tmp/trainer_cpu.json  # CPU smoke run

Prints a table and writes JSON; never asserts a speed. Target: trainer / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from open360.backends.native import DistEnv, parallelize
from open360.checkpoint.cadence import CadencePolicy
from open360.checkpoint.writer import CheckpointWriter
from open360.config import compose
from open360.models import build_model, count_parameters, training_flops_per_token
from open360.train.callbacks import Callback
from open360.train.optim import build_optimizer
from open360.train.pipeline import build_settings
from open360.train.progress import peak_flops
from open360.train.schedules import build_stages
from open360.train.state import seed_everything
from open360.train.trainer import StageData, Trainer


class RandomTokenOrder:
    """Stands in for open360.data.DataOrder: seeded random rows shaped like shard sequences."""

    def __init__(self, global_batch: int, seq_len: int, vocab: int) -> None:
        self.global_batch, self.seq_len, self.vocab = global_batch, seq_len, vocab

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng(step)
        return rng.integers(0, self.vocab, size=(self.global_batch, self.seq_len + 1), dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": f"random-{self.global_batch}-{self.seq_len}-{self.vocab}"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.state_dict()["fingerprint"]:
            raise ValueError("random token order fingerprint mismatch")

    def seen_ids(self, steps: int) -> np.ndarray:
        return np.arange(steps * self.global_batch)


class StepClock(Callback):
    """Records wall time at the end of every step (the Trainer syncs once per step)."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.times[step] = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model: torch.nn.Module, cfg: Any, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per optimizer step of forward+backward (with grad accumulation) + AdamW, nothing else."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=float(cfg.optim.lr), betas=tuple(cfg.optim.betas), weight_decay=0.1
    )
    order = RandomTokenOrder(
        int(cfg.trainer.global_batch_size), int(cfg.trainer.seq_len), cfg.model.vocab_size
    )
    mbs = int(cfg.trainer.micro_batch_size)
    accum = int(cfg.trainer.global_batch_size) // mbs
    batches = [torch.from_numpy(order.batch(s)).to(device) for s in range(2)]
    autocast = device.type == "cuda"
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        batch = batches[step % 2]
        for i in range(accum):
            micro = batch[i * mbs : (i + 1) * mbs]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model.loss(micro[:, :-1], micro[:, 1:])
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    elapsed = (time.perf_counter() - t0) / steps
    del opt
    return elapsed


def trainer_loop(
    model: torch.nn.Module, cfg: Any, device: torch.device, warmup: int, steps: int, save_dir: Path | None
) -> tuple[float, dict[str, Any]]:
    """Seconds per step of the open360 Trainer on the same model; optionally one checkpoint save timed."""
    env = DistEnv(device=device)
    optimizer = build_optimizer(model, cfg.optim)
    module = parallelize(model, env, "ddp")
    order = RandomTokenOrder(
        int(cfg.trainer.global_batch_size), int(cfg.trainer.seq_len), cfg.model.vocab_size
    )

    def open_stage(stage: Any) -> StageData:
        lineage = {"stage": stage.name, "manifest_hash": "random", "tokenizer_hash": "random"}
        return StageData(order, [], lineage, lambda n: {"count": n * order.global_batch})

    clock = StepClock()
    cadence = CadencePolicy("list", save_final=False)
    writer = (
        CheckpointWriter(save_dir / "published", save_dir / "recovery", 1, background=True)
        if save_dir
        else None
    )
    trainer = Trainer(
        model=model,
        module=module,
        optimizer=optimizer,
        stages=build_stages(cfg),
        settings=build_settings(cfg, device.type, env),
        env=env,
        open_stage=open_stage,
        cadence=cadence,
        writer=None,
        callbacks=[clock],
        config_yaml="benchmark: true\n",
        lineage_base={"run_name": "bench"},
    )
    summary = trainer.train()
    per_step = (clock.times[warmup + steps] - clock.times[warmup]) / steps
    save: dict[str, Any] = {}
    if writer is not None:
        trainer.writer = writer
        t0 = time.perf_counter()
        trainer.save(published=True)  # blocks for the device->host snapshot only
        save["stall_s"] = time.perf_counter() - t0
        writer.wait_pending()
        save["total_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        trainer.save(published=False)  # a later save reuses the pinned host buffers
        save["later_stall_s"] = time.perf_counter() - t1
        writer.wait_pending()
        save["bytes"] = sum(p.stat().st_size for p in (save_dir / "published").rglob("*") if p.is_file())
        writer.close()
    del optimizer
    return per_step, {"trainer_summary": summary, "checkpoint_save": save}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument(
        "--tiny", action="store_true", help="amber_tiny on CPU (checks the script, not speed)"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per loop")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--compile", action="store_true", help="model.compile=true (torch.compile per block)")
    parser.add_argument("--no-save", action="store_true", help="skip timing one checkpoint save")
    parser.add_argument(
        "--save-dir", default=None, help="where the timed checkpoint is written (default: a temp dir)"
    )
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    seq = 128 if args.tiny else 2048
    total = args.warmup + args.steps
    overrides = [
        "+experiment=amber_tiny",
        f"model={'amber_tiny' if args.tiny else 'amber_1b4'}",
        f"trainer={'cpu_tiny' if args.tiny else 'gpu'}",
        "tracking=off",
        f"trainer.seq_len={seq}",
        f"model.max_seq_len={seq}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.micro_batch * args.accum}",
        f"trainer.max_steps={total}",
        "trainer.progress_bar=false",
        f"trainer.log_every={total}",
        f"model.compile={str(args.compile).lower()}",
        "optim.lr=3.0e-4",  # AMBER's peak LR (the tiny experiment's 3e-3 is for a 1.8M-parameter model)
    ]
    cfg = compose(overrides)
    seed_everything(0)
    model = build_model(cfg.model).to(device)
    tokens_per_step = args.micro_batch * args.accum * seq
    flops_tok = training_flops_per_token(cfg.model, seq)
    peak = peak_flops(device)

    bare_1 = bare_loop(model, cfg, device, args.warmup, args.steps)
    tmp = tempfile.TemporaryDirectory(dir=args.save_dir) if not args.no_save else None
    trainer_s, extra = trainer_loop(
        model, cfg, device, args.warmup, args.steps, Path(tmp.name) if tmp else None
    )
    bare_2 = bare_loop(model, cfg, device, args.warmup, args.steps)
    if tmp:
        tmp.cleanup()
    bare_s = (bare_1 + bare_2) / 2

    def row(name: str, sec: float) -> dict[str, Any]:
        tps = tokens_per_step / sec
        return {
            "name": name,
            "s_per_step": sec,
            "tokens_per_s": tps,
            "tflops": flops_tok * tps / 1e12,
            "mfu": flops_tok * tps / peak if peak else None,
        }

    rows = [row("bare fwd+bwd+AdamW (mean of before/after)", bare_s), row("open360 Trainer", trainer_s)]
    result = {
        "benchmark": "trainer_vs_bare",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": cfg.model.name,
        "parameters": count_parameters(cfg.model),
        "seq_len": seq,
        "micro_batch": args.micro_batch,
        "accum": args.accum,
        "compile": args.compile,
        "data": "random token ids shaped like shard rows (not real shards)",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "bare_runs_s_per_step": [bare_1, bare_2],
        "rows": rows,
        "ratio_trainer_over_bare": bare_s / trainer_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        **extra,
    }
    print(f"{'implementation':<44} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{r['name']:<44} {r['s_per_step']:>8.4f} {r['tokens_per_s']:>10,.0f} {r['tflops']:>8.1f} {mfu:>6}"
        )
    print(f"trainer / bare throughput: {result['ratio_trainer_over_bare']:.3f}  (target >= 0.9)")
    if extra["checkpoint_save"]:
        s = extra["checkpoint_save"]
        print(
            f"checkpoint save: training stalled {s['stall_s']:.2f} s (first snapshot, pinned buffers allocated), "
            f"{s['later_stall_s']:.2f} s (later snapshots), written in {s['total_s']:.1f} s, "
            f"{s['bytes'] / 2**30:.1f} GiB"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
