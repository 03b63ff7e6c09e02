"""Shard builds: bit-identical rebuilds, idempotence, mixing, scale-out merge, resume after interruption."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from open360.data import ShardError, ShardSet, build_shards, merge_parts
from open360.data import build as build_mod

RECIPE = "data_recipes/embedded_tiny.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shards(RECIPE, tmp_path_factory.mktemp("a"), seed=1234)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "build_info.json"
    }


def test_tiny_recipe_shape(tiny: Path) -> None:
    s = ShardSet.open(tiny)
    assert tiny.name.startswith("embedded_tiny-") and len(tiny.name.split("-")[-1]) == 12
    assert s.seq_len == 128 and s.num_sequences >= 240 * 16
    assert len(s.chunk_sizes) == 8 and all(c % 16 == 0 for c in s.chunk_sizes)
    toks = s.sequences(np.arange(s.num_sequences))
    assert toks.shape == (s.num_sequences, 129) and toks.max() < 4096 and toks.min() >= 0
    assert s.tokenizer().get_vocab_size() <= 4096
    assert (toks == s.eos_id).any(axis=1).mean() > 0.01  # documents are separated by EOS
    s.verify_content()
    for src in ("code", "english", "shakespeare"):
        assert s.validation(src).shape[1] == 129


def test_rebuild_is_byte_identical_and_idempotent(tiny: Path, tmp_path: Path) -> None:
    again = build_shards(RECIPE, tmp_path, seed=1234, workers=2)
    assert again.name == tiny.name
    assert _files(again) == _files(tiny)
    mtime = (again / "manifest.json").stat().st_mtime_ns
    assert build_shards(RECIPE, tmp_path, seed=1234) == again
    assert (again / "manifest.json").stat().st_mtime_ns == mtime  # nothing rewritten


def test_seed_changes_folder_and_order(tiny: Path, tmp_path: Path) -> None:
    other = build_shards(RECIPE, tmp_path, seed=99)
    assert other.name != tiny.name
    a, b = ShardSet.open(tiny), ShardSet.open(other)
    assert a.tokenizer_hash == b.tokenizer_hash  # the tokenizer does not depend on the shuffle seed
    assert not np.array_equal(a.sequences(np.arange(16)), b.sequences(np.arange(16)))


def test_mixing_proportions_follow_weights(tiny: Path) -> None:
    m = json.loads((tiny / "manifest.json").read_text())
    total = m["num_sequences"]
    for name, s in m["sources"].items():
        assert abs(s["sequences_selected"] / total - s["target_fraction"]) <= 1 / total + 1e-9, name
    # every chunk is itself a fair sample of the mix (global shuffle before chunking)
    for chunk in m["chunks"]:
        for name, s in m["sources"].items():
            assert abs(chunk["sources"][name] / chunk["rows"] - s["target_fraction"]) < 0.08


def test_scale_out_two_machines_merge_to_single_build(tiny: Path, tmp_path: Path) -> None:
    roots = [tmp_path / "m0", tmp_path / "m1"]
    in_progress = roots[0] / tiny.name / ".tmp-w1of2-999-train_00001.parquet"  # worker 1, still writing
    in_progress.parent.mkdir(parents=True)
    in_progress.write_bytes(b"being written")
    outs = [build_shards(RECIPE, roots[w], seed=1234, worker_index=w, num_workers=2) for w in range(2)]
    assert in_progress.read_bytes() == b"being written"  # a worker removes only its own slot's leftovers
    in_progress.unlink()
    assert not (outs[0] / "manifest.json").exists()
    assert sorted(p.name for p in outs[0].glob("train_*")) == [f"train_{k:05d}.parquet" for k in (0, 2, 4, 6)]
    for p in outs[1].iterdir():  # "copy machine 1's output to machine 0"
        if p.is_file() and p.name.startswith(("train_", "val_")):
            shutil.copy(p, outs[0] / p.name)
    shutil.copy(next((outs[1] / ".parts").iterdir()), outs[0] / ".parts")
    tokenizer = (outs[0] / "tokenizer.json").read_bytes()
    (outs[0] / "tokenizer.json").unlink()  # a copy that forgot it: refused, nothing written
    with pytest.raises(ShardError, match="tokenizer.json: missing"):
        merge_parts(outs[0], 2)
    assert not (outs[0] / "manifest.json").exists()
    (outs[0] / "tokenizer.json").write_bytes(tokenizer)
    merge_parts(outs[0], 2)
    assert _files(outs[0]) == _files(tiny)


def test_build_writes_missing_files_again(tiny: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(tiny, tmp_path / tiny.name))
    (out / "train_00005.parquet").unlink()
    with pytest.warns(UserWarning, match="rebuilding .*train_00005.parquet: listed in the manifest but missing"):
        assert build_shards(RECIPE, tmp_path, seed=1234) == out
    assert _files(out) == _files(tiny)


def test_a_repair_that_fails_keeps_the_manifest(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder missing one file is repaired by a rebuild; if that rebuild cannot read its inputs, the
    intact files keep their manifest (nothing already saved is lost) and the next build repairs it."""
    out = Path(shutil.copytree(tiny, tmp_path / tiny.name))
    (out / "val_code.parquet").unlink()

    def inputs_gone(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise FileNotFoundError("no file at path corpus/python_stdlib.jsonl.gz")

    monkeypatch.setattr(build_mod, "_prepare_all", inputs_gone)
    with pytest.warns(UserWarning, match="rebuilding"), pytest.raises(FileNotFoundError):
        build_shards(RECIPE, tmp_path, seed=1234)
    assert (out / "manifest.json").read_bytes() == (tiny / "manifest.json").read_bytes()
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="rebuilding"):
        assert build_shards(RECIPE, tmp_path, seed=1234) == out
    assert _files(out) == _files(tiny)


def test_an_edited_manifest_is_rebuilt_not_returned(tiny: Path, tmp_path: Path) -> None:
    """Every reader refuses a manifest whose manifest_hash no longer matches: the build must not return it."""
    out = Path(shutil.copytree(tiny, tmp_path / tiny.name))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sources"]["code"]["license"] = "edited"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="the manifest was edited"):
        ShardSet.open(out)
    with pytest.warns(UserWarning, match="rebuilding .*manifest_hash does not match its content"):
        assert build_shards(RECIPE, tmp_path, seed=1234) == out
    assert _files(out) == _files(tiny)
    assert ShardSet.open(out).manifest_hash == ShardSet.open(tiny).manifest_hash


def test_temporary_names_differ_between_workers_with_the_same_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scale-out workers in separate PID namespaces (containers, SLURM) share `.work` and may share a pid:
    their temporary files must still not collide."""
    from open360.paths import temp_sibling

    monkeypatch.setattr(os, "getpid", lambda: 2)
    target = Path("/shared/.work/x/code.train.bin")
    names = {temp_sibling(target) for _ in range(100)}
    assert len(names) == 100 and all(n.parent == target.parent and n.name.endswith("-code.train.bin") for n in names)


def test_interrupted_build_is_never_referenced_and_resumes(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from open360.data.cli import build_main

    real = build_mod.write_rows
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "write_rows", flaky)
    args = ["--recipe", RECIPE, "--seed", "1234", "--shards-root", str(tmp_path), "--workers", "1", "--no-progress"]
    assert build_main(args) == 130  # Ctrl-C: one line, not a traceback
    err = capsys.readouterr().err
    assert err.startswith("open360 data build: interrupted; run the same command again") and "Traceback" not in err
    out = tmp_path / tiny.name
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardSet.open(out)
    (out / ".tmp-w0of1-123-train_00003.parquet").write_bytes(b"half a shard")  # a killed run of this slot
    (out / ".tmp-77-manifest.json").write_bytes(b"{")  # an older build's, and a merge's, leftovers
    (out / ".tmp-merge-78-manifest.json").write_bytes(b"{")
    monkeypatch.setattr(build_mod, "write_rows", real)
    assert build_shards(RECIPE, tmp_path, seed=1234) == out
    assert _files(out) == _files(tiny)
    assert not list(out.glob(".tmp-*"))


def test_a_full_disk_names_the_file_keeps_the_chunks_written_and_leaves_no_temporary_file(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`open360 data build` on a disk that fills up while chunk 2 is written: one line naming that file
    (pyarrow's own error names none), the chunks before it stay, its half-written temporary file is removed
    (it held the space the disk lacks), and the same command then finishes the build."""
    import errno

    import pyarrow.parquet as pq

    from open360.data.cli import build_main

    real, writes = pq.ParquetWriter, []

    class DiskFillsUp(real):  # type: ignore[misc,valid-type]
        def write_table(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            writes.append(1)
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
            super().write_table(*args, **kwargs)

    monkeypatch.setattr(pq, "ParquetWriter", DiskFillsUp)
    args = ["--recipe", RECIPE, "--seed", "1234", "--shards-root", str(tmp_path), "--workers", "1", "--no-progress"]
    assert build_main(args) == 1
    out = tmp_path / tiny.name
    err = capsys.readouterr().err
    assert "no space left on the device" in err and f"{out / 'train_00002.parquet'}: could not be written" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["train_00000.parquet", "train_00001.parquet"]
    monkeypatch.setattr(pq, "ParquetWriter", real)
    assert build_main(args) == 0
    assert _files(out) == _files(tiny)


def test_a_chunk_of_another_seed_is_refused_and_built_again(tiny: Path, tmp_path: Path) -> None:
    other = build_shards(RECIPE, tmp_path / "other", seed=7)
    mixed = Path(shutil.copytree(tiny, tmp_path / "shards" / tiny.name))
    shutil.copy(other / "train_00002.parquet", mixed / "train_00002.parquet")  # same name, same row count
    with pytest.raises(ShardError, match="train_00002.parquet: written as train_00002.parquet of recipe hash"):
        ShardSet.open(mixed)
    with pytest.warns(UserWarning, match="rebuilding .*swapped in from another build or seed"):
        assert build_shards(RECIPE, tmp_path / "shards", seed=1234) == mixed
    assert _files(mixed) == _files(tiny)


def test_crystalcoder_stages_share_tokenizer_and_fim(tmp_path: Path) -> None:
    outs = [build_shards(f"data_recipes/crystalcoder_tiny_stage{i}.yaml", tmp_path) for i in (1, 2, 3)]
    sets = [ShardSet.open(o) for o in outs]
    assert len({s.tokenizer_hash for s in sets}) == 1
    m2 = sets[1].manifest["sources"]["code"]
    assert m2["fim_docs"] > 0 and sets[0].manifest["sources"]["code"]["fim_docs"] == 0
    fim_id = sets[1].tokenizer().token_to_id("<fim_middle>")
    assert (sets[1].sequences(np.arange(sets[1].num_sequences)) == fim_id).any()
    assert sets[2].manifest["sources"]["code"]["target_fraction"] == pytest.approx(0.9)


def test_fim_sentinels_named_as_the_tokenizer_names_them(tmp_path: Path) -> None:
    """LLM360/CrystalCoder's tokenizer names its FIM sentinels <|fim_prefix|> ... and its EOS </s>: a recipe
    names them in tokenizer.fim_tokens, and FIM inserts those ids (was: only <fim_prefix> ... could be used)."""
    fim = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    recipe = tmp_path / "cc.yaml"
    recipe.write_text(
        Path("data_recipes/crystalcoder_tiny_stage2.yaml").read_text()
        .replace('eos_token: "<|endoftext|>"', 'eos_token: "</s>"')
        .replace('special_tokens: ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<|pad|>"]',
                 f"special_tokens: {json.dumps(fim)}\n  fim_tokens: {json.dumps(fim)}")
    )
    s = ShardSet.open(build_shards(recipe, tmp_path / "shards"))
    tok, rows = s.tokenizer(), s.sequences(np.arange(s.num_sequences))
    assert s.manifest["sources"]["code"]["fim_docs"] > 0 and tok.token_to_id("<fim_middle>") is None
    for name in fim:
        assert (rows == tok.token_to_id(name)).any(), name
    assert s.eos_id == tok.token_to_id("</s>")


# The embedded_tiny shards as built on the reference machine (CPython 3.11, tokenizers 0.23, numpy 2.4).
# The manifest hash covers the recipe, the tokenizer hash, every per-source count and every shard's content
# hash (not file bytes), so a different value on another machine means the build is not reproducible there.
# Update both only when the recipe or the pipeline changes on purpose.
GOLDEN_MANIFEST = "0d853787e5637463ba87dc864d6f559cebb56b9cda50967fa7fbbfaf4f6e9291"
GOLDEN_TOKENIZER = "d67bb3ef40fb0b452528bb809a40fea68628a2abb3f7aa822aebf890a0bf08ae"


def test_golden_hashes_and_thread_independent_tokenizer(tiny: Path) -> None:
    s = ShardSet.open(tiny)
    assert (s.manifest_hash, s.tokenizer_hash) == (GOLDEN_MANIFEST, GOLDEN_TOKENIZER)
    code = (
        "import hashlib; from open360.data.recipe import load_recipe; from open360.data.tokenizer import "
        f"train_bpe; print(hashlib.sha256(train_bpe(load_recipe('{RECIPE}')).to_str().encode()).hexdigest())"
    )
    one_thread = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "RAYON_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert one_thread.stdout.strip() == s.tokenizer_hash


def test_swapped_or_damaged_shard_files_are_refused_not_read(tiny: Path, tmp_path: Path) -> None:
    good = ShardSet.open(tiny)
    swapped = Path(shutil.copytree(tiny, tmp_path / "swapped"))
    a, b = swapped / "train_00003.parquet", swapped / "train_00004.parquet"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    with pytest.raises(ShardError, match="train_00003.parquet: written as train_00004.parquet .* swapped in"):
        ShardSet.open(swapped)
    manifest = json.loads((tiny / "manifest.json").read_text())
    in_chunk_3 = int(np.cumsum(good.chunk_sizes)[2]) + 5
    with pytest.raises(ShardError, match="train_00003.parquet.*swapped or replaced"):  # files without footers
        ShardSet(swapped, manifest).sequences([in_chunk_3])
    size = (tiny / "train_00000.parquet").stat().st_size
    every_id = np.arange(good.chunk_sizes[0])
    for offset in (size // 5, size // 3, size // 2, 2 * size // 3):  # inside the token pages
        flipped = Path(shutil.copytree(tiny, tmp_path / f"flip{offset}"))
        data = bytearray((flipped / "train_00000.parquet").read_bytes())
        data[offset] ^= 0x10
        (flipped / "train_00000.parquet").write_bytes(bytes(data))
        with pytest.raises(ShardError, match="train_00000.parquet"):
            ShardSet.open(flipped).sequences(every_id)
    truncated = Path(shutil.copytree(tiny, tmp_path / "truncated"))
    (truncated / "train_00001.parquet").write_bytes((tiny / "train_00001.parquet").read_bytes()[: size // 2])
    with pytest.raises(ShardError, match="train_00001.parquet.*damaged or truncated"):
        ShardSet.open(truncated)
    (truncated / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: not valid JSON"):
        ShardSet.open(truncated)


def _rewrite_chunk(folder: Path, name: str, edit) -> None:  # noqa: ANN001
    """Write a shard file again through open360's own writer (same ids, footer and file name), its rows
    changed by `edit`: what a tampered or silently corrupted copy looks like to every cheap check."""
    from open360.data.shards import read_rows, write_rows

    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(e for e in manifest["chunks"] if e["file"] == name)
    tokens, sources = read_rows(folder / name, entry)
    tokens = edit(tokens.copy())
    size = manifest["row_group_size"]
    blocks = [(tokens[b : b + size], sources[b : b + size]) for b in range(0, len(tokens), size)]
    write_rows(folder / name, blocks, entry["first_id"], tokens.shape[1], size, manifest["recipe_hash"])


def test_shard_content_rewritten_under_its_ids_is_refused_when_read(tiny: Path, tmp_path: Path) -> None:
    from open360.data.cli import batch_main, verify_main

    def sevens(tokens: np.ndarray) -> np.ndarray:
        tokens[0] = 7
        return tokens

    out = Path(shutil.copytree(tiny, tmp_path / "tampered"))
    _rewrite_chunk(out, "train_00000.parquet", sevens)
    shards = ShardSet.open(out)  # ids, rows, row groups and footer all as the manifest says
    in_chunk_1 = [shards.chunk_sizes[0] + 3]  # other files are read as before
    assert np.array_equal(shards.sequences(in_chunk_1), ShardSet.open(tiny).sequences(in_chunk_1))
    with pytest.raises(ShardError, match=r"train_00000\.parquet: row group 0 differs from the manifest's hash"):
        shards.sequences([0])
    with pytest.raises(ShardError, match=r"train_00000\.parquet: row group 0 differs"):
        shards.verify_content()
    assert verify_main(["--shards", str(tiny)]) == 0
    assert verify_main(["--shards", str(out)]) == 1
    assert batch_main(["--shards", str(out), "--step", "0", "--global-batch-size", str(shards.num_sequences)]) == 1


def test_verify_checks_the_sequence_ids_a_loader_checks(tiny: Path, tmp_path: Path) -> None:
    """A shard whose seq_id column alone differs (tokens, sources and footer intact) fails `data verify`,
    as it fails the loader: verify must not pass a folder that training then refuses."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from open360.data.cli import verify_main

    for name in ("train_00001.parquet", "val_code.parquet"):
        out = Path(shutil.copytree(tiny, tmp_path / name))
        path = out / name
        meta = pq.ParquetFile(path).schema_arrow.metadata
        table = pq.read_table(path)
        table = table.set_column(0, "seq_id", pc.add(table.column("seq_id"), 1000)).replace_schema_metadata(meta)
        pq.write_table(table, path, compression="zstd", write_statistics=False, write_page_checksum=True)
        with pytest.raises(ShardError, match=rf"{name}: row group 0 holds sequence ids from"):
            ShardSet.open(out).verify_content()
        assert verify_main(["--shards", str(out)]) == 1


def test_a_damaged_token_column_type_is_a_shard_error(tiny: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(shutil.copytree(tiny, tmp_path / "listtype"))
    path = out / "train_00001.parquet"
    table = pq.read_table(path)
    as_list = table.set_column(2, "token_ids", table.column("token_ids").cast(pa.list_(pa.int32())))
    pq.write_table(as_list.replace_schema_metadata(table.schema.metadata), path)
    first = ShardSet.open(tiny).chunk_sizes[0]
    with pytest.raises(ShardError, match=r"train_00001\.parquet: column token_ids has type list<"):
        ShardSet.open(out).sequences([first])
    pq.write_table(as_list.replace_schema_metadata(None), path)
    with pytest.raises(ShardError, match=r"train_00001\.parquet: no open360 footer"):
        ShardSet.open(out)


@pytest.mark.parametrize(
    ("old", "new"),
    [(b"open360.recipe_hash", b"open360.recipe\x97hash"), (b"token_ids", b"token_idz"), (b"seq_id", b"s\x8aq_id")],
)
def test_a_name_damaged_in_a_footer_is_a_shard_error_naming_the_file(
    tiny: Path, tmp_path: Path, old: bytes, new: bytes
) -> None:
    """A flipped byte in a footer's metadata key or column name (not UTF-8, or another name) is a ShardError
    naming the file, not a bare UnicodeDecodeError or KeyError."""
    from open360.data.cli import verify_main

    out = Path(shutil.copytree(tiny, tmp_path / "footer"))
    path = out / "train_00002.parquet"
    path.write_bytes(path.read_bytes().replace(old, new))
    with pytest.raises(ShardError, match=r"train_00002\.parquet: unreadable shard file"):
        s = ShardSet.open(out)
        s.sequences(np.arange(s.num_sequences))
    assert verify_main(["--shards", str(out)]) == 1


def test_a_folder_of_format_1_is_still_read_and_reused(tiny: Path, tmp_path: Path) -> None:
    """Folders built before row-group hashes (format 1) keep their name, open with a warning (their
    contents are checked by `data verify`, per file) and are reused by a build: runs trained on them resume."""
    from open360.data.recipe import READABLE_FORMATS
    from open360.data.shards import manifest_hash_of

    out = Path(shutil.copytree(tiny, tmp_path / tiny.name))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = READABLE_FORMATS[0]
    for entry in [*manifest["chunks"], *manifest["validation"].values()]:
        del entry["row_group_sha256"]
    manifest["manifest_hash"] = manifest_hash_of(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=1))
    with pytest.warns(UserWarning, match="built by an older open360 .*`open360 data verify` checks whole files"):
        old = ShardSet.open(out)
    assert np.array_equal(old.sequences(np.arange(40)), ShardSet.open(tiny).sequences(np.arange(40)))
    old.verify_content()
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert build_shards(RECIPE, tmp_path, seed=1234) == out
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_a_part_manifest_cut_short_by_a_copy_names_its_file(tmp_path: Path) -> None:
    parts = tmp_path / "out" / ".parts"
    parts.mkdir(parents=True)
    (parts / "part-00000-of-00002.json").write_text('{"chunks": {"0": {"file": "train_0')  # a partial copy
    (parts / "part-00001-of-00002.json").write_text("{}")
    with pytest.raises(ShardError, match=r"part-00000-of-00002.json: not a part manifest .*copy it again"):
        merge_parts(tmp_path / "out", 2)
    (parts / "part-00000-of-00002.json").write_text("[]")
    with pytest.raises(ShardError, match=r"part-00000-of-00002.json: not a part manifest .*keys missing"):
        merge_parts(tmp_path / "out", 2)


def _with_row_groups_of(folder: Path, size: int) -> None:
    """Write every shard file of a folder again in row groups of `size` rows (same rows, ids, footer and
    content hash), with the manifest's row_group_size, row-group hashes and manifest_hash to match."""
    from open360.data.shards import manifest_hash_of, read_rows, write_rows

    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in [*manifest["chunks"], *manifest["validation"].values()]:
        tokens, sources = read_rows(folder / entry["file"], entry)
        blocks = [(tokens[b : b + size], sources[b : b + size]) for b in range(0, len(tokens), size)]
        first = entry.get("first_id", 0)
        _, entry["row_group_sha256"], _ = write_rows(
            folder / entry["file"], blocks, first, tokens.shape[1], size, manifest["recipe_hash"]
        )
    manifest["row_group_size"] = size
    manifest["manifest_hash"] = manifest_hash_of(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_verify_holds_one_row_group_at_a_time_not_a_whole_file(tiny: Path, tmp_path: Path) -> None:
    """`data verify` streams each file: at LLM360 scale a chunk file holds ~14 GB of tokens, which read
    whole (then concatenated, then copied to bytes to hash) needed ~3x that in memory."""
    import tracemalloc

    out = Path(shutil.copytree(tiny, tmp_path / "small_groups"))
    _with_row_groups_of(out, 16)
    shards = ShardSet.open(out)
    rows = max(shards.chunk_sizes)
    assert rows >= 8 * 16  # several row groups per file
    tracemalloc.start()
    try:
        shards.verify_content()  # every hash still matches
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_file = rows * (shards.seq_len + 1) * 4
    assert peak < one_file / 2, f"peak {peak} bytes; one file's tokens are {one_file} bytes"
    _rewrite_chunk(out, "train_00002.parquet", lambda t: t[::-1].copy())  # rows reordered: hashes fail
    with pytest.raises(ShardError, match=r"train_00002\.parquet: row group 0 differs"):
        shards.verify_content()


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(num_sequences=m["num_sequences"] - 16), r"num_sequences is \d+ but its chunks hold"),
        (lambda m: m.update(row_group_size=7), r"chunks\.0 \(train_00000\.parquet\) lists 1 row groups"),
        (lambda m: m.update(seq_len=64), r"train_00000\.parquet: rows of 129 tokens, the manifest's seq_len=64"),
        (lambda m: m.pop("chunks"), r"no key\(s\) \['chunks'\]"),
    ],
)
def test_a_manifest_edited_and_hashed_again_is_refused_when_its_numbers_disagree(
    tiny: Path, tmp_path: Path, edit, message: str  # noqa: ANN001
) -> None:
    """A manifest edited by hand with its manifest_hash recomputed: fewer num_sequences than its chunks
    hold gave a silently shorter epoch (another data order), the others an IndexError or a numpy shape error."""
    from open360.data.shards import manifest_hash_of

    out = Path(shutil.copytree(tiny, tmp_path / "edited"))
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    manifest["manifest_hash"] = manifest_hash_of(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=message):
        ShardSet.open(out)
    (out / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ShardError, match="manifest.json: holds a JSON list, not a shard manifest"):
        ShardSet.open(out)


def test_a_shard_is_whole_when_it_is_flushed_to_the_disk_and_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parquet writer is closed (its footer written) before the file is flushed and renamed into place: a
    flush before the footer, or none, could leave after a power cut a shard without its end under its name."""
    import numpy as np
    import pyarrow.parquet as pq

    import open360.paths as paths
    from open360.data.shards import write_rows

    target = tmp_path / "train_00000.parquet"
    flushed: list[tuple[str, int]] = []
    real = paths.fsync_file

    def whole_when_flushed(path: Path) -> None:
        flushed.append((Path(path).parent.name, pq.read_metadata(path).num_rows))
        assert not target.exists()  # renamed after the flush
        real(path)

    monkeypatch.setattr(paths, "fsync_file", whole_when_flushed)
    blocks = [(np.arange(8, dtype=np.int32).reshape(2, 4), ["a", "b"]), (np.ones((1, 4), np.int32), ["a"])]
    assert write_rows(target, blocks, 0, 4, 2, "r" * 64)[2] == 3
    assert flushed == [(tmp_path.name, 3)] and pq.read_metadata(target).num_rows == 3


@pytest.mark.parametrize("error", [OSError("Couldn't serialize thrift"), KeyboardInterrupt()])
def test_a_write_that_fails_leaves_the_file_as_it_was_and_names_it(tmp_path: Path, error: BaseException) -> None:
    """An error without an errno (pyarrow's own) is named with the file, not as `[Errno None]`; Ctrl-C goes
    through as it is; the temporary file is removed either way."""
    from open360.paths import replaced_atomically

    target = tmp_path / "train_00000.parquet"
    target.write_text("old")
    with pytest.raises(type(error)) as raised, replaced_atomically(target) as tmp:
        tmp.write_text("new")
        raise error
    if isinstance(error, OSError):
        assert str(raised.value) == f"{target}: could not be written (Couldn't serialize thrift)"
    else:
        assert raised.value is error
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_decontaminated_validation_keeps_no_row_sharing_a_passage_with_training(tiny: Path, tmp_path: Path) -> None:
    """`validation.decontaminate_ngram: 13`: the pydoc topics repeat whole sections across documents, so the
    per-document split leaves held-out rows whose passages were trained on; with the option those rows are
    dropped (counted in the manifest), the training chunks are the same, and no held-out row left shares 13
    tokens with a training row (checked here by brute force). Unset, the recipe's hash is what it was."""
    from open360.data.decontaminate import ngram_hashes
    from open360.data.recipe import load_recipe, recipe_hash

    recipe = tmp_path / "embedded_tiny.yaml"
    recipe.write_text(Path(RECIPE).read_text().replace("  max_sequences: 32\n",
                                                       "  max_sequences: 32\n  decontaminate_ngram: 13\n"))
    assert recipe_hash(load_recipe(RECIPE)) != recipe_hash(load_recipe(recipe))
    with pytest.warns(UserWarning, match="every held-out row of source 'english' shares 13 tokens"):
        clean = ShardSet.open(build_shards(recipe, tmp_path / "shards", seed=1234))
    plain = ShardSet.open(tiny)
    assert [c["content_sha256"] for c in clean.manifest["chunks"]] == [c["content_sha256"] for c in plain.manifest["chunks"]]
    trained = {tuple(row[j : j + 13]) for row in plain.sequences(np.arange(plain.num_sequences)).tolist()
               for j in range(len(row) - 12)}
    dropped = {}
    for source, entry in plain.manifest["validation"].items():
        record = clean.manifest["validation"].get(source, {}).get("decontaminated") or {}
        dropped[source] = record.get("rows_dropped", entry["rows"])
        kept = clean.validation(source).tolist() if source in clean.manifest["validation"] else []
        assert len(kept) + dropped[source] == entry["rows"]
        assert not [row for row in kept if any(tuple(row[j : j + 13]) in trained for j in range(len(row) - 12))]
        before = plain.validation(source).tolist()
        assert kept == [row for row in before if row in kept]  # the rows kept, in their order
    assert dropped["english"] >= 1 and "english" not in clean.manifest["validation"], dropped  # all 7 repeat
    a = np.array([[1, 2, 3, 4, 5, 6]])
    assert ngram_hashes(a, 3)[0, 0] == ngram_hashes(np.array([[9, 1, 2, 3]]), 3)[0, 1]
    assert len(set(ngram_hashes(a, 3)[0].tolist())) == 4
