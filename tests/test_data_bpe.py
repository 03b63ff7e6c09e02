"""The tokenize stage's encoder: tiktoken reproduces HF tokenizers' ids exactly, or HF is used."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from open360.data.bpe import PROBES, batch_encoder, tiktoken_encoding
from open360.data.recipe import load_recipe
from open360.data.tokenizer import obtain_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return obtain_tokenizer(load_recipe(REPO / "data_recipes/embedded_tiny.yaml"), tmp_path_factory.mktemp("tok"))


def _hf_ids(tokenizer_json: bytes, texts: list[str]) -> list[list[int]]:
    """HF `tokenizers` with special tokens' text encoded as text (the tokenize stage's rule)."""
    tok = Tokenizer.from_str(tokenizer_json.decode())
    tok.encode_special_tokens = True
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def test_tiktoken_path_is_used_and_matches_hf_on_the_whole_embedded_corpus(tokenizer_json: bytes) -> None:
    encoding, reason = tiktoken_encoding(tokenizer_json)
    assert encoding is not None, reason
    texts = list(PROBES)
    for name in ("python_stdlib", "pydoc_topics", "shakespeare"):
        with gzip.open(REPO / "data_recipes/corpus" / f"{name}.jsonl.gz") as f:
            texts += [json.loads(line)["text"] for line in f]
    fast = batch_encoder(tokenizer_json)
    assert fast(texts) == _hf_ids(tokenizer_json, texts)
    assert batch_encoder(tokenizer_json, prefer_tiktoken=False)(texts[:50]) == _hf_ids(tokenizer_json, texts[:50])
    tok = Tokenizer.from_str(tokenizer_json.decode())
    (ids,) = fast(["see <|endoftext|> here"])  # a document that mentions the EOS token: no document boundary
    assert tok.token_to_id("<|endoftext|>") not in ids and tok.decode(ids) == "see <|endoftext|> here"


def test_special_tokens_in_text_stay_text_and_other_added_tokens_match() -> None:
    tok = Tokenizer.from_str(_trained(pre_tokenizers.ByteLevel(add_prefix_space=False)).decode())
    tok.add_special_tokens(["<fim_middle>"])
    tok.add_tokens(["<custom>"])  # not special: HF matches it in text, and so must the fast encoder
    data = tok.to_str().encode()
    assert tiktoken_encoding(data)[0] is not None
    texts = ["print('<fim_middle>') and <|endoftext|> then <custom> end"]
    for encode in (batch_encoder(data), batch_encoder(data, prefer_tiktoken=False)):
        (ids,) = encode(texts)
        assert tok.token_to_id("<custom>") in ids
        assert tok.token_to_id("<fim_middle>") not in ids and tok.token_to_id("<|endoftext|>") not in ids
    assert batch_encoder(data)(texts) == _hf_ids(data, texts)


def test_added_tokens_that_prefix_one_another_fall_back_to_hf() -> None:
    tok = Tokenizer.from_str(_trained(pre_tokenizers.ByteLevel(add_prefix_space=False)).decode())
    tok.add_tokens(["ab", "abcd", "abcdefgh"])  # HF matches the longest; tiktoken the first alternative it tries
    data = tok.to_str().encode()
    encoding, reason = tiktoken_encoding(data)
    assert encoding is None and "'ab' and 'abcd' overlap" in reason
    texts = ["x abcdefgh y", "abcd abc ab"]
    fast = batch_encoder(data)
    assert fast(texts) == _hf_ids(data, texts)
    assert tok.token_to_id("abcdefgh") in fast(texts)[0]


def _trained(pre: object, normalizer: object | None = None) -> bytes:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox " * 20, "jumps over the lazy dog 123"], trainer)
    return tok.to_str().encode()


@pytest.mark.parametrize(
    "spec,why",
    [
        (lambda: _trained(pre_tokenizers.ByteLevel(add_prefix_space=True)), "pre-tokenizer"),
        (lambda: _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.NFKC()), "normalizer"),
        (lambda: _trained(pre_tokenizers.Whitespace()), "pre-tokenizer"),
    ],
)
def test_tokenizers_tiktoken_cannot_reproduce_fall_back_to_hf(spec, why: str) -> None:
    data = spec()
    encoding, reason = tiktoken_encoding(data)
    assert encoding is None and why in reason
    texts = ["Hello  world, ﬁne 123!", "the lazy dog"]
    assert batch_encoder(data)(texts) == _hf_ids(data, texts)


def test_a_plain_byte_level_bpe_trained_here_is_eligible_and_exact() -> None:
    data = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
    assert tiktoken_encoding(data)[0] is not None
    texts = [*PROBES, "the quick brown fox jumps over the lazy dog 123 hello world"]
    assert batch_encoder(data)(texts) == _hf_ids(data, texts)


def test_fim_sentinels_are_inserted_by_id_and_sentinel_text_stays_text() -> None:
    import numpy as np

    from open360.data.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, fim_pieces, join_encoded

    tok = Tokenizer.from_str(_trained(pre_tokenizers.ByteLevel(add_prefix_space=False)).decode())
    tok.add_special_tokens([FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX])
    data = tok.to_str().encode()
    ids = {t: tok.token_to_id(t) for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)}
    encode = batch_encoder(data)
    text = "def f():\n    print('<fim_middle>')  # the sentinel's name in code\n    return 1\n"
    for spm_rate in (0.0, 1.0):
        pieces = fim_pieces(text, np.random.default_rng(3), spm_rate, ids)
        (got,) = join_encoded([pieces], encode)
        # one sentinel of each, in the order of both layouts; SPM puts the suffix right after <fim_prefix>
        assert [t for t in got if t in ids.values()] == [ids[FIM_PREFIX], ids[FIM_SUFFIX], ids[FIM_MIDDLE]]
        assert (got[1] == ids[FIM_SUFFIX]) == bool(spm_rate) and pieces[0] == ids[FIM_PREFIX]
        assert sorted("".join(p for p in pieces if isinstance(p, str))) == sorted(text)  # every character, once
        expected = [t for p in pieces for t in ([p] if isinstance(p, int) else encode([p])[0])]
        assert got == expected
    (plain,) = join_encoded([[text]], encode)
    assert not set(plain) & set(ids.values())


def test_spm_encodes_prefix_and_middle_apart_as_starcoder_does() -> None:
    """SPM is <fim_prefix><fim_suffix> Enc(suffix) <fim_middle> Enc(prefix) Enc(middle) (StarCoder's Megatron-LM):
    at inference the prompt ends with Enc(prefix) alone, so a middle cut inside a word starts a new token in
    training too, never a token merged across the cut."""
    import numpy as np

    from open360.data.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, fim_pieces, join_encoded

    tok = Tokenizer.from_str(_trained(pre_tokenizers.ByteLevel(add_prefix_space=False)).decode())
    tok.add_special_tokens([FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX])
    data = tok.to_str().encode()
    ids = {t: tok.token_to_id(t) for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)}
    encode = batch_encoder(data)
    text = "the quick brown fox jumps over the lazy dog " * 4
    for seed in range(20):
        (got,) = join_encoded([fim_pieces(text, np.random.default_rng(seed), 1.0, ids)], encode)
        lo, hi = sorted(int(v) for v in np.random.default_rng(seed).integers(0, len(text) + 1, size=2))
        prefix, middle, suffix = encode([text[:lo], text[lo:hi], text[hi:]])
        assert got == [ids[FIM_PREFIX], ids[FIM_SUFFIX], *suffix, ids[FIM_MIDDLE], *prefix, *middle]
