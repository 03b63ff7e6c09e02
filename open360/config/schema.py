"""Typed schemas for every Hydra config group; Hydra validates each composed config against them."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

RESUME_OFF = ("", "none", "None", "null")  # trainer.resume values that start a run afresh


def resume_is_off(resume: object) -> bool:
    return str(resume).strip() in RESUME_OFF


@dataclass
class MupConfig:
    """Maximal-update parametrization (CrystalCoder / Cerebras-GPT style)."""

    enabled: bool = False
    base_width: int = 256  # width at which the base hyperparameters were tuned
    embedding_multiplier: float = 14.6
    output_multiplier: float = 2.22  # logits are scaled by output_multiplier / width_mult
    attn_scale_by_d: bool = True  # attention logits scaled by 1/d instead of 1/sqrt(d)


@dataclass
class ModelConfig:
    """One decoder-only transformer; every architectural choice is a field."""

    name: str = MISSING
    vocab_size: int = MISSING
    n_layers: int = MISSING
    d_model: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    ffn_dim: int = MISSING
    max_seq_len: int = 2048
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-6
    mlp: str = "swiglu"  # swiglu | gelu
    attn_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    rotary_fraction: float = 1.0
    rotary_base: float = 10000.0
    rope_interpolation_factor: float = 1.0  # position interpolation: positions are divided by it
    parallel_block: bool = False  # attention and MLP in parallel from one norm (phi / GPT-J)
    init_std: float = 0.02
    init_truncation: float | None = None  # draw from a normal truncated at +-init_truncation std (CrystalCoder 2)
    mup: MupConfig = field(default_factory=MupConfig)
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class DataConfig:
    """Which data recipe to build and where its shards live."""

    recipe: str = MISSING  # path to a recipe YAML, relative to the repository root or absolute
    shards_dir: str = "shards"  # relative to the workspace
    seed: int | None = None  # shuffle seed of the build, its held-out draw and later epochs; None = the recipe's `seed`
    build_workers: int = 2


@dataclass
class OptimConfig:
    """AdamW hyperparameters (muP scaling of LR/eps per group is applied on top)."""

    name: str = "adamw"
    lr: float = MISSING
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    # muP only: false = the hidden matrices' decay per step (lr x wd) shrinks with their 1/width_mult LR, as
    # torch's AdamW does on muP's groups; true = their wd is x width_mult, so lr x wd is the same at every width
    # (the `mup` library's MuAdamW), which a weight decay tuned at the base width needs to transfer
    mup_scale_weight_decay: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule shape; lengths are in optimizer steps."""

    kind: str = "cosine"  # cosine | linear | constant | wsd
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # floor as a fraction of optim.lr (AMBER: 3e-5 / 3e-4)
    decay_fraction: float = 0.2  # wsd only: fraction of the stage spent decaying
    # linear/cosine: the decay's length after warmup, when it is planned past the stage's end (CrystalCoder's
    # phase 1 stopped at step 79,721 of a 294,337-step decay); null = the decay ends with the stage
    decay_steps: int | None = None


@dataclass
class StageConfig:
    """One stage of a multi-stage run: its own data recipe, length and schedule."""

    name: str = MISSING
    recipe: str = MISSING
    steps: int = MISSING
    lr: float | None = None  # None = optim.lr
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # start the stage from the weights alone: AdamW's moments and step count begin afresh at its first step
    # (CrystalCoder's phase 3: Cerebras' `is_pretrained_checkpoint: True` loads the model, not the optimizer)
    fresh_optimizer: bool = False


@dataclass
class TrainerConfig:
    """How the run executes: backend, devices, batch geometry, length, resume."""

    backend: str = "native"  # native | megatron
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    seq_len: int = MISSING
    global_batch_size: int = MISSING  # sequences per optimizer step, over all ranks
    micro_batch_size: int = MISSING  # sequences per forward/backward on one rank
    max_steps: int = MISSING
    seed: int = 42
    log_every: int = 1
    resume: str | None = "none"  # none (or null) | auto | <checkpoint path> | <step>
    init_from: str | None = None  # checkpoint whose weights start a new run (fine-tuning, fresh optimizer)
    distributed: str = "ddp"  # ddp | fsdp (native backend under torchrun)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    loss_spike_factor: float = 3.0  # (> 1) a loss above factor x running mean is logged as a spike
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    """When to save published checkpoints, and crash-recovery ones."""

    policy: str = "every_n"  # every_n | per_chunk | log_spaced | list
    every: int = 1000
    log_spaced_until: int = 512  # log_spaced: 0,1,2,4,..,until then every `every`
    steps: list[int] = field(default_factory=list)  # policy=list
    ephemeral_every: int = 0  # 0 = off; recovery checkpoints, never published
    keep_ephemeral: int = 1
    save_final: bool = True  # also publish the run's last step and each stage's last step


@dataclass
class TrackingConfig:
    """MLflow metrics and DVC versioning of shards and checkpoints."""

    mlflow: bool = True
    mlflow_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths resolve in the workspace
    experiment: str = "open360"
    metric_buffer_steps: int = 50
    system_metrics: bool = False
    dvc: bool = True
    dvc_push: bool = True
    dvc_remote: str | None = None  # None = the repository's default remote


@dataclass
class Open360Config:
    """The whole composed configuration of one run."""

    run_name: str = MISSING
    workspace: str = "."  # where shards/, checkpoints/, mlflow.db live
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    tracking: TrackingConfig = MISSING
    stages: list[StageConfig] = field(default_factory=list)  # empty = one stage from data/schedule
