"""Refuse a distributed (torch DCP) checkpoint whose pickled parts could run code, before loading it."""

from __future__ import annotations

import dataclasses
import enum
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch

from open360.checkpoint.io import CheckpointError

# torch DCP keeps its `.metadata` as a pickle and non-tensor entries as torch.save() bytes, both
# unpickled without restriction by torch's loader: a checkpoint pulled from elsewhere could run code.
_METADATA_MODULES = ("torch.distributed.checkpoint", "megatron.core.dist_checkpointing")
_ROOTS = ("torch", "megatron", "pathlib", "collections", "builtins")
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the data classes of torch DCP / megatron metadata, dtypes, sizes and paths."""

    def find_class(self, module: str, name: str) -> Any:
        refused = pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")
        if "." in name or module.split(".")[0] not in _ROOTS:  # a dotted name walks attributes to anywhere
            raise refused
        obj = super().find_class(module, name)
        allowed = (
            (module, name) in _METADATA_GLOBALS
            or (module.startswith(_METADATA_MODULES) and _is_metadata_class(obj))
            or (module == "pathlib" and isinstance(obj, type) and issubclass(obj, pathlib.PurePath))
            or (module == "torch" and isinstance(obj, torch.dtype | torch.layout | torch.memory_format))
        )
        if not allowed:
            raise refused
        return obj


def _is_metadata_class(obj: Any) -> bool:
    """A dataclass or enum defined in torch DCP / megatron dist_checkpointing (not merely imported there):
    building one only assigns its fields."""
    return (
        isinstance(obj, type)
        and getattr(obj, "__module__", "").startswith(_METADATA_MODULES)
        and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
    )


def check_distributed_checkpoint(directory: Path) -> None:
    """Raise CheckpointError unless `directory/.metadata` unpickles with data classes only and every
    non-tensor entry loads with `torch.load(weights_only=True)`; then torch's own loader runs nothing."""
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
        entries = [
            (fqn, metadata.storage_data[MetadataIndex(fqn)])
            for fqn, item in metadata.state_dict_metadata.items()
            if isinstance(item, BytesStorageMetadata)
        ]
    except (AttributeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_file}: malformed DCP metadata ({type(err).__name__}: {err})") from err
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
