"""Per-source pipeline: read → normalize → exact dedup → quality → near-dup → FIM → tokenize → pack."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import IO, Any

import numpy as np
from tokenizers import Tokenizer

from open360.data.bpe import Encoder, batch_encoder
from open360.data.filters import (
    ExactDedup,
    NearDedup,
    content_hash,
    doc_rng,
    heuristic_reject,
    normalize,
    validation_draw,
)
from open360.data.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, fim_pieces, join_encoded
from open360.data.pack import Packer
from open360.data.quality import Scorer, build_scorer
from open360.data.recipe import RecipeSpec
from open360.data.sources import read_source
from open360.paths import file_lock, fsync_dir, fsync_file, temp_sibling, temp_siblings_of


def work_paths(work_dir: Path, source_name: str) -> dict[str, Path]:
    """The intermediate files of one source: packed rows (raw int32) and its stats (the completion mark)."""
    return {
        "train": work_dir / f"{source_name}.train.bin",
        "val": work_dir / f"{source_name}.val.bin",
        "stats": work_dir / f"{source_name}.stats.json",
    }


def load_rows(path: Path, row_len: int) -> np.ndarray:
    """Memory-map a packed-rows file as an [n, row_len] int32 array."""
    if path.stat().st_size == 0:
        return np.empty((0, row_len), dtype=np.int32)
    return np.memmap(path, dtype="<i4", mode="r").reshape(-1, row_len)


class _SourcePipeline:
    """State of one source's pass: filters, packers, counters and the open output files."""

    def __init__(
        self,
        recipe: RecipeSpec,
        index: int,
        tokenizer: Tokenizer,
        encode: Encoder | None,
        scorer: Scorer | None,
        train_out: IO[bytes],
        val_out: IO[bytes],
    ) -> None:
        self.recipe, self.source = recipe, recipe.sources[index]
        self.encode = encode
        f = recipe.filters
        self.exact = ExactDedup() if f.exact_dedup.enabled else None
        self.near = NearDedup(f.near_dedup) if f.near_dedup.enabled else None
        self.heur = f.heuristics if (f.heuristics.enabled and self.source.quality) else None
        self.scorer = scorer
        eos = tokenizer.token_to_id(recipe.tokenizer.eos_token)
        pre_tokenized = self.source.type == "llm360_chunks"
        row_len = recipe.seq_len + 1
        self.train_packer = Packer(row_len, None if pre_tokenized else eos)
        self.val_packer = Packer(row_len, None if pre_tokenized else eos)
        self.vocab_size = tokenizer.get_vocab_size()
        roles = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)  # the ids of the tokenizer's own names for the sentinels
        self.fim_ids = {r: tokenizer.token_to_id(t) for r, t in zip(roles, recipe.tokenizer.fim_tokens, strict=True)}
        self.train_out, self.val_out = train_out, val_out
        self.bad: Counter = Counter()
        self.dropped: Counter = Counter()
        self.c: Counter = Counter()
        self.pending: list[tuple[str, bytes]] = []

    def _emit(self, ids_train: list, ids_val: list) -> None:
        for packer, ids, out, kind in (
            (self.train_packer, ids_train, self.train_out, "train"),
            (self.val_packer, ids_val, self.val_out, "validation"),
        ):
            if not ids:
                continue
            self.c[f"tokens_{kind}"] += sum(len(x) for x in ids) + (
                len(ids) if packer.eos_id is not None else 0
            )
            rows = packer.add(ids)
            if kind == "validation":  # the split keeps the first max_sequences rows of the held-out documents
                room = max(0, self.recipe.validation.max_sequences - self.c["sequences_validation"])
                self.c["tokens_validation_unused"] += (len(rows) - min(room, len(rows))) * packer.row_len
                rows = rows[:room]
            out.write(np.ascontiguousarray(rows, dtype="<i4").tobytes())
            self.c["sequences_available" if kind == "train" else "sequences_validation"] += len(rows)

    def _split(self, docs: list[tuple[Any, bytes]]) -> tuple[list, list]:
        """(train, held-out) ids of documents given as (ids, content digest). A document is held out when
        the seeded draw of its content says so — a pure function of (seed, content), so it is never trained
        on whatever the batching, `max_sequences` or `seq_len`: recipes sharing seed and fraction hold out
        the same documents (a long-context recipe's held-out set stays unseen by a base trained on a
        short one). The split file keeps the first `max_sequences` rows of them; the rest is counted."""
        v = self.recipe.validation
        train, val = [], []
        for ids, digest in docs:
            (val if validation_draw(self.recipe.seed, digest) < v.fraction else train).append(ids)
        self.c["docs_train"] += len(train)
        self.c["docs_validation"] += len(val)
        return train, val

    def add_tokens(self, ids: list[int]) -> None:
        """A pre-tokenized LLM360 row: only range-checked, split and packed."""
        if not ids:
            self.bad["empty"] += 1
            return
        if max(ids) >= self.vocab_size or min(ids) < 0:
            self.bad["token_out_of_range"] += 1
            return
        arr = np.asarray(ids, dtype=np.int32)
        digest = hashlib.sha256(arr.tobytes()).digest()
        if self.exact is not None and self.exact.seen(digest):
            self.dropped["exact_dup"] += 1
            return
        self._emit(*self._split([(arr, digest)]))

    def add_text(self, raw: str) -> None:
        text = normalize(raw)
        if not text.strip():
            self.bad["empty"] += 1
            return
        digest = content_hash(text)
        self.c["chars_read"] += len(text)
        if self.exact is not None and self.exact.seen(digest):
            self.dropped["exact_dup"] += 1
            return
        if self.heur is not None and len(text) > self.heur.max_chars:
            self.dropped["quality:too_long"] += 1  # checked first: never shingle a huge document
            return
        if self.heur is not None:
            reason = heuristic_reject(text, self.heur)
            if reason is not None:
                self.dropped[f"quality:{reason}"] += 1
                return
        self.pending.append((text, digest))
        if len(self.pending) >= self.recipe.doc_batch_size:
            self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        if self.scorer is not None:
            scores = list(self.scorer([t for t, _ in batch]))
            threshold = self.recipe.filters.classifier.threshold
            kept = [b for b, s in zip(batch, scores, strict=True) if s >= threshold]
            self.dropped["classifier"] += len(batch) - len(kept)
            batch = kept
        if self.near is not None:  # after the quality filters: only kept documents enter the index
            unique = [b for b in batch if not self.near.is_duplicate(b[0])]
            if len(unique) < len(batch):
                self.dropped["near_dup"] += len(batch) - len(unique)
            batch = unique
        fim = self.source.fim
        docs: list[list[str | int]] = []
        for text, digest in batch:
            self.c["chars_kept"] += len(text)
            pieces: list[str | int] = [text]
            if fim.rate > 0:
                rng = doc_rng(self.recipe.seed, digest, b"fim")
                if rng.random() < fim.rate:
                    pieces = fim_pieces(text, rng, fim.spm_rate, self.fim_ids)
                    self.c["fim_docs"] += 1
            docs.append(pieces)
        ids = join_encoded(docs, self.encode)
        self._emit(*self._split([(x, digest) for x, (_, digest) in zip(ids, batch, strict=True)]))

    def stats(self) -> dict[str, Any]:
        self.c["tokens_dropped_remainder"] = self.train_packer.leftover_tokens
        keys = (
            "docs_read",
            "chars_read",
            "chars_kept",
            "docs_train",
            "docs_validation",
            "fim_docs",
            "tokens_train",
            "tokens_validation",
            "sequences_available",
            "sequences_validation",
            "tokens_validation_unused",
            "tokens_dropped_remainder",
        )
        out: dict[str, Any] = {k: int(self.c[k]) for k in keys}
        out["bad"] = dict(sorted(self.bad.items()))
        out["dropped"] = dict(sorted(self.dropped.items()))
        out["docs_kept"] = out["docs_train"] + out["docs_validation"]
        d, left = self.dropped, out["docs_read"] - self.bad["empty"] - self.bad["token_out_of_range"]
        after = {"read": left}
        # Counted in this (the manifest's historical) order, although near-dup now runs last: a manifest of
        # shards whose kept documents are unchanged stays byte-identical across the pipeline change, so its
        # hash (which checkpoints record) does too. `dropped` gives each filter's own count.
        for stage, n in (
            ("exact_dedup", d["exact_dup"]),
            ("near_dedup", d["near_dup"]),
            ("heuristics", sum(v for k, v in d.items() if k.startswith("quality:"))),
            ("classifier", d["classifier"]),
        ):
            left -= n
            after[stage] = left
        out["docs_after"] = (
            after  # documents left after subtracting each filter's drops, in the order read, exact, near, heuristics, classifier
        )
        return out


def prepare_source(
    recipe: RecipeSpec, index: int, tokenizer_json: bytes, work_dir: Path, progress: bool = False
) -> dict[str, Any]:
    """Run one source through the document pipeline into packed rows; resumable (the stats file marks it done,
    while the rows files are the size it records: a damaged one is warned about and the source prepared again).

    One process at a time prepares a source (a lock in `work_dir`, which workers of a scale-out build may
    share): a later one waits and reuses its rows, and finds no writer of this source's temporary files alive,
    so it deletes those a killed run left (SIGKILL and SIGTERM run no cleanup; at LLM360 scale they are the
    size of the source's tokens, and each rerun would leave another copy)."""
    source = recipe.sources[index]
    paths = work_paths(work_dir, source.name)
    row_len = recipe.seq_len + 1
    if (stats := _prepared(paths, row_len)) is not None:
        return stats
    work_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(work_dir / f"{source.name}.lock"):
        if (stats := _prepared(paths, row_len)) is not None:  # prepared by the process this one waited for
            return stats
        if paths["stats"].is_file():
            warnings.warn(
                f"{work_dir}: the prepared rows of source '{source.name}' are not what {paths['stats'].name} "
                "records (a file damaged, cut short or missing, as a partial copy leaves it); preparing the "
                "source again",
                stacklevel=2,
            )
            paths["stats"].unlink()
        for leftover in [t for p in paths.values() for t in temp_siblings_of(p)]:
            leftover.unlink(missing_ok=True)
        return _prepare_locked(recipe, index, tokenizer_json, paths, progress)


def _prepared(paths: dict[str, Path], row_len: int) -> dict[str, Any] | None:
    """The stats of a prepared source whose rows files hold the rows they record, else None (not prepared, or
    its files damaged since: a build that trusted them would fail on a reshape or an index, naming no file)."""
    try:
        stats = json.loads(paths["stats"].read_text())
        whole = all(
            paths[part].stat().st_size == int(stats[key]) * row_len * 4
            for part, key in (("train", "sequences_available"), ("val", "sequences_validation"))
        )
    except (OSError, ValueError, KeyError, TypeError):  # missing, not JSON, not the stats of a build
        return None
    return stats if whole else None


def _prepare_locked(
    recipe: RecipeSpec, index: int, tokenizer_json: bytes, paths: dict[str, Path], progress: bool
) -> dict[str, Any]:
    source = recipe.sources[index]
    tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    encode = batch_encoder(tokenizer_json) if source.type != "llm360_chunks" else None
    clf = recipe.filters.classifier
    use_clf = clf.enabled and source.quality and (not clf.sources or source.name in clf.sources)
    scorer = build_scorer(clf) if use_clf else None
    tmp = {k: temp_sibling(p) for k, p in paths.items()}  # workers of a scale-out build may share this folder
    try:
        with open(tmp["train"], "wb") as train_out, open(tmp["val"], "wb") as val_out:
            pipe = _SourcePipeline(recipe, index, tok, encode, scorer, train_out, val_out)
            docs = read_source(source, pipe.bad)
            if progress:
                from tqdm import tqdm

                docs = tqdm(docs, desc=f"  {source.name}", unit="doc", leave=False)
            for doc in docs:
                pipe.c["docs_read"] += 1
                if doc.token_ids is not None:
                    pipe.add_tokens(doc.token_ids)
                else:
                    pipe.add_text(doc.text or "")
            pipe.flush()
            stats = pipe.stats()
        # the rows on disk before the stats file marks the source done: after a power cut a stats file must
        # not vouch for rows the page cache never wrote (a rerun would pack their zeros into shards)
        for part in ("train", "val"):
            fsync_file(tmp[part])
            os.replace(tmp[part], paths[part])
        tmp["stats"].write_text(json.dumps(stats, sort_keys=True, indent=1))
        fsync_file(tmp["stats"])
        os.replace(tmp["stats"], paths["stats"])
        fsync_dir(paths["stats"].parent)
    except BaseException:  # a bad input, a full disk, Ctrl-C: no partial rows left to fill the disk
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    return stats
