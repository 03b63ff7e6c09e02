"""Tokenize+pack throughput and peak RSS on the embedded corpus: open360's pipeline vs a naive datasets.map.

Usage: python benchmarks/bench_tokenize.py --out bench_tokenize.json [--repeat 3]

Each measurement runs in a fresh subprocess of this script (so peak RSS is its own), one after the other
on the same cores. open360 runs the real per-source stage (`prepare_source`: read → normalize → tokenize
with `open360.data.bpe.batch_encoder` (tiktoken's encoder with the tokenizer's own ids; HF `tokenizers`
where tiktoken cannot reproduce it) → numpy packing → rows streamed to disk) with dedup/quality filters off, on the
corpus once and on the corpus repeated `--repeat` times (peak RSS should not grow). The baseline is what a
user would write: `datasets.load_dataset("json")` → `Dataset.map(batched=True)` calling a
`PreTrainedTokenizerFast` per batch → packing rows of seq_len + 1 in a Python loop. A third row times HF
`tokenizers` alone on texts already in memory (`encode_batch_fast`): the floor of any pipeline built on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = ["python_stdlib", "pydoc_topics", "shakespeare"]
SEQ_LEN = 128


def _tokenizer(work: Path) -> Path:
    from open360.data.recipe import load_recipe
    from open360.data.tokenizer import obtain_tokenizer

    path = work / "tokenizer.json"
    if not path.is_file():
        path.write_bytes(
            obtain_tokenizer(load_recipe(REPO / "data_recipes/embedded_tiny.yaml"), work / "cache")
        )
    return path


def _corpus_files(work: Path, repeat: int) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for name in CORPUS:
        src = REPO / "data_recipes/corpus" / f"{name}.jsonl.gz"
        files[name] = []
        for r in range(repeat):
            dst = work / f"corpus_x{repeat}" / f"{name}_{r}.jsonl.gz"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                shutil.copy(src, dst)
            files[name].append(dst)
    return files


def run_open360(work: Path, repeat: int) -> dict:
    from open360.data.prepare import prepare_source
    from open360.data.recipe import load_recipe

    files = _corpus_files(work, repeat)
    sources = "".join(
        f"  - {{name: {n}, type: jsonl, path: '{files[n][0].parent}/{n}_*.jsonl.gz', quality: false}}\n"
        for n in CORPUS
    )
    recipe_path = work / f"bench_x{repeat}.yaml"
    recipe_path.write_text(
        f"name: bench\nsources:\n{sources}filters:\n  exact_dedup: {{enabled: false}}\n"
        f"  near_dedup: {{enabled: false}}\n  heuristics: {{enabled: false}}\n"
        f"seq_len: {SEQ_LEN}\nnum_chunks: 1\nvalidation: {{fraction: 0.0, max_sequences: 0}}\n"
    )
    recipe = load_recipe(recipe_path)
    tok_json = _tokenizer(work).read_bytes()
    out = work / f"open360_x{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    tokens = rows = 0
    for i in range(len(recipe.sources)):
        st = prepare_source(recipe, i, tok_json, out)
        tokens += st["tokens_train"]
        rows += st["sequences_available"]
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "rows": rows}


def run_baseline(work: Path, repeat: int) -> dict:
    import datasets
    from transformers import PreTrainedTokenizerFast

    files = _corpus_files(work, repeat)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(_tokenizer(work)))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    ds = datasets.load_dataset(
        "json",
        data_files=[str(p) for n in CORPUS for p in files[n]],
        split="train",
        cache_dir=str(work / f"hf_cache_x{repeat}"),
    )
    ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=ds.column_names)
    buf: list[int] = []
    seqs: list[list[int]] = []
    tokens = 0
    for ids in ds["input_ids"]:
        buf.extend(ids + [eos])
        tokens += len(ids) + 1
        while len(buf) >= SEQ_LEN + 1:
            seqs.append(buf[: SEQ_LEN + 1])
            buf = buf[SEQ_LEN + 1 :]
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "rows": len(seqs)}


def run_floor(work: Path, repeat: int) -> dict:
    """HF tokenizers alone (`encode_batch_fast` on texts in memory): the floor of a pipeline built on it."""
    import gzip

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_tokenizer(work)))
    texts = []
    for n in CORPUS:
        for p in _corpus_files(work, repeat)[n]:
            with gzip.open(p) as f:
                texts += [json.loads(line)["text"] for line in f]
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 256):
        tokens += sum(
            len(e.ids) + 1 for e in tok.encode_batch_fast(texts[i : i + 256], add_special_tokens=False)
        )
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "rows": tokens // (SEQ_LEN + 1)}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _child(kind: str, work: Path, repeat: int) -> None:
    cpu0 = _cpu_seconds()
    result = {"open360": run_open360, "baseline": run_baseline, "hf_tokenizer_only": run_floor}[kind](
        work, repeat
    )
    result["cpu_seconds"] = _cpu_seconds() - cpu0  # includes imports and setup outside the timed region
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def planned_runs(repeat: int) -> list[tuple[str, int]]:
    """(kind, corpus repeat) of each subprocess, in order. The repeated-corpus pair only when repeat != 1: a
    second x1 baseline would find the first one's `datasets` cache (same cache dir) and time a cache hit."""
    runs = [("hf_tokenizer_only", 1), ("baseline", 1), ("open360", 1)]
    if repeat != 1:
        runs += [("open360", repeat), ("baseline", repeat)]
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--repeat", type=int, default=3, help="corpus repetitions for the RSS-scaling run")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "REPEAT"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], Path(args.work), int(args.child[1]))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_tok_") as tmp:
        results = []
        for kind, rep in planned_runs(args.repeat):
            cmd = [sys.executable, __file__, "--out", "-", "--child", kind, str(rep), "--work", tmp]
            line = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            r = {"impl": kind, "corpus_repeat": rep, **json.loads(line)}
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            results.append(r)
    base = {r["corpus_repeat"]: r["tokens_per_s"] for r in results if r["impl"] == "baseline"}
    print(
        f"{'impl':<17} {'corpus':>6} {'tokens':>11} {'rows':>8} {'seconds':>8} {'cpu s':>7} {'tokens/s':>11} "
        f"{'peak RSS MB':>11} {'speedup':>7}"
    )
    for r in results:
        r["speedup_vs_baseline"] = r["tokens_per_s"] / base[r["corpus_repeat"]]
        print(
            f"{r['impl']:<17} {'x' + str(r['corpus_repeat']):>6} {r['tokens']:>11,} {r['rows']:>8,} "
            f"{r['seconds']:>8.2f} {r['cpu_seconds']:>7.1f} {r['tokens_per_s']:>11,.0f} "
            f"{r['peak_rss_mb']:>11.0f} "
            f"{r['speedup_vs_baseline']:>6.2f}x"
        )
    import datasets
    import tokenizers

    info = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "tokenizers": tokenizers.__version__,
        "datasets": datasets.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "seq_len": SEQ_LEN,
    }
    Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
