"""Hugging Face interop: export a Decoder to a folder `AutoModelForCausalLM` loads, and import it back."""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from open360.config.schema import ModelConfig, MupConfig
from open360.models.decoder import Decoder, as_model_config, inference_config, model_with_weights

OPEN360_FORMAT_VERSION = 1
OPEN360_PREFIX = "model."  # open360-format tensors: "model." + Decoder.state_dict() names (the remote-code layout)
LOADING_DOC = "open360/models/HF_EXPORT.md"

# Special tokens recognised by name in a tokenizers file, in order of preference.
_SPECIAL_NAMES = {
    "eos_token": ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>"),
    "bos_token": ("<s>", "<bos>", "<|begin_of_text|>", "<|bos|>"),
    "unk_token": ("<unk>", "<|unk|>"),
    "pad_token": ("<pad>", "<|pad|>"),
}


class HFInteropError(ValueError):
    """A model or folder cannot be converted; the message says which field and what to do."""


# ----------------------------------------------------------------------------------------------
# Which stock class fits a config
# ----------------------------------------------------------------------------------------------


def hf_architecture(cfg: ModelConfig) -> str:
    """"llama" (LlamaForCausalLM), "phi" (PhiForCausalLM) or "open360" (no stock class: own format)."""
    if cfg.mup.enabled:
        return "open360"
    if (
        cfg.norm == "rmsnorm"
        and cfg.mlp == "swiglu"
        and cfg.rotary_fraction == 1.0
        and not cfg.parallel_block
        and not cfg.lm_head_bias
    ):
        return "llama"
    if cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.parallel_block:
        return "phi"
    return "open360"


def _qkv_split(cfg: ModelConfig) -> list[int]:
    head_dim = cfg.d_model // cfg.n_heads
    n_kv = cfg.n_kv_heads or cfg.n_heads
    return [cfg.n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]


def _name_rules(cfg: ModelConfig, arch: str) -> list[tuple[str, list[str], list[int] | None]]:
    """(open360 name, HF names, split sizes along dim 0) for every tensor of the HF checkpoint."""
    rules: list[tuple[str, list[str], list[int] | None]] = [("embed.weight", ["model.embed_tokens.weight"], None)]
    qkv = _qkv_split(cfg)
    if arch == "llama":
        for i in range(cfg.n_layers):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            rules += [
                (ours + "norm1.weight", [hf + "input_layernorm.weight"], None),
                (ours + "norm2.weight", [hf + "post_attention_layernorm.weight"], None),
                (ours + "attn.qkv.weight", [hf + f"self_attn.{p}_proj.weight" for p in "qkv"], qkv),
                (ours + "attn.out.weight", [hf + "self_attn.o_proj.weight"], None),
                (ours + "mlp.gate_up.weight", [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"], [cfg.ffn_dim] * 2),
                (ours + "mlp.down.weight", [hf + "mlp.down_proj.weight"], None),
            ]
            if cfg.attn_bias:
                rules += [
                    (ours + "attn.qkv.bias", [hf + f"self_attn.{p}_proj.bias" for p in "qkv"], qkv),
                    (ours + "attn.out.bias", [hf + "self_attn.o_proj.bias"], None),
                ]
            if cfg.mlp_bias:
                rules += [
                    (ours + "mlp.gate_up.bias", [hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"], [cfg.ffn_dim] * 2),
                    (ours + "mlp.down.bias", [hf + "mlp.down_proj.bias"], None),
                ]
        rules.append(("final_norm.weight", ["model.norm.weight"], None))
    elif arch == "phi":
        for i in range(cfg.n_layers):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            for p in ("weight", "bias"):
                rules += [
                    (ours + f"norm1.{p}", [hf + f"input_layernorm.{p}"], None),
                    (ours + f"attn.qkv.{p}", [hf + f"self_attn.{x}_proj.{p}" for x in "qkv"], qkv),
                    (ours + f"attn.out.{p}", [hf + f"self_attn.dense.{p}"], None),
                    (ours + f"mlp.fc1.{p}", [hf + f"mlp.fc1.{p}"], None),
                    (ours + f"mlp.fc2.{p}", [hf + f"mlp.fc2.{p}"], None),
                ]
        rules += [
            ("final_norm.weight", ["model.final_layernorm.weight"], None),
            ("final_norm.bias", ["model.final_layernorm.bias"], None),
            ("lm_head_bias", ["lm_head.bias"], None),
        ]
    else:
        raise HFInteropError(f"no HF name mapping for architecture {arch!r}")
    if not cfg.tie_embeddings:
        rules.append(("lm_head.weight", ["lm_head.weight"], None))
    return rules


def _rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    legacy: dict[str, Any] = {"rope_theta": cfg.rotary_base}
    if cfg.rope_interpolation_factor != 1.0:
        rope = {"rope_type": "linear", "factor": cfg.rope_interpolation_factor, "rope_theta": cfg.rotary_base}
        legacy["rope_scaling"] = {"rope_type": "linear", "type": "linear", "factor": cfg.rope_interpolation_factor}
    return {"rope_parameters": rope, **legacy}


def _hf_config(cfg: ModelConfig, arch: str, dtype: torch.dtype, special_ids: dict[str, int]) -> dict[str, Any]:
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": special_ids.get("bos_token_id", special_ids.get("eos_token_id")),
        "eos_token_id": special_ids.get("eos_token_id"),
        "pad_token_id": special_ids.get("pad_token_id"),
        "open360_model_config": dataclasses.asdict(cfg),
    }
    if arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "head_dim": cfg.d_model // cfg.n_heads,
            "rms_norm_eps": cfg.norm_eps,
            "attention_bias": cfg.attn_bias,
            "mlp_bias": cfg.mlp_bias,
            "pretraining_tp": 1,
            **_rope_fields(cfg),
            **common,
        }
    rope = _rope_fields(cfg)
    rope["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_fraction
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "hidden_act": "gelu_new",
        "layer_norm_eps": cfg.norm_eps,
        "partial_rotary_factor": cfg.rotary_fraction,
        "qk_layernorm": False,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        **rope,
        **common,
    }


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _recorded_eos_token(tokenizer_file: Path) -> str | None:
    """The EOS the data was packed with, as the shard folder's manifest.json beside `tokenizer_file` records it
    (only when the manifest describes this very file, by its sha256); None when there is no such record."""
    from open360.data.tokenizer import tokenizer_bytes_hash

    manifest = tokenizer_file.with_name("manifest.json")
    try:
        recorded = json.loads(manifest.read_text()).get("tokenizer") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, dict) or recorded.get("sha256") != tokenizer_bytes_hash(tokenizer_file.read_bytes()):
        return None
    eos = recorded.get("eos_token")
    return eos if isinstance(eos, str) else None


def _write_tokenizer(
    tokenizer_file: Path, out_dir: Path, cfg: ModelConfig, eos_token: str | None = None
) -> dict[str, int]:
    """Copy a tokenizers JSON file and write the tokenizer_config.json AutoTokenizer needs; return special ids.

    The copy encodes as the data was encoded: a post-processor that adds special tokens (a BOS) is left out.
    The EOS is `eos_token`, else the one the shard manifest beside the file records, else guessed by name."""
    from tokenizers import Tokenizer

    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise HFInteropError(f"tokenizer_file {tokenizer_file} does not exist; pass the shard folder's tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:
        raise HFInteropError(f"{tokenizer_file} is not a Hugging Face tokenizers JSON file: {e}") from e
    if tok.get_vocab_size() > cfg.vocab_size:
        raise HFInteropError(
            f"{tokenizer_file}: {tok.get_vocab_size()} tokens, more than the model's vocab_size={cfg.vocab_size}; "
            "pass the tokenizer the model was trained with"
        )
    if tok.post_processor is not None and tok.post_processor.num_special_tokens_to_add(False):
        # the data was encoded without special tokens (add_special_tokens=False): a BOS template (LLaMA's `<s>`)
        # would give AutoTokenizer's ids a token at position 0 that training never had
        tok.post_processor = None
        tok.save(str(out_dir / "tokenizer.json"))
    else:
        shutil.copyfile(tokenizer_file, out_dir / "tokenizer.json")
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    ids: dict[str, int] = {}
    eos_token = eos_token or _recorded_eos_token(tokenizer_file)
    if eos_token is not None:
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise HFInteropError(f"{tokenizer_file}: has no token {eos_token!r}, the EOS the data was packed with")
        tokenizer_config["eos_token"] = eos_token
        ids["eos_token_id"] = eos_id
    for role, names in _SPECIAL_NAMES.items():
        if role in tokenizer_config:
            continue
        found = next((n for n in names if n in specials), None)
        if found is not None:
            tokenizer_config[role] = found
            ids[f"{role.removesuffix('_token')}_token_id"] = specials[found]
    if "eos_token" not in tokenizer_config and len(specials) == 1:
        (name, idx), = specials.items()
        tokenizer_config["eos_token"] = name
        ids["eos_token_id"] = idx
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return ids


# ----------------------------------------------------------------------------------------------
# Export / import
# ----------------------------------------------------------------------------------------------


def _loading_readme(cfg: ModelConfig) -> str:
    """README of an open360-format folder: the loading recipe and the exact computation (HF_EXPORT.md)."""
    doc_path = Path(__file__).with_name("HF_EXPORT.md")
    doc = doc_path.read_text() if doc_path.is_file() else (
        "Load it with `from open360.models.hf import import_hf; model, cfg = import_hf(folder)`; "
        f"the format is described in {LOADING_DOC} of the open360 repository.\n"
    )
    return f"# {cfg.name} — open360 export\n\nThis folder has no stock transformers class. {doc}"


def export_hf(
    model: Decoder,
    model_cfg: ModelConfig | Any,
    tokenizer_file: Path | None,
    out_dir: Path | str,
    eos_token: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) to out_dir (new or empty; filled all at once, by a
    rename); return out_dir. `model_cfg` must be the config the model was built with (its name aside).
    Weights larger than `max_shard_size` are split as transformers splits them (huggingface_hub's
    `split_torch_state_dict_into_shards`: model-0000i-of-0000n.safetensors + model.safetensors.index.json).

    Amber-like configs become `LlamaForCausalLM`, phi-like ones `PhiForCausalLM` (both load with
    `AutoModelForCausalLM.from_pretrained(out_dir)` unmodified). Anything else (CrystalCoder: muP,
    partial rotary with SwiGLU, LayerNorm + biases) is written in open360's own format with
    `model_type: "open360"`, loaded by `import_hf` — see HF_EXPORT.md.

    The EOS written is `eos_token`, else the one the shard folder's manifest.json beside `tokenizer_file`
    records (the token the data was packed with), else a special token recognised by name.
    """
    cfg = inference_config(model_cfg)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HFInteropError(f"export_hf: {out_dir} exists and is not empty; export into a new or empty folder")
    model = getattr(model, "_orig_mod", model)  # a torch.compile(model) wrapper exports its module
    _check_model_config(model, cfg)
    dest = out_dir.resolve()  # out_dir may be a symlink (to an empty folder, or one still to be made)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    try:  # written beside out_dir and renamed into place: out_dir never holds half an export
        _write_export(model, cfg, tokenizer_file, partial, eos_token, max_shard_size)
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def _check_model_config(model: Any, cfg: ModelConfig) -> None:
    """The config to write must describe the model's weights: a Decoder's own config may differ only in name."""
    own = getattr(model, "cfg", None)
    if not isinstance(own, ModelConfig):
        return
    ours, given = _architecture(own), _architecture(cfg)
    differ = [k for k in given if given[k] != ours[k]]
    if differ:
        raise HFInteropError(
            f"export_hf: model_cfg differs from the model's own model.cfg in {differ} "
            f"({', '.join(f'{k}={given[k]!r} vs {ours[k]!r}' for k in differ)}); pass the config it was built with"
        )


def _architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The fields an export writes that describe the weights (no name, training switches or unused muP fields)."""
    cfg = inference_config(cfg)
    mup = cfg.mup if cfg.mup.enabled else MupConfig()
    return dataclasses.asdict(dataclasses.replace(cfg, name="", n_kv_heads=cfg.n_kv_heads or cfg.n_heads, mup=mup))


def _write_export(
    model: Decoder,
    cfg: ModelConfig,
    tokenizer_file: Path | None,
    out_dir: Path,
    eos_token: str | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write the export's files into the (empty) folder out_dir."""
    arch = hf_architecture(cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if "embed.weight" not in state:
        raise HFInteropError(
            f"export_hf: expected an open360 Decoder state_dict (embed.weight, blocks.*), got keys "
            f"{list(state)[:3]}...; pass the plain Decoder, not a DDP/FSDP wrapper"
        )
    dtype = state["embed.weight"].dtype
    special_ids = _write_tokenizer(Path(tokenizer_file), out_dir, cfg, eos_token) if tokenizer_file else {}
    if arch == "open360":
        tensors = {OPEN360_PREFIX + k: v.contiguous() for k, v in state.items()}
        config = {
            "model_type": "open360",
            "architectures": ["Open360ForCausalLM"],
            "auto_map": {
                "AutoConfig": "modeling_open360.Open360Config",
                "AutoModelForCausalLM": "modeling_open360.Open360ForCausalLM",
            },
            "open360_format_version": OPEN360_FORMAT_VERSION,
            "how_to_load": (
                "pip install open360; AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) "
                "or open360.models.hf.import_hf(folder); see README.md"
            ),
            "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
            **special_ids,
            "open360_model_config": dataclasses.asdict(cfg),
        }
        (out_dir / "README.md").write_text(_loading_readme(cfg))
        shutil.copyfile(Path(__file__).with_name("modeling_open360.py"), out_dir / "modeling_open360.py")
    else:
        tensors = {}
        for ours, hf_names, split in _name_rules(cfg, arch):
            # Stock classes may have a bias our config leaves out (phi): zeros are exactly equivalent.
            src = state[ours] if ours in state else torch.zeros(_expected_shape(cfg, ours), dtype=dtype)
            parts = src.split(split, dim=0) if split else [src]
            tensors.update({name: part.contiguous() for name, part in zip(hf_names, parts, strict=True)})
        config = _hf_config(cfg, arch, dtype, special_ids)
    _save_weights(tensors, out_dir, max_shard_size)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: v for k, v in special_ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if arch != "open360":
        (out_dir / "generation_config.json").write_text(json.dumps({"do_sample": False, **generation}, indent=2) + "\n")


def _save_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str) -> None:
    """model.safetensors, or shards of at most `max_shard_size` and their index (27 GB of fp32 weights at 7B)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Shape of a bias our config omits but the stock class has (only biases can be missing)."""
    if name == "lm_head_bias":
        return (cfg.vocab_size,)
    if name.endswith("attn.qkv.bias"):
        return (sum(_qkv_split(cfg)),)
    if name.endswith(("attn.out.bias", "mlp.fc2.bias", "mlp.down.bias")):
        return (cfg.d_model,)
    if name.endswith("mlp.fc1.bias"):
        return (cfg.ffn_dim,)
    raise HFInteropError(f"tensor {name!r} is missing from the model's state_dict and cannot be zero-filled")


def _rope_from_hf(hf: dict[str, Any], where: str, default_partial: float) -> tuple[float, float, float]:
    """(rotary_base, interpolation factor, partial rotary factor) from v4 or v5 style rope fields; a missing
    partial factor is the architecture's transformers default (`default_partial`)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    base = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "linear"):
        raise HFInteropError(f"{where}: rope type {rope_type!r} is not supported; open360 has default and linear (PI)")
    factor = float(params.get("factor", scaling.get("factor", 1.0))) if rope_type == "linear" else 1.0
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial)))
    return base, factor, partial


# config.json keys that fix a Llama / Phi model's shape (transformers' defaults for them describe other models)
_HF_SHAPE_KEYS = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


def _config_from_hf(hf: dict[str, Any], where: str, name: str) -> tuple[ModelConfig, str]:
    model_type = hf.get("model_type")
    if model_type == "open360":
        if hf.get("open360_format_version") != OPEN360_FORMAT_VERSION:
            raise HFInteropError(
                f"{where}: open360_format_version={hf.get('open360_format_version')}, this open360 reads "
                f"{OPEN360_FORMAT_VERSION}; use the open360 version that wrote it"
            )
        return inference_config(hf["open360_model_config"]), "open360"
    if model_type not in ("llama", "phi"):
        raise HFInteropError(f"{where}: model_type={model_type!r}; import_hf reads llama, phi and open360 folders")
    missing = [key for key in _HF_SHAPE_KEYS if not isinstance(hf.get(key), int)]
    if missing:
        raise HFInteropError(f"{where}: {', '.join(missing)} missing or not an integer; the model's shape needs them")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim", head_dim) != head_dim:
        raise HFInteropError(f"{where}: head_dim={hf['head_dim']} != hidden_size/num_attention_heads={head_dim}")
    base, factor, partial = _rope_from_hf(hf, where, default_partial=0.5 if model_type == "phi" else 1.0)
    n_kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    common = dict(
        name=name,
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=None if n_kv == hf["num_attention_heads"] else n_kv,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rotary_base=base,
        rope_interpolation_factor=factor,
        init_std=hf.get("initializer_range", 0.02),
    )
    if model_type == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise HFInteropError(f"{where}: hidden_act={hf['hidden_act']!r}; open360's SwiGLU uses silu")
        cfg = ModelConfig(
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            attn_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            rotary_fraction=partial,
            **common,
        )
    else:
        if hf.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise HFInteropError(f"{where}: hidden_act={hf['hidden_act']!r}; open360's phi MLP is tanh-GELU (gelu_new)")
        if hf.get("qk_layernorm"):
            raise HFInteropError(f"{where}: qk_layernorm=true is not supported by open360's decoder")
        cfg = ModelConfig(
            norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            mlp="gelu",
            attn_bias=True,
            mlp_bias=True,
            lm_head_bias=True,
            parallel_block=True,
            rotary_fraction=partial,
            **common,
        )
    return as_model_config(cfg), model_type


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """load_file, with a missing, truncated or corrupted file an HFInteropError that names it."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (no path in it), or OSError
        raise HFInteropError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _load_file(single)
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise HFInteropError(f"{index}: no usable weight_map ({type(err).__name__}: {err})") from err
        outside = [f for f in files if not isinstance(f, str) or Path(f).is_absolute() or ".." in Path(f).parts]
        if outside:  # a downloaded folder's index must not make open360 read files elsewhere on this machine
            raise HFInteropError(f"{index}: weight_map names files outside {folder}: {outside[:3]}")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(_load_file(folder / f))
        return tensors
    raise HFInteropError(
        f"{folder}: no model.safetensors(.index.json); open360 reads only safetensors weights "
        "(convert pytorch_model.bin with transformers' save_pretrained(safe_serialization=True) first)"
    )


def _drop_exported_zero_biases(
    cfg: ModelConfig, state: dict[str, torch.Tensor], exported: Any
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """`export_hf` writes zeros for the biases a config omits where the stock class has them (Phi has them
    all): with the exported config's bias flags, and those tensors still all zero, the import gives back the
    model without them. A non-zero one (trained in HF since the export) keeps the stock biases."""
    if not isinstance(exported, dict):
        return cfg, state
    flags = {k: getattr(cfg, k) and bool(exported.get(k, True)) for k in ("attn_bias", "mlp_bias", "lm_head_bias")}
    if all(flags[k] == getattr(cfg, k) for k in flags):
        return cfg, state
    trimmed = dataclasses.replace(cfg, **flags)
    with torch.device("meta"):
        kept = set(Decoder(trimmed).state_dict())
    dropped = [k for k in state if k not in kept]
    if any(bool(state[k].any()) for k in dropped):
        return cfg, state
    return trimmed, {k: v for k, v in state.items() if k in kept}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Decoder.state_dict() shapes for `cfg` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Decoder(cfg).state_dict().items()}


def _check_shape(folder: Path, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise HFInteropError(
            f"{folder}: tensor {name} has shape {list(tensor.shape)} but config.json describes {list(shape)}"
        )


def import_hf(folder: Path | str) -> tuple[Decoder, ModelConfig]:
    """Load a Llama, Phi or open360-format HF folder into a Decoder (fp32) and its ModelConfig."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFInteropError(f"{folder}: no config.json; is this a Hugging Face model folder?")
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFInteropError(f"{config_path}: not readable JSON ({err})") from err
    if not isinstance(hf, dict):
        raise HFInteropError(f"{config_path}: holds a JSON {type(hf).__name__}, not a config object")
    try:
        cfg, arch = _config_from_hf(hf, str(config_path), name=folder.name)
    except HFInteropError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a missing or mistyped value
        raise HFInteropError(f"{config_path}: unusable config ({type(err).__name__}: {err})") from err
    tensors = _load_tensors(folder)
    if arch == "open360":
        foreign = [k for k in tensors if not k.startswith(OPEN360_PREFIX)]
        if foreign:
            raise HFInteropError(f"{folder}: tensors {foreign[:5]} lack the {OPEN360_PREFIX!r} prefix of the open360 format")
        state = {k.removeprefix(OPEN360_PREFIX): v for k, v in tensors.items()}
        expected = _expected_shapes(cfg)
        missing = [OPEN360_PREFIX + k for k in expected if k not in state]
        foreign = [OPEN360_PREFIX + k for k in state if k not in expected]
        if missing:
            raise HFInteropError(f"{folder}: tensors {missing[:5]} missing from the safetensors weights")
        if foreign:
            raise HFInteropError(f"{folder}: tensors {foreign[:5]} are not in the model open360_model_config describes")
        for k, v in state.items():
            _check_shape(folder, OPEN360_PREFIX + k, v, expected[k])
    else:
        if cfg.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        expected = _expected_shapes(cfg)
        state = {}
        for ours, hf_names, split in _name_rules(cfg, arch):
            missing = [n for n in hf_names if n not in tensors]
            if missing:
                raise HFInteropError(f"{folder}: tensors {missing} missing from the safetensors weights")
            shape = expected[ours]
            for n, part in zip(hf_names, [(size, *shape[1:]) for size in split] if split else [shape], strict=True):
                _check_shape(folder, n, tensors[n], part)
            state[ours] = torch.cat([tensors.pop(n) for n in hf_names], dim=0)
        leftovers = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
        if leftovers:
            raise HFInteropError(f"{folder}: tensors {leftovers[:5]} have no place in open360's {arch} mapping")
        cfg, state = _drop_exported_zero_biases(cfg, state, hf.get("open360_model_config"))
    return model_with_weights(cfg, state), cfg
