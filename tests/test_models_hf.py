"""HF interop: logits parity with transformers Llama/Phi, export→import round trips, tokenizer export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from open360.config import ModelConfig, compose
from open360.models import build_model
from open360.models.hf import HFInteropError, export_hf, hf_architecture, import_hf

transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)


def model_cfg(name: str, **changes) -> ModelConfig:
    from open360.models.decoder import as_model_config

    return dataclasses.replace(as_model_config(compose([f"model={name}"]).model), **changes)


def randomized(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((0.0 if "bias" in name else 1.0) + 0.1 * torch.randn_like(p))
    return model.eval()


PARITY = {
    "amber_tiny": ("amber_tiny", {}),
    "amber_tiny_pi2_gqa_bias": ("amber_tiny", dict(rope_interpolation_factor=2.0, n_kv_heads=2, attn_bias=True)),
    "amber_tiny_tied_mlpbias": ("amber_tiny", dict(tie_embeddings=True, mlp_bias=True, rotary_base=500.0)),
    "phi15_tiny": ("phi15_tiny", {}),
    "phi15_tiny_no_head_bias_pi": ("phi15_tiny", dict(lm_head_bias=False, rope_interpolation_factor=3.0)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    name, changes = PARITY[case]
    cfg = model_cfg(name, **changes)
    model = randomized(cfg)
    out = export_hf(model, cfg, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = "LlamaForCausalLM" if name.startswith("amber") else "PhiForCausalLM"
    assert type(hf).__name__ == expected
    ids = torch.randint(0, cfg.vocab_size, (2, 100))  # past 64 positions so PI/base differences show
    with torch.no_grad():
        delta = (hf(ids).logits - model(ids)).abs().max().item()
    assert delta < 1e-4, f"{case}: max |Δlogits| = {delta}"


@pytest.mark.parametrize("name", ["amber_tiny", "crystalcoder_tiny"])
def test_weights_past_max_shard_size_are_sharded_as_transformers_shards_them(name: str, tmp_path: Path) -> None:
    """A 7B export is 27 GB of fp32 weights: split into shards with an index (transformers' layout), which
    transformers, the open360 remote code and import_hf all load to the same logits."""
    cfg = model_cfg(name)
    model = randomized(cfg, seed=3)
    out = export_hf(model, cfg, None, tmp_path / "hf", max_shard_size="500KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    back, _ = import_hf(out)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
        assert torch.equal(back(ids), model(ids))
    single = export_hf(model, cfg, None, tmp_path / "one")  # the default (5GB): one file, as before
    assert sorted(p.name for p in single.glob("model*.safetensors*")) == ["model.safetensors"]


def test_import_folder_written_by_transformers(tmp_path: Path) -> None:
    """A Llama built and saved by transformers itself (not our exporter) imports with identical logits."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = import_hf(tmp_path / "hf")
    assert (cfg.n_kv_heads, cfg.rope_interpolation_factor, cfg.rotary_base) == (2, 2.0, 1000.0)
    ids = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["amber_tiny", "phi15_tiny", "crystalcoder_tiny"])
def test_export_import_round_trip_is_identical(name: str, tmp_path: Path) -> None:
    cfg = model_cfg(name)
    model = randomized(cfg, seed=4)
    out = export_hf(model, cfg, None, tmp_path / name)
    back, back_cfg = import_hf(out)
    assert dataclasses.replace(back_cfg, name=cfg.name) == cfg
    sd, back_sd = model.state_dict(), back.state_dict()
    assert sd.keys() == back_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], back_sd[k]), k
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))


def test_a_phi_without_biases_round_trips_without_them(tmp_path: Path) -> None:
    """The stock Phi class has every bias, so the export writes zeros for those the config omits; the
    import gives them back only when they were trained (non-zero) since."""
    from safetensors.torch import load_file, save_file

    cfg = model_cfg("phi15_tiny", attn_bias=False, mlp_bias=False, lm_head_bias=False)
    model = randomized(cfg, seed=5)
    out = export_hf(model, cfg, None, tmp_path / "phi")
    back, back_cfg = import_hf(out)
    assert dataclasses.replace(back_cfg, name=cfg.name) == cfg
    assert back.state_dict().keys() == model.state_dict().keys()
    tensors = load_file(str(out / "model.safetensors"))
    bias = next(k for k in tensors if k.endswith("dense.bias"))
    tensors[bias] = tensors[bias] + 0.5  # fine-tuned in transformers after the export
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tuned, tuned_cfg = import_hf(out)
    assert tuned_cfg.attn_bias and tuned_cfg.mlp_bias and tuned_cfg.lm_head_bias
    assert sum(p.numel() for p in tuned.parameters()) > sum(p.numel() for p in model.parameters())


def test_crystalcoder_uses_open360_format_with_loading_doc(tmp_path: Path) -> None:
    cfg = model_cfg("crystalcoder_tiny")
    assert hf_architecture(cfg) == "open360"
    assert hf_architecture(model_cfg("amber_tiny")) == "llama"
    assert hf_architecture(model_cfg("phi15_tiny")) == "phi"
    out = export_hf(build_model(cfg), cfg, None, tmp_path / "cc")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "open360"
    assert config["open360_model_config"]["mup"]["embedding_multiplier"] == 14.6
    readme = (out / "README.md").read_text()
    assert "import_hf" in readme and "output_multiplier" in readme
    assert (out / "modeling_open360.py").is_file()


def test_crystalcoder_loads_through_automodel_remote_code(tmp_path: Path) -> None:
    """The open360 format loads with AutoModelForCausalLM(trust_remote_code=True): same logits, same greedy text."""
    cfg = model_cfg("crystalcoder_tiny")
    model = randomized(cfg, seed=7)
    out = export_hf(model, cfg, None, tmp_path / "cc")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "Open360ForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-5
        generated = hf.generate(ids[:, :6], max_new_tokens=5, do_sample=False)
        seq = ids[:, :6]
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, seq)


def test_the_open360_format_generates_left_padded_batches_as_each_prompt_alone(tmp_path: Path) -> None:
    """Batched `generate` and lm-eval's `generate_until` pad prompts on the left: each row then continues as
    its prompt alone does (the remote code refused left padding); a mask with holes is refused."""
    cfg = model_cfg("crystalcoder_tiny")
    model = randomized(cfg, seed=11)
    out = export_hf(model, cfg, None, tmp_path / "cc")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompts = [torch.randint(1, cfg.vocab_size, (n,)) for n in (4, 7, 7)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 7 - len(prompt) :], mask[row, 7 - len(prompt) :] = prompt, 1
    with torch.no_grad():
        batched = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for row, prompt in enumerate(prompts):
            alone = hf.generate(prompt[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[row, 7:], alone[0, len(prompt) :]), row
        logits = hf(ids, attention_mask=mask).logits
        assert (logits[0, 3:] - model(prompts[0][None])[0]).abs().max().item() < 1e-5
        assert not logits[0, :3].any()
        holes = mask.clone()
        holes[1, 2] = 0
        with pytest.raises(ValueError, match=r"attention_mask rows \[1\] are neither left- nor right-padded"):
            hf(ids, attention_mask=holes)


def test_the_open360_format_reads_a_right_padded_mask_and_refuses_padding_on_both_sides(tmp_path: Path) -> None:
    """A batch padded on the right with its attention_mask (lm-eval's loglikelihood, padding_side='right') runs as
    the unmasked batch: its real tokens' logits are untouched. A row padded on both sides is neither layout and is
    refused; a row of padding only gets zero logits (no empty forward)."""
    cfg = model_cfg("crystalcoder_tiny")
    model = randomized(cfg, seed=12)
    out = export_hf(model, cfg, None, tmp_path / "cc")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(1, cfg.vocab_size, (3, 7))
    right = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    with torch.no_grad():
        full = model(ids)
        assert (hf(ids, attention_mask=right).logits - full).abs().max().item() < 1e-5
        both = right.clone()
        both[2] = torch.tensor([0, 1, 1, 1, 0, 0, 0])
        with pytest.raises(ValueError, match=r"attention_mask rows \[2\] are neither left- nor right-padded"):
            hf(ids, attention_mask=both)
        empty = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1], [0] * 7])
        logits = hf(ids, attention_mask=empty).logits
        assert not logits[2].any() and not logits[1, :3].any()
        assert (logits[1, 3:] - model(ids[1:2, 3:])[0]).abs().max().item() < 1e-5
        assert (logits[0] - full[0]).abs().max().item() < 1e-5


def test_training_switches_are_not_exported(tmp_path: Path) -> None:
    """A run trained with model.compile / activation_checkpointing exports (and loads) a plain model."""
    from open360.models import model_with_weights

    cfg = model_cfg("crystalcoder_tiny", compile=True, activation_checkpointing=True)
    model = build_model(dataclasses.replace(cfg, compile=False))
    out = export_hf(model, cfg, None, tmp_path / "cc")
    exported = json.loads((out / "config.json").read_text())["open360_model_config"]
    assert exported["compile"] is False and exported["activation_checkpointing"] is False
    back, back_cfg = import_hf(out)
    assert not back_cfg.compile and not back_cfg.activation_checkpointing
    loaded = model_with_weights(cfg, model.state_dict())
    assert not loaded.cfg.compile and loaded.blocks[0]._compiled_call_impl is None  # not torch.compile'd


def test_import_errors_are_explicit(tmp_path: Path) -> None:
    with pytest.raises(HFInteropError, match="no config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFInteropError, match="model_type='gpt2'"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(HFInteropError, match="vocab_size, num_hidden_layers, num_attention_heads, intermediate_size "
                       "missing or not an integer"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(HFInteropError, match="config.json: not readable JSON"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(HFInteropError, match="holds a JSON list"):
        import_hf(tmp_path)
    for config in ({"model_type": "open360", "open360_format_version": 1},  # no open360_model_config
                   {"model_type": "llama", "vocab_size": 8, "num_hidden_layers": 1, "hidden_size": 8,
                    "num_attention_heads": 2, "intermediate_size": 8, "rope_scaling": {"type": "linear", "factor": "x"}}):
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(HFInteropError, match="config.json: unusable config"):
            import_hf(tmp_path)


def test_import_names_a_truncated_or_missing_weights_file(tmp_path: Path) -> None:
    """A truncated model.safetensors (an interrupted copy) or an index naming a missing shard: an HFInteropError
    naming the file, not safetensors' bare 'Error while deserializing header'."""
    cfg = model_cfg("amber_tiny")
    out = export_hf(build_model(cfg), cfg, None, tmp_path / "hf")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(HFInteropError, match=f"{weights}: not a readable safetensors file"):
        import_hf(out)
    weights.unlink()
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(HFInteropError, match="model-00001-of-00002.safetensors: not a readable safetensors file"):
        import_hf(out)
    (out / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(HFInteropError, match="index.json: no usable weight_map"):
        import_hf(out)
    elsewhere = tmp_path / "elsewhere.safetensors"  # a real weights file, but outside the folder
    export_hf(build_model(cfg), cfg, None, tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").rename(elsewhere)
    for name in ("../elsewhere.safetensors", str(elsewhere)):
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": name}}))
        with pytest.raises(HFInteropError, match="weight_map names files outside"):
            import_hf(out)


def test_phi_config_without_rotary_fraction_uses_transformers_default(tmp_path: Path) -> None:
    """A minimal phi config.json without partial_rotary_factor: transformers reads 0.5, so must open360."""
    torch.manual_seed(0)
    hf_cfg = transformers.PhiConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64)
    transformers.PhiForCausalLM(hf_cfg).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("partial_rotary_factor", None)
    (config.get("rope_parameters") or {}).pop("partial_rotary_factor", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path).eval()
    model, cfg = import_hf(tmp_path)
    assert cfg.rotary_fraction == 0.5
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def _export_bpe(tmp_path: Path, texts: list[str], specials: list[str], post_processor: Any = None) -> tuple[Any, Path]:
    """A byte-level BPE tokenizer trained on `texts` (with an optional post-processor), and an amber_tiny
    model of its vocabulary exported with it: (tokenizer, HF folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    if post_processor is not None:
        tok.post_processor = post_processor
    tok_file = tmp_path / "tokenizer.json"
    tok.save(str(tok_file))
    cfg = model_cfg("amber_tiny", vocab_size=tok.get_vocab_size())
    return tok, export_hf(build_model(cfg), cfg, tok_file, tmp_path / "hf")


def test_tokenizer_export_loads_with_autotokenizer(tmp_path: Path) -> None:
    tok, out = _export_bpe(tmp_path, ["hello world, the quick brown fox jumps over the lazy dog"] * 20,
                           ["<|endoftext|>", "<|pad|>"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the quick brown fox"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert hf_tok.pad_token == "<|pad|>"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.token_to_id("<|endoftext|>")


def test_exported_tokenizer_adds_no_bos_the_data_never_had(tmp_path: Path) -> None:
    """A LLaMA-style tokenizer.json adds `<s>` in its post-processor; the shards were encoded without special
    tokens, so AutoTokenizer on the export gives the training ids (no BOS), and the bos id is still named."""
    from tokenizers import processors

    bos = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok, out = _export_bpe(tmp_path, ["hello world"] * 5, ["<unk>", "<s>", "</s>"], post_processor=bos)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "hello world</s>hello"
    assert hf_tok(text)["input_ids"] == tok.encode(text, add_special_tokens=False).ids
    assert hf_tok.bos_token_id == 1 and hf_tok.eos_token_id == tok.token_to_id("</s>")


def test_tokenizer_export_writes_the_eos_the_shards_were_packed_with(tmp_path: Path) -> None:
    """The shard manifest beside tokenizer.json records the recipe's eos_token: that is the EOS exported, not
    a special token guessed by name (here `<|endoftext|>`, which the data never used as a separator)."""
    import hashlib

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<|endoftext|>"]))
    shards = tmp_path / "shards"
    shards.mkdir()
    data = tok.to_str().encode()
    (shards / "tokenizer.json").write_bytes(data)
    record = {"file": "tokenizer.json", "sha256": hashlib.sha256(data).hexdigest(), "eos_token": "</s>"}
    (shards / "manifest.json").write_text(json.dumps({"tokenizer": record}))
    cfg = model_cfg("amber_tiny", vocab_size=tok.get_vocab_size())
    out = export_hf(build_model(cfg), cfg, shards / "tokenizer.json", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.token_to_id("</s>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.token_to_id("</s>")
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "</s>"
    explicit = export_hf(build_model(cfg), cfg, shards / "tokenizer.json", tmp_path / "hf2", eos_token="<|endoftext|>")
    assert json.loads((explicit / "config.json").read_text())["eos_token_id"] == tok.token_to_id("<|endoftext|>")
    (shards / "manifest.json").write_text(json.dumps({"tokenizer": {**record, "sha256": "0" * 64}}))  # another file's
    guessed = export_hf(build_model(cfg), cfg, shards / "tokenizer.json", tmp_path / "hf3")
    assert json.loads((guessed / "config.json").read_text())["eos_token_id"] == tok.token_to_id("<|endoftext|>")
    with pytest.raises(HFInteropError, match="has no token '<eot>'"):
        export_hf(build_model(cfg), cfg, shards / "tokenizer.json", tmp_path / "hf4", eos_token="<eot>")


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    """Re-exporting into a used folder would mix old files in (a stale tokenizer, README, remote code);
    a failed export leaves neither the folder nor a temporary one behind."""
    cfg = model_cfg("amber_tiny")
    out = export_hf(build_model(cfg), cfg, None, tmp_path / "hf")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    phi = model_cfg("phi15_tiny")
    with pytest.raises(HFInteropError, match="not empty"):
        export_hf(build_model(phi), phi, None, out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    (tmp_path / "empty").mkdir()
    assert (export_hf(build_model(cfg), cfg, None, tmp_path / "empty") / "config.json").is_file()
    with pytest.raises(HFInteropError, match="tokenizer_file"):
        export_hf(build_model(cfg), cfg, tmp_path / "no_such_tokenizer.json", tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf"]


def test_export_into_a_symlink_fills_the_folder_it_names(tmp_path: Path) -> None:
    """A release folder linked from elsewhere (an empty one, or one still to be made): the link stays and
    names the export."""
    cfg = model_cfg("amber_tiny")
    (tmp_path / "store" / "empty").mkdir(parents=True)
    for name, target in (("linked", "store/empty"), ("dangling", "store/later/hf")):
        (tmp_path / name).symlink_to(tmp_path / target)
        out = export_hf(build_model(cfg), cfg, None, tmp_path / name)
        assert out.is_symlink() and (tmp_path / target / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["empty", "later"]


def test_export_refuses_a_config_that_is_not_the_models(tmp_path: Path) -> None:
    """The config written must be the one the weights were trained with: a muP model exported with a
    config without muP would silently lose its multipliers (a LlamaForCausalLM with other logits)."""
    mup_cfg = model_cfg("amber_tiny", mup=model_cfg("crystalcoder_tiny").mup)
    model = build_model(mup_cfg)
    cfg = model_cfg("amber_tiny")
    with pytest.raises(HFInteropError, match=r"own model.cfg in \['mup'\]"):
        export_hf(model, cfg, None, tmp_path / "hf")
    with pytest.raises(HFInteropError, match="rotary_base"):
        export_hf(build_model(cfg), dataclasses.replace(cfg, rotary_base=500.0), None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_hf(build_model(cfg), dataclasses.replace(cfg, name="renamed", compile=True), None, tmp_path / "hf")


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = model_cfg("amber_tiny", vocab_size=tok.get_vocab_size() - 1)
    with pytest.raises(HFInteropError, match=f"{tok.get_vocab_size()} tokens.*vocab_size={cfg.vocab_size}"):
        export_hf(build_model(cfg), cfg, tmp_path / "tokenizer.json", tmp_path / "hf")


@pytest.mark.parametrize("name", ["amber_tiny", "phi15_tiny", "crystalcoder_tiny"])
def test_import_names_the_tensor_whose_shape_does_not_fit(name: str, tmp_path: Path) -> None:
    """A tensor of the wrong shape (or a q/k/v piece that does not fit the heads) is an HFInteropError naming
    the tensor as the file stores it, on one line — not torch's load_state_dict report."""
    from safetensors.torch import load_file, save_file

    cfg = model_cfg(name, n_kv_heads=2)
    out = export_hf(build_model(cfg), cfg, None, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    key = next(k for k in tensors if k.endswith(("k_proj.weight", "qkv.weight")))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFInteropError) as err:
        import_hf(out)
    message = str(err.value)
    assert key in message and "shape" in message and "\n" not in message
    if name == "crystalcoder_tiny":  # open360 format: a missing or foreign tensor is named too
        del tensors[key]
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(HFInteropError, match=rf"\['{key}'\] missing"):
            import_hf(out)
