"""Shard files (parquet, zstd) and `ShardSet`, the verified read side of a built shard folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from open360.data.recipe import READABLE_FORMATS, canonical_json
from open360.data.tokenizer import TokenizerMismatchError, tokenizer_bytes_hash
from open360.paths import replaced_atomically

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
RECIPE_HASH_KEY = "open360.recipe_hash"  # parquet footer keys of a shard file
FILE_KEY = "open360.file"
MANIFEST_KEYS = ("chunks", "validation", "num_sequences", "seq_len", "row_group_size", "seed", "tokenizer", "recipe_hash")


class ShardError(ValueError):
    """A shard folder is incomplete, altered or inconsistent with its manifest."""


def chunk_file(k: int) -> str:
    return f"train_{k:05d}.parquet"


def validation_file(source: str) -> str:
    return f"val_{source}.parquet"


def content_sha256(tokens: np.ndarray, sources: list[str]) -> str:
    """Hash of a shard's (or one row group's) content: tokens as little-endian int32, then source names."""
    h = hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    h.update("\n".join(sources).encode("utf-8"))
    return h.hexdigest()


def write_rows(
    path: Path,
    blocks: Iterable[tuple[np.ndarray, list[str]]],
    first_id: int,
    row_len: int,
    row_group_size: int,
    recipe_hash: str,
    tmp_prefix: str = ".tmp",
) -> tuple[str, list[str], int]:
    """Stream row blocks (at most row_group_size rows each, one row group each) into a zstd parquet file,
    atomically.

    Returns (content hash of the file, content hash of each row group, rows). Memory stays at one block,
    whatever the shard size. The footer records the recipe hash and the file name, so that `check_files`
    knows a file of another build or seed; the row-group hashes let a reader check each row group it reads.
    """
    schema = pa.schema(
        [
            ("seq_id", pa.int64()),
            ("source", pa.dictionary(pa.int32(), pa.string())),
            ("token_ids", pa.list_(pa.int32(), row_len)),
        ],
        metadata={RECIPE_HASH_KEY: recipe_hash, FILE_KEY: path.name},
    )
    h = hashlib.sha256()
    all_sources: list[str] = []
    group_hashes: list[str] = []
    n = 0
    tmp = path.with_name(f"{tmp_prefix}-{os.getpid()}-{path.name}")
    # on disk before the manifest, written after it, marks the shard folder complete
    with replaced_atomically(path, tmp), pq.ParquetWriter(
        tmp, schema, compression="zstd", write_statistics=False, write_page_checksum=True
    ) as writer:
        for tokens, sources in blocks:
            tokens = np.ascontiguousarray(tokens, dtype="<i4")
            k = len(tokens)
            table = pa.table(
                {
                    "seq_id": pa.array(np.arange(first_id + n, first_id + n + k, dtype=np.int64)),
                    "source": pa.array(sources, type=pa.string()).dictionary_encode(),
                    "token_ids": pa.FixedSizeListArray.from_arrays(
                        pa.array(tokens.reshape(-1).astype(np.int32)), row_len
                    ),
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=row_group_size)
            group_hashes.append(content_sha256(tokens, sources))
            h.update(tokens.tobytes())
            all_sources.extend(sources)
            n += k
    h.update("\n".join(all_sources).encode("utf-8"))
    return h.hexdigest(), group_hashes, n


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn pyarrow's errors on a damaged file (bad footer, failed page checksum, truncation, a name in the
    footer altered: KeyError, UnicodeDecodeError) into a ShardError that names the file."""
    try:
        yield
    except (OSError, KeyError, UnicodeDecodeError, pa.ArrowException) as err:
        raise ShardError(
            f"{path}: unreadable shard file ({type(err).__name__}: {err}); it is damaged or truncated — "
            "`dvc pull` it again, or delete it and run `open360 data build` (it writes the file again)"
        ) from err


def open_shard_file(path: Path) -> pq.ParquetFile:
    """A shard file opened for reading with its page checksums verified on every read."""
    with _reading(path):
        return pq.ParquetFile(path, page_checksum_verification=True)


def read_rows(path: Path, entry: dict[str, Any], first_id: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Read every token row [n, seq_len+1] and its source from the shard file of a manifest entry, each
    row group checked against the entry's hash of it (and, given `first_id`, its sequence ids against
    first_id, first_id+1, ... — the column a loader checks, so `data verify` covers it too)."""
    pf = open_shard_file(path)
    tokens, sources = [], []
    for rg in range(pf.metadata.num_row_groups):
        t, src = _checked_row_group(pf, path, rg, entry, None if first_id is None else first_id + len(sources))
        tokens.append(t)
        sources.extend(src)
    return np.concatenate(tokens) if tokens else np.empty((0, 0), np.int32), sources


def _checked_row_group(
    pf: pq.ParquetFile, path: Path, rg: int, entry: dict[str, Any], first_id: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """Row group `rg` of a shard file: its tokens and sources, refused unless they hash to what the
    manifest entry records for it (and, given `first_id`, unless it holds the ids first_id, first_id+1, ...)."""
    columns = ["token_ids", "source"] + (["seq_id"] if first_id is not None else [])
    with _reading(path):
        table = pf.read_row_group(rg, columns=columns)
        if first_id is not None:
            ids = table.column("seq_id").to_numpy()
            if len(ids) == 0 or not np.array_equal(ids, np.arange(first_id, first_id + len(ids))):
                raise ShardError(
                    f"{path}: row group {rg} holds sequence ids from {ids[0] if len(ids) else 'none'}, expected "
                    f"{first_id}..{first_id + len(ids) - 1} — the file was swapped or replaced; `dvc pull` it "
                    "again or rebuild the shards"
                )
        tokens = _tokens_of(table, path)
        sources = table.column("source").cast(pa.string()).to_pylist()
    expected = entry.get("row_group_sha256")  # absent from format-1 manifests (ShardSet.open warns)
    if expected is not None and (rg >= len(expected) or content_sha256(tokens, sources) != expected[rg]):
        raise ShardError(
            f"{path}: row group {rg} differs from the manifest's hash of it — the file was altered; "
            "`dvc pull` it again, or delete it and run `open360 data build` (it writes the file again)"
        )
    return tokens, sources


def _tokens_of(table: pa.Table, path: Path) -> np.ndarray:
    col = table.column("token_ids").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):  # a damaged footer, or a file not written by write_rows
        raise ShardError(
            f"{path}: column token_ids has type {col.type}, not fixed_size_list<int32> — the file is damaged "
            "or was not written by open360; `dvc pull` it again or rebuild the shards"
        )
    row_len = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False).reshape(-1, row_len)


def manifest_hash_of(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def check_manifest(mpath: Path, manifest: dict[str, Any]) -> None:
    """Raise unless the manifest is of this format, its `manifest_hash` matches its content and its numbers
    agree with each other (a manifest edited and hashed again must not give a silently other data order)."""
    if not isinstance(manifest, dict):
        raise ShardError(f"{mpath}: holds a JSON {type(manifest).__name__}, not a shard manifest; rebuild the shards")
    if manifest.get("format") not in READABLE_FORMATS:
        raise ShardError(f"{mpath}: format {manifest.get('format')!r}, expected one of {READABLE_FORMATS}; rebuild")
    if manifest_hash_of(manifest) != manifest.get("manifest_hash"):
        raise ShardError(f"{mpath}: manifest_hash does not match its content — the manifest was edited; rebuild the shards")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ShardError(f"{mpath}: no key(s) {missing} — not a complete shard manifest; rebuild the shards")
    rows, size = [int(c["rows"]) for c in manifest["chunks"]], int(manifest["row_group_size"])
    if sum(rows) != manifest["num_sequences"]:
        raise ShardError(
            f"{mpath}: num_sequences is {manifest['num_sequences']} but its chunks hold {sum(rows)} rows — "
            "the manifest was edited; rebuild the shards"
        )
    for k, (c, n) in enumerate(zip(manifest["chunks"], rows, strict=True)):
        if "row_group_sha256" in c and (size < 1 or len(c["row_group_sha256"]) != -(-n // size)):
            raise ShardError(
                f"{mpath}: chunks.{k} ({c['file']}) lists {len(c['row_group_sha256'])} row groups, {n} rows "
                f"in row groups of row_group_size={size} make {-(-n // max(size, 1))} — the manifest was edited; "
                "rebuild the shards"
            )


def check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Raise unless the folder holds the manifest's tokenizer (same hash) and every file it lists, each
    readable with the recorded numbers of rows and row groups, and a footer naming this build's recipe hash
    and the file itself. Contents are checked as they are read: each row group against its hash."""
    tok_path = path / TOKENIZER
    if not tok_path.is_file():
        raise ShardError(f"{tok_path}: missing; copy it from the build (or `dvc pull` it) or rebuild")
    actual = tokenizer_bytes_hash(tok_path.read_bytes())
    if actual != manifest["tokenizer"]["sha256"]:
        raise TokenizerMismatchError(
            f"{tok_path}: sha256 {actual} but the manifest records "
            f"{manifest['tokenizer']['sha256']}; the tokenizer file was replaced"
        )
    for entry in [*manifest["chunks"], *manifest["validation"].values()]:
        f = path / entry["file"]
        if not f.is_file():
            raise ShardError(f"{f}: listed in the manifest but missing; `dvc pull` it or rebuild")
        pf = open_shard_file(f)
        meta = pf.metadata
        with _reading(f):
            token_type = pf.schema_arrow.field("token_ids").type
        if pa.types.is_fixed_size_list(token_type) and token_type.list_size != manifest["seq_len"] + 1:
            raise ShardError(
                f"{f}: rows of {token_type.list_size} tokens, the manifest's seq_len={manifest['seq_len']} makes "
                f"{manifest['seq_len'] + 1}; `dvc pull` it again or rebuild"
            )
        groups = len(entry["row_group_sha256"]) if "row_group_sha256" in entry else meta.num_row_groups
        if meta.num_rows != entry["rows"] or meta.num_row_groups != groups:
            raise ShardError(
                f"{f}: {meta.num_rows} rows in {meta.num_row_groups} row groups, the manifest records "
                f"{entry['rows']} in {groups}; `dvc pull` it again or rebuild"
            )
        with _reading(f):
            footer = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
        if not footer and manifest["format"] == READABLE_FORMATS[0]:  # format 1 built before footers existed
            continue
        if RECIPE_HASH_KEY not in footer or FILE_KEY not in footer:
            raise ShardError(f"{f}: no open360 footer — not a file of an open360 build; `dvc pull` it again or rebuild")
        if (footer[RECIPE_HASH_KEY], footer[FILE_KEY]) != (manifest["recipe_hash"], entry["file"]):
            raise ShardError(
                f"{f}: written as {footer[FILE_KEY]} of recipe hash {footer[RECIPE_HASH_KEY][:12]}, "
                f"but this folder's manifest lists it as {entry['file']} of {manifest['recipe_hash'][:12]} "
                "— the file was swapped in from another build or seed; `dvc pull` it again or rebuild"
            )


class ShardSet:
    """A built shard folder: manifest, tokenizer and random access to sequences by global id."""

    def __init__(self, path: Path, manifest: dict[str, Any], cache_row_groups: int = 64) -> None:
        self.path = path
        self.manifest = manifest
        self._files: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache_row_groups
        self.chunk_sizes: list[int] = [int(c["rows"]) for c in manifest["chunks"]]
        self._starts = np.concatenate([[0], np.cumsum(self.chunk_sizes)]).astype(np.int64)
        self.row_group_size: int = int(manifest["row_group_size"])

    @classmethod
    def open(cls, path: str | Path, expected_tokenizer_hash: str | None = None) -> ShardSet:
        """Open and verify a shard folder: manifest hash, tokenizer hash, every file present with its rows.

        `expected_tokenizer_hash` (e.g. the tokenizer a model was trained with) must match the shards'.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise ShardError(
                f"{path}: no {MANIFEST} — not a shard folder or the build did not finish; "
                "run `open360 data build` again (it resumes)"
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShardError(
                f"{mpath}: not valid JSON ({err}); rebuild the shards or `dvc pull` them"
            ) from err
        check_manifest(mpath, manifest)
        check_files(path, manifest)
        if manifest["format"] == READABLE_FORMATS[0]:
            warnings.warn(
                f"{path}: built by an older open360 (format {READABLE_FORMATS[0]}): its row groups carry no "
                "hashes, so a rewritten file is not found as it is read — `open360 data verify` checks whole "
                "files", stacklevel=2,
            )
        actual = manifest["tokenizer"]["sha256"]
        if expected_tokenizer_hash is not None and expected_tokenizer_hash != actual:
            raise TokenizerMismatchError(
                f"{path}: shards were tokenized with tokenizer {actual[:12]} but "
                f"{expected_tokenizer_hash[:12]} was expected; use the model's "
                "tokenizer to build the shards (or the shards' tokenizer.json)"
            )
        return cls(path, manifest)

    @property
    def manifest_hash(self) -> str:
        return self.manifest["manifest_hash"]

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    @property
    def seed(self) -> int:
        """The seed the shards were shuffled with (the run's data-order seed for later epochs too)."""
        return int(self.manifest["seed"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_path))

    def chunk_of(self, seq_id: int | np.ndarray) -> int | np.ndarray:
        """The chunk index holding each global sequence id."""
        ids = np.asarray(seq_id, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_sequences):
            raise IndexError(f"sequence id out of range [0, {self.num_sequences}) in {self.path}")
        out = np.searchsorted(self._starts, ids, side="right") - 1
        return int(out) if out.ndim == 0 else out

    def _row_group(self, chunk: int, rg: int) -> np.ndarray:
        key = (chunk, rg)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        entry = self.manifest["chunks"][chunk]
        path = self.path / entry["file"]
        if chunk not in self._files:
            self._files[chunk] = open_shard_file(path)
        first = int(self._starts[chunk]) + rg * self.row_group_size
        arr, _ = _checked_row_group(self._files[chunk], path, rg, entry, first)
        self._cache[key] = arr
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arr

    def sequences(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Token rows [len(ids), seq_len+1] (int64) of global sequence ids, in the order given."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        if not len(ids):
            return out
        chunks = np.asarray(self.chunk_of(ids)).reshape(-1)
        local = ids - self._starts[chunks]
        rgs = local // self.row_group_size
        for c, rg in sorted(set(zip(chunks.tolist(), rgs.tolist(), strict=True))):
            sel = (chunks == c) & (rgs == rg)
            out[sel] = self._row_group(c, rg)[local[sel] - rg * self.row_group_size]
        return out

    def validation(self, source: str) -> np.ndarray:
        """The held-out rows [n, seq_len+1] (int64) of one source."""
        if source not in self.manifest["validation"]:
            raise KeyError(
                f"no validation split for source '{source}' in {self.path}; "
                f"sources: {sorted(self.manifest['validation'])}"
            )
        entry = self.manifest["validation"][source]
        tokens, _ = read_rows(self.path / entry["file"], entry)
        return tokens.astype(np.int64)

    def verify_content(self) -> None:
        """Re-hash every shard's content against the manifest: each row group, then each whole file (reads
        everything; the loader checks only the row groups it reads). A file is hashed as it streams, one row
        group in memory at a time (a chunk of a 1.3T-token build is ~14 GB of tokens)."""
        entries = [(e, int(start)) for e, start in zip(self.manifest["chunks"], self._starts, strict=False)]
        entries += [(e, 0) for e in self.manifest["validation"].values()]  # validation ids count from 0
        for entry, first_id in entries:
            path = self.path / entry["file"]
            pf = open_shard_file(path)
            h, joined, n = hashlib.sha256(), [], 0  # content_sha256 of the file: its tokens, then its sources
            for rg in range(pf.metadata.num_row_groups):
                tokens, sources = _checked_row_group(pf, path, rg, entry, first_id + n)
                h.update(np.ascontiguousarray(tokens, dtype="<i4"))
                joined.append("\n".join(sources))  # a row group is never empty: joins to the file's join
                n += len(tokens)
            h.update("\n".join(joined).encode("utf-8"))
            if h.hexdigest() != entry["content_sha256"]:
                raise ShardError(f"{path}: content differs from the manifest; rebuild")
