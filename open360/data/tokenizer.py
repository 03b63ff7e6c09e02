"""Tokenizer stage: train a deterministic byte-level BPE on the recipe's sources, or load one."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from open360.data.filters import normalize
from open360.data.recipe import RecipeSpec, canonical_json, recipe_to_dict
from open360.data.sources import input_fingerprint, read_source
from open360.paths import replaced_atomically, resolve_repo_path

_SOURCE_READ_KEYS = (
    "type",
    "path",
    "hf_name",
    "hf_config",
    "hf_revision",
    "hf_data_files",
    "split",
    "text_field",
    "sample_by",
    "select_source",
    "sha256",
    "max_docs",
    "quality",  # the length rule skips a quality source's over-long documents in training too
)

TRAINER_VERSION = 3  # bump when train_bpe's behaviour changes, so cached tokenizers are not reused (3: bz2/xz inputs read)


class TokenizerMismatchError(ValueError):
    """Shards were built with a different tokenizer than the one offered (the OLMo EOS-swap bug)."""


def tokenizer_bytes_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def training_key(recipe: RecipeSpec) -> str:
    """Hash of what a trained tokenizer depends on: its spec, how its sources are read (not weights) and
    their local input files as they are now (an input edited under the same recipe trains a new one)."""
    d = recipe_to_dict(recipe)
    tok = d["tokenizer"]
    names = tok["train_sources"] or [s["name"] for s in d["sources"]]
    srcs = [{k: s[k] for k in _SOURCE_READ_KEYS if k in s} for s in d["sources"] if s["name"] in names]
    payload = {
        "trainer": TRAINER_VERSION,
        "tokenizer": tok,
        "sources": srcs,
        "inputs": [input_fingerprint(s) for s in recipe.sources if s.name in names],
        "heuristics": d["filters"]["heuristics"],
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def _training_texts(recipe: RecipeSpec) -> Iterator[str]:
    """Normalized documents of the training sources, up to train_max_chars each.

    Documents the length rule would drop are skipped: one huge "word" makes BPE training crawl.
    """
    names = recipe.tokenizer.train_sources or [s.name for s in recipe.sources]
    heur = recipe.filters.heuristics
    max_chars = heur.max_chars if heur.enabled else None
    for source in recipe.sources:
        if source.name not in names or source.type == "llm360_chunks":
            continue
        budget = recipe.tokenizer.train_max_chars
        for doc in read_source(source, Counter()):
            text = normalize(doc.text or "")
            if not text.strip() or (max_chars is not None and source.quality and len(text) > max_chars):
                continue
            yield text[:budget]
            budget -= len(text)
            if budget <= 0:
                break


def train_bpe(recipe: RecipeSpec) -> Tokenizer:
    """Byte-level BPE with vocab_size entries (EOS first, then the special tokens), no randomness."""
    spec = recipe.tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=[spec.eos_token, *[t for t in spec.special_tokens if t != spec.eos_token]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(recipe), trainer=trainer)
    return tok


def obtain_tokenizer(recipe: RecipeSpec, cache_dir: Path) -> bytes:
    """The serialized tokenizer.json of the recipe: trained (cached by `training_key`), a file, or the hub."""
    spec = recipe.tokenizer
    if spec.kind == "file":
        path = resolve_repo_path(spec.path or "")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.path: {path} does not exist; point it at a tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception on a malformed file
            raise ValueError(
                f"tokenizer.path: {path} is not a tokenizer.json the tokenizers library can load ({err})"
            ) from err
    elif spec.kind == "hub":
        name = spec.name or ""
        local = next((p.resolve() for p in (resolve_repo_path(name), Path(name)) if p.is_dir()), None)
        if local is not None:  # the hub client would take it for a repository id (and go to the network)
            raise ValueError(
                f"tokenizer.name {spec.name!r} is a local folder ({local}), and kind hub loads a hub repository; "
                f"set 'kind: file' and 'path: {local / 'tokenizer.json'}'"
            )
        try:
            tok = Tokenizer.from_pretrained(spec.name, revision=spec.revision or "main")
        except Exception as err:  # huggingface_hub's HTTP/offline errors, or a repo without tokenizer.json
            raise ValueError(
                f"tokenizer.name {spec.name!r} (revision {spec.revision or 'main'}): cannot load its "
                f"tokenizer.json from the Hugging Face hub ({type(err).__name__}: {' '.join(str(err).split())})"
            ) from err
    else:
        cached = cache_dir / f"bpe-{training_key(recipe)[:16]}.json"
        if cached.is_file():
            return cached.read_bytes()
        data = train_bpe(recipe).to_str().encode("utf-8")
        cache_dir.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(cached) as tmp:
            tmp.write_bytes(data)
        return data
    if tok.token_to_id(spec.eos_token) is None:
        raise ValueError(
            f"tokenizer '{spec.path or spec.name}' has no token '{spec.eos_token}'; "
            "set tokenizer.eos_token to its end-of-text token"
        )
    missing = [t for t in spec.special_tokens if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(
            f"tokenizer '{spec.path or spec.name}' lacks the special tokens {missing} that "
            "tokenizer.special_tokens lists; use a tokenizer that has them or drop them"
        )
    return tok.to_str().encode("utf-8")
