"""The training side of DVC versioning: a callback that adds and pushes each published checkpoint in a worker."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from open360.tracking.dvc_versioning import (
    RETRY_HINT,
    DvcWorkspace,
    VersioningError,
    local_steps,
    push_pending,
)
from open360.tracking.mlflow_logger import BACKFILL_KEY
from open360.tracking.worker import ProcessWorker
from open360.train.callbacks import Callback, RunInfo


class VersionJobs:
    """The DVC side of `DvcVersioner`, run inside its worker process: add + push one checkpoint, or catch up."""

    def __init__(self, workspace: str, remote: str | None, push: bool) -> None:
        self.store = DvcWorkspace(Path(workspace), remote=remote)
        self.push = push

    def __call__(self, kind: str, step: int, path: str, revisions: dict[str, str | None]) -> dict[str, Any]:
        if kind == "catch_up":  # a resumed run: checkpoints up to `step` that a killed run never versioned
            added = push_pending(self.store, Path(path), push=self.push, max_step=step)
            # every checkpoint up to `step` gets its record, not only those added now: a killed run may have
            # versioned a step without its record reaching MLflow (a record already there is kept: backfill)
            records = {}
            steps = [s for s in local_steps(Path(path)) if s <= step]
            tracked = self.store.tracked_children(Path(path)) if steps else {}  # one read for all steps
            for done in (s for s in steps if f"step_{s}" in tracked):
                folder = Path(path) / f"step_{done}"
                records[done] = {
                    "path": self.store.relpath(folder),
                    "dvc_md5": tracked[f"step_{done}"].md5,
                    **revisions,
                    **_trained_by(folder),
                    "pushed": self.push,
                    **({} if done in added else {BACKFILL_KEY: True}),
                }
            return {"added": added, "records": records}
        record: dict[str, Any] = {
            "path": self.store.relpath(Path(path)),
            "dvc_md5": self.store.add(Path(path)),
            **revisions,
            "pushed": False,
        }
        if not self.push:
            return {"record": record, "error": None}
        try:
            self.store.push([Path(path)])
        except VersioningError as err:
            return {"record": record, "error": str(err)}
        record["pushed"] = True
        return {"record": record, "error": None}


class DvcVersioner(Callback):
    """Adds every published checkpoint to `checkpoints.dvc` and pushes it, in a low-priority worker process.

    The process (not a thread) keeps DVC's Python work off the trainer's GIL and, at nice 19, off its
    cores; results (the checkpoint records) come back to `listeners` in the training process.
    """

    def __init__(self, workspace: Path, remote: str | None = None, push: bool = True) -> None:
        self.store = DvcWorkspace(workspace, remote=remote)
        self.push_enabled = push
        self.listeners: list[Callable[[int, dict[str, Any]], None]] = []
        self.records: dict[int, dict[str, Any]] = {}
        self._worker: ProcessWorker | None = None
        self._job_errors: list[str] = []
        self._lost_errors: list[str] = []  # jobs of a worker process that died, until a new one catches up
        self._run = ""
        self._checkpoint_dir = Path()
        self._revisions: dict[str, str | None] = {}
        self.wait_report_s = 300.0  # at the end of the run, a line this often while add/push jobs still run

    def on_run_start(self, info: RunInfo) -> None:
        from open360.checkpoint.lineage import git_revision  # imports torch: only here, not in the worker

        self._run = info.run_name
        self._checkpoint_dir = info.checkpoint_dir
        self._revisions = {
            # the workspace commit holding checkpoints.dvc
            "git_revision": _rev_text(git_revision(self.store.workspace)),
            "code_revision": _rev_text(git_revision()),  # the open360 code that trained
        }
        root = self.store.workspace / self.store.relpath(info.checkpoint_dir).split("/")[0]
        self.store.ensure_tracked_root(root)
        self._worker = self._start_worker()
        if info.start_step > 0:  # a resumed run: earlier checkpoints whose add/push never finished
            self._worker.submit("catch_up", info.start_step, str(info.checkpoint_dir), self._revisions)

    def on_checkpoint_saved(self, step: int, path: Path, published: bool) -> None:
        if not published or self._worker is None:
            return
        try:
            self._worker.submit("version", step, str(path), self._revisions)
        except RuntimeError as err:  # the worker process died (killed, out of memory): never fail training
            print(
                f"open360.tracking: {err}; a new DVC worker versions the checkpoints up to step {step} that "
                "checkpoints.dvc lacks",
                file=sys.stderr,
            )
            self._lost_errors += self._worker.errors  # resolved when the catch-up succeeds
            self._worker = self._start_worker()
            self._worker.submit("catch_up", step, str(self._checkpoint_dir), self._revisions)

    def _start_worker(self) -> ProcessWorker:
        return ProcessWorker(
            f"dvc[{self._run}]",
            VersionJobs,
            (str(self.store.workspace), self.store.remote, self.push_enabled),
            self._on_result,
        )

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self._worker is None:
            return
        if self._worker.pending():
            print(
                f"open360.tracking: waiting for {self._worker.pending()} DVC add/push job(s)", file=sys.stderr
            )
        waited = 0.0
        while not self._worker.close(timeout=self.wait_report_s):  # a push to a big or slow remote takes long
            waited += self.wait_report_s
            print(
                f"open360.tracking: still waiting for {self._worker.pending()} DVC add/push job(s) after "
                f"{waited:.0f} s; Ctrl-C stops the wait and loses no checkpoint (they are on local disk; the "
                "next run catches up, or "
                + RETRY_HINT.format(run=self._run, path="checkpoints", ws=self.store.workspace)
                + ")",
                file=sys.stderr,
            )
        if self.errors:
            print(
                f"open360.tracking: {len(self.errors)} DVC job(s) failed; the checkpoints are intact "
                "on local disk. "
                + RETRY_HINT.format(run=self._run, path="checkpoints", ws=self.store.workspace),
                file=sys.stderr,
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued add/push is done (tests, benchmarks)."""
        return self._worker.drain(timeout) if self._worker is not None else True

    @property
    def errors(self) -> list[str]:
        """Messages of DVC jobs that failed (also printed to stderr when they happened)."""
        return (
            self._lost_errors + (list(self._worker.errors) if self._worker is not None else []) + self._job_errors
        )

    def _on_result(self, args: tuple, result: dict[str, Any] | None, error: str | None) -> None:
        if not result:
            return
        if args[0] == "catch_up":
            self._lost_errors = []
        if result.get("added"):  # a catch-up that versioned checkpoints an earlier run (or a dead worker) left
            print(
                f"open360.tracking: dvc[{self._run}]: caught up: steps {result['added']} added to checkpoints.dvc"
                + (f", every checkpoint up to step {args[1]} pushed" if self.push_enabled else ""),
                file=sys.stderr,
            )
        for step, record in sorted((result.get("records") or {}).items()):  # caught up after a resume
            self._deliver(int(step), record)
        if "record" not in result:
            return
        if result["error"]:
            message = f"dvc[{self._run}]: {result['error']}"
            self._job_errors.append(message)
            print(f"open360.tracking: {message}", file=sys.stderr)
        self._deliver(int(args[1]), result["record"])

    def _deliver(self, step: int, record: dict[str, Any]) -> None:
        self.records[step] = record
        for listener in self.listeners:
            try:
                listener(step, record)
            except Exception as err:  # noqa: BLE001 - a record consumer must not fail the versioning
                print(
                    f"open360.tracking: checkpoint record of step {step} not delivered: {err}",
                    file=sys.stderr,
                )


def _trained_by(folder: Path) -> dict[str, str | None]:
    """`code_revision` of the code that wrote the checkpoint (its lineage), for a record sent again later."""
    import json

    try:
        code = json.loads((folder / "lineage.json").read_text())["code"]
        return {"code_revision": _rev_text(code)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _rev_text(rev: dict[str, Any]) -> str | None:
    return rev["revision"] and rev["revision"] + ("-dirty" if rev["dirty"] else "")
