"""Batch encoding for the tokenize stage: byte-level BPE through tiktoken's encoder when the tokenizer.json
allows it (the same ids as HF `tokenizers`, checked on construction, several times faster), else HF."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from tokenizers import Tokenizer

# The GPT-2 pre-tokenization split of HF's ByteLevel pre-tokenizer (use_regex=true), as tiktoken writes it.
BYTE_LEVEL_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Texts both encoders must agree on before the fast one is used (whitespace runs, contractions, digits,
# non-ASCII letters, emoji, control characters, an added special token in running text).
PROBES = (
    "def f(x):\n    return x  # it's 3.14\n\n\n\tTabs\r\nand CRLF  ",
    "I'll say: they've we'd you're HE'S  “quoted” — naïve café 東京 😀 \x00\x07 end",
    "text<|endoftext|>more <|endoftext|> 12345 67.8e-9 ~!@#$%^&*()_+",
    "   leading and trailing spaces   ",
    "",
)

Encoder = Callable[[list[str]], list[list[int]]]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode alphabet for bytes, inverted: character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _ineligible(spec: dict[str, Any]) -> str | None:
    """Why tiktoken cannot reproduce this tokenizer exactly (None when it can)."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r} is not BPE"
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"BPE option {key}={model[key]!r}"
    if model.get("byte_fallback") or model.get("ignore_merges"):
        return "byte_fallback / ignore_merges"
    if spec.get("normalizer") is not None:
        return "a normalizer"
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return f"pre-tokenizer {pre.get('type')!r} (only ByteLevel with use_regex and no prefix space)"
    for tok in spec.get("added_tokens") or []:
        if tok.get("single_word") or tok.get("lstrip") or tok.get("rstrip"):
            return f"added token {tok['content']!r} with single_word/lstrip/rstrip"
    # added tokens matched in text: at one position tiktoken takes the first alternative of its (arbitrary)
    # order, HF the longest token, so no such token may be a prefix of another
    in_text = sorted(t["content"] for t in spec.get("added_tokens") or [] if not t.get("special"))
    for a, b in zip(in_text, in_text[1:], strict=False):
        if b.startswith(a):
            return f"added tokens {a!r} and {b!r} overlap"
    return None


def tiktoken_encoding(tokenizer_json: bytes) -> tuple[Any | None, str]:
    """(tiktoken Encoding with the tokenizer's own ids, "") or (None, the reason it cannot be built)."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    spec = json.loads(tokenizer_json)
    reason = _ineligible(spec)
    if reason:
        return None, reason
    decoder = _byte_decoder()
    vocab: dict[str, int] = spec["model"]["vocab"]
    specials = {t["content"]: int(t["id"]) for t in spec.get("added_tokens") or []}
    try:
        ranks = {bytes(decoder[c] for c in s): i for s, i in vocab.items() if s not in specials}
    except KeyError:
        return None, "a vocabulary entry outside the byte-level alphabet"
    merged = []
    for merge in spec["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged.append(vocab.get(left + right, -1))
    # tiktoken merges the adjacent pair whose result has the lowest rank; using ids as ranks matches
    # HF's merge priority when the merge results' ids follow the merge order (as trained BPE assigns them).
    if len(ranks) != len(vocab) - len(set(specials) & set(vocab)) or min(merged, default=0) < 0:
        return None, "duplicate or missing merge results in the vocabulary"
    if any(a >= b for a, b in zip(merged, merged[1:], strict=False)):
        return None, "merge results' ids do not follow the merge order"
    encoding = tiktoken.Encoding(
        "open360-bpe", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return encoding, ""


def batch_encoder(tokenizer_json: bytes, prefer_tiktoken: bool = True) -> Encoder:
    """texts -> token ids (no added BOS/EOS), identical whichever encoder runs; tiktoken when it is
    installed, can express the tokenizer, and agrees with HF `tokenizers` on PROBES.

    A special token's text inside a document (a page that mentions `<|endoftext|>`, code that prints
    `<fim_middle>`) is encoded as text, never as the special id: EOS between documents and FIM sentinels
    are inserted by id only. Added tokens that are not special match in text, as in HF `tokenizers`."""
    hf = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    hf.encode_special_tokens = True

    def hf_encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)]

    if not prefer_tiktoken:
        return hf_encode
    encoding, _ = tiktoken_encoding(tokenizer_json)
    if encoding is None:
        return hf_encode
    threads = max(1, len(os.sched_getaffinity(0)))
    in_text = {t["content"] for t in json.loads(tokenizer_json).get("added_tokens") or [] if not t.get("special")}

    def fast_encode(texts: list[str]) -> list[list[int]]:
        return encoding.encode_batch(texts, num_threads=threads, allowed_special=in_text, disallowed_special=())

    if fast_encode(list(PROBES)) != hf_encode(list(PROBES)):
        warnings.warn("tiktoken and HF tokenizers disagree on this tokenizer; using HF tokenizers", stacklevel=2)
        return hf_encode
    return fast_encode
