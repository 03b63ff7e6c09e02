"""megatron-core backend on CPU: layout validation, native <-> megatron weight conversion with TP/PP
sharding, the layer spec's numerics against the native decoder, optimizer groups, and clear refusals."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from open360.backends.megatron.layout import (
    LayoutError,
    ParallelLayout,
    megatron_to_native,
    merge_shards,
    native_to_megatron,
    shard_for_rank,
)
from open360.config.schema import ModelConfig, MupConfig
from open360.models.decoder import Decoder

AMBER = ModelConfig(
    name="amber_gqa", vocab_size=256, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64
)
PHI = ModelConfig(
    name="phi", vocab_size=256, n_layers=4, d_model=64, n_heads=4, ffn_dim=128, max_seq_len=64, norm="layernorm",
    norm_eps=1e-5, mlp="gelu", attn_bias=True, mlp_bias=True, lm_head_bias=True, rotary_fraction=0.5,
    parallel_block=True,
)
CRYSTAL = ModelConfig(
    name="crystalcoder", vocab_size=256, n_layers=4, d_model=64, n_heads=4, ffn_dim=128, max_seq_len=64,
    norm="layernorm", rotary_fraction=0.25, tie_embeddings=True, rope_interpolation_factor=2.0,
    mup=MupConfig(enabled=True, base_width=32),
)
ARCHS = [AMBER, PHI, CRYSTAL]


def _native(cfg: ModelConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():  # break the init's symmetries (zero biases, unit norms) so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


# -- layout --------------------------------------------------------------------------------------


def test_layout_checks_name_the_offending_setting() -> None:
    assert ParallelLayout.for_run(AMBER, 2, 2, 8) == ParallelLayout(tp=2, pp=2, dp=2)
    with pytest.raises(LayoutError, match="launch a multiple of 4"):
        ParallelLayout.for_run(AMBER, 2, 2, 6)
    with pytest.raises(LayoutError, match="n_kv_heads=2 is not divisible by trainer.tensor_parallel=4"):
        ParallelLayout.for_run(AMBER, 4, 1, 4)
    with pytest.raises(LayoutError, match="n_layers=4 is not divisible by trainer.pipeline_parallel=3"):
        ParallelLayout.for_run(AMBER, 1, 3, 3)
    with pytest.raises(LayoutError, match=">= 1"):
        ParallelLayout.for_run(AMBER, 0, 1, 1)
    layout = ParallelLayout(tp=1, pp=1, dp=2)
    assert layout.microbatches(16, 4) == 2
    with pytest.raises(LayoutError, match="global_batch_size=10 must be a multiple"):
        layout.microbatches(10, 4)
    from open360.backends.megatron.layout import layout_for_run  # what the pipeline checks before building
    from open360.config import compose

    cfg = compose(["+experiment=amber_tiny", "trainer=megatron", "trainer.tensor_parallel=3"])
    with pytest.raises(LayoutError, match="trainer.tensor_parallel=3"):
        layout_for_run(cfg, 3, 16, 4)


# -- conversion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ARCHS, ids=lambda c: c.name)
def test_native_megatron_roundtrip_is_exact(cfg: ModelConfig) -> None:
    native = _native(cfg).state_dict()
    back = megatron_to_native(native_to_megatron(native, cfg), cfg)
    assert set(back) == set(native)
    assert all(torch.equal(back[k], native[k]) for k in native)


def test_qkv_is_regrouped_per_query_group() -> None:
    h, kv, hd = AMBER.n_heads, AMBER.n_kv_heads, AMBER.d_model // AMBER.n_heads
    native = _native(AMBER).state_dict()
    qkv = native["blocks.0.attn.qkv.weight"]
    meg = native_to_megatron(native, AMBER)["decoder.layers.0.self_attention.linear_qkv.weight"]
    per_group = (h // kv + 2) * hd
    # group 1: query heads 2..3, then k head 1, then v head 1
    group1 = meg[per_group : 2 * per_group]
    assert torch.equal(group1[: 2 * hd], qkv[2 * hd : 4 * hd])
    assert torch.equal(group1[2 * hd : 3 * hd], qkv[(h + 1) * hd : (h + 2) * hd])
    assert torch.equal(group1[3 * hd :], qkv[(h + kv + 1) * hd : (h + kv + 2) * hd])


@pytest.mark.parametrize("cfg", ARCHS, ids=lambda c: c.name)
def test_tp_pp_sharding_merges_back_and_splits_like_megatron(cfg: ModelConfig) -> None:
    layout = ParallelLayout(tp=2, pp=2, dp=1)
    full = native_to_megatron(_native(cfg).state_dict(), cfg)
    shards = {(t, p): shard_for_rank(full, cfg, layout, t, p) for t in range(2) for p in range(2)}
    merged = merge_shards(shards, cfg, layout)
    assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)

    first, last = shards[(1, 0)], shards[(1, 1)]
    assert "embedding.word_embeddings.weight" in first and "decoder.final_layernorm.weight" in last
    assert {k.split(".")[2] for k in last if k.startswith("decoder.layers.")} == {"0", "1"}  # stage-local numbering
    assert torch.equal(  # layer 2 of the model is layer 0 of stage 1
        last["decoder.layers.0.self_attention.linear_proj.weight"],
        full["decoder.layers.2.self_attention.linear_proj.weight"].chunk(2, dim=1)[1],
    )
    fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]
    if cfg.mlp == "swiglu":  # each TP rank holds [its gate rows; its up rows]
        gate, up = fc1.chunk(2)
        expected = torch.cat([gate.chunk(2)[1], up.chunk(2)[1]])
    else:
        expected = fc1.chunk(2)[1]
    assert torch.equal(first["decoder.layers.0.mlp.linear_fc1.weight"], expected)
    if cfg.tie_embeddings:  # the last stage holds the embedding copy megatron keeps in sync
        assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])


def test_merge_needs_every_rank() -> None:
    layout = ParallelLayout(tp=2, pp=1, dp=1)
    full = native_to_megatron(_native(AMBER).state_dict(), AMBER)
    with pytest.raises(LayoutError, match="needs the shards of ranks"):
        merge_shards({(0, 0): shard_for_rank(full, AMBER, layout, 0, 0)}, AMBER, layout)


# -- megatron-core on CPU (one gloo process; RoPE's CUDA device lookup pointed at the CPU) ---------


@pytest.fixture(scope="module")
def megatron_cpu():
    pytest.importorskip("megatron.core")
    if torch.cuda.is_available():  # the patch below would break torch's own CUDA device queries
        pytest.skip("CPU-only checks; on CUDA machines tests/test_backend_megatron_gpu.py covers the same")
    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # megatron-core's RoPE moves its tables to the current CUDA device
    try:
        yield
    finally:
        torch.cuda.current_device = current_device
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.parametrize("cfg", ARCHS, ids=lambda c: c.name)
def test_megatron_model_from_converted_weights_matches_native_logits(megatron_cpu, cfg: ModelConfig) -> None:
    from open360.backends.megatron.spec import build_gpt_model, transformer_config

    native = _native(cfg)
    model = build_gpt_model(cfg, transformer_config(cfg, 1, 1, bf16=False), True, True)
    missing, unexpected = model.load_state_dict(native_to_megatron(native.state_dict(), cfg), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    positions = torch.arange(24)[None].expand(2, -1)
    with torch.no_grad():
        logits = model(ids, positions, None)
        assert torch.allclose(logits, native(ids), atol=2e-5), (logits - native(ids)).abs().max()
        per_token = model(ids[:, :-1], positions[:, :-1], None, labels=ids[:, 1:])
        assert torch.allclose(per_token.mean(), native.loss(ids[:, :-1], ids[:, 1:]), atol=1e-5)


@pytest.mark.parametrize("cfg", ARCHS, ids=lambda c: c.name)
def test_tensor_parallel_weights_are_marked_as_megatron_initializes_them(megatron_cpu, cfg: ModelConfig) -> None:
    """perform_initialization=False skips megatron's initializer, which is also what marks a weight as split over
    the TP ranks; unmarked, megatron's optimizer counts only TP rank 0's shard of it in the global gradient norm
    (amber at TP=2 on gloo: 1.46 where native and TP=1 give 2.13) and clips with that norm."""
    from dataclasses import replace

    from open360.backends.megatron.spec import build_gpt_model, transformer_config

    config = transformer_config(cfg, 1, 1, bf16=False)
    attrs = ("tensor_model_parallel", "partition_dim", "partition_stride")

    def marks(model: torch.nn.Module) -> dict[str, tuple]:
        return {n: tuple(getattr(p, a, None) for a in attrs) for n, p in model.named_parameters()}

    ours = marks(build_gpt_model(cfg, config, True, True))
    assert ours == marks(build_gpt_model(cfg, replace(config, perform_initialization=True), True, True))
    assert ours["decoder.layers.0.self_attention.linear_proj.weight"] == (True, 1, 1)
    assert ours["embedding.word_embeddings.weight"] == (True, 0, 1)


def test_a_fractional_rotary_base_reaches_megatron_unrounded(megatron_cpu) -> None:
    from dataclasses import replace

    from open360.backends.megatron.spec import build_gpt_model, transformer_config

    cfg = replace(AMBER, rotary_base=10000.5)
    model = build_gpt_model(cfg, transformer_config(cfg, 1, 1, bf16=False), True, True)
    head_dim = cfg.d_model // cfg.n_heads
    expected = 1.0 / cfg.rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    assert torch.equal(model.rotary_pos_emb.inv_freq.cpu(), expected)


def test_engine_weight_loads_refuse_a_partial_state(megatron_cpu) -> None:
    """Both engine loads (native weights, distributed checkpoint) go through one checked loader."""
    from open360.backends.megatron.engine import MegatronEngine
    from open360.backends.megatron.spec import build_gpt_model, transformer_config

    gpt = build_gpt_model(AMBER, transformer_config(AMBER, 1, 1, bf16=False), True, True)
    engine = SimpleNamespace(gpt=gpt, pp_rank=0, tp_rank=0)
    state = native_to_megatron(_native(AMBER).state_dict(), AMBER)
    MegatronEngine._load_gpt_state(engine, state, "whole state")
    assert torch.equal(gpt.state_dict()["embedding.word_embeddings.weight"], state["embedding.word_embeddings.weight"])
    dropped = next(k for k in state if "linear_fc2" in k)
    with pytest.raises(KeyError, match=f"loading ckpt/step_9: missing \\['{dropped}'\\]"):
        MegatronEngine._load_gpt_state(engine, {k: v for k, v in state.items() if k != dropped}, "ckpt/step_9")
    with pytest.raises(KeyError, match="unexpected \\['decoder.layers.99.extra'\\]"):
        MegatronEngine._load_gpt_state(engine, {**state, "decoder.layers.99.extra": torch.zeros(1)}, "x")


def test_resume_keeps_the_runs_optimizer_hyperparameters_and_names_a_group_mismatch(monkeypatch, tmp_path) -> None:
    """megatron's optimizer load puts the checkpoint's param groups back (its betas, eps multipliers, ...):
    this run's hyperparameters stay, as on the native backend; a group the checkpoint lacks (muP width or
    optim.mup_scale_weight_decay changed) is named instead of megatron's bare KeyError."""
    pytest.importorskip("megatron.core")
    import contextlib

    from open360.backends.megatron import engine as megatron_engine
    from open360.checkpoint import CheckpointError

    class MegatronLikeOptimizer:  # DistributedOptimizer.load_state_dict: saved groups replace the run's
        def __init__(self, groups: list[dict]) -> None:
            self.param_groups = groups

        def load_state_dict(self, state: dict) -> None:
            saved = state["optimizer"]["param_groups"]
            self.param_groups = [{**g, "params": own["params"]} for g, own in zip(saved, self.param_groups, strict=True)]

    ids = {"wd_mult": 1.0, "lr_mult": 0.5, "is_expert_parallel": False, "is_decoupled_lr": False}
    saved_group = {**ids, "params": [0], "betas": (0.9, 0.95), "eps_mult": 0.5, "step": 7.0}
    saved = {"optimizer": {"param_groups": [saved_group]}}
    monkeypatch.setattr(megatron_engine, "guarded_distributed_load", lambda _d: contextlib.nullcontext())
    monkeypatch.setattr(megatron_engine.dist_checkpointing, "load", lambda *_a, **_k: {"model": {}, "optimizer": saved})

    def engine(**group: Any) -> megatron_engine.MegatronEngine:
        eng = object.__new__(megatron_engine.MegatronEngine)  # its loading logic, without a model
        params = [torch.nn.Parameter(torch.zeros(2))]
        eng.optimizer = MegatronLikeOptimizer([{**ids, "params": params, **group}])
        for name in ("_materialize_optimizer_state", "_patch_torch_adam_state_loading", "_inner_states"):
            setattr(eng, name, lambda: [])
        eng._sharded_state = lambda is_loading: {}
        eng._load_gpt_state = lambda state, source: None
        return eng

    eng = engine(betas=(0.8, 0.99), eps_mult=0.25)
    eng.load_distributed(tmp_path)
    (group,) = eng.optimizer.param_groups
    assert group["betas"] == (0.8, 0.99) and group["eps_mult"] == 0.25 and group["step"] == 7.0
    eng = engine(betas=(0.9, 0.95), wd_mult=2.0)  # optim.mup_scale_weight_decay=true on resume
    with pytest.raises(CheckpointError, match="no parameter group with .*'wd_mult': 2.0.*mup_scale_weight_decay"):
        eng.load_distributed(tmp_path)


def test_stock_local_attention_spec_is_available_for_comparison(megatron_cpu) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from open360.backends.megatron.spec import SDPAttention, layer_spec

    assert layer_spec(AMBER).submodules.self_attention.submodules.core_attention is SDPAttention
    assert layer_spec(AMBER, "local").submodules.self_attention.submodules.core_attention is DotProductAttention
    with pytest.raises(ValueError, match="attention='flash'"):
        layer_spec(AMBER, "flash")


def test_optimizer_groups_mirror_native_decay_and_mup_lr(megatron_cpu) -> None:
    from open360.backends.megatron.engine import _optimizer_overrides
    from open360.backends.megatron.spec import build_gpt_model, transformer_config

    cfg = CRYSTAL
    model = build_gpt_model(cfg, transformer_config(cfg, 1, 1, bf16=False), True, True)
    overrides = _optimizer_overrides(cfg)

    def merged(name: str, param: torch.nn.Parameter) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in overrides.items():
            if key.matches(param, f"module.module.{name}"):
                out.update(value)
        return out

    params = dict(model.named_parameters())
    assert merged("embedding.word_embeddings.weight", params["embedding.word_embeddings.weight"]) == {"wd_mult": 0.0}
    norm = "decoder.layers.0.input_layernorm.bias"
    assert merged(norm, params[norm]) == {"wd_mult": 0.0}
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert merged(qkv, params[qkv]) == {"lr_mult": 0.5, "eps_mult": 0.5}  # muP: 1 / width_mult (64 / 32)
    overrides = _optimizer_overrides(cfg, scale_weight_decay=True)  # optim.mup_scale_weight_decay
    assert merged(qkv, params[qkv]) == {"lr_mult": 0.5, "eps_mult": 0.5, "wd_mult": 2.0}
    overrides = _optimizer_overrides(cfg)
    assert _optimizer_overrides(AMBER) and all("lr_mult" not in v for v in _optimizer_overrides(AMBER).values())
    # tied embeddings under pipeline parallelism: the last stage's copy (output_layer) is undecayed too
    copy = torch.nn.Parameter(torch.zeros(4, 4))
    assert CRYSTAL.tie_embeddings and merged("output_layer.weight", copy) == {"wd_mult": 0.0}
    untied = [k for k in _optimizer_overrides(AMBER) if k.matches(copy, "module.module.output_layer.weight")]
    assert not AMBER.tie_embeddings and not untied  # an untied head decays, as in native training


def test_biases_megatron_cannot_express_are_refused(megatron_cpu) -> None:
    from dataclasses import replace

    from open360.backends.megatron.spec import transformer_config

    with pytest.raises(ValueError, match="add_bias_linear"):
        transformer_config(replace(AMBER, attn_bias=True), 1, 1, bf16=False)
    with pytest.raises(ValueError, match="add_bias_linear"):
        transformer_config(replace(AMBER, mlp_bias=True), 1, 1, bf16=False)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [["model.attn_bias=true"], ["model.mlp_bias=true"], ["model.lm_head_bias=true", "model.tie_embeddings=true"]],
    ids=["attn_bias_only", "mlp_bias_only", "tied_head_bias"],
)
def test_models_megatron_cannot_build_are_refused_with_the_config(overrides: list[str]) -> None:
    """Refused by the config check, before the run's folders, its MLflow run and the native model exist (the
    engine would raise the same only after all of those, on every rank)."""
    from open360.config import compose
    from open360.train.validate import check_training_config

    cfg = compose(["+experiment=amber_tiny", "trainer=megatron", "trainer.seq_len=128", *overrides])
    with pytest.raises(ValueError, match="add_bias_linear|lm_head_bias with tie_embeddings"):
        check_training_config(cfg)


def test_megatron_on_cpu_and_tensor_parallel_on_native_are_refused(tmp_path: Path, monkeypatch) -> None:
    """Megatron on CPU is a resource refusal (exit 2 from the command line, before Hydra writes outputs/)."""
    from open360.config import compose
    from open360.train.pipeline import run_training
    from open360.train.resources import ResourceError, check_megatron_available, check_resources

    monkeypatch.chdir(tmp_path)
    cpu_megatron = compose(["+experiment=amber_tiny", "trainer.backend=megatron", "trainer.device=cpu"])
    with pytest.raises(ResourceError, match="needs CUDA GPUs"):
        check_resources(cpu_megatron)
    with pytest.raises(ResourceError, match="needs CUDA GPUs"):
        run_training(cpu_megatron, device="cpu")
    proc = subprocess.run([sys.executable, "-m", "open360.train", "+experiment=amber_tiny", "trainer.backend=megatron",
                           "trainer.device=cpu", f"workspace={tmp_path / 'ws'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs CUDA GPUs" in proc.stderr and sorted(tmp_path.iterdir()) == []
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # not installed
    with pytest.raises(ResourceError, match=r"megatron-core is not installed; pip install -e '.\[megatron\]'"):
        check_megatron_available("cuda")
    with pytest.raises(ValueError, match="run on trainer.backend=megatron"):  # before any folder is made
        run_training(compose(["+experiment=amber_tiny", "trainer.tensor_parallel=2"]), device="cpu")
    with pytest.raises(ValueError, match="trainer.backend='deepspeed': expected one of native, megatron"):
        run_training(compose(["+experiment=amber_tiny", "trainer.backend=deepspeed"]), device="cpu")


def test_checkpoint_resumes_only_on_the_backend_that_wrote_it(tmp_path: Path) -> None:
    from open360.checkpoint import CheckpointContents, save_checkpoint
    from open360.train.pipeline import resume
    from open360.train.trainer import TrainingError

    path = save_checkpoint(
        tmp_path,
        3,
        CheckpointContents(
            model={"w": torch.zeros(2)},
            optimizer={},
            trainer_state={"step": 3, "stage": {"index": 0, "name": "main"}},
            rng={},
            config_yaml="x: 1\n",
            lineage={"backend": "native"},
        ),
    )
    from open360.backends.native import DistEnv

    trainer = SimpleNamespace(backend="megatron", stages=[SimpleNamespace(index=0, name="main", end=10)], env=DistEnv())
    with pytest.raises(TrainingError, match="written by the native backend.*trainer.init_from="):
        resume(trainer, path)


def test_distributed_checkpoint_with_code_in_its_pickles_is_refused(tmp_path) -> None:
    import os
    import pickle
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp

    from open360.backends.megatron.checkpoint_guard import check_distributed_checkpoint
    from open360.checkpoint import CheckpointError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    good = tmp_path / "good"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"w": torch.zeros(4), "extra": {"step": 3, "betas": [0.9, 0.95]}}, checkpoint_id=good, no_dist=True)
        check_distributed_checkpoint(good)  # tensors and plain data: accepted
        evil_meta = Path(shutil.copytree(good, tmp_path / "meta"))
        (evil_meta / ".metadata").write_bytes(pickle.dumps(Payload()))
        with pytest.raises(CheckpointError, match=r"\.metadata: refused .*system"):
            check_distributed_checkpoint(evil_meta)
        evil_entry = tmp_path / "entry"
        dcp.save({"w": torch.zeros(4), "extra": Payload()}, checkpoint_id=evil_entry, no_dist=True)
        with pytest.raises(CheckpointError, match="entry 'extra' is not plain data"):
            check_distributed_checkpoint(evil_entry)

    def stack_global(module: str, name: str, args: tuple) -> bytes:
        """A protocol-4 pickle calling module.name(*args): names may be dotted attribute paths there."""
        text = b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name))
        return b"\x80\x04" + text + b"\x93" + pickle.dumps(args, protocol=4)[2:-1] + b"R."

    touch = ([f"touch {marker}"],)
    valid = (good / ".metadata").read_bytes()
    valid2 = pickle.dumps(pickle.loads(valid), protocol=2)  # the same metadata in protocol 2: text globals
    unimported = "torch.utils.show_pickle"  # a real module no test imports: naming it must not import it
    assert unimported not in sys.modules
    forged = {
        # a dotted name under an allowed module resolves, attribute by attribute, to subprocess.Popen
        "popen": stack_global(
            "torch.distributed.checkpoint.metadata", "torch._strobelight.cli_function_profiler.subprocess.Popen", touch
        ),
        # a class of the DCP package that is not plain metadata (its constructor does more than assign)
        "writer": stack_global("torch.distributed.checkpoint.filesystem", "FileSystemWriter", (str(tmp_path / "w"),)),
        "import": stack_global(unimported, "main", ()),
        "prefix": stack_global("torch.distributed.checkpointX", "Metadata", ()),
        # BUILD on a class or function (not an instance) would change it for the whole process: every Path's
        # string, or what a layout name means to later torch.load calls
        "class_state": valid[:2] + b"cpathlib\nPurePath\n(N}V_str\nV" + str(marker).encode() + b"\nstb0" + valid[2:],
        "function_state": b"\x80\x02ctorch.serialization\n_get_layout\n}(Vcache\n}(Vtorch.strided\nctorch\n"
        b"sparse_coo\nuub.",
        # BUILD on an enum member (a process-wide singleton): the next read of the same bytes, by torch's own
        # loader, would then see other metadata than the guard saw
        "enum_state": valid2[:2] + b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\nK\x00\x85R}X"
        b"\x07\x00\x00\x00_value_K\x07sb0" + valid2[2:],
        # a data class's constructor is never called (genuine pickles use NEWOBJ); nor are dunder state keys set
        "constructor": stack_global("torch.distributed.checkpoint.metadata", "StorageMeta", ()),
        "dunder_state": valid2[:2] + b"ctorch.distributed.checkpoint.metadata\nStorageMeta\n)\x81}X\t\x00\x00\x00"
        b"__class__ctorch.distributed.checkpoint.metadata\nMetadata\nsb0" + valid2[2:],
        "not_metadata": pickle.dumps({"state_dict_metadata": {}}),
        "truncated": valid[:40],
    }
    for label, payload in forged.items():
        folder = Path(shutil.copytree(good, tmp_path / label))
        (folder / ".metadata").write_bytes(payload)
        with pytest.raises(CheckpointError, match=r"\.metadata: refused"):
            check_distributed_checkpoint(folder)
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING
    from torch.serialization import _get_layout

    assert unimported not in sys.modules and str(Path("/x")) == "/x" and _get_layout("torch.strided") is torch.strided
    assert _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT.value == 0
    # an entry whose bytes are read from outside the folder, or past the end of its file
    metadata = pickle.loads(valid)
    for label, change in (("outside", {"relative_path": "../good/" + next(iter(metadata.storage_data.values())).relative_path}),
                          ("past_end", {"length": 10**9})):
        forged_meta = pickle.loads(valid)
        for info in forged_meta.storage_data.values():
            for key, value in change.items():
                setattr(info, key, value)
        folder = Path(shutil.copytree(good, tmp_path / label))
        (folder / ".metadata").write_bytes(pickle.dumps(forged_meta))
        with pytest.raises(CheckpointError, match="outside the checkpoint folder|checkpoint is incomplete or forged"):
            check_distributed_checkpoint(folder)
    assert not marker.exists() and not (tmp_path / "w").exists()


def test_megatron_loads_the_checked_metadata_even_if_the_files_change_after_the_check(
    megatron_cpu, tmp_path, monkeypatch
) -> None:
    """torch's DCP loader would unpickle `.metadata` and non-tensor entries again, unrestricted: within
    guarded_distributed_load megatron reads the metadata the guard checked, and entries as weights only."""
    import io
    import pickle

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from open360.backends.megatron.checkpoint_guard import guarded_distributed_load
    from open360.checkpoint import CheckpointError

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)  # megatron's save, on CPU
    marker = tmp_path / "ran"

    class Payload:
        def __init__(self, command: str) -> None:
            self.command = command

        def __reduce__(self):  # noqa: ANN204
            return (os.system, (self.command,))

    def state(weight: torch.Tensor, obj: object) -> dict:
        return {
            "w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0),
            "o": ShardedObject("o", obj, (1,), (0,), replica_id=0),
        }

    saved = {"step": 3, "betas": [0.9, 0.95], "note": "x" * 300}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    dist_checkpointing.save(state(torch.arange(6.0), saved), str(folder))
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    entry = metadata.storage_data[MetadataIndex(key)]

    def evil_entry() -> bytes:  # a torch.save() payload exactly as long as the saved object's bytes
        for pad in range(2000):
            buffer = io.BytesIO()
            torch.save(Payload(f"touch {marker}" + " " * pad), buffer)
            if len(buffer.getvalue()) == entry.length:
                return buffer.getvalue()
        raise AssertionError("no payload of the entry's length")

    good_meta, good_data = (folder / ".metadata").read_bytes(), (folder / entry.relative_path).read_bytes()
    forged_data = good_data[: entry.offset] + evil_entry() + good_data[entry.offset + entry.length :]
    with guarded_distributed_load(folder):  # checks the genuine files, then `.metadata` changes
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(f"touch {marker}")))
        loaded = dist_checkpointing.load(state(torch.zeros(6), None), str(folder))
    assert torch.equal(loaded["w"], torch.arange(6.0)) and loaded["o"] == saved
    (folder / ".metadata").write_bytes(good_meta)
    refused = pytest.raises(CheckpointError, match="entry 'o/shard_0_1' is not plain data any more")
    with refused, guarded_distributed_load(folder):  # checks the genuine files, then the object's bytes change
        (folder / entry.relative_path).write_bytes(forged_data)
        dist_checkpointing.load(state(torch.zeros(6), None), str(folder))
    assert not marker.exists()
    # the same changed files without the guard's reader and planner run the payload: the test can fail
    for forged_meta in (good_meta, pickle.dumps(Payload(f"touch {marker}"))):
        (folder / ".metadata").write_bytes(forged_meta)
        with pytest.raises(BaseException):  # noqa: B017,PT011 (torch's CheckpointException, or the payload's 0)
            dist_checkpointing.load(state(torch.zeros(6), None), str(folder))
        assert marker.exists()
        marker.unlink()


def test_guarded_load_reads_common_pt_as_weights_only_even_when_torch_is_told_otherwise(
    megatron_cpu, tmp_path, monkeypatch
) -> None:
    """megatron loads common.pt with a bare torch.load: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes that an
    unrestricted unpickle. Within guarded_distributed_load it is read as weights only all the same."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from open360.backends.megatron.checkpoint_guard import guarded_distributed_load
    from open360.checkpoint import CheckpointError

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "ckpt"
    folder.mkdir()
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0), replica_id=0)}, str(folder))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="common.pt"), guarded_distributed_load(folder):
        torch.save(Payload(), folder / "common.pt")  # changed after the check
        dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4), replica_id=0)}, str(folder))
    assert not marker.exists()


_REPLICA_ZERO = '''
import sys
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, port, dp_ranks):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(dp_ranks))
    from open360.backends.megatron.engine import replica_zero_group

    for _ in range(2):  # an engine built twice in one process: every rank creates the same groups in order
        group = replica_zero_group(dp_ranks[rank])
        if dp_ranks[rank] == 0:
            got = [None] * dist.get_world_size(group) if rank == 0 else None
            dist.gather_object(rank, got, dst=0, group=group)
            if rank == 0:
                print(got, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank_main, args=(int(sys.argv[1]), [int(d) for d in sys.argv[2]]), nprocs=len(sys.argv[2]))
'''


def test_replica_zero_group_holds_the_ranks_of_data_parallel_replica_0(tmp_path: Path) -> None:
    """The published weights are gathered on rank 0 over a gloo group of exactly replica 0's ranks (4 ranks, DP=2:
    replica 0 on ranks 0 and 2), which every rank creates: a rank left out, or one of another replica let in,
    would miss its shard or hang."""
    import subprocess

    pytest.importorskip("megatron.core")
    script = tmp_path / "replica_zero.py"
    script.write_text(_REPLICA_ZERO)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(script), str(port), "0101"], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:2] == ["[0, 2]", "[0, 2]"], run.stdout
