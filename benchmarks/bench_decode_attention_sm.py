"""How much HBM bandwidth decode attention gets from a few SMs, and whether that lets it overlap the GEMMs (GPU only).

    python benchmarks/bench_decode_attention_sm.py --out results/bench_decode_attention_sm.json

Follows up the overlap probe of `bench_memorization_floors.py`, whose persistent attention kernel read only
~23 GB/s per SM. Half a batch (2,048 sequences) of the 1.4B Amber shape, one decode step with 48 cached
positions of a 64-slot cache (bf16, [sequence x head, slot, 64]), 24 layers. Three parts, CUDA events,
means after a warm-up:
  stream     a plain read of 2 GiB by P = 32 persistent programs (no attention math): what one SM can pull
             from HBM with `num_stages` loads in flight (Triton pipelines them through shared memory)
  alone      decode-attention kernels on P programs: `loads` reads what attention reads and does no
             math; `vec` one (sequence, head) per step in fp32; `dot<h>` h heads per step through the tensor
             cores (q padded to 16 rows, the h heads' keys as one block-diagonal product); `engine` is
             open360's kernel (one program per (sequence, head), all SMs)
  overlap    the GEMMs of that half batch's decode step through cuBLASLt with `carve-out` SMs kept from them
             (`torch._C._set_sm_carveout_experimental`) on one stream, an attention kernel of P programs on
             another; against both run one after the other on the whole GPU (cuBLAS GEMMs, the fastest
             attention kernel alone)
Prints the tables and writes JSON; asserts nothing but each kernel's agreement with fp32 SDPA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from bench_memorization_floors import layer_gemms, mean_ms
from shapes import AMBER_1B4

SLOTS, CACHED = 64, 48  # cache slots per (sequence, head); positions filled at the measured decode step


def build_kernels() -> dict[str, Callable]:
    """The Triton kernels (imported here: the CPU install has no Triton, and `--help` must work there)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _stream(x_ptr, out_ptr, rows_per_program, BR: tl.constexpr, C: tl.constexpr, STAGES: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * rows_per_program
        r, c = tl.arange(0, BR), tl.arange(0, C)
        acc = tl.zeros([BR, C], tl.float32)
        for i in tl.range(0, rows_per_program, BR, num_stages=STAGES):
            acc += tl.load(x_ptr + (base + i + r)[:, None] * C + c[None, :]).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc))

    @triton.jit
    def _loads(k_ptr, v_ptr, out_ptr, n_items, n, D: tl.constexpr, HB: tl.constexpr, STAGES: tl.constexpr):
        r, dd = tl.arange(0, HB * 64), tl.arange(0, D)
        valid = (r % 64) < n
        acc = tl.zeros([HB * 64, D], tl.float32)
        for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0), num_stages=STAGES):
            off = (item.to(tl.int64) * HB * 64 + r)[:, None] * D + dd[None, :]
            acc += tl.load(k_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
            acc += tl.load(v_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc))

    @triton.jit
    def _vec(q_ptr, k_ptr, v_ptr, o_ptr, n_items, n, scale, D: tl.constexpr, STAGES: tl.constexpr):
        dd, j = tl.arange(0, D), tl.arange(0, 64)
        valid = j < n
        for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0), num_stages=STAGES):
            row = item.to(tl.int64)
            off = (row * 64 + j)[:, None] * D + dd[None, :]
            keys = tl.load(k_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
            values = tl.load(v_ptr + off, mask=valid[:, None], other=0.0).to(tl.float32)
            q = tl.load(q_ptr + row * D + dd).to(tl.float32) * scale
            s = tl.where(valid, tl.sum(keys * q[None, :], axis=1), float("-inf"))
            p = tl.exp(s - tl.max(s, axis=0))
            o = tl.sum(p[:, None] * values, axis=0) / tl.sum(p, axis=0)
            tl.store(o_ptr + row * D + dd, o.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _dot(
        q_ptr, k_ptr, v_ptr, o_ptr, n_items, n, scale, D: tl.constexpr, HB: tl.constexpr, STAGES: tl.constexpr
    ):
        dd, r16, j = tl.arange(0, D), tl.arange(0, 16), tl.arange(0, HB * 64)
        valid = (j % 64) < n
        own = ((j // 64)[None, :] == r16[:, None]) & valid[None, :]  # row h of q meets only head h's keys
        for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0), num_stages=STAGES):
            base = item.to(tl.int64) * HB
            off = (base * 64 + j)[:, None] * D + dd[None, :]
            keys = tl.load(k_ptr + off, mask=valid[:, None], other=0.0)
            values = tl.load(v_ptr + off, mask=valid[:, None], other=0.0)
            q = tl.load(q_ptr + (base + r16)[:, None] * D + dd[None, :], mask=(r16 < HB)[:, None], other=0.0)
            s = tl.where(own, tl.dot(q, tl.trans(keys)) * scale, -1.0e30)
            p = tl.exp(s - tl.max(s, axis=1)[:, None])
            o = tl.dot(p.to(values.dtype), values) / tl.sum(p, axis=1)[:, None]
            tl.store(
                o_ptr + (base + r16)[:, None] * D + dd[None, :],
                o.to(o_ptr.dtype.element_ty),
                mask=(r16 < HB)[:, None],
            )

    return {"stream": _stream, "loads": _loads, "vec": _vec, "dot": _dot}


def stream_part(stream_kernel: Callable, sms_list: list[int]) -> list[dict]:
    x = torch.randn(1 << 23, 128, device="cuda", dtype=torch.bfloat16)  # 2 GiB, far beyond L2
    out = torch.empty(1024, device="cuda")
    rows = []
    for programs in sms_list:
        for br in (64, 128):
            for stages in (1, 2, 3, 4):
                per = x.shape[0] // programs // br * br
                t = mean_ms(
                    lambda p=programs, b=br, s=stages, n=per: stream_kernel[(p,)](
                        x, out, n, BR=b, C=128, STAGES=s, num_warps=8
                    ),
                    3,
                )
                tb = per * programs * 128 * 2 / t / 1e9
                rows.append(
                    {
                        "programs": programs,
                        "rows_per_load": br,
                        "stages": stages,
                        "ms": t,
                        "tb_per_s": tb,
                        "gb_per_s_per_sm": tb / programs * 1e3,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--batch", type=int, default=2048, help="sequences (half of the memorization batch)")
    ap.add_argument("--carveouts", default="24,32,48,64")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    from open360.analysis.memorization.engine import decode_attention

    cfg = asdict(AMBER_1B4)
    layers, heads, d = cfg["n_layers"], cfg["n_heads"], cfg["d_model"]
    head_dim, b, sms = d // heads, args.batch, torch.cuda.get_device_properties(0).multi_processor_count
    import triton

    kern = build_kernels()
    stream = stream_part(kern["stream"], [32])

    bf = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    k, v = torch.randn(b * heads, SLOTS, head_dim, **bf), torch.randn(b * heads, SLOTS, head_dim, **bf)
    q, o = torch.randn(b * heads, head_dim, **bf), torch.empty(b * heads, head_dim, **bf)
    scale, rows_ = head_dim**-0.5, b * heads
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, None, None], k[:, None, :CACHED].float(), v[:, None, :CACHED].float(), scale=scale
    )[:, 0, 0]
    attention_bytes = 2 * rows_ * CACHED * head_dim * 2 * layers
    sink = torch.empty(4096, device="cuda")
    kernels: dict[str, Callable[[int], object]] = {
        "loads": lambda p: kern["loads"][(p,)](
            k, v, sink, rows_ // 4, CACHED, D=head_dim, HB=4, STAGES=4, num_warps=8
        ),
        "vec": lambda p: kern["vec"][(p,)](
            q, k, v, o, rows_, CACHED, scale, D=head_dim, STAGES=3, num_warps=4
        ),
        "dot2": lambda p: kern["dot"][(p,)](
            q, k, v, o, rows_ // 2, CACHED, scale, D=head_dim, HB=2, STAGES=4, num_warps=4
        ),
        "dot4": lambda p: kern["dot"][(p,)](
            q, k, v, o, rows_ // 4, CACHED, scale, D=head_dim, HB=4, STAGES=3, num_warps=8
        ),
    }
    q4 = q.view(b, heads, 1, head_dim)
    k4, v4 = (t.view(b, heads, SLOTS, head_dim)[:, :, :CACHED] for t in (k, v))

    def engine() -> None:
        o.view(b, heads, head_dim).copy_(decode_attention(q4, k4, v4, scale)[:, :, 0])

    alone = []
    for name, kernel in [*kernels.items(), ("engine", None)]:
        for programs in (32, sms, 2 * sms) if kernel else (b * heads,):
            o.zero_()
            step = (lambda p=programs, f=kernel: f(p)) if kernel else engine
            t = mean_ms(lambda s=step: [s() for _ in range(layers)], 3)
            err = float("nan") if name == "loads" else (o.float() - reference).abs().max().item()
            tb = attention_bytes / t / 1e9
            alone.append(
                {
                    "kernel": name,
                    "programs": programs,
                    "ms": t,
                    "tb_per_s": tb,
                    "gb_per_s_per_sm": tb / min(programs, sms) * 1e3,
                    "max_abs_err_vs_fp32": err,
                }
            )
    fastest = min((r for r in alone if r["kernel"] != "loads"), key=lambda r: r["ms"])

    gemms = layer_gemms(b, d, cfg["ffn_dim"], layers)
    serial = mean_ms(gemms, 10) + fastest["ms"]
    streams = torch.cuda.Stream(), torch.cuda.Stream()
    overlap = []
    torch.backends.cuda.preferred_blas_library("cublaslt")  # the carve-out applies to cuBLASLt only
    for carveout in [int(c) for c in args.carveouts.split(",") if c.strip()]:
        torch._C._set_sm_carveout_experimental(carveout)
        g = mean_ms(gemms, 10)
        for name in ("vec", "dot2", "dot4"):
            for programs in (carveout, 2 * carveout, 4 * carveout):

                def both(p: int = programs, f: Callable[[int], object] = kernels[name]) -> None:
                    here = torch.cuda.current_stream()
                    for s, work in zip(streams, (gemms, lambda: [f(p) for _ in range(layers)]), strict=True):
                        s.wait_stream(here)
                        with torch.cuda.stream(s):
                            work()
                    for s in streams:
                        here.wait_stream(s)

                t = mean_ms(both, 5)
                overlap.append(
                    {
                        "carveout_sms": carveout,
                        "kernel": name,
                        "programs": programs,
                        "gemm_ms": g,
                        "together_ms": t,
                        "serial_ms": serial,
                        "speedup": serial / t,
                    }
                )
    torch._C._set_sm_carveout_experimental(0)
    torch.backends.cuda.preferred_blas_library("cublas")

    print(
        f"decode attention on few SMs, {torch.cuda.get_device_name()}, {b} sequences x {heads} heads, "
        f"{CACHED} cached positions, {layers} layers"
    )
    print("  stream (plain reads, 32 programs, 8 warps): rows/load, stages -> GB/s per SM")
    for r in stream:
        print(
            f"    {r['rows_per_load']:4d} x 128, {r['stages']} stages: {r['tb_per_s']:.2f} TB/s, "
            f"{r['gb_per_s_per_sm']:.1f} GB/s per SM"
        )
    print("  attention kernels alone (24 layers):")
    for r in alone:
        print(
            f"    {r['kernel']:6s} {r['programs']:6d} programs: {r['ms']:6.2f} ms, {r['tb_per_s']:.2f} TB/s, "
            f"{r['gb_per_s_per_sm']:.1f} GB/s per SM, max |err| {r['max_abs_err_vs_fp32']:.1e}"
        )
    best = max(overlap, key=lambda r: r["speedup"])
    print(
        f"  overlap, serial on the whole GPU {serial:.2f} ms (cuBLAS GEMMs + {fastest['kernel']} alone); best "
        f"{best['together_ms']:.2f} ms ({best['speedup']:.2f}x) at carve-out {best['carveout_sms']}, "
        f"{best['kernel']} on {best['programs']} programs"
    )
    for r in overlap:
        print(
            f"    carve-out {r['carveout_sms']:2d} (GEMMs {r['gemm_ms']:.2f} ms), {r['kernel']:4s} on "
            f"{r['programs']:3d} programs: together {r['together_ms']:.2f} ms ({r['speedup']:.2f}x)"
        )
    payload = {
        "benchmark": "decode_attention_sm",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": " ".join(sys.argv),
        "model": cfg,
        "batch": b,
        "cached_positions": CACHED,
        "stream": stream,
        "alone": alone,
        "serial_ms": serial,
        "overlap": overlap,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
