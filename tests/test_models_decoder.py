"""Decoder behaviour against an independent naive reference: partial rotary, PI, parallel block, muP, KV cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from open360.config import ModelConfig, MupConfig, OptimConfig, compose
from open360.models import Decoder, KVCache, build_model, count_parameters

torch.set_num_threads(2)


def tiny(**changes) -> ModelConfig:
    base = ModelConfig(name="t", vocab_size=97, n_layers=2, d_model=64, n_heads=4, ffn_dim=96, max_seq_len=64)
    return dataclasses.replace(base, **changes)


def randomize_vectors(model: Decoder, seed: int = 0) -> Decoder:
    """Give norms and biases non-trivial values so that parity checks see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                mean = 0.0 if "bias" in name else 1.0
                p.copy_(mean + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Naive reference: loops over heads, complex-number rotary on (j, j + r/2) pairs, explicit softmax.
# Written independently of open360.models.decoder (only reads the parameters).
# ------------------------------------------------------------------------------------------------


def ref_rotary(x: torch.Tensor, positions: torch.Tensor, r: int, base: float, pi: float) -> torch.Tensor:
    """x [T, hd]: rotate pairs (x_j, x_{j+r/2}) as the complex number x_j + i x_{j+r/2} by angle p/pi * base^(-2j/r)."""
    if r == 0:
        return x
    half = r // 2
    j = torch.arange(half, dtype=torch.float64)
    theta = (positions.double()[:, None] / pi) * base ** (-2 * j / r)[None, :]
    z = torch.complex(x[:, :half].double(), x[:, half:r].double()) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real.to(x.dtype), z.imag.to(x.dtype), x[:, r:]], dim=-1)


def ref_norm(cfg: ModelConfig, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if cfg.norm == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + cfg.norm_eps) * norm.weight + norm.bias


def ref_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def ref_forward(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] of one sequence, computed the slow, obvious way."""
    cfg = model.cfg
    T = ids.shape[0]
    H, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    KV = cfg.n_kv_heads or H
    r = int(hd * cfg.rotary_fraction)
    wm = cfg.d_model / cfg.mup.base_width if cfg.mup.enabled else 1.0
    pos = torch.arange(T)
    x = model.embed.weight[ids] * (cfg.mup.embedding_multiplier if cfg.mup.enabled else 1.0)
    for blk in model.blocks:
        h = ref_norm(cfg, blk.norm1, x)
        qkv = ref_linear(blk.attn.qkv, h)
        q_all, k_all, v_all = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
        heads = []
        for head in range(H):
            kvh = head // (H // KV)
            q = ref_rotary(q_all[:, head * hd : (head + 1) * hd], pos, r, cfg.rotary_base, cfg.rope_interpolation_factor)
            k = ref_rotary(k_all[:, kvh * hd : (kvh + 1) * hd], pos, r, cfg.rotary_base, cfg.rope_interpolation_factor)
            v = v_all[:, kvh * hd : (kvh + 1) * hd]
            scale = 1.0 / hd if (cfg.mup.enabled and cfg.mup.attn_scale_by_d) else 1.0 / math.sqrt(hd)
            scores = (q @ k.T) * scale
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v)
        attn = ref_linear(blk.attn.out, torch.cat(heads, -1))

        def mlp(u, blk=blk):
            if cfg.mlp == "swiglu":
                gate, up = ref_linear(blk.mlp.gate_up, u).split(cfg.ffn_dim, -1)
                return ref_linear(blk.mlp.down, gate * torch.sigmoid(gate) * up)
            a = ref_linear(blk.mlp.fc1, u)
            a = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
            return ref_linear(blk.mlp.fc2, a)

        if cfg.parallel_block:
            x = x + attn + mlp(h)
        else:
            x = x + attn
            x = x + mlp(ref_norm(cfg, blk.norm2, x))
    x = ref_norm(cfg, model.final_norm, x)
    w = model.embed.weight if cfg.tie_embeddings else model.lm_head.weight
    logits = x @ w.T + (model.lm_head_bias if cfg.lm_head_bias else 0.0)
    return logits * (cfg.mup.output_multiplier / wm if cfg.mup.enabled else 1.0)


REFERENCE_CASES = {
    "llama": tiny(),
    "rotary_25pct": tiny(rotary_fraction=0.25),
    "rotary_50pct_parallel_gelu": tiny(
        rotary_fraction=0.5, parallel_block=True, mlp="gelu", norm="layernorm", attn_bias=True, mlp_bias=True
    ),
    "no_rotary": tiny(rotary_fraction=0.0),
    "pi_factor_4": tiny(rope_interpolation_factor=4.0, rotary_base=500.0),
    "parallel_block_swiglu": tiny(parallel_block=True),
    "gqa_tied_headbias": tiny(n_kv_heads=2, tie_embeddings=True, lm_head_bias=True),
    "mup_crystalcoder_like": tiny(
        norm="layernorm", norm_eps=1e-5, attn_bias=True, mlp_bias=True, tie_embeddings=True, rotary_fraction=0.25,
        mup=MupConfig(enabled=True, base_width=16, embedding_multiplier=14.6, output_multiplier=2.22),
    ),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_matches_naive_reference(case: str) -> None:
    torch.manual_seed(1)
    model = randomize_vectors(build_model(REFERENCE_CASES[case]))
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        out = model(ids)
        for b in range(2):
            ref = ref_forward(model, ids[b])
            assert (out[b] - ref).abs().max().item() < 1e-4, case


def test_pi_factor_is_position_division() -> None:
    """With PI factor f, the logits at position p equal those of a model without PI at position p/f (integers)."""
    torch.manual_seed(0)
    pi_model = build_model(tiny(rope_interpolation_factor=2.0))
    plain = build_model(tiny())
    plain.load_state_dict(pi_model.state_dict())
    # Rotary only sees relative positions, so compare attention inputs directly: cos/sin tables.
    assert torch.allclose(pi_model.rotary.cos[10], plain.rotary.cos[5])
    assert torch.allclose(pi_model.rotary.sin[30], plain.rotary.sin[15])
    assert not torch.allclose(pi_model.rotary.cos[10], plain.rotary.cos[10])


def test_parameter_count_matches_flops_formula() -> None:
    for case, cfg in REFERENCE_CASES.items():
        assert build_model(cfg).num_parameters() == count_parameters(cfg), case
    for name in ("amber_tiny", "crystalcoder_tiny", "phi15_tiny"):
        cfg = compose([f"model={name}"]).model
        assert build_model(cfg).num_parameters() == count_parameters(cfg), name


def test_build_from_dictconfig_and_dict() -> None:
    cfg = compose(["model=crystalcoder_tiny"]).model
    m = build_model(cfg)
    assert m.cfg.mup.enabled and m.width_mult == 2.0 and m.cfg.norm == "layernorm"
    m2 = build_model(OmegaConf.to_container(cfg))
    assert m2.cfg == m.cfg
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        build_model(dataclasses.replace(tiny(), norm="batchnorm"))
    with pytest.raises(ValueError, match="unknown keys.*d_modell"):
        build_model({**dataclasses.asdict(tiny()), "d_modell": 3})
    with pytest.raises(ValueError, match="rotary_fraction"):
        build_model(tiny(rotary_fraction=0.35))  # 16 * 0.35 -> 5 dims: odd
    with pytest.raises(ValueError, match="rotary_fraction"):
        build_model(tiny(rotary_fraction=1.5))
    for key, value in [("n_layers", 0), ("n_layers", -1), ("d_model", 0), ("n_heads", 0), ("ffn_dim", 0),
                       ("vocab_size", 0), ("max_seq_len", 0), ("n_kv_heads", 0), ("n_kv_heads", -2),
                       ("norm_eps", -1.0), ("rotary_base", 0.0), ("init_std", 0.0)]:
        with pytest.raises(ValueError, match=f"{key}={value}"):
            build_model(tiny(**{key: value}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"parallel_block": "false"}, "parallel_block='false' must be true or false"),  # was truthy: a parallel block
        ({"attn_bias": 1}, "attn_bias=1 must be true or false"),
        ({"mup": {"enabled": "no"}}, "mup.enabled='no' must be true or false"),
        ({"n_layers": True}, "n_layers=True must be a positive integer"),
        ({"rotary_fraction": "0.5"}, "rotary_fraction='0.5' must lie in"),  # was a bare TypeError
        ({"norm_eps": "1e-6"}, "norm_eps='1e-6' must be > 0"),  # YAML 1.1 reads 1e-6 as a string
        ({"mup": {"enabled": True, "base_width": "64"}}, "mup.base_width='64' must be > 0"),
        ({"rotary_fraction": 0.05}, "rotary_fraction=0.05 gives 0 rotary dims"),  # was silently no positions at all
        ({"n_kv_heads": True}, "n_kv_heads=True must be a positive integer"),  # True passed for 1: one kv head
        ({"compile": "false"}, "compile='false' must be true or false"),
        ({"mup": {"enabled": False, "attn_scale_by_d": "no"}}, "mup.attn_scale_by_d='no' must be true or false"),
        ({"norm_eps": True}, "norm_eps=True must be > 0"),  # True passed for 1.0
        ({"init_truncation": 0.0}, "init_truncation=0.0 must be > 0"),  # every weight would be cut to 0
        ({"init_truncation": "2"}, "init_truncation='2' must be > 0"),
    ],
)
def test_values_of_the_wrong_kind_are_refused_naming_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"model config 't': {message}"):
        build_model({**dataclasses.asdict(tiny()), **changes})


@pytest.mark.parametrize("case", ["llama", "gqa_tied_headbias", "mup_crystalcoder_like", "rotary_50pct_parallel_gelu"])
def test_kv_cache_decoding_equals_full_forward(case: str) -> None:
    torch.manual_seed(2)
    model = randomize_vectors(build_model(REFERENCE_CASES[case]))
    ids = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.allocate(model, batch_size=3, max_len=32)
        pieces = [model(ids[:, :10], cache, 0)]
        for t in range(10, 24):
            # start_pos as a device tensor: the fixed-shape path used under CUDA graphs
            pieces.append(model(ids[:, t : t + 1], cache, torch.tensor(t)))
        assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-5
        # greedy continuation from the cache equals greedy from repeated full forwards
        cache2 = KVCache.allocate(model.cfg, 3, 32, device="cpu", dtype=torch.float32)
        nxt = model(ids[:, :8], cache2, 0)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([ids[:, :8], nxt], 1)
        for t in range(8, 16):
            nxt = model(seq[:, -1:], cache2, t)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        naive = ids[:, :8]
        for _ in range(9):
            naive = torch.cat([naive, model(naive)[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(seq, naive)


def test_kv_cache_overflow_is_an_error() -> None:
    model = build_model(tiny())
    cache = KVCache.allocate(model, 1, 8)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long), cache, 0)


def test_loss_is_mean_cross_entropy_and_checkpointing_keeps_grads() -> None:
    torch.manual_seed(3)
    cfg = tiny()
    model = build_model(cfg)
    ids = torch.randint(0, 97, (2, 17))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    ref = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)
    assert abs(loss.item() - math.log(97)) < 0.5  # near-uniform at init
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ckpt = build_model(dataclasses.replace(cfg, activation_checkpointing=True)).train()
    ckpt.load_state_dict(model.state_dict())
    ckpt.loss(ids[:, :-1], ids[:, 1:]).backward()
    for n, p in ckpt.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_param_groups_decay_and_mup_scaling() -> None:
    optim = OptimConfig(lr=1e-3, eps=1e-8, weight_decay=0.1)
    model = build_model(compose(["model=crystalcoder_tiny"]).model)  # width_mult = 128 / 64 = 2
    groups = {g["name"]: g for g in model.param_groups(optim)}
    assert set(groups) == {"hidden", "embedding", "norms_biases"}  # tied: no separate head
    assert groups["hidden"]["lr"] == pytest.approx(5e-4) and groups["hidden"]["eps"] == pytest.approx(5e-9)
    assert groups["hidden"]["weight_decay"] == 0.1
    for name in ("embedding", "norms_biases"):
        assert groups[name]["lr"] == 1e-3 and groups[name]["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in groups["hidden"]["params"])
    assert all(p.ndim == 1 for p in groups["norms_biases"]["params"])
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))

    sp = build_model(compose(["model=amber_tiny"]).model)
    sp_groups = {g["name"]: g for g in sp.param_groups(optim)}
    assert set(sp_groups) == {"hidden", "lm_head", "embedding", "norms_biases"}
    assert all(g["lr"] == 1e-3 and g["eps"] == 1e-8 for g in sp_groups.values())
    opt = torch.optim.AdamW(sp.param_groups(optim))
    sp.loss(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)).backward()
    opt.step()


def test_mup_init_and_multipliers() -> None:
    torch.manual_seed(0)
    cfg = tiny(d_model=256, n_heads=4, mup=MupConfig(enabled=True, base_width=64), init_std=0.02)
    model = build_model(cfg)
    assert model.width_mult == 4.0
    assert model.embedding_multiplier == 14.6 and model.logit_multiplier == pytest.approx(2.22 / 4)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.01, rel=0.05)  # 0.02 / sqrt(4)
    for residual_out in (model.blocks[1].attn.out, model.blocks[1].mlp.down):  # further / sqrt(2 * n_layers)
        assert residual_out.weight.std().item() == pytest.approx(0.01 / 2, rel=0.05)
    assert model.blocks[0].attn.scale == pytest.approx(1 / 64)


def test_crystalcoder_init_is_the_published_one() -> None:
    """LLM360's CrystalCoder params.yaml: truncated normals at +-2 std of std 0.073 (embedding), 0.01825 (= 0.073 /
    sqrt(16), hidden matrices) and 0.00228125 (= 0.073 / sqrt(2 * 16 * 32), residual output projections); a normal
    cut at +-2 std has 0.8796 std. Built narrow at the published width_mult 16 and depth."""
    torch.manual_seed(0)
    overrides = ["model.d_model=256", "model.mup.base_width=16", "model.n_heads=4", "model.ffn_dim=64", "model.vocab_size=512"]
    model = build_model(compose(["model=crystalcoder", *overrides]).model)
    assert model.width_mult == 16 and model.cfg.n_layers == 32
    hidden = torch.cat([torch.cat([b.attn.qkv.weight.flatten(), b.mlp.gate_up.weight.flatten()]) for b in model.blocks])
    residual_out = torch.cat([torch.cat([b.attn.out.weight.flatten(), b.mlp.down.weight.flatten()]) for b in model.blocks])
    for weights, std in ((model.embed.weight, 0.073), (hidden, 0.01825), (residual_out, 0.00228125)):
        assert weights.abs().max().item() <= 2 * std
        assert weights.abs().max().item() > 1.95 * std  # cut at 2 std, not narrower
        assert weights.std().item() == pytest.approx(0.8796 * std, rel=0.02)


def test_init_truncation_cuts_every_normal_the_untied_head_included() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(init_truncation=1.5, tie_embeddings=False, vocab_size=512, d_model=128, n_heads=4))
    std = model.cfg.init_std
    for name, weight in (("embed", model.embed.weight), ("lm_head", model.lm_head.weight)):
        assert weight.abs().max().item() <= 1.5 * std, name
        assert weight.abs().max().item() > 1.4 * std, name


def test_full_size_models_have_the_published_architecture() -> None:
    """The full-size configs, built (on the meta device), realize shared/DOMAIN.md's facts in their modules."""

    def built(name: str) -> Decoder:
        with torch.device("meta"):
            return build_model(compose([f"model={name}"]).model)

    optim = OptimConfig(lr=1.0, eps=1e-9, weight_decay=0.1)
    amber = built("amber")  # LLaMA-7B: RMSNorm 1e-6, SwiGLU 11008, full RoPE base 10000, untied, no biases
    block = amber.blocks[0]
    assert isinstance(block.norm1, torch.nn.RMSNorm) and block.norm1.eps == 1e-6 and not block.parallel
    assert block.mlp.gate_up.weight.shape == (2 * 11008, 4096) and block.attn.qkv.bias is None
    assert (amber.rotary.dim, amber.rotary.base, block.attn.scale) == (128, 10000.0, 1 / math.sqrt(128))
    assert amber.lm_head is not None and amber.lm_head_bias is None and amber.embed.weight.shape == (32000, 4096)
    assert (amber.embedding_multiplier, amber.logit_multiplier) == (1.0, 1.0)

    cc = built("crystalcoder")  # LayerNorm 1e-5 + biases, SwiGLU 10922, 32 of 128 dims rotary, tied, muP
    block = cc.blocks[0]
    assert isinstance(block.norm1, torch.nn.LayerNorm) and block.norm1.eps == 1e-5 and not block.parallel
    assert all(m.bias is not None for m in (block.attn.qkv, block.attn.out, block.mlp.gate_up, block.mlp.down))
    assert block.mlp.gate_up.weight.shape == (2 * 10922, 4096)
    assert (cc.rotary.dim, block.attn.scale) == (32, 1 / 128)  # 25% rotary; attention 1/d
    assert cc.lm_head is None and cc.embed.weight.shape == (32032, 4096)
    assert cc.embedding_multiplier == 14.6 and cc.logit_multiplier == pytest.approx(2.22 / 16)
    assert {g["name"]: g["lr_scale"] for g in cc.param_groups(optim)}["hidden"] == 0.0625

    phi = built("phi15")  # parallel block from one LayerNorm, tanh-GELU 8192, 32 of 64 dims rotary, biases
    block = phi.blocks[0]
    assert block.parallel and block.norm2 is None and isinstance(block.norm1, torch.nn.LayerNorm)
    assert block.norm1.eps == 1e-5 and block.mlp.fc1.weight.shape == (8192, 2048) and block.mlp.fc1.bias is not None
    assert (phi.rotary.dim, block.attn.scale, block.attn.qkv.bias is not None) == (32, 1 / 8, True)
    assert phi.lm_head is not None and phi.lm_head_bias.shape == (51200,)


@pytest.mark.slow
def test_compiled_model_matches_eager() -> None:
    """cfg.compile=True (per-block torch.compile + compiled loss) gives the same loss, grads and cached decode."""
    torch.manual_seed(5)
    cfg = tiny(n_layers=1)
    eager = build_model(cfg)
    compiled = build_model(dataclasses.replace(cfg, compile=True))
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (2, 17))
    for model in (eager, compiled):
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    with torch.no_grad():
        cache = KVCache.allocate(compiled, 2, 20)
        compiled(ids[:, :8], cache, 0)
        for t in range(8, 12):
            last = compiled(ids[:, t : t + 1], cache, torch.tensor(t))
        assert (last[:, -1] - eager(ids[:, :12])[:, -1]).abs().max().item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_loss_and_kv_cache() -> None:
    torch.manual_seed(6)
    cfg = REFERENCE_CASES["mup_crystalcoder_like"]
    model = build_model(cfg).cuda()
    ids = torch.randint(0, 97, (4, 33), device="cuda")
    ref = model.loss(ids[:, :-1], ids[:, 1:])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        logits = model(ids[:, :16])
        cache = KVCache.allocate(model, 4, 32, dtype=torch.bfloat16)
        model(ids[:, :8], cache, 0)
        step = torch.zeros((), dtype=torch.long, device="cuda")
        for t in range(8, 16):
            last = model(ids[:, t : t + 1], cache, step + t)
    assert abs(loss.item() - ref.item()) < 0.02
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert (last[:, -1].float() - logits[:, 15].float()).abs().max().item() < 0.1
