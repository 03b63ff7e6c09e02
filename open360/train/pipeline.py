"""`run_training(cfg, device)`: wires shards, model, optimizer, schedule, checkpoints and callbacks."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig, OmegaConf

from open360.backends.native import (
    DistEnv,
    barrier,
    first_error,
    init_distributed,
    parallelize,
    shutdown_distributed,
)
from open360.checkpoint.branches import (
    branch_folder,
    pending_branches,
    write_pending_branch,
)
from open360.checkpoint.cadence import CadencePolicy
from open360.checkpoint.io import (
    MODEL_FILE,
    RNG_FILE,
    TRAINER_STATE_FILE,
    CheckpointError,
    check_architecture,
    check_writable,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    read_config,
    read_lineage,
    remove_stale_temp_dirs,
    verify_checkpoint,
)
from open360.checkpoint.lineage import config_hash, git_revision, hardware_record, history_to_inherit
from open360.checkpoint.writer import CheckpointWriter
from open360.credentials import mask_secrets
from open360.paths import resolve_workspace_path
from open360.tracking.checkpoints import finish_pending_branches, run_checkpoints, run_dirs
from open360.train.callbacks import Callback, RunInfo
from open360.train.optim import build_optimizer
from open360.train.progress import format_summary, peak_flops
from open360.train.resources import check_megatron_available, disk_space_warning
from open360.train.schedules import Stage, build_stages
from open360.train.state import (
    check_fresh_optimizer_kept,
    check_resume_compatible,
    check_resume_recipe,
    check_rng_state,
    check_trainer_state,
    find_resume_checkpoint,
    rng_untouched,
    seed_everything,
)
from open360.train.trainer import (
    StageData,
    Trainer,
    TrainerSettings,
    TrainingDiverged,
    TrainingError,
)
from open360.train.validate import check_init_from, check_training_config

BACKENDS = ("native", "megatron")


def resolve_precision(precision: str, device: str) -> torch.dtype | None:
    """Autocast dtype: `auto` is bf16 on CUDA and fp32 (None) on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    raise ValueError(f"trainer.precision={precision!r}: expected auto, bf16 or fp32")


class ShardProvider:
    """Builds (or pulls, or reuses) each stage's shards on first use and opens its deterministic data order."""

    def __init__(self, cfg: DictConfig, workspace: Path, env: DistEnv) -> None:
        self.cfg = cfg
        self.workspace = workspace
        self.env = env
        self.shards_root = resolve_workspace_path(workspace, cfg.data.shards_dir)
        self.shard_dirs: dict[str, Path] = {}
        self.listeners: list[Callable[[str, Path], None]] = []  # told (stage name, shard folder) as each opens

    def build(self, stage: Stage) -> Path:
        """The shard folder of a stage's recipe: rank 0 pulls it when the workspace's DVC records it and this
        machine lacks it (a clone of a published workspace), else builds or reuses it; the others wait."""
        from open360.data import build_shards

        recipe = str(stage.recipe)  # build_shards resolves it (working directory, then repository root)
        if self.env.is_main:
            from open360.tracking import pull_shards, version_shards

            pull_shards(self.planned(stage), self.workspace, self.cfg)
            shard_dir = build_shards(
                recipe, self.shards_root, self.cfg.data.seed, int(self.cfg.data.build_workers)
            )
            version_shards(shard_dir, self.workspace, self.cfg)
        barrier(self.env)
        if not self.env.is_main:
            shard_dir = build_shards(
                recipe, self.shards_root, self.cfg.data.seed, int(self.cfg.data.build_workers)
            )
        self.shard_dirs[stage.name] = Path(shard_dir)
        return Path(shard_dir)

    def planned(self, stage: Stage) -> Path:
        """The shard folder of a stage's recipe, known without building or pulling anything."""
        from open360.data.build import planned_shard_dir

        return planned_shard_dir(str(stage.recipe), self.shards_root, self.cfg.data.seed)

    def open(self, stage: Stage) -> StageData:
        """Open a stage's data: order, chunk ends as global steps, provenance for lineage.json (building,
        pulling and versioning its shards leave the training RNGs where they were)."""
        with rng_untouched():
            return self._open(stage)

    def _open(self, stage: Stage) -> StageData:
        from open360.data import DataOrder, ShardSet

        shard_dir = self.build(stage)
        shards = ShardSet.open(shard_dir)
        seq_len, vocab = int(self.cfg.trainer.seq_len), int(self.cfg.model.vocab_size)
        if shards.seq_len != seq_len:
            raise TrainingError(
                f"stage {stage.name!r}: shards in {shard_dir} hold sequences of {shards.seq_len} tokens but "
                f"trainer.seq_len={seq_len}; set trainer.seq_len={shards.seq_len} or change the recipe's seq_len"
            )
        tok_vocab = shards.tokenizer().get_vocab_size()
        if tok_vocab > vocab:
            raise TrainingError(
                f"stage {stage.name!r}: the tokenizer of {shard_dir} has {tok_vocab} tokens but "
                f"model.vocab_size={vocab}; raise model.vocab_size to at least {tok_vocab}"
            )
        order = DataOrder(shards, shards.seed, int(self.cfg.trainer.global_batch_size))
        chunk_ends = [stage.start + s for s in order.chunk_end_steps() if 0 < s <= stage.steps]
        if stage.steps > order.steps_per_epoch and self.env.is_main:
            print(
                f"open360.train: warning: stage {stage.name!r} trains {stage.steps} steps, more than one epoch of "
                f"{shard_dir.name} ({order.steps_per_epoch} steps of {order.global_batch_size}); the steps after "
                "that see its sequences again, in a seeded reshuffle",
                file=sys.stderr,
            )
        if stage.schedule.warmup_steps >= stage.steps and self.env.is_main:
            print(
                f"open360.train: warning: stage {stage.name!r} trains {stage.steps} steps, within its "
                f"{stage.schedule.warmup_steps} warmup steps: its learning rate never reaches the peak "
                f"{stage.lr:g} and never decays",
                file=sys.stderr,
            )
        ragged = [k for k, n in enumerate(shards.chunk_sizes) if n % order.global_batch_size]
        if ragged and self.cfg.checkpoint.policy == "per_chunk" and self.env.is_main:
            print(
                f"open360.train: warning: stage {stage.name!r}: chunks {ragged[:5]}{'...' if len(ragged) > 5 else ''} "
                f"of {shard_dir.name} are not a multiple of the global batch ({order.global_batch_size}), so a "
                "per-chunk checkpoint also holds the first sequences of the next chunk (its lineage records "
                "exactly which); set the recipe's chunk_multiple to the global batch size to align them",
                file=sys.stderr,
            )
        if self.env.is_main:  # which shard folder (built, reused or pulled) this stage reads
            print(
                f"open360.train: stage {stage.name!r}: shards {_relative(shard_dir, self.workspace)} "
                f"({shards.num_sequences:,} sequences of {shards.seq_len} tokens in {len(shards.chunk_sizes)} "
                f"chunks, {order.steps_per_epoch:,} steps of {order.global_batch_size} per epoch)",
                flush=True,
            )
        lineage = {
            "stage": stage.name,
            "recipe": str(stage.recipe),
            "shard_dir": _relative(shard_dir, self.workspace),
            "manifest_hash": shards.manifest_hash,
            "tokenizer_hash": shards.tokenizer_hash,
        }

        def seen_range(steps_done: int) -> dict[str, Any]:
            return _seen_summary(order, steps_done)

        for listener in self.listeners:
            listener(stage.name, shard_dir)
        return StageData(order=order, chunk_end_steps=chunk_ends, lineage=lineage, seen_range=seen_range)


def _seen_summary(order: Any, steps_done: int) -> dict[str, Any]:
    """Sequence ids consumed by the first `steps_done` steps of a stage: count, min, max, contiguity.

    Epoch 0 consumes ids [0, steps * B) in order (DataOrder's contract), so that case needs no id list.
    """
    if steps_done <= 0:
        return {"count": 0}
    if steps_done <= order.steps_per_epoch:
        end = steps_done * order.global_batch_size
        return {"count": end, "min_id": 0, "max_id": end - 1, "contiguous": True, "epochs": 1}
    ids = order.seen_ids(steps_done)  # sorted, unique
    lo, hi = int(ids[0]), int(ids[-1])
    return {
        "count": int(len(ids)),
        "min_id": lo,
        "max_id": hi,
        "contiguous": hi - lo + 1 == len(ids),
        "epochs": -(-steps_done // order.steps_per_epoch),
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _build_callbacks(cfg: DictConfig, workspace: Path, env: DistEnv) -> list[Callback]:
    from open360.tracking import build_callbacks

    return list(build_callbacks(cfg, workspace, env.is_main))


def run_training(cfg: DictConfig, device: str, init_from: Path | None = None) -> dict[str, Any]:
    """Train the configured run end to end (resuming when asked) and return the run summary.

    `init_from`: a checkpoint directory whose weights start the model (fine-tuning; a fresh optimizer
    and step 0). A resumed run takes its weights from the resume checkpoint instead.
    """
    check_training_config(cfg)
    backend = str(cfg.trainer.backend)  # one of BACKENDS; TP/PP only on megatron (check_training_config)
    if backend == "megatron":
        check_megatron_available(device)
    env = init_distributed(device)
    try:
        with exclusive_run(cfg, env):
            return _run(cfg, device, env, init_from)
    finally:
        if backend == "megatron":
            from open360.backends.megatron.engine import destroy_parallel

            destroy_parallel()
        shutdown_distributed()


RUN_LOCK_FILE = ".run.lock"


def lock_run(recovery_dir: Path, run_name: str) -> IO[str] | None:
    """Take the run's exclusive lock (an flock on `recovery/<run>/.run.lock`, released by the kernel when the
    process ends, SIGKILL included) and return its open file; CheckpointError naming the holder when another
    process trains this run_name in this workspace now: two such runs both start from the same empty folder and
    replace each other's step_N checkpoints without a word (and one's start deletes the other's saves in
    progress). None, with a warning, on a filesystem without flock."""
    import fcntl

    check_writable(recovery_dir)
    path = Path(recovery_dir) / RUN_LOCK_FILE
    f = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise CheckpointError(
            f"run '{run_name}' is being trained now by {holder} (it holds {path}); a second run of the same "
            "run_name in this workspace would overwrite its checkpoints step by step. Wait for it to end (then "
            "continue with trainer.resume=auto), stop it, or give this run another run_name"
        ) from None
    except OSError as err:  # flock not supported (some Lustre / NFS mounts): no guard, but training goes on
        f.close()
        print(f"open360.train: warning: {path}: cannot lock ({err}); nothing stops a second run of '{run_name}' "
              "from writing into this run's folder at the same time", file=sys.stderr)
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    f.flush()
    return f


@contextlib.contextmanager
def exclusive_run(cfg: DictConfig, env: DistEnv) -> Iterator[None]:
    """Rank 0 holds the run's lock (`lock_run`) while the block runs; when another process holds it, every
    rank raises its CheckpointError before anything of the run is touched."""
    held, error = None, None
    if env.is_main:
        _, recovery_dir = run_dirs(Path(cfg.workspace).expanduser().resolve(), str(cfg.run_name))
        try:
            held = lock_run(recovery_dir, str(cfg.run_name))
        except CheckpointError as err:
            error = str(err)
    if error := first_error(env, error):
        raise CheckpointError(error)
    try:
        yield
    finally:
        if held is not None:
            held.close()


def build_settings(cfg: DictConfig, device: str, env: DistEnv) -> TrainerSettings:
    """Batch geometry, precision, guards and FLOP figures of the run, from cfg.trainer/optim/model."""
    from open360.models import training_flops_per_token

    seq_len = int(cfg.trainer.seq_len)
    autocast = resolve_precision(str(cfg.trainer.precision), device)
    return TrainerSettings(
        global_batch_size=int(cfg.trainer.global_batch_size),
        micro_batch_size=int(cfg.trainer.micro_batch_size),
        seq_len=seq_len,
        grad_clip=float(cfg.optim.grad_clip),
        autocast_dtype=autocast,
        loss_spike_factor=float(cfg.trainer.loss_spike_factor),
        log_every=int(cfg.trainer.log_every),
        progress_bar=bool(cfg.trainer.progress_bar),
        flops_per_token=training_flops_per_token(cfg.model, seq_len),
        # the peaks are bf16 tensor-core figures: an fp32 run's MFU against them would read ~15x low (H100)
        peak_flops=peak_flops(env.device) if autocast == torch.bfloat16 else None,
    )


def _load_initial_weights(model: torch.nn.Module, checkpoint: Path, model_cfg: Any) -> dict[str, Any]:
    """Load a checkpoint's weights into a freshly built model; returns what lineage.json records of it."""
    init = Path(checkpoint).expanduser().resolve()
    lineage = verify_checkpoint(init)
    check_architecture(init, model_cfg, "trainer.init_from")
    model.load_state_dict(load_model_weights(init / MODEL_FILE))
    return {
        "checkpoint": str(init),
        "step": lineage.get("step"),
        "model_sha256": lineage["files"][MODEL_FILE],
        # which sequences the weights had seen before this run (memorization's `seen`, the release card)
        "data_history": history_to_inherit(lineage, int(read_config(init).trainer.global_batch_size)),
    }


def _recorded_init(checkpoint: Path, lineage: dict[str, Any], init_from: Path | None) -> dict[str, Any] | None:
    """The warm start (`init_from`) the resumed checkpoint records; a trainer.init_from given now must name
    that same checkpoint (by path or by its weights' sha256), and its folder need not exist any more."""
    recorded = lineage.get("init_from")
    if init_from is None:
        return recorded
    given = Path(init_from).expanduser().resolve()
    if recorded is None:
        raise TrainingError(
            f"trainer.init_from={init_from}: {checkpoint} records no warm start (its run started from scratch, or "
            "was resumed without trainer.init_from by an open360 from before 2026-11-27, which dropped the record); "
            "drop trainer.init_from to resume it, or start a new run_name from those weights"
        )
    try:
        given_sha = read_lineage(given).get("files", {}).get(MODEL_FILE)
    except CheckpointError:
        given_sha = None
    if str(given) != recorded.get("checkpoint") and given_sha != recorded.get("model_sha256"):
        raise TrainingError(
            f"trainer.init_from={init_from}: the run resumed from {checkpoint} started from "
            f"{recorded.get('checkpoint')} (step {recorded.get('step')}); resume it without trainer.init_from"
        )
    return recorded


def resume(trainer: Trainer, checkpoint: Path, planned: Callable[[Stage], Path] | None = None) -> dict[str, Any]:
    """Load a checkpoint into the trainer after checking it fits the configured stages, data and tokenizer
    (`planned`: a stage's shard folder, checked against the checkpoint's before any shards are built).

    Returns the callbacks' run metadata recorded in the checkpoint (e.g. the MLflow run id to continue).
    """
    # Hashed once per node (every file lineage.json lists, megatron/ shards included), not once per rank;
    # the megatron backend reads its own sharded weights, so model.safetensors is not loaded for it.
    error = None
    if trainer.env.local_rank == 0:
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError as err:
            error = str(err)
    if error := first_error(trainer.env, error):
        raise CheckpointError(error)
    contents = load_checkpoint(checkpoint, verify=False, weights=trainer.backend != "megatron")
    recorded = contents.lineage.get("backend", "native")
    if recorded != trainer.backend:
        raise TrainingError(
            f"{checkpoint}: written by the {recorded} backend, this run uses trainer.backend={trainer.backend}; "
            f"a checkpoint resumes only on its own backend. Start from its weights with "
            f"trainer.init_from={checkpoint} (fresh optimizer) instead"
        )
    check_trainer_state(Path(checkpoint) / TRAINER_STATE_FILE, contents.trainer_state)
    check_rng_state(Path(checkpoint) / RNG_FILE, contents.rng)
    total = trainer.stages[-1].end
    if int(contents.trainer_state["step"]) > total:
        raise TrainingError(
            f"{checkpoint}: checkpoint of step {contents.trainer_state['step']}, beyond the {total} steps this "
            "config trains (trainer.max_steps / stages); raise trainer.max_steps or resume from an earlier step"
        )
    stage_state = contents.trainer_state["stage"]
    stage = next((s for s in trainer.stages if s.index == stage_state["index"]), None)
    if stage is None or stage.name != stage_state["name"]:
        raise TrainingError(
            f"{checkpoint}: checkpoint is in stage {stage_state['name']!r}, which the config's stages do "
            "not have at that position; resume with the original `stages`"
        )
    saved_stages = OmegaConf.create(contents.config_yaml).get("stages") or []
    check_fresh_optimizer_kept(checkpoint, saved_stages, trainer.stages, int(contents.trainer_state["step"]))
    check_architecture(checkpoint, OmegaConf.create(trainer.config_yaml).model, "trainer.resume")
    if planned is not None:
        check_resume_recipe(checkpoint, contents.lineage, stage.name, str(stage.recipe), planned(stage))
    data = trainer.stage_data(stage)
    check_resume_compatible(
        checkpoint, contents.lineage, stage.name, data.lineage["manifest_hash"], data.lineage["tokenizer_hash"]
    )
    trainer.load_state_dict(
        {
            "model": contents.model,
            "optimizer": contents.optimizer,
            "trainer": contents.trainer_state,
            "rng": contents.rng,
            "checkpoint_dir": Path(checkpoint),
        }
    )
    return dict(contents.lineage.get("callbacks", {}))


def warn_if_schedule_changed(checkpoint: Path, stages: list[Stage], step: int) -> None:
    """A resume takes its hyperparameters from the config: say so when that changes the learning rate the
    checkpoint's own config gives at the next step (a longer max_steps stretches a cosine, say)."""
    from open360.train.schedules import lr_at

    try:
        old_cfg = read_config(checkpoint)
        if old_cfg.stages:  # its stages uncut by its max_steps: a longer run goes on along the same schedule
            total = sum(int(st.steps) for st in old_cfg.stages)
            old_cfg = OmegaConf.merge(old_cfg, {"trainer": {"max_steps": total}})
        before = build_stages(old_cfg)
    except Exception:  # noqa: BLE001 - an older or partial config: nothing to compare against
        return
    if step >= stages[-1].end:
        return
    ended = step >= before[-1].end  # extending a finished run: compare with where its schedule ended
    old, new = lr_at(before, min(step, before[-1].end - 1)), lr_at(stages, step)
    if abs(old - new) > 1e-9 * max(abs(old), abs(new), 1e-30):
        where = (
            f"{checkpoint}'s config.yaml ended its schedule at step {before[-1].end} with {old:.3e}"
            if ended
            else f"{old:.3e} under {checkpoint}'s config.yaml"
        )
        print(
            f"open360.train: warning: at step {step + 1} the learning rate is {new:.3e} under this config, "
            f"{where}: the run goes on along another schedule (the checkpoints it saves record this config)",
            file=sys.stderr,
        )


def _recorded_after(workspace: Path, run_name: str, step: int) -> bool:
    """Whether checkpoints.dvc records checkpoints of this run after `step` (a clone may not hold them),
    tracking.dvc or not: the branch moves their records as it does their folders."""
    return any(entry.step > step for entry in run_checkpoints(workspace, run_name))


def _run(cfg: DictConfig, device: str, env: DistEnv, init_from: Path | None) -> dict[str, Any]:
    workspace = Path(cfg.workspace).expanduser().resolve()
    run_name = str(cfg.run_name)
    published_dir, recovery_dir = run_dirs(workspace, run_name)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    # What every checkpoint records (config.yaml, its hash) has secrets masked: it is published.
    recorded_config = mask_secrets(config_dict)
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(recorded_config))
    stages = build_stages(cfg)
    cadence = CadencePolicy.from_config(cfg.checkpoint)
    if env.is_main:
        for d in (published_dir, recovery_dir):
            check_writable(d)
            remove_stale_temp_dirs(d)
    settings = build_settings(cfg, device, env)  # the layout was checked with the config (check_parallel_layout)
    # A branch's journal entry stays until the tracking callbacks have started this run as that branch: a crash
    # before then (while its later checkpoints move, or just after) leaves the entry, and a resume from its step
    # is still the branch (MLflow starts the branch's own run, not continuing the replaced run's history).
    interrupted: dict[int, str] = {}  # from_step -> superseded folder of a branch a crash cut short
    journal: list[Path] = []
    if env.is_main:  # a branch a crash interrupted is finished before anything else (DVC or not)
        for marker, entry in pending_branches(recovery_dir):
            interrupted[int(entry["from_step"])] = str(entry["superseded"])
            journal.append(marker)
        finish_pending_branches(workspace, run_name, keep_journal=True)
    barrier(env)
    resume_from = find_resume_checkpoint(str(cfg.trainer.resume), published_dir, recovery_dir)
    if resume_from is None and init_from is not None:  # a fresh start (also under resume=auto) needs its base
        check_init_from(init_from)

    callbacks = _build_callbacks(cfg, workspace, env)
    for cb in callbacks:  # a tracking server that is down fails now, not after the shards and model are built
        cb.preflight()
    seed_everything(int(cfg.trainer.seed))
    from open360.models import build_model

    model = build_model(cfg.model)
    resumed_lineage = read_lineage(resume_from) if resume_from is not None else {}
    if resume_from is not None:  # the weights come from the checkpoint; its warm start stays on record
        init_record = _recorded_init(resume_from, resumed_lineage, init_from)
    else:
        init_record = _load_initial_weights(model, init_from, cfg.model) if init_from is not None else None
    shards = ShardProvider(cfg, workspace, env)
    shards.listeners = [cb.on_stage_open for cb in callbacks]
    writer = CheckpointWriter(
        published_dir, recovery_dir, int(cfg.checkpoint.keep_ephemeral), background=env.device.type == "cuda"
    )
    hardware = hardware_record(env.device, env.world_size)
    lineage_base = {
        "run_name": run_name,
        "code": git_revision(),
        "config_hash": config_hash(recorded_config),
        "torch_version": torch.__version__,
        "hardware": hardware,
        **({"init_from": init_record} if init_record else {}),
    }
    common = dict(
        stages=stages,
        settings=settings,
        env=env,
        open_stage=shards.open,
        cadence=cadence,
        writer=writer if env.is_main else None,
        callbacks=callbacks,
        config_yaml=config_yaml,
        lineage_base=lineage_base,
    )
    trainer: Trainer
    if cfg.trainer.backend == "megatron":
        from open360.backends.megatron.trainer import create_megatron_trainer

        # The native initializer (same seed) gives the weights, so both backends start identically.
        trainer = create_megatron_trainer(cfg, model.state_dict(), (published_dir, recovery_dir), **common)
        del model
        lineage_base["parallel_layout"] = vars(trainer.engine.layout)
    else:
        model = model.to(env.device)
        module = parallelize(model, env, str(cfg.trainer.distributed), settings.autocast_dtype)
        optimizer = build_optimizer(model, cfg.optim)  # after parallelize: FSDP2 swaps in sharded parameters
        trainer = Trainer(model=model, module=module, optimizer=optimizer, **common)
    lineage_base["backend"] = trainer.backend  # what resume() checks a checkpoint against

    branch: dict[str, Any] | None = None
    if resume_from is not None:
        resumed_metadata = resume(trainer, resume_from, shards.planned)
        lineage_base["resumed_from"] = {  # where this run's optimizer, data position and RNG came from
            "checkpoint": str(Path(resume_from).resolve()),
            "run_name": resumed_lineage.get("run_name"),
            "step": resumed_lineage.get("step"),
            "model_sha256": (resumed_lineage.get("files") or {}).get(MODEL_FILE),
        }
        if env.is_main:
            warn_if_schedule_changed(resume_from, stages, trainer.progress.step)
        step, moved = trainer.progress.step, {}
        if env.is_main and step in interrupted:  # the move of this branch was cut short: still a branch (its
            # later checkpoints are moved aside now, so the test below no longer sees them; MLflow must not
            # continue the replaced run, whose history after the step would take this branch's values)
            branch = {"from_step": step, "superseded": interrupted[step]}
        elif env.is_main and str(cfg.trainer.resume).strip() != "auto":  # an explicit step: maybe a new branch
            on_disk = list_checkpoints(published_dir) + list_checkpoints(recovery_dir)
            if any(s > step for s, _ in on_disk) or _recorded_after(workspace, run_name, step):  # else it continues
                branch = {"from_step": step, "superseded": branch_folder(step, published_dir, recovery_dir)}
                # journaled, DVC or not: a crash halfway (published moved, recovery not) is finished by the next
                # start, whose resume=auto would otherwise continue the replaced branch from its recovery step
                journal.append(write_pending_branch(recovery_dir, step, branch["superseded"]))
                # in a DVC workspace their checkpoints.dvc records move too, tracking.dvc or not: a record left
                # behind lists (and `ckpt pull` brings back) a replaced checkpoint as the run's
                moved = finish_pending_branches(workspace, run_name, keep_journal=True)
            if moved:
                print(
                    f"open360.train: resuming from step {trainer.progress.step}: this run's later checkpoints "
                    f"(steps {sorted(moved)}) moved to {sorted({str(p.parent) for p in moved.values()})} — they belong to "
                    "the run this one replaces",
                    flush=True,
                )
        barrier(env)
        if env.is_main:
            print(f"open360.train: resumed from {resume_from} (step {trainer.progress.step})", flush=True)
    else:
        resumed_metadata = {}
        trainer.stage_data(stages[0])

    info = RunInfo(
        run_name=run_name,
        workspace=workspace,
        checkpoint_dir=published_dir,
        config=config_dict,
        config_yaml=config_yaml,
        start_step=trainer.progress.step,
        is_main_process=env.is_main,
        extra={
            **resumed_metadata,
            "resumed_from": str(resume_from) if resume_from else None,
            "branch": branch,  # {from_step, superseded: folder under superseded/} when resume replaces later steps
            "shard_dirs": {k: str(v) for k, v in shards.shard_dirs.items()},
            "hardware": hardware,
            "init_from": init_record["checkpoint"] if init_record else None,
        },
    )
    if env.is_main:
        to_come = len(cadence.published_steps(trainer.progress.step + 1, stages[-1].end))
        if warning := disk_space_warning(cfg, to_come):
            print(f"open360.train: warning: {warning}", file=sys.stderr, flush=True)
    start_callbacks(callbacks, info)
    for marker in journal:  # the tracking knows of the branch now: a crash from here on is an ordinary resume
        marker.unlink(missing_ok=True)
    summary: dict[str, Any] = {"status": "failed", "run_name": run_name}
    try:
        summary = {"run_name": run_name, **trainer.train()}
    except TrainingError as err:
        status = "diverged" if isinstance(err, TrainingDiverged) else "failed"
        summary = {"status": status, "run_name": run_name, "steps": trainer.progress.step, "error": str(err)}
        raise
    except KeyboardInterrupt:
        summary = {"status": "interrupted", "run_name": run_name, "steps": trainer.progress.step}
        raise
    finally:
        end_callbacks(callbacks, summary)
    if env.is_main:
        print_summary(summary)
    return summary


def start_callbacks(callbacks: list[Callback], info: RunInfo) -> None:
    """Every callback's `on_run_start` (leaving the training RNGs where they were). When one fails, or a signal
    comes, the callbacks already started, and the one that failed as far as it got, end the run as failed
    before the error goes on: a DVC worker would otherwise be killed at exit in the middle of its catch-up,
    and an MLflow run already started stay RUNNING."""
    started: list[Callback] = []
    try:
        with rng_untouched():
            for cb in callbacks:
                started.append(cb)
                cb.on_run_start(info)
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        summary = {"status": status, "run_name": info.run_name, "steps": info.start_step,
                   "error": f"a callback's start failed: {type(err).__name__}: {err}"}
        for cb in started:
            try:
                cb.on_run_end(summary)
            except BaseException as end_err:  # noqa: BLE001 - the start's error is the one raised
                print(f"open360.train: {type(cb).__name__} could not end the run after that: "
                      f"{type(end_err).__name__}: {end_err}", file=sys.stderr)
        raise


def end_callbacks(callbacks: list[Callback], summary: dict[str, Any]) -> None:
    """Every callback's `on_run_end`, also when a signal interrupts one of them (a second Ctrl-C or a
    SIGTERM while DVC's queue drains must not leave the MLflow run open); the interrupt is raised after."""
    interrupted: KeyboardInterrupt | None = None
    for cb in callbacks:
        try:
            cb.on_run_end(summary)
        except KeyboardInterrupt as err:
            interrupted = interrupted or err
    if interrupted is not None:
        raise interrupted


def print_summary(summary: dict[str, Any]) -> None:
    """Print the end-of-run summary table."""
    print(format_summary(summary), flush=True)
