"""Refuse a distributed (torch DCP) checkpoint whose pickled parts could run code, before loading it."""

from __future__ import annotations

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
        obj = super().find_class(module, name) if module.split(".")[0] in ("torch", "megatron", "pathlib",
                                                                            "collections", "builtins") else None
        allowed = (
            (module, name) in _METADATA_GLOBALS
            or (module.startswith(_METADATA_MODULES) and isinstance(obj, type))
            or (module == "pathlib" and isinstance(obj, type) and issubclass(obj, pathlib.PurePath))
            or (module == "torch" and isinstance(obj, torch.dtype | torch.layout | torch.memory_format))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")
        return obj


def check_distributed_checkpoint(directory: Path) -> None:
    """Raise CheckpointError unless `directory/.metadata` unpickles with data classes only and every
    non-tensor entry loads with `torch.load(weights_only=True)`; then torch's own loader runs nothing."""
    directory = Path(directory)
    meta_file = directory / ".metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{directory}: no .metadata — not a complete distributed checkpoint")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(meta_file.read_bytes())).load()
    except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, TypeError) as err:
        raise CheckpointError(f"{meta_file}: refused ({err}); load only checkpoints you trust") from err
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        info = metadata.storage_data[MetadataIndex(fqn)]
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{directory}: entry {fqn!r} is stored transformed; it cannot be checked")
        with open(directory / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{directory / info.relative_path}: entry {fqn!r} is not plain data ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}); refused — load only checkpoints you trust"
            ) from err
