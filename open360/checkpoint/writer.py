"""Checkpoint writer: snapshot to CPU, write atomically (in a background thread when asked), prune recovery."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from open360.checkpoint.io import CheckpointContents, list_checkpoints, save_checkpoint

TensorFn = Callable[[tuple[Any, ...], torch.Tensor], Any]


def map_tensors(obj: Any, fn: TensorFn, key: tuple[Any, ...] = ()) -> Any:
    """`obj` (nested dicts, lists and tuples) with each tensor replaced by `fn(key, tensor)`, in the nesting's
    order; `key` is the tensor's path of dict keys and list indices."""
    if isinstance(obj, torch.Tensor):
        return fn(key, obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn, (*key, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, (*key, i)) for i, v in enumerate(obj))
    return obj


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """What identifies the memory a tensor lives in (its device type and storage address)."""
    return tensor.device.type, tensor.untyped_storage().data_ptr()


class HostSnapshot:
    """Copies nested dicts/lists/tuples of tensors to CPU memory; CUDA tensors go through reused pinned
    buffers with asynchronous copies and one synchronize, so a save stalls training only for a
    device-to-host copy at full bandwidth (the buffers are allocated once, at the first save).

    `live`: the storages (`storage_key`) training goes on writing. When given, a CPU tensor outside them is
    the state dict's own copy (a gathered one) and is kept as it is, not copied a second time; without it
    every CPU tensor is copied.

    `begin(live)` returns the per-tensor copy for a state gathered one tensor at a time (`full_state`): each
    gathered tensor is copied before the next is gathered, so the device holds one at a time; `__call__`
    then keeps those copies as they are and synchronizes."""

    def __init__(self) -> None:
        self._pinned: dict[tuple[Any, ...], torch.Tensor] = {}
        self._live: frozenset[tuple[str, int]] | None = None
        self._copies: dict[tuple[Any, ...], torch.Tensor] = {}

    def __call__(self, obj: Any, live: frozenset[tuple[str, int]] | None = None) -> Any:
        copy = self.begin(live)
        out = map_tensors(obj, copy)
        if any(buf.is_pinned() for buf in self._pinned.values()):
            torch.cuda.synchronize()
        return out

    def begin(self, live: frozenset[tuple[str, int]] | None) -> Callable[[tuple[Any, ...], torch.Tensor], torch.Tensor]:
        """Start a snapshot: the copy of one tensor found at `key` (a path of dict keys and list indices)."""
        self._live = live
        self._copies = {}  # one copy of each view of a live tensor, for this snapshot only
        return self.copy

    def copy(self, key: tuple[Any, ...], tensor: torch.Tensor) -> torch.Tensor:
        """The host copy of `tensor`. Views of one live storage share a copy (tied weights stay one tensor, so
        the file stores them once); a gathered tensor is freed after its copy, and the next one may reuse its
        address, so it is never looked up by address."""
        if tensor.numel() == 0:
            return self._copy_tensor(tensor, key)
        if self._live is not None and storage_key(tensor) not in self._live:
            return self._copy_tensor(tensor, key)
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype,
                tensor.shape, tensor.stride())
        if view not in self._copies:
            self._copies[view] = self._copy_tensor(tensor, key)
        return self._copies[view]

    def _copy_tensor(self, obj: torch.Tensor, key: tuple[Any, ...]) -> torch.Tensor:
        if obj.device.type != "cuda":
            if self._live is not None and storage_key(obj) not in self._live:
                return obj  # no live tensor's memory: training never writes it
            return obj.detach().to("cpu", copy=True)
        buf = self._pinned.get(key)
        if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
            buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            self._pinned[key] = buf
        buf.copy_(obj.detach(), non_blocking=True)
        return buf


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint directory that has been completed."""

    step: int
    path: Path
    published: bool


class CheckpointWriter:
    """Writes published checkpoints under `published_dir` and recovery ones under `recovery_dir`.

    With `background=True` the files are written by one worker thread from a CPU snapshot, so the
    training loop only pays for the device-to-host copy; `poll()` reports completed saves, `wait()`
    blocks until every save is on disk. At most one save is in flight: a new one waits for the last.
    """

    def __init__(
        self, published_dir: Path, recovery_dir: Path, keep_ephemeral: int, background: bool
    ) -> None:
        self.published_dir = Path(published_dir)
        self.recovery_dir = Path(recovery_dir)
        self.keep_ephemeral = keep_ephemeral
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt") if background else None
        self._pending: list[Future[SavedCheckpoint]] = []
        self._done: list[SavedCheckpoint] = []
        self._snapshot = HostSnapshot()

    def _write(self, step: int, contents: CheckpointContents, published: bool) -> SavedCheckpoint:
        parent = self.published_dir if published else self.recovery_dir
        path = save_checkpoint(parent, step, contents)
        if not published:
            for _, old in list_checkpoints(self.recovery_dir)[: -self.keep_ephemeral]:
                # out of the listing first: a deletion cut short leaves a .tmp- folder (cleared at the next
                # start), never a step_N with its lineage.json and some files gone, which resume would pick
                doomed = old.with_name(f".tmp-{old.name}-pruned")
                shutil.rmtree(doomed, ignore_errors=True)
                old.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        return SavedCheckpoint(step, path, published)

    def host_copy(self, live: frozenset[tuple[str, int]] | None) -> Callable[[tuple[Any, ...], torch.Tensor], torch.Tensor]:
        """The per-tensor host copy for the next save's state, gathered one tensor at a time (`full_state`):
        into the reused pinned buffers, so the previous save is waited for here; without background,
        `tensor.cpu()` (a CPU tensor as it is: the write finishes before training goes on)."""
        if self._pool is None:
            return lambda key, tensor: tensor.detach().cpu()
        self.wait_pending()
        return self._snapshot.begin(live)

    def save(
        self,
        step: int,
        contents: CheckpointContents,
        published: bool,
        live: frozenset[tuple[str, int]] | None = None,
    ) -> None:
        """Start (or, without background, perform) the save of one checkpoint. `live`: the storages training
        goes on writing (see HostSnapshot); None copies every tensor of `contents` before the write starts."""
        if self._pool is None:
            self._done.append(self._write(step, contents, published))
            return
        self.wait_pending()  # the pinned buffers are reused: the previous save must be on disk
        snapshot = CheckpointContents(
            model=self._snapshot(contents.model, live),
            optimizer=self._snapshot(contents.optimizer, live),
            trainer_state=contents.trainer_state,
            rng=self._snapshot(contents.rng, live),
            config_yaml=contents.config_yaml,
            lineage=contents.lineage,
            extra_dirs=contents.extra_dirs,
        )
        self._pending.append(self._pool.submit(self._write, step, snapshot, published))

    def _collect(self, futures: list[Future[SavedCheckpoint]]) -> None:
        """Record finished saves; a failed one's error is raised once, after the others are recorded (they
        stay to be reported by `close`, and the failed save is not raised again)."""
        error: BaseException | None = None
        for future in futures:
            try:
                self._done.append(future.result())
            except BaseException as err:  # noqa: BLE001 - re-raised below
                error = error or err
        if error is not None:
            raise error

    def wait_pending(self) -> None:
        """Block until every started save is complete (re-raising a failed save's error)."""
        for future in self._pending:
            future.exception()  # waits; an interrupt (SIGTERM) here leaves the save pending for close to wait on
        finished, self._pending = self._pending, []
        self._collect(finished)

    def poll(self) -> list[SavedCheckpoint]:
        """Saves completed since the last poll (raises if a background save failed)."""
        finished, still = [], []
        for future in self._pending:
            (finished if future.done() else still).append(future)
        self._pending = still
        self._collect(finished)
        done, self._done = self._done, []
        return done

    def close(self) -> list[SavedCheckpoint]:
        """Finish every save and stop the worker; returns the saves not yet reported by `poll`."""
        try:
            self.wait_pending()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        done, self._done = self._done, []
        return done
