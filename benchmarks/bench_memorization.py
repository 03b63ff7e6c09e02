"""Memorization throughput (k = l = 32), side by side in one process: Analysis360, HF generate, open360.

    python benchmarks/bench_memorization.py --out bench_memorization.json          # one H100, ~3 min
    python benchmarks/bench_memorization.py --tiny --out /tmp/bench_mem_tiny.json  # CPU smoke run
    python benchmarks/bench_memorization.py --compile --variants open360_compiled_b4096 --rounds 5 \
        --out bench_memorization_rounds.json    # + Analysis360 vs open360 timed alternately, 5 times
    python benchmarks/bench_memorization.py --compile --variants open360_compiled_b4096 --no-hf \
        --checkpoint-swaps 3 --out swaps.json   # + per-checkpoint cost: fresh scorer vs swapped weights

Same randomly initialized 1.4B Amber-shaped model (24 layers, hidden 2048, 32 heads, FFN 5504, vocab
50304) for every method: open360's Decoder, exported with `open360.models.hf.export_hf` and loaded
as `LlamaForCausalLM`. Methods:
  analysis360     HF generate, fp16, batch 32 (Analysis360's memorization script)
  hf_generate     HF generate, bf16, batch --hf-batch (512)
  open360_greedy  open360 exact greedy: static KV cache, CUDA graph, bf16; each decode step attends
                  over the filled cache slots only (sliced decode) with the engine's Triton kernel
  open360_sdpa    the same with SDPA (it picks its kernel) for the decode steps
  open360_masked  one fixed shape for every step (attention over all k+l slots under a mask, SDPA):
                  the engine before sliced decode
  open360_sdpa_*  open360_sdpa with SDPA held to one backend (flash, efficient, cudnn)
  open360_eager   open360_greedy without the CUDA graph
  open360_tf      open360 teacher-forced screen (one forward; exact full_match only), bf16
  open360_tf_compiled_b<B>       the teacher-forced screen with `compile=true`, batch B (--compile)
  open360_compiled_auto          compiled, batch_size=0: the batch the scorer sizes from free memory
  open360_*_b<B>_percell<C>      --cell-size C: sequences cut into a job's cells, one `score` per cell
  open360_*_b<B>_cells<C>        the same cells streamed through `score_groups` (shared batches)
Scores are checked against HF generate on a sample in fp32 (TF32 off): identical continuations are
expected except at argmax near-ties; bf16 agreement with HF bf16 is reported too (bf16 rounding
differs between the two implementations, so a random-init model's near-uniform logits flip often).
Prints a table and writes JSON; never asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import shapes
import torch

K = L = 32
AMBER_1B4 = asdict(shapes.AMBER_1B4)
TINY = dict(
    name="amber_bench_tiny",
    vocab_size=512,
    n_layers=2,
    d_model=64,
    n_heads=4,
    ffn_dim=128,
    max_seq_len=128,
    norm="rmsnorm",
    norm_eps=1e-6,
    mlp="swiglu",
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def hf_generate_rows(hf: Any, seqs: torch.Tensor, batch: int, analysis360_call: bool) -> np.ndarray:
    """HF generate over `seqs` in batches -> [N, L] continuations. `analysis360_call`: the loop of
    Analysis360's `single_ckpt_memorization_eval.py` as written there (their `generate` arguments, no
    attention mask or pad id, EOS left on, matches counted on the GPU and read back with `.tolist()`)."""
    from open360.analysis.memorization.reference import hf_greedy_continuations

    if not analysis360_call:
        return hf_greedy_continuations(hf, seqs, K, L, batch_size=batch)
    device = next(hf.parameters()).device
    out = np.zeros((seqs.shape[0], L), dtype=np.int32)
    total_token_match: list[int] = []
    all_match: list[list[int]] = []
    for lo in range(0, seqs.shape[0], batch):
        prompt = seqs[lo : lo + batch, :K].to(device)
        continuation = seqs[lo : lo + batch, K : K + L].to(device)
        generated = hf.generate(prompt, min_length=K, max_new_tokens=L, num_beams=1, do_sample=False)[:, K:]
        total_token_match += (generated == continuation).sum(dim=1).tolist()
        all_match += (generated == continuation).int().tolist()
        out[lo : lo + prompt.shape[0], : generated.shape[1]] = generated.cpu().numpy()
    return out


def score_cells(scorer: Any, seqs: torch.Tensor, args: Any, how: str) -> Any:
    """`seqs` cut into cells of `--cell-size` sequences (as a job's sampled chunks), scored one call per
    cell ("percell": each cell's last batch padded) or as one stream through `score_groups` ("cells")."""
    from open360.analysis.memorization import ScoreResult

    cells = list(enumerate(torch.split(seqs, args.cell_size)))
    if how == "percell":
        parts = [scorer.score(cell) for _, cell in cells]
    else:
        parts = [res for _, res in scorer.score_groups(iter(cells))]
    return ScoreResult.concat(parts, scorer.mode, K, L, parts[-1].info)


def checkpoint_swaps(args: Any, shape: dict, seqs: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Per-checkpoint cost in a job, `--checkpoint-swaps` checkpoints of one batch each (compiled on CUDA):
    a fresh scorer per checkpoint (model built around the weights as `load_model_from_checkpoint` does,
    moved, compiled from the warm cache, graph captured) against one scorer whose weights are swapped in
    place (`load_weights`, what the job does). Weights start in memory: reading them from disk is extra."""
    from open360.analysis.memorization import MemorizationScorer
    from open360.models import build_model, model_with_weights

    batch, cuda = args.rounds_batch, device.type == "cuda"
    states = []
    for seed in range(args.checkpoint_swaps):
        torch.manual_seed(seed)
        states.append(build_model(shape).state_dict())
    kw = dict(k=K, l=L, batch_size=batch, device=device, dtype="auto", compile=cuda)
    fresh: list[dict[str, Any]] = []
    swapped: list[dict[str, Any]] = []
    tokens = []
    for state in states:
        start = time.perf_counter()
        scorer = MemorizationScorer(model_with_weights(shape, state), **kw)
        res = scorer.score(seqs[:batch])
        sync(device)
        fresh.append({"seconds": time.perf_counter() - start, "scoring_seconds": res.seconds})
        tokens.append(res.predicted)
        scorer.release()
        scorer = None
        release_memory()
    scorer = MemorizationScorer(build_model(shape), **kw)
    scorer.score(seqs[:batch])  # the job's first checkpoint: build, compile, capture
    for state, expected in zip(states, tokens, strict=True):
        start = time.perf_counter()
        scorer.load_weights(state)
        res = scorer.score(seqs[:batch])
        sync(device)
        swapped.append(
            {
                "seconds": time.perf_counter() - start,
                "scoring_seconds": res.seconds,
                "identical_to_fresh": bool(np.array_equal(res.predicted, expected)),
            }
        )
    scorer.release()
    for i, (a, b) in enumerate(zip(fresh, swapped, strict=True)):
        print(
            f"  checkpoint {i}: fresh scorer {a['seconds']:.1f}s, swapped weights {b['seconds']:.1f}s "
            f"(scoring {b['scoring_seconds']:.2f}s of one batch of {batch}); same tokens: {b['identical_to_fresh']}",
            flush=True,
        )
    return {"batch": batch, "fresh": fresh, "swapped": swapped}


def interleaved_rounds(
    args: Any, model: torch.nn.Module, hf_dir: Path, seqs: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    """Analysis360's method and open360's fastest exact setting (bf16, `compile=true`, batch
    `--rounds-batch`) timed alternately `--rounds` times in one process, both models resident: the
    host-bound baseline drifts between calls, so the ratio is given per round and as median/min/max.
    On CPU (the smoke run) both run in fp32 and open360 is not compiled."""
    from open360.analysis.memorization import MemorizationScorer

    cuda = device.type == "cuda"
    hf = load_hf(hf_dir, torch.float16 if cuda else torch.float32, device)
    batch = args.rounds_batch
    scorer = MemorizationScorer(
        copy.deepcopy(model), k=K, l=L, batch_size=batch, device=device, dtype="auto", compile=cuda
    )
    n = min(args.sequences, 16 * batch)
    scorer.score(seqs[:batch])  # warm-up: compile, graph capture
    hf_generate_rows(hf, seqs[: args.a360_batch], args.a360_batch, True)
    rounds = []
    for r in range(args.rounds):
        _, a360 = timed(lambda: hf_generate_rows(hf, seqs[: args.a360_sequences], args.a360_batch, True), device)
        _, ours = timed(lambda: scorer.score(seqs[:n]), device)
        row = {
            "analysis360_seq_per_s": args.a360_sequences / a360,
            "open360_seq_per_s": n / ours,
            "ratio": (n / ours) / (args.a360_sequences / a360),
        }
        rounds.append(row)
        print(
            f"  round {r}: analysis360 {row['analysis360_seq_per_s']:.1f} seq/s, open360 "
            f"{row['open360_seq_per_s']:.1f} seq/s, ratio {row['ratio']:.1f}x",
            flush=True,
        )
    scorer.release()
    ratios = [r["ratio"] for r in rounds]
    return {
        "open360_batch": batch,
        "open360_sequences_per_round": n,
        "analysis360_sequences_per_round": args.a360_sequences,
        "rounds": rounds,
        "ratio_median": float(np.median(ratios)),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "open360_seq_per_s_median": float(np.median([r["open360_seq_per_s"] for r in rounds])),
        "analysis360_seq_per_s_median": float(np.median([r["analysis360_seq_per_s"] for r in rounds])),
    }


def load_hf(folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers >= 4.56 takes `dtype`, older releases `torch_dtype`; the final .to() makes sure.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", **{key: dtype})
    return model.to(device=device, dtype=dtype).eval()


def release_memory() -> None:
    """Collect dropped models and hand their GPU memory back before loading the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke run of every code path)")
    ap.add_argument("--batch", type=int, default=1024, help="open360 batch size (sequences)")
    ap.add_argument("--hf-batch", type=int, default=512)
    ap.add_argument("--a360-batch", type=int, default=32)
    ap.add_argument("--sequences", type=int, default=16384, help="sequences timed for open360 methods")
    ap.add_argument(
        "--hf-sequences", type=int, default=2048, help="sequences timed for HF generate batch 512"
    )
    ap.add_argument(
        "--a360-sequences", type=int, default=320, help="sequences timed for Analysis360's method"
    )
    ap.add_argument("--check", type=int, default=128, help="sequences for the fp32 parity check against HF")
    ap.add_argument("--compile", action="store_true", help="also time open360 greedy with torch.compile")
    ap.add_argument(
        "--extra-batches", default="2048,4096", help="more open360 greedy batch sizes to time ('' for none)"
    )
    ap.add_argument("--variants", default="", help="comma list of open360 variant names to run (default all)")
    ap.add_argument("--no-hf", action="store_true", help="skip HF generate, Analysis360 and the parity check")
    ap.add_argument(
        "--cell-size", type=int, default=0, help="also time a job's cells of this many sequences each"
    )
    ap.add_argument(
        "--rounds", type=int, default=0, help="time Analysis360 and open360 alternately this many times"
    )
    ap.add_argument("--rounds-batch", type=int, default=4096, help="open360 batch size in the rounds and the checkpoint swaps")
    ap.add_argument(
        "--checkpoint-swaps", type=int, default=0, help="time this many checkpoints: fresh scorer vs swapped weights"
    )
    ap.add_argument(
        "--sdpa-backends", default="flash,efficient,cudnn", help="SDPA backends to force, one variant each"
    )
    args = ap.parse_args(argv)

    from open360.analysis.memorization import MemorizationScorer
    from open360.models import build_model, count_parameters
    from open360.models.hf import export_hf

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape = TINY if args.tiny else AMBER_1B4
    if args.tiny:
        args.batch, args.hf_batch, args.a360_batch = 64, 64, 8
        args.sequences, args.hf_sequences, args.a360_sequences, args.check = 256, 128, 32, 32
        args.extra_batches, args.cell_size = "32", 40
        args.rounds, args.rounds_batch, args.checkpoint_swaps = 2, 32, 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(shape)
    # Round weights to bf16 once so that fp32, bf16 and fp16 copies all start from the same values.
    model = model.to(torch.bfloat16).to(torch.float32).eval()
    n_params = count_parameters(model.cfg)
    gen = torch.Generator().manual_seed(1234)
    n_max = max(args.sequences, args.hf_sequences, args.a360_sequences, args.check)
    seqs = torch.randint(0, shape["vocab_size"], (n_max, K + L), generator=gen)

    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    outputs: dict[str, np.ndarray] = {}

    def record(name: str, n: int, seconds: float, **extra: Any) -> None:
        results[name] = {"sequences": n, "seconds": seconds, "seq_per_s": n / seconds, **extra}
        print(f"  {name:<32} {n / seconds:>10.1f} seq/s  ({n} sequences in {seconds:.2f}s)", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench_mem_"))
    hf_dir = export_hf(model.to(torch.bfloat16).cpu(), model.cfg, None, tmp / "hf")
    model = model.float().to(device)

    # --- open360 (bf16 on GPU, fp32 on CPU) ---------------------------------------------------
    dtype = "bf16" if device.type == "cuda" else "fp32"
    variants: list[tuple[str, dict[str, Any], int]] = [
        ("open360_masked", dict(mode="greedy", cuda_graphs=True, sliced_decode=False), args.batch),
        ("open360_greedy", dict(mode="greedy", cuda_graphs=True), args.batch),
        ("open360_sdpa", dict(mode="greedy", cuda_graphs=True, decode_kernel=False), args.batch),
        ("open360_eager", dict(mode="greedy", cuda_graphs=False), args.batch),
        ("open360_tf", dict(mode="teacher_forced", cuda_graphs=False), args.batch),
    ]
    for b in [int(x) for x in args.extra_batches.split(",") if x.strip()]:
        variants.append((f"open360_greedy_b{b}", dict(mode="greedy", cuda_graphs=True), b))
    if device.type == "cuda":
        for backend in [x.strip() for x in args.sdpa_backends.split(",") if x.strip()]:
            opts = dict(mode="greedy", cuda_graphs=True, decode_kernel=False)
            variants.append((f"open360_sdpa_{backend}", opts, args.batch))
    if args.compile:
        variants.append(("open360_compiled", dict(mode="greedy", cuda_graphs=True, compile=True), args.batch))
        for b in [int(x) for x in args.extra_batches.split(",") if x.strip()]:
            variants.append(
                (f"open360_compiled_b{b}", dict(mode="greedy", cuda_graphs=True, compile=True), b)
            )
        variants.append(("open360_compiled_auto", dict(mode="greedy", cuda_graphs=True, compile=True), 0))
        for b in [args.batch] + [int(x) for x in args.extra_batches.split(",") if x.strip()]:
            opts = dict(mode="teacher_forced", cuda_graphs=False, compile=True)
            variants.append((f"open360_tf_compiled_b{b}", opts, b))
        variants.append(
            (
                "open360_compiled_masked",
                dict(mode="greedy", cuda_graphs=True, compile=True, sliced_decode=False),
                args.batch,
            )
        )
        variants.append(
            (
                "open360_compiled_sdpa",
                dict(mode="greedy", cuda_graphs=True, compile=True, decode_kernel=False),
                args.batch,
            )
        )
    if args.cell_size:  # a job's cells (one checkpoint x one chunk), scored one by one or as a stream
        best = max(int(x) for x in f"{args.batch},{args.extra_batches}".split(",") if x.strip())
        for how in ("percell", "cells"):
            opts = dict(mode="greedy", cuda_graphs=True, compile=args.compile, groups=how)
            tag = "compiled" if args.compile else "greedy"
            variants.append((f"open360_{tag}_b{best}_{how}{args.cell_size}", opts, best))
    wanted = {x.strip() for x in args.variants.split(",") if x.strip()}
    if wanted:
        variants = [v for v in variants if v[0] in wanted]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    for name, opts, batch in variants:
        try:
            opts = dict(opts)
            groups = opts.pop("groups", None)
            m = copy.deepcopy(model) if opts.get("compile") else model
            scorer = MemorizationScorer(m, k=K, l=L, batch_size=batch, device=device, dtype=dtype, **opts)
            batch = scorer.batch_size  # batch 0 = auto: what the scorer chose
            n = min(args.sequences, 4 * batch) if name == "open360_eager" else min(args.sequences, 16 * batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            backend = name.removeprefix("open360_sdpa_") if name.startswith("open360_sdpa_") else None
            ctx = sdpa_kernel([backends[backend]]) if backend else contextlib.nullcontext()
            with ctx:  # the kernel is chosen when the graph is captured, on the warm-up call
                scorer.score(seqs[:batch])  # warm-up: allocation, CUDA graph capture, compile
                if groups:
                    res, seconds = timed(lambda s=scorer, n=n, g=groups: score_cells(s, seqs[:n], args, g), device)
                else:
                    res, seconds = timed(lambda s=scorer, n=n: s.score(seqs[:n]), device)
            extra: dict[str, Any] = {}
            if device.type == "cuda" and name in ("open360_greedy", "open360_compiled"):
                extra = phase_times(scorer, seqs[:batch, :K].to(device))
            record(
                name,
                n,
                seconds,
                batch=batch,
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                dtype=dtype,
                cuda_graphs=scorer.use_graphs,
                decode_kernel=getattr(scorer, "decode_kernel", False),
                graph_error=scorer.graph_error,
                token_match=res.token_match,
                full_match=res.full_match,
                **extra,
            )
            if extra:
                print(f"    phases (eager, ms per batch of {batch}): {json.dumps(extra)}", flush=True)
            outputs[name] = res.predicted
            scorer.release()
            scorer = m = None
            release_memory()
        except Exception as err:  # report and keep going: one failing method must not hide the others
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"  {name:<16} FAILED: {errors[name]}", flush=True)
    if "open360_masked" in outputs:  # bf16 agreement of each variant with the engine before sliced decode
        ref_rows = outputs["open360_masked"]
        for name, pred in outputs.items():
            n = min(len(pred), len(ref_rows))
            if name != "open360_masked" and not name.startswith("open360_tf") and name in results and n:
                same = float((pred[:n] == ref_rows[:n]).all(1).mean())
                results[name]["bf16_identical_to_masked"] = same
                print(f"  {name:<24} identical continuations to open360_masked: {same:.4f}", flush=True)
    swaps: dict[str, Any] = {}
    if args.checkpoint_swaps > 0:
        try:
            swaps = checkpoint_swaps(args, shape, seqs, device)
        except Exception as err:
            errors["checkpoint_swaps"] = f"{type(err).__name__}: {err}"
            print(f"  checkpoint swaps FAILED: {errors['checkpoint_swaps']}", flush=True)
    if args.no_hf:
        return finish(args, shape, n_params, device, results, {}, errors, None, swaps)
    model = model.to(torch.bfloat16)  # keep memory for the HF copies

    # --- HF generate bf16, large batch ---------------------------------------------------------
    try:
        hf = load_hf(hf_dir, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
        hf_generate_rows(hf, seqs[: args.hf_batch], args.hf_batch, False)  # warm-up
        ref, seconds = timed(
            lambda: hf_generate_rows(hf, seqs[: args.hf_sequences], args.hf_batch, False), device
        )
        record("hf_generate", args.hf_sequences, seconds, batch=args.hf_batch, dtype=dtype)
        outputs["hf_generate"] = ref
        hf = None
        release_memory()
    except Exception as err:
        errors["hf_generate"] = f"{type(err).__name__}: {err}"
        print(f"  hf_generate      FAILED: {errors['hf_generate']}", flush=True)

    # --- Analysis360's method: HF generate fp16 batch 32 -----------------------------------------
    try:
        hf = load_hf(hf_dir, torch.float16 if device.type == "cuda" else torch.float32, device)
        hf_generate_rows(hf, seqs[: args.a360_batch], args.a360_batch, True)  # warm-up
        _, seconds = timed(
            lambda: hf_generate_rows(hf, seqs[: args.a360_sequences], args.a360_batch, True), device
        )
        record(
            "analysis360",
            args.a360_sequences,
            seconds,
            batch=args.a360_batch,
            dtype="fp16" if device.type == "cuda" else "fp32",
        )
        hf = None
        release_memory()
    except Exception as err:
        errors["analysis360"] = f"{type(err).__name__}: {err}"
        print(f"  analysis360      FAILED: {errors['analysis360']}", flush=True)

    # --- parity: fp32 open360 greedy vs fp32 HF generate ------------------------------------------
    parity: dict[str, Any] = {}
    try:
        model = model.float()
        hf = load_hf(hf_dir, torch.float32, device)
        sample = seqs[: args.check]
        ref = hf_generate_rows(hf, sample, min(args.check, 64), False)
        ours = MemorizationScorer(
            model, k=K, l=L, batch_size=min(args.check, 64), device=device, dtype="fp32", cuda_graphs=True
        ).score(sample)
        truth = sample[:, K : K + L].numpy()
        ref_score = (ref == truth).mean(1)
        parity["fp32_identical_continuations"] = float((ours.predicted == ref).all(1).mean())
        parity["fp32_identical_scores"] = float((np.abs(ours.score - ref_score) < 1e-6).mean())
        parity["fp32_sequences"] = int(args.check)
        hf = None
        release_memory()
        if "open360_greedy" in outputs and "hf_generate" in outputs:
            n = min(len(outputs["open360_greedy"]), len(outputs["hf_generate"]))
            parity["bf16_identical_continuations"] = float(
                (outputs["open360_greedy"][:n] == outputs["hf_generate"][:n]).all(1).mean()
            )
            parity["bf16_first_token_agreement"] = float(
                (outputs["open360_greedy"][:n, 0] == outputs["hf_generate"][:n, 0]).mean()
            )
        if "open360_greedy" in outputs and "open360_tf" in outputs:
            n = min(len(outputs["open360_greedy"]), len(outputs["open360_tf"]))
            truth = seqs[:n, K : K + L].numpy()
            g_full = (outputs["open360_greedy"][:n] == truth).all(1)
            t_full = (outputs["open360_tf"][:n] == truth).all(1)
            parity["tf_full_match_agrees_with_greedy"] = float((g_full == t_full).mean())
    except Exception as err:
        errors["parity"] = f"{type(err).__name__}: {err}"
        print(f"  parity FAILED: {errors['parity']}", flush=True)

    rounds: dict[str, Any] = {}
    if args.rounds > 0:
        try:
            model = model.cpu()  # the rounds hold their own bf16 copy, the HF fp16 model and a big cache
            release_memory()
            rounds = interleaved_rounds(args, model, hf_dir, seqs, device)
        except Exception as err:
            errors["rounds"] = f"{type(err).__name__}: {err}"
            print(f"  rounds FAILED: {errors['rounds']}", flush=True)
    return finish(args, shape, n_params, device, results, parity, errors, rounds, swaps)


def phase_times(scorer: Any, prompts: torch.Tensor, reps: int = 5) -> dict[str, float]:
    """Eager ms per batch: prefill (k tokens + first argmax) and each decode step, median of `reps`."""
    from open360.analysis.memorization.engine import _logits_at

    cache = scorer._ensure_cache(prompts.shape[0])
    fwd, k = scorer._forward, prompts.shape[1]

    def median_ms(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(reps + 1):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return float(np.median(times[1:]))

    tok = prompts[:, -1:]
    with torch.no_grad():
        prefill = median_ms(lambda: _logits_at(fwd, prompts, k - 1, k, cache, 0).argmax(-1))
        first = median_ms(lambda: _logits_at(fwd, tok, 0, 1, cache, k).argmax(-1))
        last = median_ms(lambda: _logits_at(fwd, tok, 0, 1, cache, k + L - 2).argmax(-1))
    return {"prefill_ms": prefill, "first_step_ms": first, "last_step_ms": last}


def finish(
    args: Any,
    shape: dict,
    n_params: int,
    device: torch.device,
    results: dict[str, Any],
    parity: dict[str, Any],
    errors: dict[str, str],
    rounds: dict[str, Any] | None = None,
    swaps: dict[str, Any] | None = None,
) -> int:
    base = results.get("analysis360", {}).get("seq_per_s")
    hf512 = results.get("hf_generate", {}).get("seq_per_s")
    print(
        "\nmemorization throughput, k=l=32, model",
        shape["name"],
        f"({n_params / 1e9:.2f} B params) on",
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
    )
    print(f"{'method':<34}{'seq/s':>10}{'x Analysis360':>15}{'x HF b512':>11}")
    for name, r in results.items():
        x1 = f"{r['seq_per_s'] / base:.1f}" if base else "-"
        x2 = f"{r['seq_per_s'] / hf512:.2f}" if hf512 else "-"
        print(f"{name:<34}{r['seq_per_s']:>10.1f}{x1:>15}{x2:>11}")
    if device.type == "cuda":
        flop_ceiling = 800e12 / (2 * n_params * (K + L))
        print(f"FLOP ceiling at 800 TFLOP/s (2*N*64 per sequence): {flop_ceiling:.0f} seq/s")
    if rounds:
        print(
            f"interleaved rounds ({len(rounds['rounds'])}): open360 / Analysis360 median "
            f"{rounds['ratio_median']:.1f}x (min {rounds['ratio_min']:.1f}x, max {rounds['ratio_max']:.1f}x)"
        )
    print("parity:", json.dumps(parity))
    if errors:
        print("errors:", json.dumps(errors, indent=1))
    payload = {
        "benchmark": "memorization",
        "k": K,
        "l": L,
        "model": shape,
        "parameters": n_params,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "transformers": __import__("transformers").__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": " ".join(sys.argv),
        "results": results,
        "ratios_vs_analysis360": {k: v["seq_per_s"] / base for k, v in results.items()} if base else {},
        "parity": parity,
        "interleaved_rounds": rounds or {},
        "checkpoint_swaps": swaps or {},
        "errors": errors,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
