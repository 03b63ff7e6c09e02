"""Train-step throughput of the 1.4B Amber shape: open360 (eager, compiled) vs transformers Llama, one process."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from shapes import AMBER_1B4, H100_BF16_PEAK
from shapes import AMBER_TINY as TINY

from open360.config import ModelConfig
from open360.models import build_model
from open360.models.flops import count_parameters, training_flops_per_token


@dataclass
class Result:
    """One implementation's measurements (None where it did not run)."""

    name: str
    status: str = "ok"
    batch_size: int = 0
    seq_len: int = 0
    params: int = 0
    first_step_s: float | None = None  # includes torch.compile time
    train_step_ms: float | None = None  # forward + backward + AdamW.step + zero_grad
    train_tokens_per_s: float | None = None
    train_tflops: float | None = None
    train_mfu: float | None = None
    fwd_bwd_ms: float | None = None  # forward + backward only (BENCHMARKS.md reference figures)
    fwd_bwd_tokens_per_s: float | None = None
    fwd_bwd_mfu: float | None = None
    peak_memory_gib: float | None = None
    loss: float | None = None


def hf_llama(cfg: ModelConfig) -> torch.nn.Module:
    """transformers LlamaForCausalLM with the same shape, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
        use_cache=False, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_cfg)


def hf_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def open360_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model.loss(inputs, targets)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str,
    build: Callable[[], torch.nn.Module],
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    cfg: ModelConfig,
    args: argparse.Namespace,
    device: torch.device,
    attention: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Result:
    """Warm up, then time train steps and forward+backward steps of one implementation."""
    res = Result(name=name, batch_size=args.batch, seq_len=args.seq_len)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = build()
    model.train()
    res.params = sum(p.numel() for p in model.parameters())
    groups = model.param_groups(args) if hasattr(model, "param_groups") else [{"params": list(model.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda or None)
    gen = torch.Generator(device=device).manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device, generator=gen)
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    flops_per_token = training_flops_per_token(cfg, args.seq_len)
    tokens = args.batch * args.seq_len

    def fwd_bwd() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=cuda), attention():
            loss = loss_fn(model, inputs, targets)
        loss.backward()
        return loss

    def train_step() -> torch.Tensor:
        loss = fwd_bwd()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def timed(fn: Callable[[], torch.Tensor], steps: int) -> tuple[float, float]:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = fn()
        sync(device)
        return (time.perf_counter() - start) / steps, loss.item()

    try:
        start = time.perf_counter()
        train_step()
        sync(device)
        res.first_step_s = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            train_step()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step_s, res.loss = timed(train_step, args.steps)
        res.train_step_ms = 1e3 * step_s
        res.train_tokens_per_s = tokens / step_s
        res.train_tflops = flops_per_token * res.train_tokens_per_s / 1e12
        res.train_mfu = flops_per_token * res.train_tokens_per_s / args.peak_flops
        if cuda:
            res.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        fb_s, _ = timed(lambda: fwd_bwd().detach(), args.steps)
        optimizer.zero_grad(set_to_none=True)
        res.fwd_bwd_ms = 1e3 * fb_s
        res.fwd_bwd_tokens_per_s = tokens / fb_s
        res.fwd_bwd_mfu = flops_per_token * res.fwd_bwd_tokens_per_s / args.peak_flops
    except torch.cuda.OutOfMemoryError:
        phase = "forward+backward-only timing" if res.train_step_ms is not None else "train step"
        res.status = f"OOM at micro-batch {args.batch} in the {phase}"
    return res


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--compile", action="store_true", help="also run open360 with torch.compile")
    parser.add_argument("--tiny", action="store_true", help="tiny shape on CPU (checks the script, not the speed)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 8; 4 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (128 with --tiny)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK / 1e12, help="dense bf16 peak for MFU")
    parser.add_argument("--skip-hf", action="store_true", help="do not run the transformers baseline")
    parser.add_argument(
        "--cudnn-attention", action="store_true", help="also run open360 with SDPA's cuDNN backend preferred (CUDA)"
    )
    args = parser.parse_args()
    args.warmup = max(args.warmup, 1)
    cfg = TINY if args.tiny else AMBER_1B4
    args.batch = args.batch or (4 if args.tiny else 8)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    args.peak_flops = args.peak_tflops * 1e12
    args.lr, args.eps, args.weight_decay = 3e-4, 1e-8, 0.1  # read by Decoder.param_groups
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    default = contextlib.nullcontext
    eager, compiled = (lambda: build_model(cfg)), (lambda: build_model(replace(cfg, compile=True)))
    variants: list[tuple[str, Callable[[], torch.nn.Module], Callable, Callable]] = []
    if not args.skip_hf:
        variants.append(("hf_llama_sdpa", lambda: hf_llama(cfg), hf_loss, default))
    variants.append(("open360_eager", eager, open360_loss, default))
    if args.compile:
        variants.append(("open360_compiled", compiled, open360_loss, default))
    if args.cudnn_attention and device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        cudnn = lambda: sdpa_kernel(order, set_priority=True)  # noqa: E731
        variants.append(("open360_eager_cudnn", eager, open360_loss, cudnn))
        if args.compile:
            variants.append(("open360_compiled_cudnn", compiled, open360_loss, cudnn))

    results = []
    for name, build, loss_fn, attention in variants:
        print(f"running {name} ...", flush=True)
        torch._dynamo.reset()  # compiled variants must not reuse graphs traced under another SDPA backend
        try:
            results.append(measure(name, build, loss_fn, cfg, args, device, attention))
        except Exception as e:  # one broken variant (e.g. a backend missing here) must not hide the others
            traceback.print_exc()
            results.append(Result(name=name, status=f"error: {type(e).__name__}: {e}"[:300]))
        gc.collect()  # the model and optimizer of the previous implementation must be gone before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = results[-1]
        print(f"  {r.status}: {fmt(r.train_step_ms, '.1f')} ms/step, MFU {fmt(r.train_mfu, '.3f')}", flush=True)

    hf = next((r for r in results if r.name == "hf_llama_sdpa" and r.train_tokens_per_s), None)
    header = (
        f"{'implementation':<22} {'train ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'vs HF':>6} "
        f"{'fwd+bwd MFU':>11} {'peak GiB':>8} {'1st step s':>10}"
    )
    print(f"\n{cfg.name}: {count_parameters(cfg) / 1e9:.3f}B params, micro-batch {args.batch} x seq {args.seq_len}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, AdamW{' (fused)' if device.type == 'cuda' else ''}, "
          f"device {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}")
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = r.train_tokens_per_s / hf.train_tokens_per_s if hf and r.train_tokens_per_s else None
        print(
            f"{r.name:<22} {fmt(r.train_step_ms, '9.1f')} {fmt(r.train_tokens_per_s, '9.0f')} "
            f"{fmt(r.train_tflops, '8.1f')} {fmt(r.train_mfu and 100 * r.train_mfu, '5.1f')}% {fmt(ratio, '6.2f')} "
            f"{fmt(r.fwd_bwd_mfu and 100 * r.fwd_bwd_mfu, '10.1f')}% {fmt(r.peak_memory_gib, '8.1f')} "
            f"{fmt(r.first_step_s, '10.1f')}" + ("" if r.status == "ok" else f"  {r.status}")
        )
    if any(r.status.startswith("OOM") and r.train_step_ms is None for r in results):
        print(f"some train steps ran out of memory at micro-batch {args.batch}: rerun all with --batch 4")
    if device.type == "cpu":
        print("(CPU run: MFU is against the H100 peak and means nothing here; this only checks the script)")

    import transformers

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "model": asdict(cfg),
        "flops_per_token": training_flops_per_token(cfg, args.seq_len),
        "peak_tflops": args.peak_tflops,
        "warmup": args.warmup,
        "steps": args.steps,
        "results": [asdict(r) for r in results],
        "ratio_vs_hf": {
            r.name: r.train_tokens_per_s / hf.train_tokens_per_s for r in results if hf and r.train_tokens_per_s
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
