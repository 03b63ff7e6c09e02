"""Resume state: every RNG state (weights_only-loadable), resume target selection, compatibility checks."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from open360.checkpoint.io import CheckpointError, list_checkpoints
from open360.config.schema import resume_is_off
from open360.train.schedules import Stage


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors/ints/lists (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])


@contextmanager
def rng_untouched() -> Iterator[None]:
    """Run side work (tracking callbacks, building/pulling/versioning shards) without moving the training
    RNGs: a run with tracking would otherwise carry other RNG states at its first step (MLflow's random run
    names draw from Python's `random`) than one without, and a random draw in training other values."""
    saved = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(saved)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume_path(resume: str) -> Path:
    """`trainer.resume` given as a path: it must be a complete checkpoint folder (one holding lineage.json)."""
    path = Path(resume).expanduser()
    if not (path / "lineage.json").is_file():
        raise CheckpointError(
            f"trainer.resume={resume}: {path} is not a complete checkpoint directory (no lineage.json); "
            "pass auto, a step number, or a checkpoints/<run>/step_<N> path"
        )
    return path


def find_resume_checkpoint(resume: str, published_dir: Path, recovery_dir: Path) -> Path | None:
    """Resolve `trainer.resume`: none, auto (newest complete checkpoint, published or recovery), a step, a path."""
    resume = str(resume).strip()
    candidates = list_checkpoints(published_dir) + list_checkpoints(recovery_dir)
    if resume_is_off(resume):
        if candidates:  # a fresh start would overwrite them step by step and mix two runs in one folder
            raise CheckpointError(
                f"{published_dir.parent}: run '{published_dir.name}' already has checkpoints (steps "
                f"{sorted({s for s, _ in candidates})}); trainer.resume=none would start it over on top of "
                "them. Continue it with trainer.resume=auto, branch from a step with trainer.resume=<step>, "
                "or give this run another run_name"
            )
        return None
    if resume == "auto":
        if not candidates:
            return None
        # newest step; at equal steps prefer the published copy (listed first, max is stable)
        best = max(candidates, key=lambda item: item[0])
        return best[1]
    if resume.isdigit():
        step = int(resume)
        for s, path in candidates:
            if s == step:
                return path
        have = ", ".join(str(s) for s, _ in sorted(candidates)) or "none"
        raise CheckpointError(
            f"trainer.resume={resume}: no complete checkpoint for step {step} in {published_dir} "
            f"or {recovery_dir} (steps available: {have})"
        )
    path = resume_path(resume)
    own = path.resolve().parent in (Path(published_dir).resolve(), Path(recovery_dir).resolve())
    if candidates and not own:  # its history is not this folder's: one folder, one chain of checkpoints
        raise CheckpointError(
            f"trainer.resume={resume}: a checkpoint from outside {published_dir} (a superseded branch, another "
            f"run), while this run's folder holds checkpoints (steps {sorted({s for s, _ in candidates})}) of "
            "its own history; continue it under another run_name, or resume this run by step"
        )
    return path


# trainer_state.json keys that a resume reads, with their types (a foreign or hand-made file fails here, naming
# the key, not with a KeyError deep in the trainer); loss and loss_ema are None before the first step
_NUMBER_OR_NONE = (int, float, type(None))
_TRAINER_STATE_TYPES = {
    "step": int, "tokens_seen": int, "loss_spikes": int, "global_batch_size": int, "seq_len": int, "stage": dict,
    "loader": dict, "data_history": list, "loss": _NUMBER_OR_NONE, "loss_ema": _NUMBER_OR_NONE,
}
_MISSING = object()


def check_trainer_state(file: Path, state: Any) -> None:
    """Raise CheckpointError naming `file` and the key when a loaded trainer_state.json lacks a key that a
    resume reads, or holds a value of another type there."""

    def check(key: str, value: Any, kind: type | tuple[type, ...]) -> None:
        if value is _MISSING or not isinstance(value, kind) or isinstance(value, bool):
            found = "missing" if value is _MISSING else f"{type(value).__name__} {str(value)[:40]!r}"
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CheckpointError(
                f"{file}: key {key!r} is {found}, {names} expected; the file was not written by open360 or was "
                "edited — resume from another step"
            )

    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: a JSON object is expected, found {type(state).__name__}; the checkpoint is corrupted")
    for key, kind in _TRAINER_STATE_TYPES.items():
        check(key, state.get(key, _MISSING), kind)
    check("stage.index", state["stage"].get("index", _MISSING), int)
    check("stage.name", state["stage"].get("name", _MISSING), str)
    for i, entry in enumerate(state["data_history"]):
        check(f"data_history[{i}]", entry, dict)
        check(f"data_history[{i}].stage_index", entry.get("stage_index", _MISSING), int)


def check_rng_state(file: Path, rng: Any) -> None:
    """Raise CheckpointError naming `file` unless a loaded rng.pt holds `{"ranks": [...]}` with a state that
    `restore_rng_state` takes for every rank (tried, then undone: the RNGs are left as they were)."""
    ranks = rng.get("ranks") if isinstance(rng, dict) else None
    if not isinstance(ranks, list) or not ranks:
        raise CheckpointError(
            f"{file}: no per-rank RNG states (key 'ranks', a non-empty list); the file was not written by open360 "
            "or was edited — resume from another step"
        )
    for i, entry in enumerate(ranks):
        try:
            with rng_untouched():
                restore_rng_state(entry)
        except (LookupError, TypeError, ValueError, AttributeError, OverflowError, RuntimeError) as err:
            raise CheckpointError(
                f"{file}: the RNG state of rank {i} cannot be restored ({type(err).__name__}: {err}); the file was "
                "not written by open360 or was edited — resume from another step"
            ) from err


_SAME_SHARDS = (
    "The run must continue on the exact shards it started on: restore the original data recipe, data.seed and "
    "tokenizer, or start a new run (different run_name, trainer.resume=none)."
)


def check_resume_compatible(
    checkpoint: Path, lineage: dict[str, Any], stage_name: str, manifest_hash: str, tokenizer_hash: str
) -> None:
    """Refuse to resume onto different data or tokenizer than the checkpoint (whose lineage.json is given)
    was trained on."""
    data = lineage.get("data", {})
    problems = []
    if data.get("stage") == stage_name:
        if data.get("manifest_hash") != manifest_hash:
            problems.append(
                f"data manifest hash {data.get('manifest_hash')} in the checkpoint, {manifest_hash} now"
            )
        if data.get("tokenizer_hash") != tokenizer_hash:
            problems.append(
                f"tokenizer hash {data.get('tokenizer_hash')} in the checkpoint, {tokenizer_hash} now"
            )
    elif data.get("stage") is not None:
        problems.append(
            f"checkpoint is in stage {data.get('stage')!r}, the config puts its step in {stage_name!r}"
        )
    if problems:
        raise CheckpointError(
            f"refusing to resume from {checkpoint}: " + "; ".join(problems) + ". " + _SAME_SHARDS
        )


def check_resume_recipe(
    checkpoint: Path, lineage: dict[str, Any], stage_name: str, recipe: str, planned_dir: Path
) -> None:
    """Refuse, before any shards are built, to resume a stage whose recipe (or data.seed) now names another
    shard folder than the checkpoint trained on: the folder's name carries the recipe's hash, so these are
    other shards, which `check_resume_compatible` refuses too, but only after they were built (hours at
    LLM360 size)."""
    data = lineage.get("data", {})
    recorded = data.get("shard_dir")
    if data.get("stage") != stage_name or not isinstance(recorded, str) or Path(recorded).name == planned_dir.name:
        return
    raise CheckpointError(
        f"refusing to resume from {checkpoint}: stage {stage_name!r} trained on shards {Path(recorded).name}, "
        f"its recipe {recipe} (with data.seed) now makes {planned_dir.name} (another recipe hash: other data). "
        + _SAME_SHARDS
    )


def check_fresh_optimizer_kept(checkpoint: Path, saved_stages: list[Any], stages: list[Stage], step: int) -> None:
    """Refuse a resume whose config flips `fresh_optimizer` of a stage the checkpoint (at `step`, its config's
    `stages` given) has begun: the optimizer state restarts at a stage's first step only, so the flip would
    not take effect there, yet the checkpoints saved from now on would record it as the run's config."""
    for st in stages:
        was = bool(saved_stages[st.index].get("fresh_optimizer", False)) if st.index < len(saved_stages) else False
        if st.index > 0 and st.start < step and was != st.fresh_optimizer:
            raise CheckpointError(
                f"refusing to resume from {checkpoint}: stage {st.name!r} began at step {st.start} "
                f"{'with' if was else 'without'} a fresh optimizer state, the config now sets "
                f"stages.{st.index}.fresh_optimizer={st.fresh_optimizer} (it acts at the stage's first step only). "
                f"Resume with stages.{st.index}.fresh_optimizer={was}, or from a checkpoint at or before step {st.start}"
            )
