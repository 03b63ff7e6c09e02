"""The checkpoint directory format: atomic save, sha256-verified load, listing and lineage reading."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from open360.paths import fsync_dir, fsync_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.pt"
CONFIG_FILE = "config.yaml"
LINEAGE_FILE = "lineage.json"
# Written in this order; lineage.json comes last and lists the sha256 of all the others.
PAYLOAD_FILES = (MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, RNG_FILE, CONFIG_FILE)

STEP_DIR_RE = re.compile(r"^step_(\d+)$")
# Test hook: seconds to sleep in the middle of a save (after the weights, before the rename), so a
# kill test can SIGKILL a trainer while a checkpoint is half written.
SAVE_DELAY_ENV = "OPEN360_CHECKPOINT_SAVE_DELAY_S"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupted, or does not fit the run."""


@dataclass
class CheckpointContents:
    """Everything one checkpoint directory holds, in memory (tensors on CPU)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer_state: dict[str, Any]
    rng: dict[str, Any]
    config_yaml: str
    lineage: dict[str, Any] = field(default_factory=dict)
    # name -> a finished directory (e.g. a megatron-core distributed checkpoint) moved into the checkpoint
    # on save; its files are hashed into lineage.json like the others. Not read back by load_checkpoint.
    extra_dirs: dict[str, Path] = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    """`step_<N>`: the name of a complete checkpoint directory."""
    return f"step_{step}"


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied embeddings); return name aliases."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.contiguous()
    return kept, aliases


def save_model_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a model state dict as safetensors; tied tensors are stored once and aliased in metadata."""
    kept, aliases = _dedupe_shared({k: v.to("cpu") for k, v in state.items()})
    save_file(kept, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases, sort_keys=True)})
    _sort_metadata(path)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its `__metadata__` keys sorted, so that equal weights give equal
    bytes (the writer keeps metadata in a hash map whose order changes from process to process)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > size:  # never: the same keys and values in another order (left as written)
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # the header is space-padded to its recorded length


def load_model_weights(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors state dict written by `save_model_weights`, restoring tied aliases."""
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                state[name] = f.get_tensor(name)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path}: unreadable weights ({err}); the file is damaged or truncated — pull the checkpoint "
            "again (open360 ckpt pull <run> <step> --force) or check it with open360 ckpt lineage"
        ) from err
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
        for alias, target in aliases.items():
            state[alias] = state[target]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}: its 'aliases' metadata is malformed ({type(err).__name__}: {err}); the file was not written "
            "by open360 or is damaged"
        ) from err
    return state


def _canonical_optimizer_state(state: Any) -> Any:
    """The optimizer state with list-valued hyperparameters (AdamW's betas come back from a loaded state
    as lists) stored as tuples, as a fresh optimizer holds them: equal states, equal bytes."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        return state
    groups = [{k: tuple(v) if isinstance(v, list) and k == "betas" else v for k, v in g.items()}
              for g in state["param_groups"]]
    return {**state, "param_groups": groups}


def _write_payload(tmp: Path, contents: CheckpointContents) -> None:
    save_model_weights(contents.model, tmp / MODEL_FILE)
    delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    torch.save(_canonical_optimizer_state(contents.optimizer), tmp / OPTIMIZER_FILE)
    (tmp / TRAINER_STATE_FILE).write_text(json.dumps(contents.trainer_state, indent=2, sort_keys=True) + "\n")
    torch.save(contents.rng, tmp / RNG_FILE)
    (tmp / CONFIG_FILE).write_text(contents.config_yaml)


def save_checkpoint(parent: Path, step: int, contents: CheckpointContents) -> Path:
    """Write `<parent>/step_<step>/` atomically: temp dir, fsync every file and the dir, rename.

    `contents.lineage` is completed with the sha256 of every other file and written last. An existing
    directory for the same step (a run resumed from an earlier step) is replaced.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / step_dir_name(step)
    tmp = parent / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_payload(tmp, contents)
        extra_files = []
        for name, directory in contents.extra_dirs.items():
            shutil.move(str(directory), str(tmp / name))
            extra_files += sorted(str(f.relative_to(tmp)) for f in (tmp / name).rglob("*") if f.is_file())
        lineage = dict(contents.lineage)
        lineage["step"] = step
        lineage["files"] = {name: sha256_file(tmp / name) for name in (*PAYLOAD_FILES, *extra_files)}
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
        for name in (*PAYLOAD_FILES, *extra_files, LINEAGE_FILE):
            fsync_file(tmp / name)
        for name in contents.extra_dirs:  # the entries of nested folders (megatron's shards) are durable too
            for folder in [tmp / name, *sorted(p for p in (tmp / name).rglob("*") if p.is_dir())]:
                fsync_dir(folder)
        fsync_dir(tmp)
    except BaseException as err:  # a failed save leaves nothing half-written behind, and no earlier step changes
        shutil.rmtree(tmp, ignore_errors=True)
        # A full disk surfaces as OSError, as safetensors' SafetensorError or as torch.save's RuntimeError
        # ("unexpected pos"); each is a failed write here.
        if isinstance(err, OSError | SafetensorError | RuntimeError):
            raise CheckpointError(
                f"{final}: could not be written ({err}); the partial copy was removed and every earlier "
                "checkpoint is intact — free space (or fix the filesystem) and resume with trainer.resume=auto"
            ) from err
        raise
    if final.exists():
        old = parent / f".old-{step_dir_name(step)}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_dir(parent)
    return final


def check_writable(directory: Path) -> None:
    """Create `directory` and write a probe file in it: CheckpointError naming it when that fails, so an
    unwritable checkpoint folder is found before the first steps are spent, not at the first save."""
    directory = Path(directory)
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"open360")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(
            f"{directory}: checkpoints cannot be written there ({err}); fix its permissions or free space, or "
            "choose another workspace="
        ) from err


def interrupted_replacement(parent: Path, step: int) -> Path | None:
    """The complete old copy of step N that a crash left as `.old-step_N-<pid>` while replacing it (no step_N
    beside it): what remove_stale_temp_dirs restores at the next start."""
    parent = Path(parent)
    if (parent / step_dir_name(step)).exists() or not parent.is_dir():
        return None
    old = re.compile(rf"\.old-{step_dir_name(step)}-\d+")
    copies = sorted(parent.glob(f".old-{step_dir_name(step)}-*"))
    return next((p for p in copies if old.fullmatch(p.name) and p.is_dir() and (p / LINEAGE_FILE).is_file()), None)


def remove_stale_temp_dirs(parent: Path) -> list[Path]:
    """Clear the leftovers of saves interrupted by a crash: a step whose folder was being replaced (moved
    to `.old-step_N-*`, the new one not yet renamed in) gets the old complete copy back; every other
    `.tmp-step_*` / `.old-step_*` folder is deleted. Returns the deleted folders."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        m = re.match(r"\.old-step_(\d+)-\d+$", p.name)
        if m and p == interrupted_replacement(parent, int(m.group(1))):
            p.rename(parent / step_dir_name(int(m.group(1))))
    for p in parent.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-step_") or p.name.startswith(".old-step_")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints `(step, path)` under a run directory, sorted by step (temp dirs ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = STEP_DIR_RE.match(p.name)
        if m and p.is_dir() and (p / LINEAGE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_inside_folder(name: str) -> bool:
    """A relative path that stays inside the folder it is joined to (no absolute path, no `..`)."""
    return not (Path(name).is_absolute() or ".." in Path(name).parts)


# lineage.json keys that readers rely on, with their types (a hand-edited file fails here, in one line)
_LINEAGE_TYPES = {"step": int, "files": dict, "data": dict, "data_history": list, "callbacks": dict, "init_from": dict}
_LINEAGE_NULLABLE = ("init_from",)


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: the object, or _DuplicateKeyError naming a key given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(repr(key))
        out[key] = value
    return out


def _check_history(file: Path, key: str, history: Any) -> None:
    """A data history (a list of one object per stage) or CheckpointError naming `key` in `file`."""
    if not isinstance(history, list):
        raise CheckpointError(
            f"{file}: key {key!r} holds {type(history).__name__} {str(history)[:40]!r}, a list is expected; "
            "the checkpoint is corrupted"
        )
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise CheckpointError(
                f"{file}: key {key}[{i}] holds {type(entry).__name__} {str(entry)[:40]!r}, a dict is expected; "
                "the checkpoint is corrupted"
            )


def read_lineage(path: Path) -> dict[str, Any]:
    """The parsed `lineage.json` of a checkpoint directory."""
    file = Path(path) / LINEAGE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file}: no lineage.json, so {path} is not a complete checkpoint directory "
            "(pass a checkpoints/<run>/step_<N> folder)"
        )
    try:
        lineage = json.loads(file.read_text(), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # a binary or non-UTF-8 file as well
        raise CheckpointError(f"{file}: not valid JSON ({err}); the checkpoint is corrupted") from err
    except _DuplicateKeyError as err:  # `files` listing one name twice: readers would disagree on its sha256
        raise CheckpointError(
            f"{file}: key {err} appears twice in one object, so the file says two things about it (only the "
            "last would be checked); open360 never writes that — the lineage was edited or forged"
        ) from err
    if not isinstance(lineage, dict):
        raise CheckpointError(f"{file}: a JSON object is expected, found {type(lineage).__name__}; the checkpoint is corrupted")
    for key, kind in _LINEAGE_TYPES.items():
        if key not in lineage or (lineage[key] is None and key in _LINEAGE_NULLABLE):
            continue
        value = lineage[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"{file}: key {key!r} holds {type(value).__name__} {str(value)[:40]!r}, a {kind.__name__} is "
                "expected; the checkpoint is corrupted"
            )
    if "data_history" in lineage:
        _check_history(file, "data_history", lineage["data_history"])
    if lineage.get("init_from") and "data_history" in lineage["init_from"]:
        _check_history(file, "init_from.data_history", lineage["init_from"]["data_history"])
    named = STEP_DIR_RE.match(Path(path).name)
    if named and "step" in lineage and int(named.group(1)) != lineage["step"]:  # a renamed or mixed-up folder
        raise CheckpointError(
            f"{file}: key 'step' is {lineage['step']}, but the folder is {Path(path).name}; the folder was renamed "
            f"or holds another checkpoint's files — rename it step_{lineage['step']} or re-fetch it"
        )
    return lineage


def verify_checkpoint(path: Path, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Recompute the sha256 of every file listed in lineage.json (or of the files `only` names); raise
    naming the first bad file."""
    path = Path(path)
    lineage = read_lineage(path)
    files = lineage.get("files") if isinstance(lineage, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path / LINEAGE_FILE}: key 'files' (sha256 per file) is missing or empty")
    unlisted = [name for name in (only or PAYLOAD_FILES) if name not in files]
    if unlisted:
        raise CheckpointError(
            f"{path / LINEAGE_FILE}: key 'files' does not list {unlisted}; every checkpoint records the "
            "sha256 of each of its files — the lineage was edited or comes from elsewhere"
        )
    for name, expected in files.items():
        if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise CheckpointError(
                f"{path / LINEAGE_FILE}: key files[{name!r}] is {expected!r}, not a sha256; the lineage is corrupted"
            )
        if not is_inside_folder(name):
            raise CheckpointError(
                f"{path / LINEAGE_FILE}: key files[{name!r}] points outside the checkpoint folder; the lineage "
                "is corrupted or forged"
            )
        if only and name not in only:
            continue
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in lineage.json but missing; re-fetch the checkpoint")
        actual = sha256_file(file)
        if actual != expected:
            raise CheckpointError(
                f"{file}: sha256 {actual[:16]}… does not match lineage.json ({expected[:16]}…); "
                "the file is truncated or modified — re-fetch it (open360 ckpt pull <run> <step> --force) or "
                "use another step"
            )
    return lineage


def load_checkpoint(path: Path, verify: bool = True, weights: bool = True) -> CheckpointContents:
    """Read every file of a checkpoint directory onto the CPU (optimizer/RNG with weights_only=True);
    `weights=False` leaves `model.safetensors` unread (a backend that loads its own sharded state)."""
    path = Path(path)
    lineage = verify_checkpoint(path) if verify else read_lineage(path)
    return CheckpointContents(
        model=load_model_weights(path / MODEL_FILE) if weights else {},
        optimizer=_load_tensors_file(path / OPTIMIZER_FILE),
        trainer_state=_load_json_file(path / TRAINER_STATE_FILE),
        rng=_load_tensors_file(path / RNG_FILE),
        config_yaml=_load_text_file(path / CONFIG_FILE),
        lineage=lineage,
    )


def _load_tensors_file(file: Path) -> Any:
    """torch.load with weights_only=True; a damaged file, or one holding anything but tensors and plain
    containers (a pickle that could run code), is a CheckpointError naming it — never retried unsafely. A
    damaged pickle stream can also fail inside the restricted unpickler (a memo index that is not there: a
    KeyError; an empty stack: an IndexError; a tensor rebuilt from the wrong arguments: a TypeError or an
    AttributeError).

    Memory-mapped (copy-on-write: the file is never written): the tensors' bytes are read from the page
    cache as they are used, so the ranks of one machine that each load the full optimizer state on resume
    share one copy of it instead of holding one each (Adam's moments: 56 GB per rank at 7B)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (
        pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, LookupError, TypeError, AttributeError
    ) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # torch's message for a refused pickle starts by advising weights_only=False: keep only the reason
        reasons = [ln.split(". ")[0] for ln in lines if "GLOBAL" in ln or "WeightsUnpickler" in ln]
        first = reasons[0] if reasons else lines[0] if lines else type(err).__name__
        raise CheckpointError(
            f"{file}: not loadable as tensors with weights_only=True ({first}); the file is damaged or was not "
            "written by open360 — do not load it with weights_only=False (a pickle can run code); re-fetch the "
            "checkpoint or use another step"
        ) from err


def _load_json_file(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); the checkpoint is corrupted") from err


def _load_text_file(file: Path) -> str:
    try:
        return file.read_text()
    except (UnicodeDecodeError, OSError) as err:  # a missing file, a binary or non-UTF-8 one
        raise CheckpointError(f"{file}: not readable as UTF-8 text ({err}); the checkpoint is corrupted") from err


# The model.* keys that decide the parameters' names and shapes (rotary and muP settings may change
# between a checkpoint and a run that starts from it: position interpolation does).
ARCHITECTURE_KEYS = (
    "vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "norm", "mlp", "attn_bias",
    "mlp_bias", "lm_head_bias", "tie_embeddings", "parallel_block",
)


def check_architecture(path: Path, model_cfg: Any, use: str) -> None:
    """Raise CheckpointError naming the differing `model.*` keys when the checkpoint at `path` holds
    another architecture than `model_cfg` (before any weight is loaded)."""
    saved = read_config(path).model

    def value(cfg: Any, key: str) -> Any:  # n_kv_heads None means n_heads: the same architecture
        return (cfg.get(key) or cfg.get("n_heads")) if key == "n_kv_heads" else cfg.get(key)

    differ = {
        f"model.{key}": (saved.get(key), model_cfg.get(key))
        for key in ARCHITECTURE_KEYS
        if value(saved, key) != value(model_cfg, key)
    }
    if differ:
        raise CheckpointError(
            f"{path}: holds another architecture than this run's config (checkpoint, config: {differ}); "
            f"{use} needs the checkpoint's values for those keys"
        )


def load_model_from_checkpoint(path: Path, device: str = "cpu", verify: bool = True) -> tuple[Any, Any]:
    """Build the checkpoint's model from its `config.yaml` and load its weights: `(Decoder, DictConfig)`.
    Both files are checked against the sha256 that lineage.json records first (the optimizer state is
    not read, so not hashed); `verify=False` for a caller that has just verified the whole folder."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{path}: expected {MODEL_FILE} and {CONFIG_FILE} in a checkpoint directory "
            "(checkpoints/<run>/step_<N>); is the step pulled (open360 ckpt pull)?"
        )
    if verify:
        verify_checkpoint(path, only=(MODEL_FILE, CONFIG_FILE))
    cfg = read_config(path)
    from open360.models import model_with_weights

    return model_with_weights(cfg.model, load_model_weights(path / MODEL_FILE)).to(device), cfg


def read_config(path: Path) -> Any:
    """The composed run config a checkpoint saved (`config.yaml`), as a DictConfig."""
    from omegaconf import OmegaConf

    file = Path(path) / CONFIG_FILE
    try:
        cfg = OmegaConf.create(file.read_text())
    except Exception as err:  # yaml's parser and scanner errors, a non-UTF-8 file
        raise CheckpointError(f"{file}: not a readable config ({type(err).__name__}: {err}); the checkpoint is corrupted") from err
    if not OmegaConf.is_dict(cfg) or "model" not in cfg:
        raise CheckpointError(f"{file}: no 'model' section; the checkpoint is corrupted or not open360's")
    found = next(_interpolations(cfg), None)
    if found is not None:  # training records the config resolved: `${oc.env:HF_TOKEN}` here was put by hand
        raise CheckpointError(
            f"{file}: key {found[0]} holds the interpolation {found[1]!r}, but a checkpoint records its config "
            "resolved: the file was edited or forged, and resolving it could copy this machine's environment "
            "(${oc.env:...}) into what is exported, logged or printed; refused"
        )
    return cfg


def _interpolations(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, text) of each interpolation (`${...}`) in a config, read without resolving any."""
    from omegaconf import OmegaConf

    keys = range(len(node)) if OmegaConf.is_list(node) else node.keys()
    for key in keys:
        where = f"{prefix}.{key}" if prefix else str(key)
        child = node._get_node(key)
        if OmegaConf.is_interpolation(node, key):
            yield where, str(child._value())
        elif OmegaConf.is_config(child):
            yield from _interpolations(child, where)
