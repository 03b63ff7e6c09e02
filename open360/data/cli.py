"""`open360 data build|batch|seen`: build shards, show the exact batch of a step, list ids seen by a step."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from open360.paths import CONFIGS_DIR


def _recipe_from_data_arg(arg: str) -> tuple[str, int | None]:
    """`data=<name>` → (recipe path, seed: None = the recipe's) from configs/data/<name>.yaml."""
    from open360.config.schema import DataConfig

    name = arg.split("=", 1)[1]
    path = CONFIGS_DIR / "data" / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONFIGS_DIR / "data").glob("*.yaml"))
        raise SystemExit(f"open360 data build: no data config '{name}' ({path}); choose one of {names}")
    try:
        raw = OmegaConf.load(path)
        if not OmegaConf.is_dict(raw):
            raise SystemExit(f"open360 data build: {path}: a mapping of data keys (recipe, seed, ...) is expected")
        raw.pop("defaults", None)
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), raw)
        return str(cfg.recipe), cfg.seed
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise SystemExit(f"open360 data build: {path}: " + " ".join(str(err).split())) from err


def summary_table(manifest: dict[str, Any]) -> str:
    """Per-source docs, filter drops, tokens and mix shares, as a fixed-width table."""
    head = (
        "source",
        "read",
        "bad",
        "exact",
        "quality",
        "classif",
        "near",
        "kept",
        "tokens",
        "seqs",
        "used",
        "share",
    )
    rows = [head]
    total = max(1, manifest["num_sequences"])
    for name, s in manifest["sources"].items():
        d = s["dropped"]
        quality = sum(v for k, v in d.items() if k.startswith("quality:"))
        rows.append(
            (
                name,
                s["docs_read"],
                sum(s["bad"].values()),
                d.get("exact_dup", 0),
                quality,
                d.get("classifier", 0),
                d.get("near_dup", 0),
                s["docs_kept"],
                s["tokens_train"],
                s["sequences_available"],
                s["sequences_selected"],
                f"{s['sequences_selected'] / total:.3f}/{s['target_fraction']:.3f}",
            )
        )
    widths = [
        max(len(f"{r[i]:,}" if isinstance(r[i], int) else str(r[i])) for r in rows) for i in range(len(head))
    ]
    fmt = [(f"{v:,}" if isinstance(v, int) else str(v)) for r in rows for v in r]
    lines = []
    for r in range(len(rows)):
        cells = fmt[r * len(head) : (r + 1) * len(head)]
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        f"{manifest['num_sequences']:,} training sequences x {manifest['seq_len'] + 1} tokens in "
        f"{len(manifest['chunks'])} chunks; validation: "
        + ", ".join(f"{k} {v['rows']}" for k, v in manifest["validation"].items())
    )
    return "\n".join(lines)


def build_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="open360 data build",
        description="Build the token shards of a data recipe "
        "(idempotent: an existing matching shard folder is reused).",
    )
    ap.add_argument("data", nargs="?", help="Hydra-style data=<name> (configs/data/<name>.yaml)")
    ap.add_argument("--recipe", help="path to a recipe YAML (instead of data=<name>)")
    ap.add_argument(
        "--shards-root", default="shards", help="folder holding shard folders (default: ./shards)"
    )
    ap.add_argument("--seed", type=int, help="build seed (default: the data config's, else the recipe's)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the per-source pipeline")
    ap.add_argument("--worker-index", type=int, default=0, help="this worker's index (scale-out)")
    ap.add_argument("--num-workers", type=int, default=1, help="workers sharing the build (scale-out)")
    ap.add_argument(
        "--merge-only",
        action="store_true",
        help="only merge the part manifests of --num-workers "
        "workers whose files were copied into one shard folder (no shared filesystem)",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.data and args.data.startswith("data="):
        recipe, seed = _recipe_from_data_arg(args.data)
    elif args.recipe:
        recipe, seed = args.recipe, None
    else:
        ap.error("give data=<name> or --recipe PATH")
    if args.seed is not None:
        seed = args.seed
    return _reported("open360 data build", lambda: _build(args, recipe, seed), args.shards_root)


def _reported(prog: str, run: Callable[[], int], where: str | None = None) -> int:
    """Run a verb; bad input (a recipe, shard or tokenizer error, a missing file, a full disk) is one
    line naming what and where, exit status 1, instead of a traceback; so is Ctrl-C (exit status 130)."""
    try:
        return run()
    except (ValueError, OSError, KeyError, IndexError) as err:
        text = str(err) or type(err).__name__
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            text = f"no space left on the device{f' under {Path(where).resolve()}' if where else ''} ({err})"
        print(f"{prog}: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again (a build goes on from the sources it has "
              "prepared, and no shard folder is complete before its manifest.json)", file=sys.stderr)
        return 130


def _build(args: argparse.Namespace, recipe: str, seed: int | None) -> int:
    from open360.data.build import build_shards, merge_parts, shard_dir_name
    from open360.data.recipe import load_recipe

    if args.merge_only:
        out = Path(args.shards_root).resolve() / shard_dir_name(load_recipe(recipe, seed))
        merge_parts(out, args.num_workers)
        print(summary_table(json.loads((out / "manifest.json").read_text())))
        print(out)
        return 0
    out = build_shards(
        recipe,
        args.shards_root,
        seed=seed,
        workers=args.workers,
        worker_index=args.worker_index,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    mpath = out / "manifest.json"
    if not mpath.is_file():
        print(
            f"worker {args.worker_index}/{args.num_workers} done; manifest.json is written once every worker "
            f"has finished: {out}"
        )
        return 0
    print(summary_table(json.loads(mpath.read_text())))
    print(out)
    return 0


def _order_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shards", required=True, help="a shard folder (shards/<recipe>-<hash>)")
    ap.add_argument(
        "--step",
        type=int,
        required=True,
        help="0-based step within these shards' stage: the optimizer step for a one-stage run; for a "
        "later stage of a multi-stage run, the optimizer step minus the step the stage starts at",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=None,
        help="data-order seed for epochs after the first (default: the seed the shards were built with, "
        "which is the trainer's)",
    )
    ap.add_argument("--global-batch-size", type=int, required=True, help="sequences per optimizer step")


def _parse_order_args(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.step < 0:
        ap.error(f"--step {args.step}: steps count from 0")
    if args.global_batch_size < 1:
        ap.error(f"--global-batch-size {args.global_batch_size}: must be >= 1")
    return args


def _order(args: argparse.Namespace):  # noqa: ANN202 - returns (ShardSet, DataOrder)
    from open360.data.order import DataOrder
    from open360.data.shards import ShardSet

    shards = ShardSet.open(args.shards)
    return shards, DataOrder(shards, shards.seed if args.seed is None else args.seed, args.global_batch_size)


def batch_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="open360 data batch",
        description="Print the exact global batch of a step: "
        "sequence ids and token ids (what the trainer consumes at that step).",
    )
    _order_args(ap)
    ap.add_argument("--decode", action="store_true", help="also print each sequence as text")
    ap.add_argument("--json", action="store_true", help="print one JSON object {step, ids, tokens}")
    args = _parse_order_args(ap, argv)
    return _reported("open360 data batch", lambda: _batch(args))


def _batch(args: argparse.Namespace) -> int:
    shards, order = _order(args)
    ids = order.batch_ids(args.step)
    tokens = shards.sequences(ids)
    if args.json:
        print(json.dumps({"step": args.step, "ids": ids.tolist(), "tokens": tokens.tolist()}))
        return 0
    tok = shards.tokenizer() if args.decode else None
    chunks = np.asarray(shards.chunk_of(ids)).reshape(-1)
    print(
        f"# step {args.step} (epoch {order.epoch_of(args.step)}), "
        f"{len(ids)} sequences x {tokens.shape[1]} tokens, "
        f"shards {shards.path.name}"
    )
    for sid, c, row in zip(ids.tolist(), chunks.tolist(), tokens, strict=True):
        print(f"{sid}\tchunk {c}\t{' '.join(map(str, row.tolist()))}")
        if tok is not None:
            print("\t" + repr(tok.decode(row.tolist(), skip_special_tokens=False)))
    return 0


def verify_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="open360 data verify",
        description="Re-hash every row group and every file of a shard folder against its manifest "
        "(reads everything; training checks only the row groups it reads).",
    )
    ap.add_argument("--shards", required=True, help="a shard folder (shards/<recipe>-<hash>)")
    args = ap.parse_args(argv)
    return _reported("open360 data verify", lambda: _verify(args))


def _verify(args: argparse.Namespace) -> int:
    from open360.data.shards import ShardSet

    shards = ShardSet.open(args.shards)
    shards.verify_content()
    entries = [*shards.manifest["chunks"], *shards.manifest["validation"].values()]
    groups = sum(len(e.get("row_group_sha256", [])) for e in entries)
    print(f"{shards.path}: {len(entries)} files, {groups} hashed row groups, every hash matches the manifest")
    return 0


def seen_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="open360 data seen",
        description="Sequence ids consumed by steps 0..step-1, "
        "with counts per chunk (the input of memorization analysis).",
    )
    _order_args(ap)
    ap.add_argument("--out", help="write the sorted ids to this file (.npy, or text with one id per line)")
    args = _parse_order_args(ap, argv)
    return _reported("open360 data seen", lambda: _seen(args))


def _seen(args: argparse.Namespace) -> int:
    shards, order = _order(args)
    ids = order.seen_ids(args.step)
    per_chunk = np.bincount(np.asarray(shards.chunk_of(ids)).reshape(-1), minlength=len(shards.chunk_sizes))
    print(f"{len(ids):,} distinct sequences seen before step {args.step} of {shards.num_sequences:,}")
    for k, (n, size) in enumerate(zip(per_chunk.tolist(), shards.chunk_sizes, strict=True)):
        print(f"chunk {k:5d}: {n:>10,} / {size:,}")
    if args.out:
        out = Path(args.out)
        if out.suffix == ".npy":
            np.save(out, ids)
        else:
            out.write_text("".join(f"{i}\n" for i in ids.tolist()))
        print(f"ids written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(build_main())
