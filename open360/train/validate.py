"""Range checks of a training config, made before a run writes anything (and under `--cfg job`)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from open360.config.schema import resume_is_off
from open360.credentials import holds_credentials, mask_value

POSITIVE_INTS = (
    "trainer.global_batch_size",
    "trainer.micro_batch_size",
    "trainer.seq_len",
    "trainer.log_every",
    "trainer.tensor_parallel",
    "trainer.pipeline_parallel",
)


def check_init_from(init_from: object) -> None:
    """trainer.init_from must be a checkpoint folder (it holds lineage.json)."""
    if not (Path(str(init_from)).expanduser() / "lineage.json").is_file():
        raise ValueError(
            f"trainer.init_from={init_from}: not a checkpoint folder (no lineage.json); give a "
            "checkpoints/<run>/step_<N> path (relative to where the command runs, or absolute)"
        )


def check_resume_path(resume: object) -> None:
    """trainer.resume given as a path (not none/auto/<step>) must be a checkpoint folder: checked here, before
    the run's checkpoint folders are created, as find_resume_checkpoint would later."""
    from open360.checkpoint import CheckpointError
    from open360.train.state import resume_path

    value = str(resume).strip()
    if resume_is_off(value) or value == "auto" or value.isdigit():
        return
    try:
        resume_path(value)
    except CheckpointError as err:
        raise ValueError(str(err)) from err


def check_resume_step(cfg: DictConfig) -> None:
    """trainer.resume given as a step must name a complete checkpoint of this run: checked here, before Hydra's
    outputs/ and the run's folders are written, as find_resume_checkpoint would later (a step a crash left mid-replace,
    as `.old-step_N-*`, passes: the start restores it before looking)."""
    from open360.checkpoint import CheckpointError
    from open360.checkpoint.io import interrupted_replacement
    from open360.tracking.checkpoints import run_dirs
    from open360.train.state import find_resume_checkpoint

    value = str(cfg.trainer.resume).strip()
    if not value.isdigit():
        return
    workspace = Path(str(cfg.workspace)).expanduser().resolve()
    folders = run_dirs(workspace, str(cfg.run_name))
    try:
        find_resume_checkpoint(value, *folders)
    except CheckpointError as err:
        if not any(interrupted_replacement(folder, int(value)) for folder in folders):  # restored at the start
            raise ValueError(str(err)) from err


def check_recipes(cfg: DictConfig) -> None:
    """The data recipe (or each stage's) loads and validates: a missing or malformed recipe fails here,
    naming it, instead of after the run's folders exist."""
    from open360.data.recipe import load_recipe

    seed = cfg.data.seed
    keys = [f"stages.{i}.recipe" for i in range(len(cfg.stages))] if cfg.stages else ["data.recipe"]
    for key in keys:
        recipe = OmegaConf.select(cfg, key)
        try:
            spec = load_recipe(str(recipe), seed)
        except ValueError as err:
            raise ValueError(f"{key}={recipe}: {err}") from err
        if int(spec.seq_len) != int(cfg.trainer.seq_len):  # else refused only once its shards are built
            raise ValueError(
                f"trainer.seq_len={cfg.trainer.seq_len}: {key}={recipe} builds sequences of {spec.seq_len} tokens; "
                f"set trainer.seq_len={spec.seq_len} or change the recipe's seq_len"
            )


def check_tracking_uri(cfg: DictConfig) -> None:
    """No credentials in tracking.mlflow_uri: Hydra saves the command line and the composed config in the
    clear under outputs/<run>/<time>/.hydra/; the MLflow client reads them from the environment."""

    uri = str(cfg.tracking.mlflow_uri)
    if holds_credentials(uri):  # also with tracking=off: Hydra records it all the same
        raise ValueError(
            f"tracking.mlflow_uri={mask_value(uri)}: holds credentials, which Hydra would save in the clear under "
            "outputs/; give the URI without them and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN) in the environment"
        )


def check_parallel_layout(cfg: DictConfig) -> None:
    """The global batch splits into whole micro-batches over the processes torchrun started (WORLD_SIZE), and
    tensor/pipeline parallelism is asked of the backend that has it: checked here, not once the run's folders,
    Hydra's outputs/ and its MLflow run exist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gbs, mbs = int(cfg.trainer.global_batch_size), int(cfg.trainer.micro_batch_size)
    tp, pp = int(cfg.trainer.tensor_parallel), int(cfg.trainer.pipeline_parallel)
    if str(cfg.trainer.backend) == "megatron":
        from open360.backends.megatron.layout import layout_for_run

        layout_for_run(cfg, world, gbs, mbs)  # LayoutError (a ValueError) naming the key
        return
    if tp > 1 or pp > 1:
        raise ValueError(
            f"trainer.tensor_parallel={tp}, trainer.pipeline_parallel={pp}: tensor and pipeline parallelism run on "
            "trainer.backend=megatron; the native backend does data parallelism (DDP/FSDP) only"
        )
    if gbs % (mbs * world):
        raise ValueError(
            f"trainer.global_batch_size={gbs} must be a multiple of trainer.micro_batch_size={mbs} x world size "
            f"{world} (WORLD_SIZE, the processes torchrun started); change one of them"
        )


def check_training_config(cfg: DictConfig) -> None:
    """ValueError naming the key for any value a run would refuse later, after folders or shards exist:
    the schedule (stages, steps, LR), the cadence, the batch geometry, the precision and the optimizer."""
    from open360.checkpoint.cadence import CadencePolicy
    from open360.train.optim import check_optimizer_values
    from open360.train.pipeline import resolve_precision
    from open360.train.schedules import build_stages

    for key in POSITIVE_INTS:
        if int(OmegaConf.select(cfg, key)) < 1:
            raise ValueError(f"{key}={OmegaConf.select(cfg, key)}: must be >= 1")
    gbs, mbs = int(cfg.trainer.global_batch_size), int(cfg.trainer.micro_batch_size)
    if gbs % mbs:
        raise ValueError(
            f"trainer.global_batch_size={gbs} is not a multiple of trainer.micro_batch_size={mbs} "
            "(a step accumulates whole micro-batches on every data-parallel rank)"
        )
    seq_len = int(cfg.trainer.seq_len)
    if seq_len > int(cfg.model.max_seq_len):
        raise ValueError(
            f"trainer.seq_len={seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}: the model (and its "
            "HF export) would claim a shorter context than it was trained on; raise model.max_seq_len"
        )
    if not float(cfg.trainer.loss_spike_factor) > 1:
        raise ValueError(
            f"trainer.loss_spike_factor={cfg.trainer.loss_spike_factor}: must be > 1 (a loss above factor x its "
            "running mean is logged as a spike)"
        )
    if not 0 <= int(cfg.trainer.seed) < 2**63:
        raise ValueError(f"trainer.seed={cfg.trainer.seed}: must be >= 0 and < 2**63")
    if cfg.data.seed is not None and not 0 <= int(cfg.data.seed) < 2**63:  # else blamed on the recipe's `seed`
        raise ValueError(f"data.seed={cfg.data.seed}: must be >= 0 and < 2**63 (or null: the recipe's own seed)")
    if int(cfg.data.build_workers) < 0:
        raise ValueError(f"data.build_workers={cfg.data.build_workers}: must be >= 0 (0 or 1 = build in this process)")
    _check_choices(cfg)
    check_parallel_layout(cfg)
    if int(cfg.tracking.metric_buffer_steps) < 1:
        raise ValueError(f"tracking.metric_buffer_steps={cfg.tracking.metric_buffer_steps}: must be >= 1")
    if cfg.trainer.init_from and resume_is_off(cfg.trainer.resume):  # a resume may not need it: see _run
        check_init_from(cfg.trainer.init_from)
    check_resume_path(cfg.trainer.resume)
    check_resume_step(cfg)
    check_tracking_uri(cfg)
    check_optimizer_values(cfg.optim)
    resolve_precision(str(cfg.trainer.precision), "cpu")
    last = build_stages(cfg)[-1].end
    CadencePolicy.from_config(cfg.checkpoint)
    beyond = sorted(int(s) for s in cfg.checkpoint.steps if int(s) > last)
    if cfg.checkpoint.policy == "list" and beyond:
        raise ValueError(
            f"checkpoint.steps={beyond}: beyond the run's last step {last} (trainer.max_steps / stages), so never "
            "saved; drop them or train longer"
        )
    check_recipes(cfg)


def _check_choices(cfg: DictConfig) -> None:
    """Keys that take one of a few words: a misspelling fails here, not after the run's folders exist."""
    from open360.backends.native import DISTRIBUTED_MODES
    from open360.train.pipeline import BACKENDS
    from open360.train.resources import DEVICES

    for key, choices in (
        ("trainer.device", DEVICES),
        ("trainer.backend", BACKENDS),
        ("trainer.distributed", DISTRIBUTED_MODES),
    ):
        value = str(OmegaConf.select(cfg, key))
        if value not in choices:
            raise ValueError(f"{key}={value!r}: expected one of {', '.join(choices)}")
