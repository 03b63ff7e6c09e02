"""Read stage: stream documents (or pre-tokenized LLM360 rows) from a recipe source, counting bad input."""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import json
import lzma
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from open360.data.recipe import PACKAGED_BUILDERS, SourceSpec
from open360.paths import REPO_ROOT, resolve_repo_path

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://")


class SourceError(ValueError):
    """A source cannot be read: the message names the source, the file and what to do."""


@dataclass
class Doc:
    """One input document: text to tokenize, or token ids from an LLM360 pre-tokenized chunk."""

    text: str | None
    token_ids: list[int] | None = None


def visible_files(folder: Path) -> list[Path]:
    """The files under `folder`, sorted; hidden files and everything under hidden folders (.git, .cache)
    are not data.

    Sorted as paths, folder name by folder name ("a/b" before "a-b"), where `datasets` sorts the strings ("a-b"
    before "a/b"): a recipe reads its files in one fixed order everywhere, and a local source and a `type: hf`
    source over the same folder are two recipes (two hashes, two shard folders) that may read them in
    different orders. Kept so: sorting otherwise would reorder the documents of an existing recipe under its
    unchanged hash, and its shards would no longer be the ones its folder name stands for."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def resolve_files(source: SourceSpec) -> list[Path]:
    """The local files of a source, sorted as `visible_files` sorts them; a missing path is an error naming the
    source."""
    assert source.path is not None
    base = resolve_repo_path(source.path)
    if base.is_dir():
        files = visible_files(base)
    elif base.is_file():  # that file, also when its name holds glob characters ("data[1].jsonl")
        files = [base]
    elif any(c in source.path for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(base), recursive=True) if Path(p).is_file())
    else:
        files = []
    if not files:
        raise SourceError(
            f"source '{source.name}': no file at path '{source.path}' (resolved to {base}); "
            "check the recipe's 'path' (relative to the repository root)"
        )
    return files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_pinned_hash(source: SourceSpec, files: list[Path]) -> None:
    """If the recipe pins a sha256, the (single) input file must match it."""
    if source.sha256 is None:
        return
    if len(files) != 1:
        raise SourceError(f"source '{source.name}': 'sha256' pins one file but path matches {len(files)}")
    actual = file_sha256(files[0])
    if actual != source.sha256:
        raise SourceError(
            f"source '{source.name}': {files[0]} has sha256 {actual}, the recipe pins "
            f"{source.sha256}; the file changed — restore it (data_recipes/corpus/make_corpus.py "
            "regenerates the embedded corpus) or update the pin"
        )


# compressed inputs, by file suffix (a .bz2 or .xz file read as plain bytes would be nothing but bad lines)
_DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _open_binary(path: Path) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix in (".zst", ".zstd"):
        raise SourceError(
            f"{path}: zstd-compressed, which local jsonl/text sources do not read (gzip, bz2 and xz they do); "
            "decompress it (`zstd -d`), or read it with `type: hf`, `hf_name: json` (needs `zstandard`)"
        )
    return _DECOMPRESS.get(suffix, open)(path, "rb")


def _readable(docs: Iterator[Doc], source: SourceSpec, where: str | Path) -> Iterator[Doc]:
    """The documents of one file (or dataset), with a read failure (truncated gzip, damaged parquet,
    I/O error) turned into a SourceError naming the source and the file."""
    try:
        yield from docs
    except SourceError:
        raise
    except Exception as err:
        if str(where).startswith("hub:") and source.hf_data_files:  # a builder (json, parquet, ...) on files
            hint = (
                "one of its data files is malformed or unreadable — `datasets` stops at the first bad record "
                "(a `type: jsonl` source skips malformed lines and counts them)"
            )
        elif str(where).startswith("hub:"):
            hint = "check the dataset name, config and split (and network access)"
        else:
            hint = _damaged_file_hint(source, Path(where))
        raise SourceError(
            f"source '{source.name}': cannot read {where} ({type(err).__name__}: {err}); {hint}"
        ) from err


def _damaged_file_hint(source: SourceSpec, path: Path) -> str:
    """What to do about a local file that failed to read: a file of a parquet source that is no parquet file at
    all (a README, an empty _SUCCESS marker beside the parts) is named as such, not as a damaged part."""
    damaged = "the file is damaged or truncated — restore it, or remove it from the source"
    if source.type != "parquet":
        return damaged
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return damaged
    if head == b"PAR1":  # a parquet file begins with its magic bytes, also when it is cut short
        return damaged
    return (
        f"{path.name} is no parquet file (it does not begin with parquet's magic bytes), and a folder or glob "
        "source reads every visible file it names — move it out of the source, or narrow 'path' to the data "
        "files (a glob such as 'folder/*.parquet')"
    )


def iter_jsonl(path: Path, bad: Counter) -> Iterator[tuple[int, dict]]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:  # a byte-order mark (Windows editors write one) is no part of the first row
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad["invalid_utf8"] += 1
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: a line nested too deep to parse
                bad["malformed_json"] += 1
                continue
            if not isinstance(row, dict):
                bad["malformed_json"] += 1
                continue
            yield lineno, row


def _read_jsonl(source: SourceSpec, files: list[Path], bad: Counter) -> Iterator[Doc]:
    for path in files:
        yield from _readable(_jsonl_docs(source, path, bad), source, path)


def _jsonl_docs(source: SourceSpec, path: Path, bad: Counter) -> Iterator[Doc]:
    for _, row in iter_jsonl(path, bad):
        text = row.get(source.text_field)
        if not isinstance(text, str):
            bad["missing_field"] += 1
            continue
        yield Doc(text)


def _split_bytes(data: bytes, sample_by: str) -> list[bytes]:
    if sample_by == "document":
        return [data]
    if sample_by == "line":
        return data.split(b"\n")
    return re.split(rb"\r?\n[ \t]*\r?\n", data)  # paragraphs: a blank line, LF or CRLF


def _read_text(source: SourceSpec, files: list[Path], bad: Counter) -> Iterator[Doc]:
    """One document per file, paragraph or line; a unit that is not valid UTF-8 is skipped and counted."""
    for path in files:
        yield from _readable(_text_docs(source, path, bad), source, path)


def _text_docs(source: SourceSpec, path: Path, bad: Counter) -> Iterator[Doc]:
    with _open_binary(path) as f:
        data = f.read().removeprefix(codecs.BOM_UTF8)
    for part in _split_bytes(data, source.sample_by):
        try:
            text = part.decode("utf-8")
        except UnicodeDecodeError:
            bad["invalid_utf8"] += 1
            continue
        yield Doc(text)


def _read_llm360_local(source: SourceSpec, files: list[Path], bad: Counter) -> Iterator[Doc]:
    for path in files:
        yield from _readable(_llm360_docs(source, path, bad), source, path)


def _llm360_docs(source: SourceSpec, path: Path, bad: Counter) -> Iterator[Doc]:
    for _, row in iter_jsonl(path, bad):
        if (doc := _chunk_doc(source, row, bad)) is not None:
            yield doc


def _chunk_doc(source: SourceSpec, row: dict[str, Any], bad: Counter) -> Doc | None:
    """One row of LLM360's pre-tokenized chunks (local jsonl or hub): a list of int token ids, else bad input."""
    ids = row.get("token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        bad["missing_field"] += 1
        return None
    if source.select_source is not None and row.get("source") != source.select_source:
        return None
    return Doc(None, token_ids=ids)


def _read_parquet(source: SourceSpec, files: list[Path], bad: Counter) -> Iterator[Doc]:
    """Local parquet files, file by file (an error names the file; a part with no rows is no error)."""
    for path in files:
        yield from _readable(_parquet_docs(source, path, bad), source, path)


def _parquet_docs(source: SourceSpec, path: Path, bad: Counter) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if source.text_field not in pf.schema_arrow.names:
        raise SourceError(
            f"source '{source.name}': {path} has no field '{source.text_field}' (fields: "
            f"{sorted(pf.schema_arrow.names)}); set 'text_field' in the recipe"
        )
    for batch in pf.iter_batches(batch_size=1024, columns=[source.text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield Doc(text)
            else:
                bad["missing_field"] += 1


def _read_datasets(source: SourceSpec, bad: Counter) -> Iterator[Doc]:
    """Hub datasets (and local folders or files in their formats) go through `datasets.load_dataset`."""
    return _readable(_datasets_docs(source, bad), source, _hub_where(source))


def _hub_where(source: SourceSpec) -> str:
    """How errors name a `datasets` source: hub:<name>, with its data files where the recipe gives them."""
    _, files = hub_arguments(source)
    return f"hub:{source.hf_name}" + (f" (data files {files})" if files else "")


def _check_local_data_files(source: SourceSpec, data_files: str | list[str] | None) -> None:
    """Every `hf_data_files` pattern on local files (a builder's, or inside a local `hf_name` folder) matches a
    file: `datasets` leaves a pattern of a list that matches nothing out without a word (and fails on a lone
    one with a bare StopIteration), so a moved or misnamed file would silently take its documents out."""
    folder = _local_dir(source.hf_name)
    if data_files is None or (folder is None and source.hf_name not in PACKAGED_BUILDERS):
        return  # patterns inside a hub repository: `datasets` resolves them there
    for pattern in [data_files] if isinstance(data_files, str) else data_files:
        full = folder / pattern if folder is not None else Path(pattern)
        if _URL.match(pattern) or any(Path(p).is_file() for p in glob.glob(str(full), recursive=True)):
            continue  # a glob as `datasets` takes it: a file named "data[1].jsonl" matches no such pattern
        raise SourceError(
            f"source '{source.name}': hf_data_files pattern '{pattern}' matches no file (resolved to {full}); "
            f"check the recipe's 'hf_data_files' (relative to {folder or 'the repository root'})"
        )


def _datasets_docs(source: SourceSpec, bad: Counter) -> Iterator[Doc]:
    import datasets

    name, data_files = hub_arguments(source)
    _check_local_data_files(source, data_files)
    kwargs: dict[str, Any] = {"data_files": data_files} if data_files else {}
    if source.hf_revision is not None:
        kwargs["revision"] = source.hf_revision
    ds = datasets.load_dataset(name, source.hf_config, split=source.split, streaming=source.streaming, **kwargs)
    where = _hub_where(source)
    for i, row in enumerate(ds):
        if source.type == "llm360_chunks":
            if (doc := _chunk_doc(source, row, bad)) is not None:
                yield doc
            continue
        text = row.get(source.text_field)
        if not isinstance(text, str):
            if source.text_field not in row:
                raise SourceError(
                    f"source '{source.name}': {where} row {i} has no field '{source.text_field}' "
                    f"(fields: {sorted(row)}); set 'text_field' in the recipe"
                )
            bad["missing_field"] += 1
            continue
        yield Doc(text)


def _local_dir(name: str | None) -> Path | None:
    """`hf_name` as a local folder in the hub's layout (relative to the repository root), if it is one."""
    if not name:
        return None
    p = resolve_repo_path(name)
    return p if p.is_dir() else None


def hub_arguments(source: SourceSpec) -> tuple[str, str | list[str] | None]:
    """(path, data_files) for `datasets.load_dataset`: a local `hf_name` folder, and local `data_files`
    of a builder such as `json`, resolved against the repository root like every other recipe path;
    hub names and patterns inside a dataset repository are passed as they are."""
    folder = _local_dir(source.hf_name)
    if folder is None and source.hf_name not in PACKAGED_BUILDERS and Path(str(source.hf_name)).is_dir():
        raise SourceError(  # `datasets` reads a folder of the working directory in place of the hub repository
            f"source '{source.name}': hf_name '{source.hf_name}' is a folder of the working directory "
            f"({Path(str(source.hf_name)).resolve()}), which `datasets` would read instead of the hub repository, "
            "unpinned by hf_revision and untracked by the build's caches; a local hf_name folder is relative to "
            f"the repository root ({REPO_ROOT}) — give its absolute path, or run from elsewhere to read the hub"
        )
    files = source.hf_data_files
    if folder is None and source.hf_name in PACKAGED_BUILDERS and files is not None:
        files = [  # URLs (https://, hf://, s3://, ...) go to datasets as they are
            f if _URL.match(f) else str(resolve_repo_path(f)) for f in ([files] if isinstance(files, str) else files)
        ]
    return (str(folder) if folder is not None else str(source.hf_name)), files


def input_fingerprint(source: SourceSpec) -> list[list[Any]]:
    """(path, size, mtime) of a source's local input files: what caches of its reading are keyed by, so
    that an input changed under the same recipe is read again. Hub datasets give [] (`hf_revision` names them)."""
    if source.path is not None and source.type != "hf":
        files = resolve_files(source)
    elif (folder := _local_dir(source.hf_name)) is not None:
        files = visible_files(folder)
    else:
        _, data_files = hub_arguments(source)
        patterns = [data_files] if isinstance(data_files, str) else list(data_files or [])
        local = [pat for pat in patterns if Path(pat).is_absolute()]  # a packaged builder's files
        files = sorted(Path(f) for pat in local for f in glob.glob(pat, recursive=True))
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def read_source(source: SourceSpec, bad: Counter) -> Iterator[Doc]:
    """Stream the documents of a source in a fixed order, up to `max_docs`; bad input goes to `bad` (a
    document that is no valid Unicode, such as a JSON lone surrogate escape, counts as invalid_utf8)."""
    if source.type == "hf" or (source.type == "llm360_chunks" and source.path is None):
        docs = _read_datasets(source, bad)
    else:
        files = resolve_files(source)
        check_pinned_hash(source, files)
        if source.type == "parquet":
            docs = _read_parquet(source, files, bad)
        elif source.type == "jsonl":
            docs = _read_jsonl(source, files, bad)
        elif source.type == "llm360_chunks":
            docs = _read_llm360_local(source, files, bad)
        else:  # text, dir
            docs = _read_text(source, files, bad)
    n = 0
    for doc in docs:
        if doc.text is not None and not _encodable(doc.text):
            bad["invalid_utf8"] += 1  # a lone surrogate escape ("\ud800") in JSON: no UTF-8 text
            continue
        yield doc
        n += 1
        if source.max_docs is not None and n >= source.max_docs:
            return  # before the reader is asked for more: no line, file or download past the cut is read


def _encodable(text: str) -> bool:
    """Whether a decoded document is valid Unicode text (JSON escapes can give lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
