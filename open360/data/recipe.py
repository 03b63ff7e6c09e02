"""Data recipe schema: sources, filters, tokenizer, packing and chunking, validated on load."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from open360.credentials import holds_credentials, mask_value
from open360.paths import resolve_repo_path

SOURCE_TYPES = ("jsonl", "parquet", "text", "dir", "hf", "llm360_chunks")
TOKENIZER_KINDS = ("train", "file", "hub")
FORMAT_VERSION = "open360-shards/2"  # what a build writes; 2: a content hash per row group
READABLE_FORMATS = ("open360-shards/1", FORMAT_VERSION)  # 1: a content hash per file only
# The recipe hash (and so the shard folder's name) is taken with the format the folder layout first had:
# format 2 added a manifest field, not a new layout, so folders built by format 1 keep their names and runs
# trained on them resume.
RECIPE_HASH_FORMAT = "open360-shards/1"
# `datasets` builders that read the data files they are given (type hf, hf_name: json, ...)
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
_COMMIT = re.compile(r"[0-9a-f]{40}")
FIM_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")


class RecipeError(ValueError):
    """A recipe is invalid: the message names the file, the key and what to change."""


@dataclass
class FimSpec:
    """Fill-in-the-middle (Bavarian et al. 2022) applied to a fraction of a source's documents."""

    rate: float = 0.0  # fraction of documents transformed; 0 = off
    spm_rate: float = 0.5  # of those, fraction in suffix-prefix-middle order (else prefix-suffix-middle)


@dataclass
class SourceSpec:
    """One input source and its share of the training mix."""

    name: str = MISSING
    type: str = MISSING  # jsonl | parquet | text | dir | hf | llm360_chunks
    path: str | None = None  # file, glob or folder (relative to the repository root) for local types
    hf_name: str | None = None  # hub dataset name (type hf, or llm360_chunks read from the hub)
    hf_config: str | None = None
    # hub commit (40-hex sha), tag or branch of hf_name; only a commit sha pins what is read
    hf_revision: str | None = None
    # a pattern or a list of them, e.g. "train/train_00*.jsonl" for LLM360 chunk repositories; relative
    # to the dataset repository, or (hf_name: json, parquet, ...) to the repository root
    hf_data_files: Any = None
    split: str = "train"
    streaming: bool = True
    text_field: str = "text"
    sample_by: str = (
        "document"  # text/dir: one document per file ("document"), blank-line "paragraph" or "line"
    )
    select_source: str | None = None  # llm360_chunks: keep only lines whose "source" equals this
    weight: float = 1.0  # share of the training mix (normalized over sources)
    license: str = "unknown"
    sha256: str | None = None  # pinned hash of the (single) local input file, checked before reading
    max_docs: int | None = None  # read at most this many documents (in file order)
    quality: bool = True  # apply the quality filters to this source
    fim: FimSpec = field(default_factory=FimSpec)


@dataclass
class ExactDedupSpec:
    """Drop documents whose normalized text has the same sha256 as an earlier one."""

    enabled: bool = True


@dataclass
class NearDedupSpec:
    """MinHash/LSH near-duplicate removal over word n-gram shingles (datasketch), among the documents the
    quality filters kept: a document LSH pairs with an earlier kept one is dropped. LSH is approximate:
    datasketch picks bands for `threshold`, so pairs near it fall either side."""

    enabled: bool = True
    threshold: float = 0.8  # the Jaccard similarity the LSH bands are tuned to
    num_perm: int = 64
    shingle_words: int = 5


@dataclass
class HeuristicSpec:
    """Gopher-style document rules; a document failing any rule is dropped and counted by rule."""

    enabled: bool = True
    min_chars: int = 32
    max_chars: int = 1_000_000
    min_words: int = 5
    max_line_chars: int = 20_000
    min_alpha_fraction: float = 0.2  # letters / non-space characters
    max_duplicate_line_fraction: float = 0.7  # repeated non-empty lines / non-empty lines
    max_mean_word_chars: float = 30.0


@dataclass
class ClassifierSpec:
    """phi-1-style quality classifier: trained on a labelled sample, drops documents below threshold."""

    enabled: bool = False
    labels: str | None = None  # jsonl(.gz) with `text` and `label` (1 = keep-worthy, 0 = not)
    labels_sha256: str | None = None
    scorer: str | None = None  # "module:function" taking list[str] -> list[float]; replaces the model
    threshold: float = 0.5
    sources: list[str] = field(default_factory=list)  # sources it applies to; empty = all
    num_features: int = 4096  # hashed word uni/bigram features of the built-in logistic regression
    iterations: int = 300


@dataclass
class FilterSpec:
    """Every filter stage of the recipe, applied after normalization in the order exact dedup, heuristics,
    classifier, near-dup (so that a near-duplicate is dropped only for a copy that is kept)."""

    exact_dedup: ExactDedupSpec = field(default_factory=ExactDedupSpec)
    near_dedup: NearDedupSpec = field(default_factory=NearDedupSpec)
    heuristics: HeuristicSpec = field(default_factory=HeuristicSpec)
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)


@dataclass
class TokenizerSpec:
    """Train a byte-level BPE on the recipe's sources, or load one from a file or the hub."""

    kind: str = "train"  # train | file | hub
    vocab_size: int = 4096
    path: str | None = None  # kind=file: a tokenizer.json
    name: str | None = None  # kind=hub: a hub repository with tokenizer.json (contacted at build time)
    revision: str | None = None  # kind=hub: commit sha, tag or branch of `name` (a sha pins it)
    eos_token: str = "<|endoftext|>"
    special_tokens: list[str] = field(default_factory=list)  # added after eos (e.g. FIM tokens)
    # the FIM sentinels (prefix, middle, suffix), among special_tokens when a source uses fim; a hub tokenizer
    # names its own (LLM360/CrystalCoder: <|fim_prefix|>, <|fim_middle|>, <|fim_suffix|>, ids 32000-32002)
    fim_tokens: list[str] = field(default_factory=lambda: list(FIM_TOKENS))
    train_sources: list[str] = field(default_factory=list)  # empty = every source of the recipe
    train_max_chars: int = 4_000_000  # characters read per source for training


@dataclass
class ValidationSpec:
    """Held-out documents per source, packed like the training data."""

    fraction: float = 0.02  # of documents, chosen by a seeded hash of their content
    max_sequences: int = 64  # per source
    # drop held-out rows that share a run of this many tokens with a training row of any source (a passage
    # repeated across documents, which the per-document split keeps on both sides); None = keep every row
    decontaminate_ngram: int | None = None


@dataclass
class MixSpec:
    """How many training sequences the mix has; per-source counts follow the weights exactly."""

    total_sequences: int | None = None  # None = as many as the scarcest source allows, no repeats
    allow_repeat: bool = False  # let a source be repeated (up-sampled) to reach its share
    # False keeps the input order, source after source (one block each): for one pre-mixed source such
    # as LLM360's released, already shuffled chunks, or a curriculum
    shuffle: bool = True


@dataclass
class RecipeSpec:
    """A whole data recipe: what is read, filtered, tokenized, mixed, shuffled and chunked."""

    name: str = MISSING
    description: str = ""
    sources: list[SourceSpec] = MISSING
    weights: dict[str, float] = field(default_factory=dict)  # optional overrides of sources[*].weight by name
    filters: FilterSpec = field(default_factory=FilterSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    seq_len: int = MISSING  # model context; sequences are stored with seq_len + 1 tokens
    num_chunks: int = MISSING
    chunk_multiple: int = 1  # every chunk holds a multiple of this many sequences (e.g. the batch size)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    mix: MixSpec = field(default_factory=MixSpec)
    seed: int = 1234
    row_group_size: int = 1024  # rows per parquet row group (the unit of random access)
    doc_batch_size: int = 256  # documents per tokenizer call


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise RecipeError(f"{where}: {message}")


def _check_no_credentials(s: SourceSpec, key: str) -> None:
    """No password, token or signed query in a source's locations: the recipe goes into manifest.json, which
    is versioned and released with the shards."""
    files = s.hf_data_files if isinstance(s.hf_data_files, list) else [s.hf_data_files]
    for name, value in (("path", s.path), ("hf_name", s.hf_name), *(("hf_data_files", f) for f in files)):
        _check(
            not (isinstance(value, str) and holds_credentials(value)),
            key,
            f"'{name}' {mask_value(value or '')} holds credentials, which manifest.json (versioned and released "
            "with the shards) would record in the clear; log in instead (HF_TOKEN, `huggingface-cli login`, "
            "the storage's own credential chain)",
        )


def validate_recipe(recipe: RecipeSpec, where: str) -> None:
    """Semantic checks OmegaConf cannot express; raise RecipeError naming the file and key."""
    _check(
        bool(recipe.name) and "/" not in recipe.name,
        f"{where}: key 'name'",
        "must be a non-empty name without '/'",
    )
    _check(len(recipe.sources) > 0, f"{where}: key 'sources'", "lists no source; add at least one")
    names = [s.name for s in recipe.sources]
    _check(len(set(names)) == len(names), f"{where}: key 'sources'", f"source names repeat: {names}")
    for i, s in enumerate(recipe.sources):
        key = f"{where}: key 'sources[{i}]' ({s.name})"
        _check(bool(s.name) and "/" not in s.name, key, "'name' must be non-empty, without '/'")
        _check(s.type in SOURCE_TYPES, key, f"type '{s.type}' is not one of {SOURCE_TYPES}")
        _check(math.isfinite(s.weight) and s.weight >= 0, key, f"weight {s.weight} must be finite and >= 0")
        files = s.hf_data_files
        _check(
            files is None
            or isinstance(files, str)
            or (isinstance(files, list) and all(isinstance(f, str) for f in files)),
            key,
            f"hf_data_files must be a pattern or a list of patterns, not {files!r}",
        )
        if s.type == "hf":
            _check(bool(s.hf_name), key, "type hf needs 'hf_name'")
            _check(
                s.sha256 is None,
                key,
                "'sha256' pins one local file (types jsonl, text, parquet, ...); a hub dataset is not "
                "checked against it — remove it, or read the file with type jsonl/parquet",
            )
        elif s.type == "llm360_chunks":
            _check(bool(s.path or s.hf_name), key, "type llm360_chunks needs 'path' or 'hf_name'")
        else:
            _check(bool(s.path), key, f"type {s.type} needs 'path'")
        if s.hf_revision is not None:
            _check(
                s.type == "hf" or (s.type == "llm360_chunks" and not s.path),
                key,
                "'hf_revision' pins a hub dataset ('hf_name'); a local source has no revision — pin its "
                "file with 'sha256'",
            )
            _check(
                reads_hub(s),
                key,
                f"'hf_revision' pins a hub repository, and '{s.hf_name}' reads local files or a local "
                "folder; drop it, or read local files with type jsonl/parquet and pin them with 'sha256'",
            )
        _check_no_credentials(s, key)
        _check(0 <= s.fim.rate <= 1 and 0 <= s.fim.spm_rate <= 1, key, "fim rates must lie in [0, 1]")
        _check(s.max_docs is None or s.max_docs > 0, key, "max_docs must be positive")
        _check(
            s.sample_by in ("document", "paragraph", "line"), key, "sample_by must be document|paragraph|line"
        )
        # keys a type would silently ignore: an error, not shards built without the filter asked for
        hub_keys = [k for k in ("hf_name", "hf_config", "hf_data_files") if getattr(s, k) is not None]
        if s.type in ("jsonl", "parquet", "text", "dir"):
            _check(not hub_keys, key, f"{hub_keys} read a hub dataset (type hf); type {s.type} reads 'path' and "
                   "would ignore them — remove them, or set type hf")
        elif s.type == "llm360_chunks" and s.path:
            _check(not hub_keys, key, f"type llm360_chunks reads its local 'path' when one is given, and would "
                   f"ignore {hub_keys} — give 'path' (local chunk files) or 'hf_name' (a hub dataset), not both")
        _check(s.type != "hf" or s.path is None, key, "'path' is read by local types; type hf reads 'hf_name' "
               "(local files through it: hf_name json/parquet with hf_data_files) and would ignore it — remove it")
        _check(
            not (_reads_by_name(s) and s.hf_name in PACKAGED_BUILDERS and s.hf_data_files is None),
            key,
            f"hf_name '{s.hf_name}' reads the files 'hf_data_files' names, and it names none (datasets would read "
            "every such file under the working directory); set 'hf_data_files'",
        )
        _check(
            s.sample_by == "document" or s.type in ("text", "dir"),
            key,
            f"'sample_by' splits files of type text or dir; type {s.type} reads one document per row — remove it",
        )
        _check(
            s.select_source is None or s.type == "llm360_chunks",
            key,
            f"'select_source' filters LLM360 chunk rows (type llm360_chunks); type {s.type} would read every "
            "row — remove it",
        )
        _check(
            s.fim.rate == 0 or s.type != "llm360_chunks",
            key,
            "fim needs text; type llm360_chunks is already tokenized — set fim.rate to 0",
        )
        if s.fim.rate > 0:
            missing = [t for t in recipe.tokenizer.fim_tokens if t not in recipe.tokenizer.special_tokens]
            _check(not missing, key, f"fim needs tokenizer.special_tokens to include {missing}")
    total_weight = sum(s.weight for s in recipe.sources)
    _check(total_weight > 0, f"{where}: key 'sources[*].weight'", f"weights sum to {total_weight}; need > 0")
    tok = recipe.tokenizer
    _check(
        tok.kind in TOKENIZER_KINDS,
        f"{where}: key 'tokenizer.kind'",
        f"'{tok.kind}' not in {TOKENIZER_KINDS}",
    )
    _check(bool(tok.eos_token), f"{where}: key 'tokenizer.eos_token'", "must be a non-empty token")
    _check(
        len(tok.fim_tokens) == 3 and len(set(tok.fim_tokens)) == 3 and tok.eos_token not in tok.fim_tokens,
        f"{where}: key 'tokenizer.fim_tokens'",
        f"{tok.fim_tokens} must be three distinct tokens (prefix, middle, suffix), not the EOS",
    )
    if tok.kind == "file":
        _check(bool(tok.path), f"{where}: key 'tokenizer.path'", "kind file needs a path to tokenizer.json")
    else:  # a path or a name that another kind would ignore: an error, not shards of another tokenizer
        _check(
            tok.path is None,
            f"{where}: key 'tokenizer.path'",
            f"only kind file reads a tokenizer file, and kind is '{tok.kind}'; set 'kind: file' or remove 'path'",
        )
    if tok.kind == "hub":
        _check(bool(tok.name), f"{where}: key 'tokenizer.name'", "kind hub needs a hub repository name")
    else:
        _check(
            tok.name is None,
            f"{where}: key 'tokenizer.name'",
            f"only kind hub loads a hub tokenizer, and kind is '{tok.kind}'; set 'kind: hub' or remove 'name'",
        )
        _check(tok.revision is None, f"{where}: key 'tokenizer.revision'", "only kind hub has a revision")
    if tok.kind == "train":
        _check(
            tok.vocab_size >= 260,
            f"{where}: key 'tokenizer.vocab_size'",
            "must be >= 260 (256 bytes + specials)",
        )
        _check(tok.train_max_chars >= 1, f"{where}: key 'tokenizer.train_max_chars'", "must be >= 1")
    for src in tok.train_sources:
        _check(
            src in names,
            f"{where}: key 'tokenizer.train_sources'",
            f"unknown source '{src}'; sources: {names}",
        )
    clf = recipe.filters.classifier
    for src in clf.sources:
        _check(
            src in names,
            f"{where}: key 'filters.classifier.sources'",
            f"unknown source '{src}'; sources: {names}",
        )
    if clf.enabled:
        _check(
            bool(clf.labels or clf.scorer),
            f"{where}: key 'filters.classifier'",
            "enabled needs 'labels' or 'scorer'",
        )
    _check(clf.num_features >= 1, f"{where}: key 'filters.classifier.num_features'", "must be >= 1")
    _check(clf.iterations >= 1, f"{where}: key 'filters.classifier.iterations'", "must be >= 1")
    nd = recipe.filters.near_dedup
    _check(0 < nd.threshold <= 1, f"{where}: key 'filters.near_dedup.threshold'", "must lie in (0, 1]")
    _check(nd.num_perm >= 2, f"{where}: key 'filters.near_dedup.num_perm'", "must be >= 2")
    _check(nd.shingle_words >= 1, f"{where}: key 'filters.near_dedup.shingle_words'", "must be >= 1")
    heur = recipe.filters.heuristics
    for name in ("min_chars", "max_chars", "min_words", "max_line_chars"):
        _check(getattr(heur, name) >= 0, f"{where}: key 'filters.heuristics.{name}'", "must be >= 0")
    _check(heur.min_words >= 1, f"{where}: key 'filters.heuristics.min_words'", "must be >= 1")
    _check(recipe.seq_len >= 2, f"{where}: key 'seq_len'", "must be >= 2")
    _check(recipe.num_chunks >= 1, f"{where}: key 'num_chunks'", "must be >= 1")
    _check(recipe.chunk_multiple >= 1, f"{where}: key 'chunk_multiple'", "must be >= 1")
    _check(0 <= recipe.validation.fraction < 1, f"{where}: key 'validation.fraction'", "must lie in [0, 1)")
    _check(recipe.validation.max_sequences >= 0, f"{where}: key 'validation.max_sequences'", "must be >= 0")
    n = recipe.validation.decontaminate_ngram
    _check(n is None or 2 <= n <= recipe.seq_len + 1, f"{where}: key 'validation.decontaminate_ngram'",
           f"{n} must lie in [2, seq_len + 1 = {recipe.seq_len + 1}] (13 is the usual choice), or be null")
    _check(0 <= recipe.seed < 2**63, f"{where}: key 'seed'", f"{recipe.seed} must lie in [0, 2**63)")
    m = recipe.mix.total_sequences
    _check(m is None or m > 0, f"{where}: key 'mix.total_sequences'", "must be positive or null")
    _check(recipe.row_group_size >= 1, f"{where}: key 'row_group_size'", "must be >= 1")
    _check(recipe.doc_batch_size >= 1, f"{where}: key 'doc_batch_size'", "must be >= 1")


def _reads_by_name(s: SourceSpec) -> bool:
    """Whether a source is read through `datasets` by its `hf_name` (not from a local `path`)."""
    return s.type == "hf" or (s.type == "llm360_chunks" and not s.path)


def reads_hub(s: SourceSpec) -> bool:
    """Whether a source reads a hub repository (not a builder over local files, not a local folder)."""
    return _reads_by_name(s) and bool(s.hf_name) and s.hf_name not in PACKAGED_BUILDERS and not resolve_repo_path(s.hf_name).is_dir()


def unpinned_hub_inputs(recipe: RecipeSpec) -> list[str]:
    """Names of the recipe's hub inputs that no commit sha pins (a branch or tag can move): a build
    records the recipe, not what the hub served, so these make shards that a rebuild may not repeat."""
    out = []
    for s in recipe.sources:
        if reads_hub(s) and not _COMMIT.fullmatch(s.hf_revision or ""):
            out.append(f"source '{s.name}' ({s.hf_name})")
    tok = recipe.tokenizer
    if tok.kind == "hub" and not _COMMIT.fullmatch(tok.revision or ""):
        out.append(f"tokenizer ({tok.name})")
    return out


def _check_sections(spec: type, raw: Any, where: str, prefix: str = "") -> None:
    """A section given a scalar or a list (`near_dedup: false`, `validation: 0.05`) is an error naming its key
    and keys (OmegaConf's merge error names neither); nested sections are checked too."""
    if not OmegaConf.is_dict(raw):
        return
    hints = typing.get_type_hints(spec)
    for f in dataclasses.fields(spec):
        sub = hints[f.name]
        if f.name not in raw or not dataclasses.is_dataclass(sub):
            continue
        node = raw._get_node(f.name)
        if not OmegaConf.is_dict(node):
            value = node._value() if node is not None else None
            keys = ", ".join(g.name for g in dataclasses.fields(sub))
            raise RecipeError(
                f"{where}: key '{prefix}{f.name}': a mapping of ({keys}), not {value!r} — e.g. "
                f"`{f.name}: {{{dataclasses.fields(sub)[0].name}: ...}}`"
            )
        _check_sections(sub, node, where, f"{prefix}{f.name}.")


def load_recipe(path: str | Path, seed: int | None = None) -> RecipeSpec:
    """Load and validate a recipe YAML; `seed` (if given) overrides the recipe's own seed.

    A relative path is looked up in the working directory, then in the repository root.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or not p.is_file():  # relative: the working directory first, then the repository root
        p = resolve_repo_path(path)
    if not p.is_file():
        raise RecipeError(
            f"recipe file not found: {p} (give a path relative to the repository root or absolute)"
        )
    try:
        raw = OmegaConf.load(p)
    except Exception as e:  # yaml syntax errors carry the line
        raise RecipeError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from e
    if not OmegaConf.is_dict(raw):
        raise RecipeError(f"{p}: a recipe is a mapping of keys (name, sources, tokenizer, ...), not a "
                          f"{type(raw).__name__}")
    _check_sections(RecipeSpec, raw, str(p))
    weights = raw.get("weights")
    if weights is not None and not OmegaConf.is_dict(weights):
        raise RecipeError(
            f"{p}: key 'weights': a mapping of source name to weight (`weights: {{web: 0.7}}`), not {weights!r}"
        )
    sources = raw.get("sources")
    if sources is not None and not OmegaConf.is_list(sources):
        raise RecipeError(
            f"{p}: key 'sources': a list of sources ('- name: ..., type: ..., path: ...'), not a "
            f"{'mapping' if OmegaConf.is_dict(sources) else type(sources).__name__}"
        )
    for i, src in enumerate(sources if OmegaConf.is_list(sources) else []):
        if not OmegaConf.is_dict(src):
            raise RecipeError(f"{p}: key 'sources[{i}]': {src!r} is not a mapping (name, type, path, weight, ...)")
        _check_sections(SourceSpec, src, str(p), f"sources[{i}].")
        try:  # merged one by one so that an error names its list index
            OmegaConf.merge(OmegaConf.structured(SourceSpec), src)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise RecipeError(f"{p}: key 'sources[{i}].{key}': {str(e).splitlines()[0]}") from e
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RecipeSpec), raw)
        if seed is not None:
            merged.seed = int(seed)
        recipe: RecipeSpec = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise RecipeError(f"{p}: key '{key}': {msg}") from e
    names = [s.name for s in recipe.sources]
    for src_name, w in recipe.weights.items():
        if src_name not in names:
            raise RecipeError(
                f"{p}: key 'weights.{src_name}': no source named '{src_name}'; sources: {names}"
            )
        recipe.sources[names.index(src_name)].weight = float(w)
    validate_recipe(recipe, str(p))
    return recipe


def recipe_to_dict(recipe: RecipeSpec) -> dict[str, Any]:
    """Plain, JSON-serializable form of a recipe (the form recorded in the manifest and hashed). Keys
    added after the format's first release are left out while unset, so older recipes keep their hash."""
    d: dict[str, Any] = OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)  # type: ignore[assignment]
    for src in d["sources"]:
        if src["hf_revision"] is None:
            del src["hf_revision"]
    if d["tokenizer"]["revision"] is None:
        del d["tokenizer"]["revision"]
    if d["tokenizer"]["fim_tokens"] == list(FIM_TOKENS):
        del d["tokenizer"]["fim_tokens"]
    if d["validation"]["decontaminate_ngram"] is None:
        del d["validation"]["decontaminate_ngram"]
    return d


def canonical_json(obj: Any) -> str:
    """The one serialization that hashes are taken over: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def recipe_hash(recipe: RecipeSpec) -> str:
    """sha256 of the layout's format version and the resolved recipe (seed included)."""
    payload = canonical_json({"format": RECIPE_HASH_FORMAT, "recipe": recipe_to_dict(recipe)})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
