"""Where one exact-greedy memorization batch spends its time, against the floors of its parts (GPU only).

    python benchmarks/bench_memorization_floors.py --out results/bench_memorization_floors.json

1.4B Amber shape, k = l = 32, open360's fastest exact setting (bf16, `compile=true`, CUDA graph,
batch 4096). Measured with CUDA events, each a mean of 5 runs after a warm-up:
  batch          the whole continuation of one batch (the graph replayed)
  prefill        the k-token prefill alone, captured as its own graph; decode = batch - prefill
  GEMM floors    bare bf16 matmuls of the same shapes (24 layers x QKV, out, gate_up, down, plus the
                 LM head at the last position): the prefill's at M = batch x k rows, one decode step's
                 at M = batch rows
  attention      the engine's Triton decode kernel alone over cached lengths k+1 .. k+l-1, 24 layers
Then the overlap probe: can the memory-bound decode attention run beside the compute-bound GEMMs if
each gets its own SMs? Half a batch's decode-step GEMMs run on one stream through cuBLASLt with some SMs
kept from them (`torch._C._set_sm_carveout_experimental`; the default cuBLAS path ignores it), and the
decode attention on another stream in a persistent Triton kernel of `P` programs (one per SM), so it stays
on the SMs left. First that kernel alone for each `P`: its bandwidth per SM says how far it can go on a
few SMs. Prints a table and writes JSON; asserts nothing.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import AMBER_1B4  # noqa: E402

K = L = 32


def mean_ms(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def layer_gemms(rows: int, d: int, f: int, n_layers: int) -> Callable[[], None]:
    """The four matmuls of each of `n_layers` blocks for `rows` tokens (random bf16 operands)."""
    bf = dict(device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(d, 3 * d, **bf), torch.randn(d, d, **bf), torch.randn(d, 2 * f, **bf)]
    down = torch.randn(f, d, **bf)
    x, h = torch.randn(rows, d, **bf), torch.randn(rows, f, **bf)

    def run() -> None:
        for _ in range(n_layers):
            for w in weights:
                x @ w
            h @ down

    return run


def persistent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_layers: int) -> Callable[[int], None]:
    """`n_layers` single-token attentions (q [B, H, D], k/v [B, H, L, D] contiguous) by a persistent Triton
    kernel of `programs` programs, each looping over (sequence, 4 heads) items with pipelined loads."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(q_ptr, k_ptr, v_ptr, o_ptr, n_items, scale, H: tl.constexpr, D: tl.constexpr, L: tl.constexpr,
               BL: tl.constexpr, HB: tl.constexpr):
        dd, pos, hh = tl.arange(0, D), tl.arange(0, BL), tl.arange(0, HB)
        valid = pos < L
        for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0), num_stages=3):
            row = item.to(tl.int64) * HB + hh  # (sequence, head) rows of this item
            q = tl.load(q_ptr + row[:, None] * D + dd[None, :]).to(tl.float32) * scale
            kv = (row[:, None, None] * L + pos[None, :, None]) * D + dd[None, None, :]
            keys = tl.load(k_ptr + kv, mask=valid[None, :, None], other=0.0).to(tl.float32)
            values = tl.load(v_ptr + kv, mask=valid[None, :, None], other=0.0).to(tl.float32)
            s = tl.where(valid[None, :], tl.sum(keys * q[:, None, :], axis=2), float("-inf"))
            p = tl.exp(s - tl.max(s, axis=1)[:, None])
            o = tl.sum(p[:, :, None] * values, axis=1) / tl.sum(p, axis=1)[:, None]
            tl.store(o_ptr + row[:, None] * D + dd[None, :], o.to(o_ptr.dtype.element_ty))

    b, h, length, d = k.shape
    out, heads_per_item = torch.empty_like(q), 4

    def run(programs: int) -> None:
        for _ in range(n_layers):
            kernel[(programs,)](q, k, v, out, b * h // heads_per_item, d**-0.5, H=h, D=d, L=length,
                                BL=triton.next_power_of_2(length), HB=heads_per_item, num_warps=2)

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--carveouts", default="0,32,48,66", help="SMs kept from cuBLASLt in the overlap probe")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")

    from open360.analysis.memorization import MemorizationScorer
    from open360.analysis.memorization.engine import _logits_at, decode_attention
    from open360.models import build_model

    cfg = asdict(AMBER_1B4)
    d, f, vocab, n_layers = cfg["d_model"], cfg["ffn_dim"], cfg["vocab_size"], cfg["n_layers"]
    heads, head_dim, b = cfg["n_heads"], cfg["d_model"] // cfg["n_heads"], args.batch
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(cfg)
    scorer = MemorizationScorer(model, k=K, l=L, batch_size=b, device="cuda", dtype="bf16", compile=True)
    prompts = torch.randint(0, vocab, (b, K), device="cuda")
    batch_ms = mean_ms(lambda: scorer._greedy_batch(prompts))

    cache, forward = scorer._cache, scorer._forward
    prefill = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):
            for _ in range(2):
                _logits_at(forward, prompts, K - 1, K, cache, 0).argmax(-1)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(prefill):
            _logits_at(forward, prompts, K - 1, K, cache, 0).argmax(-1)
    prefill_ms = mean_ms(prefill.replay)
    scorer.release()
    del prefill, cache

    bf = dict(device="cuda", dtype=torch.bfloat16)
    last_hidden, head = torch.randn(b, d, **bf), torch.randn(d, vocab, **bf)
    head_ms = mean_ms(lambda: last_hidden @ head)
    prefill_gemm_ms = mean_ms(layer_gemms(b * K, d, f, n_layers)) + head_ms
    step_gemm_ms = mean_ms(layer_gemms(b, d, f, n_layers)) + head_ms
    q = torch.randn(b, 1, heads, head_dim, **bf).transpose(1, 2)  # the decoder's strided view
    keys, values = torch.randn(b, heads, K + L, head_dim, **bf), torch.randn(b, heads, K + L, head_dim, **bf)
    attention_ms = n_layers * sum(
        mean_ms(lambda n=n: decode_attention(q, keys[:, :, :n], values[:, :, :n], head_dim**-0.5), reps=2)
        for n in range(K + 1, K + L)
    )
    steps = L - 1
    decode_ms = batch_ms - prefill_ms
    flop_per_token = 2 * n_layers * (3 * d * d + d * d + 2 * d * f + f * d)
    rows = {
        "batch_ms": batch_ms,
        "seq_per_s": b / batch_ms * 1e3,
        "prefill_ms": prefill_ms,
        "prefill_gemm_floor_ms": prefill_gemm_ms,
        "prefill_gemm_tflops": (flop_per_token * K + 2 * d * vocab) * b / prefill_gemm_ms / 1e9,  # + LM head
        "decode_ms": decode_ms,
        "decode_step_ms": decode_ms / steps,
        "decode_step_gemm_floor_ms": step_gemm_ms,
        "decode_step_gemm_tflops": (flop_per_token + 2 * d * vocab) * b / step_gemm_ms / 1e9,
        "decode_step_attention_ms": attention_ms / steps,
        "decode_step_rest_ms": (decode_ms - steps * step_gemm_ms - attention_ms) / steps,
    }
    del keys, values, q

    # Overlap probe: half a batch's decode-step GEMMs and attention (48 cached positions), each on its own SMs.
    half, positions, sms = b // 2, 48, torch.cuda.get_device_properties(0).multi_processor_count
    gemms = layer_gemms(half, d, f, n_layers)
    q = torch.randn(half, heads, head_dim, **bf)
    keys, values = (torch.randn(half, heads, positions, head_dim, **bf) for _ in range(2))
    attention = persistent_attention(q, keys, values, n_layers)
    attention_bytes = 2 * keys.numel() * keys.element_size() * n_layers
    alone = []
    for programs in (32, 64, 132):
        a = mean_ms(lambda p=programs: attention(p), 10)
        alone.append({"programs": programs, "attention_ms": a, "tb_per_s": attention_bytes / a / 1e9})
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def together(programs: int) -> None:
        here = torch.cuda.current_stream()
        for stream, work in zip(streams, (gemms, lambda: attention(programs)), strict=True):
            stream.wait_stream(here)
            with torch.cuda.stream(stream):
                work()
        for stream in streams:
            here.wait_stream(stream)

    overlap = []
    torch.backends.cuda.preferred_blas_library("cublaslt")  # the carve-out applies to cuBLASLt only
    serial = mean_ms(gemms, 10) + mean_ms(lambda: attention(sms), 10)
    for carveout in [int(x) for x in args.carveouts.split(",") if x.strip()]:
        torch._C._set_sm_carveout_experimental(carveout)
        g = mean_ms(gemms, 10)
        for programs in sorted({max(carveout, 16), sms}):
            a, both = mean_ms(lambda p=programs: attention(p), 10), mean_ms(lambda p=programs: together(p), 10)
            overlap.append({"carveout_sms": carveout, "attention_programs": programs, "gemm_ms": g,
                            "attention_ms": a, "together_ms": both, "serial_full_gpu_ms": serial})
    torch._C._set_sm_carveout_experimental(0)
    torch.backends.cuda.preferred_blas_library("cublas")

    print(f"memorization batch of {b} on {torch.cuda.get_device_name()}, k = l = {K}")
    print(f"  whole batch      {batch_ms:8.1f} ms  ({rows['seq_per_s']:.0f} seq/s)")
    print(f"  prefill          {prefill_ms:8.1f} ms  GEMM floor {prefill_gemm_ms:.1f} ms "
          f"({rows['prefill_gemm_tflops']:.0f} TFLOP/s)")
    print(f"  decode step      {rows['decode_step_ms']:8.2f} ms  GEMM floor {step_gemm_ms:.2f} ms "
          f"({rows['decode_step_gemm_tflops']:.0f} TFLOP/s), attention {rows['decode_step_attention_ms']:.2f} ms, "
          f"rest {rows['decode_step_rest_ms']:.2f} ms")
    print("  decode attention alone (half batch, 24 layers), persistent kernel:")
    for r in alone:
        print(f"    {r['programs']:4d} programs: {r['attention_ms']:.2f} ms, {r['tb_per_s']:.2f} TB/s "
              f"({r['tb_per_s'] / r['programs'] * 1e3:.1f} GB/s per SM)")
    print(f"  overlap probe (half batch, one decode step), serial on the whole GPU {serial:.2f} ms:")
    for r in overlap:
        print(f"    cuBLASLt carve-out {r['carveout_sms']:2d} SMs: GEMMs {r['gemm_ms']:.2f} ms, attention on "
              f"{r['attention_programs']} programs {r['attention_ms']:.2f} ms; together {r['together_ms']:.2f} ms "
              f"({serial / r['together_ms']:.2f}x)")
    payload = {
        "benchmark": "memorization_floors",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": " ".join(sys.argv),
        "model": cfg,
        "batch": b,
        "breakdown": rows,
        "attention_alone": alone,
        "overlap": overlap,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
