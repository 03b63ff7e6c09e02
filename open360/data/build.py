"""`build_shards`: recipe → per-source packed rows → weighted mix → seeded shuffle → chunks + manifest."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from open360.data.decontaminate import clean_rows, training_ngrams
from open360.data.prepare import load_rows, prepare_source, work_paths
from open360.data.quality import labels_source
from open360.data.recipe import (
    FORMAT_VERSION,
    RecipeError,
    RecipeSpec,
    canonical_json,
    load_recipe,
    recipe_hash,
    recipe_to_dict,
    unpinned_hub_inputs,
)
from open360.data.shards import (
    MANIFEST,
    TOKENIZER,
    ShardError,
    check_files,
    check_manifest,
    chunk_file,
    manifest_hash_of,
    validation_file,
    write_rows,
)
from open360.data.sources import input_fingerprint
from open360.data.tokenizer import TokenizerMismatchError, obtain_tokenizer, tokenizer_bytes_hash
from open360.paths import file_lock, replaced_atomically

PARTS_DIR = ".parts"


# Bumped when the per-source pipeline changes what it writes for the same inputs, so that the intermediates
# of an interrupted build of an older version are not resumed (2: special-token text in documents is text;
# 3: a UTF-8 byte-order mark opening a jsonl or text file is dropped, no longer a malformed first row;
# 4: nothing past a source's max_docs is read, so bad lines there are no longer counted; 5: bz2 and xz files are
# decompressed, no longer read as bad lines, and the quality classifier sums its sparse features in a fixed
# order, which can move a score by an ulp; 6: FIM's SPM encodes prefix and middle apart, as StarCoder does; 7: a
# document without words is never a near-duplicate).
PIPELINE_VERSION = 7


def shard_dir_name(recipe: RecipeSpec) -> str:
    return f"{recipe.name}-{recipe_hash(recipe)[:12]}"


def planned_shard_dir(recipe_path: str | Path, shards_root: str | Path, seed: int | None = None) -> Path:
    """The folder `build_shards` writes (or finds) for a recipe, known without building anything."""
    return Path(shards_root).expanduser().resolve() / shard_dir_name(load_recipe(recipe_path, seed))


def mix_counts(recipe: RecipeSpec, available: list[int]) -> tuple[list[int], int]:
    """Training sequences taken from each source (largest-remainder rounding of the weights) and the total;
    every weighted source has sequences (checked by the caller, which knows why one has none).

    The total is `mix.total_sequences` or, if unset, the most the scarcest weighted source allows; it is
    then rounded down to num_chunks x chunk_multiple so that every chunk has the same size.
    """
    weights = np.array([s.weight for s in recipe.sources], dtype=np.float64)
    p = weights / weights.sum()
    unit = recipe.num_chunks * recipe.chunk_multiple
    if recipe.mix.total_sequences is not None:
        total = int(recipe.mix.total_sequences)
        if total < unit:
            raise RecipeError(
                f"recipe '{recipe.name}': mix.total_sequences = {total} is below num_chunks x "
                f"chunk_multiple = {unit}; every chunk needs at least chunk_multiple sequences"
            )
    else:
        total = int(min(available[i] / p[i] for i in range(len(p)) if p[i] > 0))
    if recipe.mix.total_sequences is not None and total % unit:
        warnings.warn(
            f"recipe '{recipe.name}': mix.total_sequences = {total} is not a multiple of num_chunks x "
            f"chunk_multiple = {unit}; {total // unit * unit} sequences are taken (every chunk the same size)",
            stacklevel=2,
        )
    total = (total // unit) * unit
    if total == 0:
        raise RecipeError(
            f"recipe '{recipe.name}': only {sum(available)} packed sequences "
            f"({dict(zip([s.name for s in recipe.sources], available, strict=True))}), fewer than "
            f"num_chunks x chunk_multiple = {unit}; add data or lower num_chunks"
        )
    exact = p * total
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(p)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    for i, s in enumerate(recipe.sources):
        if counts[i] > available[i] and not recipe.mix.allow_repeat:
            raise RecipeError(
                f"recipe '{recipe.name}': source '{s.name}' has {available[i]} sequences but its "
                f"weight asks for {counts[i]} of {total}; set mix.allow_repeat: true, lower "
                "mix.total_sequences, or add data"
            )
    return counts.tolist(), total


def global_order(
    recipe: RecipeSpec, available: list[int], counts: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(source index, row) of every training sequence in its final position; a pure function of the seed."""
    src, row = [], []
    for i, (n, c) in enumerate(zip(available, counts, strict=True)):
        if c == 0:
            continue
        rng = np.random.default_rng([recipe.seed, 1, i])
        reps = -(-c // n)
        passes = [rng.permutation(n) if recipe.mix.shuffle else np.arange(n) for _ in range(reps)]
        picks = np.concatenate(passes)[:c]
        src.append(np.full(c, i, dtype=np.int64))
        row.append(picks.astype(np.int64))
    src_all, row_all = np.concatenate(src), np.concatenate(row)
    if not recipe.mix.shuffle:
        return src_all, row_all
    perm = np.random.default_rng([recipe.seed, 2]).permutation(len(src_all))
    return src_all[perm], row_all[perm]


def _prepare_worker(args: tuple[str, int | None, int, bytes, str]) -> dict[str, Any]:
    recipe_path, seed, index, tok_json, work_dir = args
    return prepare_source(load_recipe(recipe_path, seed), index, tok_json, Path(work_dir))


def _prepare_all(
    recipe: RecipeSpec,
    recipe_path: str,
    seed: int | None,
    tok_json: bytes,
    work: Path,
    order: list[int],
    workers: int,
    progress: bool,
) -> dict[int, dict[str, Any]]:
    stats: dict[int, dict[str, Any]] = {}
    todo = [i for i in order if not work_paths(work, recipe.sources[i].name)["stats"].is_file()]
    if workers > 1 and len(todo) > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(workers, len(todo))) as pool:
            args = [(recipe_path, seed, i, tok_json, str(work)) for i in todo]
            for i, st in zip(todo, pool.imap(_prepare_worker, args), strict=True):
                stats[i] = st
    for i in order:
        if i not in stats:
            stats[i] = prepare_source(recipe, i, tok_json, work, progress=progress)
    return stats


def _owned(k: int, worker_index: int, num_workers: int) -> bool:
    return k % num_workers == worker_index


def build_shards(
    recipe_path: str | Path,
    shards_root: str | Path,
    seed: int | None = None,
    workers: int = 1,
    worker_index: int = 0,
    num_workers: int = 1,
    progress: bool = False,
) -> Path:
    """Build (or find) the shards of a recipe; returns `shards_root/<name>-<recipe_hash[:12]>/`.

    Idempotent: a folder whose manifest records the same recipe hash (seed included) is returned as is.
    Scale-out: with num_workers > 1, worker i writes chunks k with k % num_workers == i and validation
    files of sources s with s % num_workers == i plus a part manifest; whichever worker finds every part
    present writes manifest.json (call again with any worker_index, or `merge_parts`, to merge later).
    Per-source intermediates live in `shards_root/.work/` and make an interrupted build resume; a
    single-worker build deletes them once manifest.json is written. Concurrent builds of the same
    recipe serialize on a file lock, and the later one returns the finished folder.
    """
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} must lie in [0, num_workers={num_workers})")
    if workers < 0:
        raise ValueError(f"workers={workers}: must be >= 0 (0 or 1: the per-source pipeline runs in this process)")
    recipe = load_recipe(recipe_path, seed)
    rhash = recipe_hash(recipe)
    root = Path(shards_root).expanduser().resolve()
    out = root / shard_dir_name(recipe)
    existing = _existing_manifest(out)
    if existing is not None and existing.get("recipe_hash") == rhash and existing.get("seed") == recipe.seed:
        if _reusable(recipe, root, out, existing):
            return out
        repair = True  # the manifest goes only once the inputs have been read again (nothing lost on failure)
        existing = None
    else:
        repair = False
    if existing is not None:
        raise ShardError(
            f"{out / MANIFEST}: records recipe hash {existing.get('recipe_hash')} but the recipe "
            f"hashes to {rhash}; remove the folder to rebuild it"
        )
    work = root / ".work" / out.name
    work.mkdir(parents=True, exist_ok=True)
    with file_lock(work.with_name(f"{out.name}.w{worker_index}-of-{num_workers}.lock")):
        if not repair and _existing_manifest(out) is not None:  # a concurrent build finished first
            return out
        _build_locked(
            recipe, str(recipe_path), seed, root, out, work, workers, worker_index, num_workers, progress, repair
        )
    if num_workers == 1 and (out / MANIFEST).is_file():
        shutil.rmtree(work, ignore_errors=True)
    return out


def _build_locked(
    recipe: RecipeSpec,
    recipe_path: str,
    seed: int | None,
    root: Path,
    out: Path,
    work: Path,
    workers: int,
    worker_index: int,
    num_workers: int,
    progress: bool,
    repair: bool = False,
) -> None:
    rhash = recipe_hash(recipe)
    out.mkdir(parents=True, exist_ok=True)
    # temporary files carry the worker's slot, so that a worker starting late on a shared filesystem
    # removes only what an earlier run of its own slot left, never another worker's file in progress
    tmp_prefix = f".tmp-w{worker_index}of{num_workers}"
    stale = list(out.glob(f"{tmp_prefix}-*"))
    if num_workers == 1:  # a one-machine build also owns temp files of older builds and of merges
        stale += [f for f in out.glob(".tmp-*") if re.match(r"\.tmp-(\d+|merge)-", f.name)]
    for f in stale:
        f.unlink(missing_ok=True)

    if unpinned := unpinned_hub_inputs(recipe):
        warnings.warn(
            f"recipe '{recipe.name}': {', '.join(unpinned)} not pinned to a hub commit (set a 40-hex "
            "sha as hf_revision / tokenizer.revision): a later build of this recipe may read other data",
            stacklevel=3,
        )
    tok_json = obtain_tokenizer(recipe, root / ".tokenizers")
    # intermediates are keyed by the tokenizer's hash and the local input files as they are now (the
    # classifier's labelled sample included): a tokenizer file (kind file / hub) or an input changed under
    # the same recipe is read again, never resumed from rows of the old one
    fingerprints = [input_fingerprint(s) for s in recipe.sources]
    if recipe.filters.classifier.enabled:
        fingerprints.append(input_fingerprint(labels_source(recipe.filters.classifier)))
    inputs = hashlib.sha256(canonical_json([PIPELINE_VERSION, fingerprints]).encode()).hexdigest()
    work = work / f"{tokenizer_bytes_hash(tok_json)[:12]}-{inputs[:12]}"
    n_src = len(recipe.sources)
    mine = [i for i in range(n_src) if _owned(i, worker_index, num_workers)]
    order = mine + [i for i in range(n_src) if i not in mine]
    stats = _prepare_all(recipe, recipe_path, seed, tok_json, work, order, workers, progress)
    available = [stats[i]["sequences_available"] for i in range(n_src)]
    for i, src in enumerate(recipe.sources):
        if src.weight > 0 and available[i] == 0:
            raise RecipeError(
                f"recipe '{recipe.name}': source '{src.name}' gave no training sequences (documents read "
                f"{stats[i]['docs_read']}, bad input {stats[i]['bad']}, dropped {stats[i]['dropped']}, "
                f"kept {stats[i]['docs_kept']}); check its path, text_field and filters, or set its weight to 0"
            )
    counts, total = mix_counts(recipe, available)
    if repair:  # every input was read again: the files below are rewritten, readers wait for the new manifest
        (out / MANIFEST).unlink(missing_ok=True)
    src_of, row_of = global_order(recipe, available, counts)
    rows = [load_rows(work_paths(work, s.name)["train"], recipe.seq_len + 1) for s in recipe.sources]
    names = [s.name for s in recipe.sources]

    per_chunk = total // recipe.num_chunks
    part: dict[str, Any] = {"chunks": {}, "validation": {}}
    chunks = range(recipe.num_chunks)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="chunks", unit="chunk", leave=False)
    for k in chunks:
        if not _owned(k, worker_index, num_workers):
            continue
        s_k, r_k = src_of[k * per_chunk : (k + 1) * per_chunk], row_of[k * per_chunk : (k + 1) * per_chunk]
        digest, group_hashes, _ = write_rows(
            out / chunk_file(k),
            _gather_blocks(rows, names, s_k, r_k, recipe.row_group_size),
            k * per_chunk,
            recipe.seq_len + 1,
            recipe.row_group_size,
            rhash,
            tmp_prefix,
        )
        part["chunks"][str(k)] = {
            "file": chunk_file(k),
            "rows": per_chunk,
            "first_id": k * per_chunk,
            "content_sha256": digest,
            "row_group_sha256": group_hashes,
            "sources": {names[i]: int((s_k == i).sum()) for i in np.unique(s_k)},
        }
    ngram = recipe.validation.decontaminate_ngram
    train_runs = training_ngrams(rows, ngram) if ngram and mine else None  # every source's rows, each read once
    for i in mine:
        val = load_rows(work_paths(work, names[i])["val"], recipe.seq_len + 1)
        dropped = 0
        if train_runs is not None:  # rows sharing a passage with training data are no held-out data
            keep = clean_rows(val, train_runs, ngram)
            val, dropped = np.asarray(val)[keep], int((~keep).sum())
        if len(val) == 0:
            if dropped:
                warnings.warn(f"recipe '{recipe.name}': every held-out row of source '{names[i]}' shares "
                              f"{ngram} tokens with training rows; it has no validation file", stacklevel=2)
            continue
        blocks = (
            (
                np.asarray(val[b : b + recipe.row_group_size]),
                [names[i]] * len(val[b : b + recipe.row_group_size]),
            )
            for b in range(0, len(val), recipe.row_group_size)
        )
        digest, group_hashes, _ = write_rows(
            out / validation_file(names[i]),
            blocks,
            0,
            recipe.seq_len + 1,
            recipe.row_group_size,
            rhash,
            tmp_prefix,
        )
        part["validation"][names[i]] = {
            "file": validation_file(names[i]),
            "rows": len(val),
            "content_sha256": digest,
            "row_group_sha256": group_hashes,
            **({"decontaminated": {"ngram": ngram, "rows_dropped": dropped}} if train_runs is not None else {}),
        }

    part["common"] = _common_manifest(recipe, rhash, tok_json, stats, counts, available, total)
    parts = out / PARTS_DIR
    parts.mkdir(exist_ok=True)
    _atomic_write(
        parts / f"part-{worker_index:05d}-of-{num_workers:05d}.json",
        json.dumps(part, sort_keys=True),
        tmp_prefix,
    )
    _atomic_write_bytes(out / TOKENIZER, tok_json, tmp_prefix)
    with file_lock(work.with_name(f"{out.name}.merge.lock")):
        if not (out / MANIFEST).is_file():
            merge_parts(out, num_workers, required=False, tmp_prefix=tmp_prefix)


def _gather_blocks(
    rows: list[np.ndarray], names: list[str], src: np.ndarray, row: np.ndarray, block: int
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Rows of a chunk, `block` at a time, gathered from the per-source packed files."""
    for b in range(0, len(src), block):
        s_b, r_b = src[b : b + block], row[b : b + block]
        tokens = np.empty((len(s_b), rows[0].shape[1]), dtype=np.int32)
        for i in np.unique(s_b):
            m = s_b == i
            tokens[m] = rows[i][r_b[m]]
        yield tokens, [names[i] for i in s_b]


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    mpath = out / MANIFEST
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{mpath}: not valid JSON ({err}); remove {out} to rebuild it") from err
    if not isinstance(manifest, dict):
        raise ShardError(
            f"{mpath}: holds a JSON {type(manifest).__name__}, not a shard manifest; remove {out} to rebuild it"
        )
    return manifest


def _reusable(recipe: RecipeSpec, root: Path, out: Path, manifest: dict[str, Any]) -> bool:
    """True if a finished folder of this recipe can be returned as is; False (with a warning) if a file
    it lists is missing or damaged, so that the build writes it again. A tokenizer file (`kind: file`)
    changed since the build is an error: the recipe would no longer give these shards. An edited manifest
    (its manifest_hash no longer matches) is rebuilt too: every reader would refuse it."""
    built_with = manifest.get("tokenizer")
    built_with = built_with.get("sha256") if isinstance(built_with, dict) else None  # edited: check_manifest says
    if recipe.tokenizer.kind == "file" and built_with is not None:
        now = tokenizer_bytes_hash(obtain_tokenizer(recipe, root / ".tokenizers"))
        if now != built_with:
            raise ShardError(
                f"{out}: built with tokenizer {built_with[:12]}, but "
                f"tokenizer.path ({recipe.tokenizer.path}) now gives {now[:12]}; restore the file, or "
                f"remove {out} to rebuild the shards with the new tokenizer"
            )
    try:
        check_manifest(out / MANIFEST, manifest)
        check_files(out, manifest)
    except (ShardError, TokenizerMismatchError) as err:
        warnings.warn(f"rebuilding {out}: {err}", stacklevel=3)
        return False
    return True


def _common_manifest(
    recipe: RecipeSpec,
    rhash: str,
    tok_json: bytes,
    stats: dict[int, dict[str, Any]],
    counts: list[int],
    available: list[int],
    total: int,
) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json.decode("utf-8"))
    weights = np.array([s.weight for s in recipe.sources], dtype=np.float64)
    sources = {}
    for i, s in enumerate(recipe.sources):
        sources[s.name] = {
            **stats[i],
            "type": s.type,
            "license": s.license,
            "weight": s.weight,
            "target_fraction": float(weights[i] / weights.sum()),
            "sequences_selected": int(counts[i]),
            "fraction_used": float(counts[i] / available[i]) if available[i] else 0.0,
        }
    return {
        "format": FORMAT_VERSION,
        "name": recipe.name,
        "recipe_hash": rhash,
        "seed": recipe.seed,
        "recipe": recipe_to_dict(recipe),
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": tokenizer_bytes_hash(tok_json),
            "vocab_size": tok.get_vocab_size(),
            "eos_token": recipe.tokenizer.eos_token,
            "eos_id": tok.token_to_id(recipe.tokenizer.eos_token),
        },
        "seq_len": recipe.seq_len,
        "num_sequences": total,
        "num_tokens": total * (recipe.seq_len + 1),
        "row_group_size": recipe.row_group_size,
        "sources": sources,
    }


def merge_parts(
    out: str | Path, num_workers: int, required: bool = True, tmp_prefix: str = ".tmp-merge"
) -> Path | None:
    """Merge the part manifests of `num_workers` workers into manifest.json (written last, atomically)."""
    out = Path(out)
    files = [out / PARTS_DIR / f"part-{w:05d}-of-{num_workers:05d}.json" for w in range(num_workers)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        if required:
            raise ShardError(f"{out}: cannot merge, parts missing: {missing}; run those workers first")
        return None
    parts = [_read_part(f) for f in files]
    common = parts[0]["common"]
    for f, p in zip(files, parts, strict=True):
        if p["common"] != common:
            raise ShardError(
                f"{f}: built from a different recipe, seed, tokenizer or inputs, or by another open360 version (its "
                f"pipeline writes other rows), than {files[0].name}; every worker must run the same recipe and seed "
                "on the same inputs with one open360: run the workers that differ again"
            )
    chunks = {int(k): v for p in parts for k, v in p["chunks"].items()}
    n = common["recipe"]["num_chunks"]
    if sorted(chunks) != list(range(n)):
        raise ShardError(f"{out}: parts cover chunks {sorted(chunks)}, expected 0..{n - 1}")
    manifest = {
        **common,
        "chunks": [chunks[k] for k in range(n)],
        "validation": {k: v for p in parts for k, v in sorted(p["validation"].items())},
    }
    manifest["validation"] = dict(sorted(manifest["validation"].items()))
    manifest["manifest_hash"] = manifest_hash_of(manifest)
    check_files(out, manifest)  # a folder merged from copies must hold every file, tokenizer.json included
    _atomic_write(out / "build_info.json", json.dumps(_build_info(), sort_keys=True, indent=1), tmp_prefix)
    _atomic_write(out / MANIFEST, json.dumps(manifest, sort_keys=True, indent=1), tmp_prefix)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    return out


def _read_part(f: Path) -> dict[str, Any]:
    """A worker's part manifest; one cut short or not written by a build (a partial copy) names its file."""
    try:
        part = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        part = err
    if not isinstance(part, dict) or not {"chunks", "validation", "common"} <= part.keys():
        raise ShardError(
            f"{f}: not a part manifest of a build ({part if isinstance(part, Exception) else 'keys missing'}); "
            "copy it again from its worker, or run that worker again"
        )
    return part


def _build_info() -> dict[str, str]:
    """Library versions of the build (not hashed: the manifest hash must not depend on them)."""
    import pyarrow
    import tokenizers

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "tokenizers": tokenizers.__version__,
        "tiktoken": _version_or_none("tiktoken"),  # the tokenize stage's encoder when installed (same ids)
    }


def _version_or_none(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _atomic_write(path: Path, text: str, tmp_prefix: str = ".tmp") -> None:
    _atomic_write_bytes(path, text.encode("utf-8"), tmp_prefix)


def _atomic_write_bytes(path: Path, data: bytes, tmp_prefix: str = ".tmp") -> None:
    with replaced_atomically(path, path.with_name(f"{tmp_prefix}-{os.getpid()}-{path.name}")) as tmp:
        tmp.write_bytes(data)
