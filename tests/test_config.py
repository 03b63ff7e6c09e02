"""Config tree: every experiment composes, bad keys/types/values fail at composition naming the key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ValidationError

from open360.config import compose
from open360.config.store import ConfigKeyError
from open360.data.recipe import load_recipe
from open360.models.flops import count_parameters
from open360.paths import CONFIGS_DIR, REPO_ROOT, resolve_repo_path

EXPERIMENTS = sorted(p.stem for p in (CONFIGS_DIR / "experiment").glob("*.yaml"))
REQUIRED_EXPERIMENTS = {"amber", "amber_tiny", "crystalcoder", "crystalcoder_tiny", "phi15", "phi15_tiny"}


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "open360.train", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_required_experiments_exist():
    assert set(EXPERIMENTS) >= REQUIRED_EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(name):
    cfg = compose([f"+experiment={name}"])
    assert cfg.run_name.startswith(name)
    for stage in cfg.stages:
        assert stage.steps > 0
    assert sum(s.steps for s in cfg.stages) in (0, cfg.trainer.max_steps)
    assert cfg.trainer.global_batch_size % cfg.trainer.micro_batch_size == 0
    assert cfg.trainer.seq_len <= cfg.model.max_seq_len
    assert cfg.model.d_model % cfg.model.n_heads == 0


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_recipe_a_config_points_at_exists(name):
    cfg = compose([f"+experiment={name}"])
    recipes = [cfg.data.recipe] + [s.recipe for s in cfg.stages]
    for recipe in recipes:
        assert resolve_repo_path(recipe).is_file(), f"{name}: recipe {recipe} does not exist"


def test_amber_has_the_published_values():
    cfg = compose(["+experiment=amber"])
    m, o, s = cfg.model, cfg.optim, cfg.schedule
    assert (m.n_layers, m.d_model, m.n_heads, m.ffn_dim, m.vocab_size) == (32, 4096, 32, 11008, 32000)
    assert (m.norm, m.norm_eps, m.mlp, m.tie_embeddings) == ("rmsnorm", 1e-6, "swiglu", False)
    assert (o.lr, list(o.betas), o.weight_decay, o.grad_clip) == (3e-4, [0.9, 0.95], 0.1, 1.0)
    assert (s.kind, s.warmup_steps) == ("cosine", 2000)
    assert s.min_lr_ratio * o.lr == pytest.approx(3e-5)
    assert (cfg.trainer.global_batch_size, cfg.trainer.seq_len) == (2240, 2048)
    # LLaMA-7B shape: 6.74B parameters.
    assert count_parameters(m) == pytest.approx(6.738e9, rel=1e-3)


def test_crystalcoder_and_phi15_have_the_published_values():
    cc = compose(["+experiment=crystalcoder"])
    assert (cc.model.norm, cc.model.norm_eps, cc.model.attn_bias, cc.model.mlp_bias) == (
        "layernorm",
        1e-5,
        True,
        True,
    )
    assert (cc.model.rotary_fraction, cc.model.tie_embeddings, cc.model.vocab_size) == (0.25, True, 32032)
    assert cc.model.mup.enabled and cc.model.mup.embedding_multiplier == 14.6
    assert cc.model.d_model / cc.model.mup.base_width == 16  # hidden LR x 1/16 = 0.0625
    assert cc.optim.eps == 1e-9 and len(cc.stages) == 3
    phi = compose(["+experiment=phi15"])
    assert (phi.model.n_layers, phi.model.d_model, phi.model.ffn_dim, phi.model.mlp) == (24, 2048, 8192, "gelu")
    assert phi.model.parallel_block and phi.model.rotary_fraction == 0.5
    assert (phi.optim.lr, list(phi.optim.betas), phi.optim.eps) == (2e-4, [0.9, 0.98], 1e-7)
    assert (phi.schedule.kind, phi.schedule.warmup_steps) == ("constant", 0)


def test_full_size_experiments_pin_every_published_value():
    """shared/DOMAIN.md's values that the two tests above leave out: a config edit that moves one fails here."""
    amber = compose(["+experiment=amber"])
    assert (amber.model.max_seq_len, amber.model.rotary_fraction, amber.trainer.precision) == (2048, 1.0, "bf16")
    assert (amber.optim.weight_decay, amber.checkpoint.policy) == (0.1, "per_chunk")
    assert (amber.model.n_kv_heads, amber.model.attn_bias, amber.model.mlp_bias) == (None, False, False)
    cc = compose(["+experiment=crystalcoder"])
    m = cc.model
    assert (m.n_layers, m.d_model, m.n_heads, m.ffn_dim, m.mlp, m.init_std) == (32, 4096, 32, 10922, "swiglu", 0.073)
    assert (m.mup.output_multiplier, m.mup.attn_scale_by_d) == (2.22, True)
    assert (list(cc.optim.betas), cc.optim.weight_decay, cc.optim.grad_clip) == ([0.9, 0.95], 0.1, 1.0)
    assert [s.schedule.kind for s in cc.stages] == ["linear"] * 3  # each stage its own warmup and linear decay
    assert sum(s.steps for s in cc.stages) == cc.trainer.max_steps
    assert (cc.trainer.seq_len, cc.trainer.precision, cc.trainer.global_batch_size) == (2048, "bf16", 2112)
    phi = compose(["+experiment=phi15"])
    assert (phi.model.n_heads, phi.model.d_model // phi.model.n_heads, phi.model.norm) == (32, 64, "layernorm")
    assert (phi.optim.weight_decay, phi.trainer.global_batch_size, phi.trainer.seq_len) == (0.1, 2048, 2048)
    tokens = phi.trainer.max_steps * phi.trainer.global_batch_size * phi.trainer.seq_len
    assert tokens == pytest.approx(150e9, rel=1e-4)
    assert (amber.trainer.max_steps * 2240 * 2048) == pytest.approx(1.26e12, rel=0.01)  # ~1.26T tokens


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_per_chunk_checkpoints_see_whole_chunks(name):
    """A per_chunk run's recipes hold chunks of whole global batches, so that checkpoint k has seen exactly chunks
    0..k (CrystalCoder's recipes kept chunk_multiple 2048 when its batch became the published 2112)."""
    cfg = compose([f"+experiment={name}"])
    if cfg.checkpoint.policy != "per_chunk":
        return
    for recipe in [s.recipe for s in cfg.stages] or [cfg.data.recipe]:
        assert load_recipe(recipe).chunk_multiple % cfg.trainer.global_batch_size == 0, recipe


def test_crystalcoder_recipes_have_the_published_mix():
    """LLM360/crystalcoder-train params/phase{1,2,3}/params.yaml and LLM360/crystalcoder-data-prep's README."""
    stages = [load_recipe(s.recipe) for s in compose(["+experiment=crystalcoder"]).stages]

    def mix(r):
        return {s.name: (s.weight, s.fim.rate, s.fim.spm_rate) for s in r.sources}

    assert mix(stages[0]) == {"slimpajama": (1.0, 0.0, 0.5)}
    # phase 2: SlimPajama's seven parts sum to 0.371882, StarCoder with FIM (rate 0.9) 0.628118
    assert mix(stages[1]) == {"slimpajama": (0.371882, 0.0, 0.5), "starcoder": (0.628118, 0.9, 0.5)}
    assert mix(stages[2]) == {
        "css": (0.087928, 0.3, 0.5), "javascript": (0.183708, 0.3, 0.5), "html": (0.185367, 0.3, 0.5),
        "python": (0.342701, 0.3, 0.5), "slimpajama": (0.166856, 0.0, 0.5), "starcoder": (0.033440, 0.9, 0.5),
    }
    files = [{s.name: s.hf_data_files for s in r.sources} for r in stages]
    assert files[0]["slimpajama"] == [f"train/chunk{i}/*" for i in range(1, 6)]  # part 0 of 2
    assert files[1]["slimpajama"] == [f"train/chunk{i}/*" for i in range(6, 11)]  # part 1 of 2
    assert files[2]["slimpajama"] == ["train/chunk1/*"]  # data_subset 0.0-0.1
    assert [files[2][k] for k in ("css", "javascript", "html", "python")] == [
        f"{k}/*.parquet" for k in ("css", "javascript", "html", "python")
    ]
    for r in stages:  # the published tokenizer: EOS </s> (id 2), FIM sentinels <|fim_*|> (ids 32000-32002)
        assert (r.tokenizer.kind, r.tokenizer.name, r.tokenizer.eos_token) == ("hub", "LLM360/CrystalCoder", "</s>")
        assert r.tokenizer.fim_tokens == ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
        assert r.seq_len == 2048
        # tokenized as released: no dedup or quality filter drops a document the published run trained on
        f = r.filters
        assert not (f.exact_dedup.enabled or f.near_dedup.enabled or f.heuristics.enabled or f.classifier.enabled)
    assert [r.num_chunks for r in stages] == [48, 62, 33]  # 143 chunks, as LLM360's 143 released checkpoints


def test_tiny_experiments_keep_their_family():
    for big, tiny in [("amber", "amber_tiny"), ("crystalcoder", "crystalcoder_tiny"), ("phi15", "phi15_tiny")]:
        b, t = compose([f"+experiment={big}"]).model, compose([f"+experiment={tiny}"]).model
        for key in ("norm", "mlp", "attn_bias", "mlp_bias", "tie_embeddings", "rotary_fraction", "parallel_block"):
            assert b[key] == t[key], f"{tiny}.{key} differs from {big}"
        assert b.mup.enabled == t.mup.enabled
        assert count_parameters(t) < 5e6
    assert len(compose(["+experiment=crystalcoder_tiny"]).stages) == 3


def test_misspelt_key_names_the_full_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["+experiment=amber", "model.n_layer=3"])
    assert isinstance(err.value.__cause__, ConfigAttributeError)
    assert "full_key: model.n_layer" in str(err.value.__cause__)


def test_wrong_type_names_the_full_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["+experiment=amber", "model.n_layers=many"])
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError)
    assert "model.n_layers" in str(cause)


def test_a_misspelt_key_inside_a_stage_names_its_list_path():
    from open360.config.store import ConfigKeyError

    with pytest.raises(ConfigKeyError, match=r"config key 'stages\.1\.schedule\.warmup_stepz'"):
        compose(["+experiment=crystalcoder_tiny", "+stages.1.schedule.warmup_stepz=3"])
    with pytest.raises(ConfigKeyError, match=r"config key 'stages\.0\.stepz'"):
        compose(["+experiment=crystalcoder_tiny", "+stages.0.stepz=5"])
    with pytest.raises(ConfigKeyError, match=r"config key 'requirements'"):  # no such key (it was never read)
        compose(["+experiment=amber_tiny", "+requirements.min_gpu_memory_gb=3"])


def test_unknown_experiment_fails():
    with pytest.raises(MissingConfigException) as err:
        compose(["+experiment=amber_typo"])
    assert "experiment/amber_typo" in str(err.value)


def test_missing_required_value_names_the_key():
    with pytest.raises(ConfigKeyError, match=r"config keys \['optim.lr'\] have no value"):
        compose(["+experiment=amber", "optim.lr=???"])  # before anything runs, not at first use


def test_cfg_job_prints_amber_without_touching_data_or_devices(tmp_path):
    proc = run_train("+experiment=amber", f"workspace={tmp_path}", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("n_layers: 32", "d_model: 4096", "ffn_dim: 11008", "vocab_size: 32000", "lr: 0.0003"):
        assert needle in out
    assert "- 0.9\n" in out and "- 0.95\n" in out
    assert list(tmp_path.iterdir()) == []  # nothing was built or written
    for bad, says in (("+trainer.max_stepz=5", "trainer.max_stepz"), ("model.n_heads=5", "n_heads=5")):
        proc = run_train("+experiment=amber_tiny", bad, f"workspace={tmp_path}", "--cfg", "job")
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_typo_fails_at_composition_before_any_work(tmp_path):
    proc = run_train("+experiment=amber_tiny", "trainer.max_stepz=3", f"workspace={tmp_path}")
    assert proc.returncode != 0
    assert "max_stepz" in proc.stderr and "TrainerConfig" in proc.stderr
    assert not (tmp_path / "shards").exists()
    # Hydra's own hint ("to append use +trainer.max_stepz=3") must not let the typo through either
    appended = run_train("+experiment=amber_tiny", "+trainer.max_stepz=3", f"workspace={tmp_path}")
    assert appended.returncode == 2 and "config key 'trainer.max_stepz'" in appended.stderr
    assert not (tmp_path / "shards").exists()
    from open360.config.store import ConfigKeyError

    with pytest.raises(ConfigKeyError, match="trainer.max_stepz"):
        compose(["+experiment=amber_tiny", "+trainer.max_stepz=3"])


def test_overrides_that_stages_would_ignore_are_refused(tmp_path):
    for override in ("schedule.warmup_steps=500", "schedule=constant", "data.recipe=data_recipes/embedded_tiny.yaml",
                     "data=phi15_tiny"):
        proc = run_train("+experiment=crystalcoder_tiny", override, f"workspace={tmp_path}")
        key = override.split("=")[0]
        assert proc.returncode == 2 and f"{key} would be ignored; override stages.<i>" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "shards").exists()
    printed = run_train("+experiment=crystalcoder_tiny", "schedule.kind=wsd", f"workspace={tmp_path}", "--cfg", "job")
    assert printed.returncode == 2 and "schedule.kind would be ignored" in printed.stderr


def test_model_values_out_of_range_fail_in_one_line_before_any_work(tmp_path):
    proc = run_train("+experiment=amber_tiny", "model.n_heads=0", f"workspace={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "open360.train: model config 'amber_tiny': n_heads=0 must be a positive integer"
    assert not (tmp_path / "shards").exists()


BAD_TRAINING_VALUES = [
    ("trainer.global_batch_size=0", "trainer.global_batch_size=0: must be >= 1"),
    ("trainer.micro_batch_size=3", "trainer.global_batch_size=16 is not a multiple of trainer.micro_batch_size=3"),
    ("trainer.tensor_parallel=0", "trainer.tensor_parallel=0: must be >= 1"),
    ("data.build_workers=-1", "data.build_workers=-1: must be >= 0"),
    ("trainer.loss_spike_factor=-1", "trainer.loss_spike_factor=-1.0: must be > 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("trainer.precision=fp16", "trainer.precision='fp16'"),
    ("checkpoint.log_spaced_until=-1", "checkpoint.log_spaced_until=-1"),
    ("checkpoint.steps=[-5,1]", "checkpoint.steps=[-5, 1]"),
    ("optim.lr=-1", "optim.lr=-1.0"),
    ("optim.eps=0", "optim.eps=0.0: must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0: must be >= 0"),
    ("trainer.device=gpu", "trainer.device='gpu': expected one of auto, cpu, cuda"),
    ("trainer.backend=megatorn", "trainer.backend='megatorn': expected one of native, megatron"),
    ("trainer.distributed=fdsp", "trainer.distributed='fdsp': expected one of ddp, fsdp"),
    ("tracking.metric_buffer_steps=0", "tracking.metric_buffer_steps=0: must be >= 1"),
    ("trainer.seed=-1", "trainer.seed=-1: must be >= 0 and < 2**63"),
    ("trainer.seed=18446744073709551616", "trainer.seed=18446744073709551616: must be >= 0"),  # torch: bare overflow
    ("data.seed=-1", "data.seed=-1: must be >= 0 and < 2**63"),  # not the recipe file's own `seed` key
    ("data.seed=9223372036854775808", "data.seed=9223372036854775808: must be >= 0 and < 2**63"),  # 2**63
    ("trainer.init_from=/nowhere/step_4", "trainer.init_from=/nowhere/step_4: not a checkpoint folder"),
    ("optim.lr=nan", "optim.lr=nan: the peak learning rate must be >= 0 and finite"),
    ("optim.lr=inf", "optim.lr=inf: the peak learning rate must be >= 0 and finite"),
    ("optim.eps=inf", "optim.eps=inf: must be > 0 and finite"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan: must be >= 0 and finite"),
    ("optim.grad_clip=nan", "optim.grad_clip=nan: must be >= 0 and finite"),
    ("trainer.resume=/nowhere/step_4", "trainer.resume=/nowhere/step_4: /nowhere/step_4 is not a complete checkpoint directory"),
    ("data.recipe=data_recipes/nope.yaml", "data.recipe=data_recipes/nope.yaml: recipe file not found"),
    ("tracking.mlflow_uri=http://alice:pw@host:5000", "tracking.mlflow_uri=http://alice:***@host:5000: holds"),
    ("trainer.tensor_parallel=2", "trainer.tensor_parallel=2, trainer.pipeline_parallel=1: tensor and pipeline"),
]


@pytest.mark.parametrize("override,says", BAD_TRAINING_VALUES, ids=[b[0] for b in BAD_TRAINING_VALUES])
def test_training_values_out_of_range_name_the_key(override, says):
    from open360.train.validate import check_training_config

    with pytest.raises(ValueError) as err:
        check_training_config(compose(["+experiment=amber_tiny", override]))
    assert says in str(err.value)


def test_a_listed_checkpoint_step_past_the_run_is_named() -> None:
    """checkpoint=list with a step the run never reaches would be dropped without a word."""
    from open360.train.validate import check_training_config

    listed = ["+experiment=amber_tiny", "checkpoint=list", "trainer.max_steps=100"]
    check_training_config(compose([*listed, "checkpoint.steps=[10,100]"]))
    with pytest.raises(ValueError, match=r"checkpoint\.steps=\[150\]: beyond the run's last step 100"):
        check_training_config(compose([*listed, "checkpoint.steps=[10,150]"]))


def test_a_batch_that_does_not_split_over_torchruns_processes_fails_before_anything_is_written(monkeypatch):
    """torchrun --nproc-per-node 2 with global 16 = micro 16: refused by the checks made before Hydra writes
    outputs/ (and before the run's folders and MLflow run), naming the keys and the world size."""
    from open360.train.validate import check_training_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    check_training_config(compose(["+experiment=amber_tiny"]))  # 16 = 8 x 2 ranks: one micro-batch each
    with pytest.raises(ValueError, match=re.escape("trainer.global_batch_size=16 must be a multiple of "
                                                   "trainer.micro_batch_size=16 x world size 2")):
        check_training_config(compose(["+experiment=amber_tiny", "trainer.micro_batch_size=16"]))
    monkeypatch.setenv("WORLD_SIZE", "3")  # megatron: the data-parallel size is WORLD_SIZE / (TP x PP)
    with pytest.raises(ValueError, match=re.escape("3 processes cannot hold trainer.tensor_parallel=2")):
        check_training_config(compose(["+experiment=amber_tiny", "trainer=megatron", "trainer.tensor_parallel=2",
                                       "trainer.seq_len=128"]))


def test_out_of_range_values_fail_under_cfg_job_and_before_a_run_writes_anything(tmp_path):
    for args in (("trainer.global_batch_size=0", "--cfg", "job"), ("optim.eps=0",)):
        proc = run_train("+experiment=amber_tiny", f"workspace={tmp_path}", "run_name=bad", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert args[0].split("=")[0] in proc.stderr
    for left in ("checkpoints", "recovery", "shards", "outputs"):  # checked before Hydra's outputs/ too
        assert not (tmp_path / left).exists()
    sweep = run_train("-m", "+experiment=scaling_tiny", "model.d_model=64,96", f"workspace={tmp_path}", "--cfg", "job")
    assert sweep.returncode == 2 and "drop -m" in sweep.stderr and "Traceback" not in sweep.stderr, sweep.stderr


def test_nan_model_and_stage_values_are_refused():
    from open360.models.decoder import as_model_config
    from open360.train.validate import check_training_config

    for override, says in (("model.rope_interpolation_factor=nan", "rope_interpolation_factor=nan must be > 0"),
                           ("model.rotary_fraction=nan", "rotary_fraction=nan must lie in [0, 1]"),
                           ("model.mup.output_multiplier=0", "mup.output_multiplier=0.0 must be > 0")):
        with pytest.raises(ValueError, match=re.escape(says)):
            as_model_config(compose(["+experiment=crystalcoder_tiny", override]).model)
    for override, says in (("stages.0.lr=nan", "stages.0.lr=nan (stage 'stage1_text')"),
                           ("stages.1.recipe=nope.yaml", "stages.1.recipe=nope.yaml: recipe file not found")):
        with pytest.raises(ValueError, match=re.escape(says)):
            check_training_config(compose(["+experiment=crystalcoder_tiny", override]))


def test_a_bad_stage_schedule_names_the_stage_key_not_the_top_level_schedule():
    from open360.train.validate import check_training_config

    for override, says in (("stages.1.schedule.kind=cosin", "stages.1.schedule.kind='cosin'"),
                           ("stages.2.schedule.min_lr_ratio=2", "stages.2.schedule: min_lr_ratio=2.0"),
                           ("stages.0.schedule.warmup_steps=-1", "stages.0.schedule: warmup_steps=-1")):
        with pytest.raises(ValueError, match=re.escape(says)):
            check_training_config(compose(["+experiment=crystalcoder_tiny", override]))
    with pytest.raises(ValueError, match=r"^schedule\.kind='cosin'"):  # no stages: the top-level key
        check_training_config(compose(["+experiment=amber_tiny", "schedule.kind=cosin"]))


def test_a_seq_len_other_than_the_recipes_fails_before_its_shards_are_built(tmp_path):
    from open360.train.validate import check_training_config

    with pytest.raises(ValueError, match=re.escape("trainer.seq_len=64: data.recipe=data_recipes/embedded_tiny.yaml "
                                                   "builds sequences of 128 tokens")):
        check_training_config(compose(["+experiment=amber_tiny", "trainer.seq_len=64"]))
    with pytest.raises(ValueError, match=re.escape("trainer.seq_len=64: stages.0.recipe=")):
        check_training_config(compose(["+experiment=crystalcoder_tiny", "trainer.seq_len=64"]))
    proc = run_train("+experiment=amber_tiny", f"workspace={tmp_path}", "tracking=off", "trainer.seq_len=64")
    assert proc.returncode == 2 and "set trainer.seq_len=128" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # no shards built, no run folders


def test_bad_input_writes_nothing_not_even_hydras_outputs(tmp_path):
    """Hydra writes outputs/<run_name>/<time>/.hydra/ before main(): run_name=../../x put it outside the
    workspace, and a credential in tracking.mlflow_uri landed there in the clear."""
    ws = tmp_path / "a" / "ws"
    ws.mkdir(parents=True)
    for bad, says in (("run_name=../../escaped", "expected one folder name"),
                      ("tracking.mlflow_uri=http://alice:s3cr3t@127.0.0.1:9", "holds credentials"),
                      ("trainer.resume=nowhere/step_4", "not a complete checkpoint directory"),
                      ("trainer.resume=4", "no complete checkpoint for step 4"),
                      ("data.recipe=nope.yaml", "recipe file not found"),
                      ("optim.lr=nan", "optim.lr=nan")):
        proc = run_train("+experiment=amber_tiny", f"workspace={ws}", "tracking=off", bad)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "s3cr3t" not in proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("a"), Path("a/ws")]


def test_cfg_job_says_why_a_value_has_the_wrong_type(tmp_path):
    proc = run_train("+experiment=amber_tiny", "trainer.max_steps=1.5", f"workspace={tmp_path}", "--cfg", "job")
    assert proc.returncode == 2 and "trainer.max_steps=1.5" in proc.stderr, proc.stderr
    assert "could not be converted to Integer" in proc.stderr


@pytest.mark.parametrize("name", ["/tmp/abs_run", "../../escaped", "", "a/b"])
def test_run_name_must_be_one_folder_name(name, tmp_path):
    from open360.tracking.checkpoints import run_dirs

    with pytest.raises(ConfigKeyError, match="expected one folder name"):
        compose(["+experiment=amber_tiny", f"run_name='{name}'"])
    with pytest.raises(ValueError, match="one folder"):
        run_dirs(tmp_path, name)


def test_an_existing_run_named_before_the_rule_can_be_resumed(tmp_path):
    with pytest.raises(ConfigKeyError, match="expected one folder name"):
        compose(["+experiment=amber_tiny", f"workspace={tmp_path}", "run_name='my run'", "trainer.resume=auto"])
    (tmp_path / "checkpoints" / "my run").mkdir(parents=True)
    cfg = compose(["+experiment=amber_tiny", f"workspace={tmp_path}", "run_name='my run'", "trainer.resume=auto"])
    assert cfg.run_name == "my run"
    with pytest.raises(ConfigKeyError, match="expected one folder name"):  # a new run under it is still refused
        compose(["+experiment=amber_tiny", f"workspace={tmp_path}", "run_name='my run'"])


def test_hydra_chdir_anchors_every_relative_path_of_the_command_line(tmp_path, monkeypatch):
    import hydra.utils

    from open360.config.schema import resume_is_off
    from open360.train.__main__ import anchor_relative_paths

    monkeypatch.setattr(hydra.utils, "get_original_cwd", lambda: str(tmp_path))
    cfg = compose(["+experiment=amber_tiny", "workspace=.", "trainer.init_from=checkpoints/base/step_12",
                   "trainer.resume=checkpoints/x/step_4"])
    anchor_relative_paths(cfg)
    assert (cfg.workspace, cfg.trainer.init_from, cfg.trainer.resume) == (
        str(tmp_path / "."), str(tmp_path / "checkpoints/base/step_12"), str(tmp_path / "checkpoints/x/step_4")
    )
    for kept in ("auto", "12", "none"):
        cfg = compose(["+experiment=amber_tiny", f"trainer.resume={kept}", "workspace=/abs/ws"])
        anchor_relative_paths(cfg)
        assert (str(cfg.trainer.resume), cfg.workspace) == (kept, "/abs/ws")
    cfg = compose(["+experiment=amber_tiny", "trainer.resume=null", "workspace=/abs/ws"])  # Hydra's null
    anchor_relative_paths(cfg)
    assert cfg.trainer.resume is None and resume_is_off(cfg.trainer.resume)


def test_reading_a_run_takes_any_single_folder_name(tmp_path):
    """A run trained before the rule (named `my run`, say) can still be listed, evaluated and exported."""
    from open360.tracking.checkpoints import run_dirs

    assert run_dirs(tmp_path, "my run")[0] == tmp_path / "checkpoints" / "my run"
    with pytest.raises(ConfigKeyError, match="expected one folder name"):
        compose(["+experiment=amber_tiny", "run_name='my run'"])
    proc = subprocess.run(
        [sys.executable, "-m", "open360.analysis.memorization", "run=../x", f"workspace={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert proc.returncode == 2 and "not a path" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_an_absolute_run_name_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "elsewhere"
    proc = run_train("+experiment=amber_tiny", f"workspace={tmp_path / 'ws'}", f"run_name={target}")
    assert proc.returncode == 2 and "expected one folder name" in proc.stderr, proc.stderr
    assert not target.exists() and not (tmp_path / "ws" / "checkpoints").exists()


def test_a_relative_workspace_stays_where_the_command_ran_under_hydra_chdir(tmp_path):
    """hydra.job.chdir=true moves the process into Hydra's run folder; `workspace=.` must not follow it."""
    fake = tmp_path / "checkpoints" / "amber_tiny" / "step_5"
    fake.mkdir(parents=True)
    (fake / "lineage.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "open360.train", "+experiment=amber_tiny", "workspace=.", "tracking=off",
         "hydra.job.chdir=true", "trainer.resume=5"],  # found, then refused (no file hashes) once the run's folders exist
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{fake}/lineage.json" in proc.stderr and (tmp_path / "recovery" / "amber_tiny").is_dir()
    assert not list((tmp_path / "outputs").rglob("checkpoints")) and not list((tmp_path / "outputs").rglob("recovery"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_amber_without_gpu_fails_fast_naming_memory(tmp_path):
    proc = run_train("+experiment=amber", f"workspace={tmp_path}")
    assert proc.returncode == 2
    assert "GiB" in proc.stderr and "amber_tiny" in proc.stderr and "6.74B" in proc.stderr
    assert not (tmp_path / "shards").exists() and not (tmp_path / "checkpoints").exists()


def test_open360_cli_help_lists_verbs():
    proc = subprocess.run(["open360", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for verb in ("data build", "ckpt pull", "analysis memorization"):
        assert verb in proc.stdout
    bad = subprocess.run(["open360", "nope", "verb"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
    group = subprocess.run(["open360", "data", "--help"], capture_output=True, text=True, timeout=60)
    assert group.returncode == 0 and "data build" in group.stdout and "ckpt pull" not in group.stdout


def test_amber_on_cpu_fails_fast_naming_ram(tmp_path):
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    if ram_gib >= 100:
        pytest.skip("this machine could hold AMBER's training state in RAM")
    proc = run_train("+experiment=amber", "trainer.device=cpu", f"workspace={tmp_path}")
    assert proc.returncode == 2
    assert "GiB of RAM" in proc.stderr and "amber_tiny" in proc.stderr and "6.74B" in proc.stderr
    assert not (tmp_path / "shards").exists() and not (tmp_path / "checkpoints").exists()


def test_checks_before_hydra_compose_with_the_config_dir_and_name_hydra_uses(tmp_path, capsys):
    """`-cd DIR +experiment=mine` is a run Hydra composes from DIR too: the early checks must find it."""
    from open360.train.__main__ import check_before_hydra

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text((REPO_ROOT / "configs/experiment/amber_tiny.yaml").read_text())
    check_before_hydra(["-cd", str(tmp_path), "+experiment=mine", f"workspace={tmp_path}", "--cfg", "job"])
    check_before_hydra([f"--config-dir={tmp_path}", "+experiment=mine", f"workspace={tmp_path}", "--cfg", "job"])
    with pytest.raises(SystemExit):
        check_before_hydra(["-cd", str(tmp_path), "+experiment=mine", "optim.lr=nan", "--cfg", "job"])
    assert "optim.lr=nan" in capsys.readouterr().err


def test_an_override_of_a_stage_the_experiment_lacks_names_its_stages(tmp_path, capsys):
    """`stages.5.steps=3` on a three-stage experiment (or on one without stages) says which stages exist,
    not OmegaConf's "dict is not a subclass of StageConfig"."""
    from open360.train.__main__ import check_before_hydra

    for argv, said in ((["+experiment=crystalcoder_tiny", "stages.5.steps=3"], "stages.0 to stages.2"),
                       (["stages.0.recipe=x"], "it has no `stages`")):
        with pytest.raises(SystemExit) as err:
            check_before_hydra([*argv, f"workspace={tmp_path}"])
        message = capsys.readouterr().err
        assert err.value.code == 2 and f"{argv[-1]}: this experiment has no stage" in message and said in message
        assert "subclass" not in message


def test_a_bad_stage_override_names_its_own_error_also_in_a_sweep_or_beside_another_bad_one(tmp_path, capsys):
    """A stage the experiment has, given a bad value, is not called missing: the value's error is said; a
    missing stage in a sweep job is named as such; a missing stage beside another bad override is one line
    (exit 2), not a traceback from composing the others."""
    from open360.train.__main__ import check_before_hydra

    for argv, said in (
        (["stages.0.steps=abc"], "Error merging override stages.0.steps=abc: Value 'abc' of type 'str' could not"),
        (["-m", "stages.5.steps=3,4"], "stages.5.steps=3: this experiment has no stage 5 (its stages are stages.0"),
        (["+stages.5.steps=3"], "stages.5.steps=3: this experiment has no stage 5 (its stages are stages.0"),
        (["stages.5.steps=3", "model.d_model=abc"], "Error merging override"),
    ):
        with pytest.raises(SystemExit) as err:
            check_before_hydra(["+experiment=crystalcoder_tiny", *argv, f"workspace={tmp_path}"])
        message = capsys.readouterr().err
        assert err.value.code == 2 and said in message and "no stage 0" not in message, message


def test_a_sweep_with_credentials_in_an_override_is_refused_before_hydra(capsys):
    from open360.train.__main__ import check_before_hydra

    with pytest.raises(SystemExit):
        check_before_hydra(["-m", "+experiment=amber_tiny", "tracking.mlflow_uri=http://alice:s3cr3t@h:9,sqlite:///m.db"])
    err = capsys.readouterr().err
    assert "holds credentials" in err and "s3cr3t" not in err
    check_before_hydra(["-m", "+experiment=amber_tiny", "model.d_model=64,96"])  # no credentials: Hydra's turn


def test_every_job_of_a_sweep_is_checked_before_the_first_one_trains(tmp_path, capsys):
    """`-m ... model.d_model=64,130`: job 1's bad value is refused before Hydra writes multirun/ and before job 0
    trains for minutes; a sweep of good values passes, and one Hydra alone can expand (glob) is left to main()."""
    from open360.train.__main__ import check_before_hydra, sweep_jobs

    good = ["-m", "+experiment=scaling_tiny", "model.d_model=64,96", f"workspace={tmp_path}", "tracking=off"]
    check_before_hydra(good)
    with pytest.raises(SystemExit) as err:
        check_before_hydra([*good[:2], "model.d_model=64,130", *good[3:]])
    assert err.value.code == 2
    said = capsys.readouterr().err
    assert "sweep job +experiment=scaling_tiny model.d_model=130" in said and "d_model=130 is not divisible" in said
    assert list(tmp_path.iterdir()) == []
    assert sweep_jobs(["+experiment=glob(amber_*)"]) == []
