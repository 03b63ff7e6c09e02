"""Refuse a distributed (torch DCP) checkpoint whose pickled parts could run code, and load it through the
checked metadata only."""

from __future__ import annotations

import dataclasses
import enum
import io
import pathlib
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from open360.checkpoint.io import CheckpointError, is_inside_folder

# torch DCP keeps its `.metadata` as a pickle and non-tensor entries as torch.save() bytes, both
# unpickled without restriction by torch's loader: a checkpoint pulled from elsewhere could run code.
_METADATA_MODULES = ("torch.distributed.checkpoint", "megatron.core.dist_checkpointing")
_PLAIN_MODULES = ("torch", "torch.serialization", "collections", "builtins")
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


def _in_packages(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _module_allowed(module: str) -> bool:
    return module in _PLAIN_MODULES or _in_packages(module, (*_METADATA_MODULES, "pathlib"))


class _MetadataUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be restricted
    """Only the data classes of torch DCP / megatron metadata, dtypes, sizes and paths, read without side
    effects, so that torch's own (unrestricted) read of the same bytes builds the same objects:
    - a global is checked as a string, then looked up in a module already imported (nothing is imported);
    - only plain values are called (REDUCE/INST/OBJ: sizes, paths, containers, enum lookups), never a
      data class's constructor (genuine pickles create those with NEWOBJ, which runs no __init__);
    - BUILD sets fields only on a data-class instance made by this pickle, never on a class, a function
      or an enum member (process-wide objects: changing one would change what the next read means)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        refused = pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")
        if "." in name or not _module_allowed(module) or module not in sys.modules:
            raise refused  # (a dotted name walks attributes to anywhere)
        obj = vars(sys.modules[module]).get(name)  # not getattr: a module __getattr__ may import
        allowed = (
            (module, name) in _METADATA_GLOBALS
            or (_in_packages(module, _METADATA_MODULES) and _is_metadata_class(obj))
            or (module.split(".")[0] == "pathlib" and isinstance(obj, type) and issubclass(obj, pathlib.PurePath))
            or (module == "torch" and isinstance(obj, torch.dtype | torch.layout | torch.memory_format))
        )
        if obj is None or not allowed:
            raise refused
        return obj

    def load_reduce(self) -> None:
        _check_callable(self.stack[-2])  # REDUCE calls the object below its argument tuple
        pickle._Unpickler.load_reduce(self)

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        _check_callable(klass)
        pickle._Unpickler._instantiate(self, klass, args)

    def load_build(self) -> None:
        target, state = self.stack[-2], self.stack[-1]  # BUILD applies the state on top to the object below
        if isinstance(target, type | enum.Enum) or not dataclasses.is_dataclass(target) or not _is_metadata_class(
            type(target)
        ):
            raise pickle.UnpicklingError(f"setting the state of a {type(target).__name__} is not allowed in checkpoint metadata")
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
        for part in parts:
            if isinstance(part, dict) and any(not isinstance(k, str) or k.startswith("__") for k in part):
                raise pickle.UnpicklingError("a state key that is not a plain field name is not allowed in checkpoint metadata")
        pickle._Unpickler.load_build(self)

    def refuse_extension(self) -> None:
        raise pickle.UnpicklingError("copyreg extension codes are not allowed in checkpoint metadata")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.EXT1[0]] = dispatch[pickle.EXT2[0]] = dispatch[pickle.EXT4[0]] = refuse_extension


def _check_callable(obj: Any) -> None:
    """What metadata pickles call: the plain globals (sizes, containers, layouts by name), paths and enum
    lookups by value."""
    plain = any(obj is vars(sys.modules[module]).get(name) for module, name in _METADATA_GLOBALS)
    typed = isinstance(obj, type) and (
        issubclass(obj, pathlib.PurePath) or (issubclass(obj, enum.Enum) and _is_metadata_class(obj))
    )
    if not (plain or typed):
        raise pickle.UnpicklingError(f"calling {getattr(obj, '__qualname__', type(obj).__name__)} is not allowed in checkpoint metadata")


def _is_metadata_class(obj: Any) -> bool:
    """A dataclass or enum defined in torch DCP / megatron dist_checkpointing (not merely imported there):
    building one only assigns its fields."""
    return (
        isinstance(obj, type)
        and _in_packages(getattr(obj, "__module__", ""), _METADATA_MODULES)
        and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
    )


def _check_storage_range(directory: Path, meta_file: Path, fqn: Any, info: Any) -> None:
    """An entry's bytes lie in a file of the checkpoint folder (no absolute or `..` path), within its size."""
    rel, offset, length = (getattr(info, key, None) for key in ("relative_path", "offset", "length"))
    name = fqn[:200] if isinstance(fqn, str) else f"<{type(fqn).__name__}>"
    if not isinstance(rel, str) or len(rel) > 1024 or not is_inside_folder(rel):
        where = rel[:200] if isinstance(rel, str) else f"<{type(rel).__name__}>"
        raise CheckpointError(f"{meta_file}: entry {name!r} is stored at {where!r}, outside the checkpoint folder; refused")
    file = directory / rel
    try:
        size = file.stat().st_size if file.is_file() else -1
    except (OSError, ValueError):
        size = -1
    ints = isinstance(offset, int) and isinstance(length, int)
    if not (ints and offset >= 0 and length >= 0 and offset + length <= size):
        raise CheckpointError(
            f"{meta_file}: entry {name!r} does not lie within {rel!r} ({size} bytes); the checkpoint is incomplete "
            "or forged"
        )


def check_distributed_checkpoint(directory: Path) -> Any:
    """The DCP `Metadata` of `directory`; CheckpointError unless `.metadata` unpickles with data classes only,
    every entry lies within its file and every non-tensor entry loads with `torch.load(weights_only=True)`."""
    directory = Path(directory)
    meta_file = directory / ".metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{directory}: no .metadata — not a complete distributed checkpoint")
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    try:
        metadata = _MetadataUnpickler(io.BytesIO(meta_file.read_bytes())).load()
    except Exception as err:  # anything a malformed pickle raises: refused, never a traceback
        raise CheckpointError(
            f"{meta_file}: refused ({type(err).__name__}: {err}); load only checkpoints you trust"
        ) from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{meta_file}: refused (holds a {type(metadata).__name__}, not DCP metadata)")

    try:
        storage = list(metadata.storage_data.items())
        entries = [
            (fqn, metadata.storage_data[MetadataIndex(fqn)])
            for fqn, item in metadata.state_dict_metadata.items()
            if isinstance(item, BytesStorageMetadata)
        ]
    except (AttributeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_file}: malformed DCP metadata ({type(err).__name__}: {err})") from err
    for index, info in storage:
        _check_storage_range(directory, meta_file, getattr(index, "fqn", index), info)
    for fqn, info in entries:
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{directory}: entry {fqn!r} is stored transformed; it cannot be checked")
        try:
            with open(directory / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{directory / str(getattr(info, 'relative_path', '?'))}: entry {fqn!r} is not plain data "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); refused — load only "
                "checkpoints you trust"
            ) from err
    return metadata


@contextmanager
def guarded_distributed_load(directory: Path) -> Iterator[None]:
    """Check `directory`, then let megatron load it with that checked metadata (torch never unpickles
    `.metadata` itself), and its non-tensor entries and `common.pt` with `weights_only=True`: a file changed
    after the check is read as data, never run."""
    from megatron.core.dist_checkpointing.strategies import common as mcore_common
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed.checkpoint import CheckpointException, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    directory = Path(directory)
    metadata = check_distributed_checkpoint(directory)

    class CheckedReader(FileSystemReader):
        def read_metadata(self) -> Any:  # what FileSystemReader.read_metadata does after its pickle.load
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class CheckedPlanner(mcore_torch.MCoreLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:  # DefaultLoadPlanner's, weights only
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as err:
                raise CheckpointError(
                    f"{directory}: entry {fqn!r} is not plain data any more ({type(err).__name__}); it changed "
                    "after the check — refused"
                ) from err
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    def reader(checkpoint_dir: Any, cache_metadata: bool = False) -> FileSystemReader:
        if Path(checkpoint_dir) != directory:
            raise CheckpointError(f"{checkpoint_dir}: not the checked distributed checkpoint {directory}")
        return CheckedReader(checkpoint_dir)

    def load_common(self: Any, checkpoint_dir: Any) -> Any:  # megatron's bare torch.load follows
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; an explicit weights_only=True does not
        file = Path(checkpoint_dir) / mcore_common.COMMON_STATE_FNAME
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise CheckpointError(f"{file}: missing — not a complete distributed checkpoint") from err
        except Exception as err:
            raise CheckpointError(
                f"{file}: not plain data ({type(err).__name__}); refused — load only checkpoints you trust"
            ) from err

    with (
        mock.patch.multiple(mcore_torch, _get_filesystem_reader=reader, MCoreLoadPlanner=CheckedPlanner),
        mock.patch.object(mcore_common.TorchCommonLoadStrategy, "load_common", load_common),
    ):
        try:
            yield
        except CheckpointException as err:  # torch gathers every rank's failure into one BaseException
            ours = [exc for exc, _ in err.failures.values() if isinstance(exc, CheckpointError)]
            if ours:
                raise ours[0] from err
            raise
