"""Background workers for tracking, off the training loop: a thread per concern (MLflow), or one
low-priority process (DVC); jobs run in order, errors kept."""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWorker:
    """Runs submitted jobs one at a time on a daemon thread; `drain()` waits for all submitted jobs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.errors: list[str] = []
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closing = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue `fn(*args, **kwargs)`; returns at once."""
        with self._lock:  # a job queued behind the stop would never run
            if self._closing or not self._thread.is_alive():
                raise RuntimeError(f"{self.name}: background worker already closed; no more jobs accepted")
            self._queue.put((fn, args, kwargs))

    def pending(self) -> int:
        """Jobs queued or running."""
        return self._queue.unfinished_tasks

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run; False when `timeout` seconds passed first."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, name=f"{self.name}-drain", daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Run what is queued, then stop the thread; False when it did not finish in `timeout` seconds."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, args, kwargs = item
                try:
                    fn(*args, **kwargs)
                except Exception as err:  # noqa: BLE001 - reported, never raised into the training loop
                    message = f"{self.name}: {err}"
                    self.errors.append(message)
                    print(f"open360.tracking: {message}", file=sys.stderr)
                    if not isinstance(err, (RuntimeError, OSError)):
                        traceback.print_exc(file=sys.stderr)
            finally:
                self._queue.task_done()


def _lower_priority() -> None:
    """Lowest CPU priority for this process (its I/O priority follows nice), so the trainer keeps the cores."""
    import contextlib
    import os

    with contextlib.suppress(OSError):
        os.nice(19)


def _next_job(jobs: Any, poll_s: float = 1.0) -> Any:
    """The next job; None when told to stop or when the parent (the trainer) is gone, killed or not: a
    worker must not outlive it (it would sleep forever, holding the trainer's stdout open)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    while True:
        try:
            return jobs.get(timeout=poll_s)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return None


def _process_main(factory: Callable[..., Any], init_args: tuple, jobs: Any, results: Any) -> None:
    import signal

    # Ctrl-C reaches the whole process group: the trainer handles it (and then drains this queue); an
    # add/push cut in the middle would only have to be redone
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lower_priority()
    handler = factory(*init_args)
    while (job := _next_job(jobs)) is not None:
        job_id, args = job
        try:
            results.put((job_id, handler(*args), None))
        except Exception as err:  # noqa: BLE001 - sent back to the parent, which reports it
            results.put(
                (
                    job_id,
                    None,
                    f"{type(err).__name__}: {err}" if not isinstance(err, RuntimeError) else str(err),
                )
            )
    results.put(None)


class ProcessWorker:
    """Runs jobs in one low-priority child process (no GIL shared with training); results come back in order.

    `factory(*init_args)` is called once in the child and returns the job handler; `submit(*args)` queues
    `handler(*args)`; `on_result(args, result, error)` is called in the parent for every finished job.
    """

    def __init__(
        self,
        name: str,
        factory: Callable[..., Callable[..., Any]],
        init_args: tuple,
        on_result: Callable[[tuple, Any, str | None], None],
    ) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.errors: list[str] = []
        self._on_result = on_result
        self._jobs = ctx.Queue()
        self._results = ctx.Queue()
        self._submitted: dict[int, tuple] = {}
        self._next_id = 0
        self._closing = False
        self._cond = threading.Condition()
        self._process = ctx.Process(
            target=_process_main, args=(factory, init_args, self._jobs, self._results), name=name, daemon=True
        )
        self._process.start()
        self._reader = threading.Thread(target=self._read, name=f"{name}-results", daemon=True)
        self._reader.start()

    def submit(self, *args: Any) -> None:
        """Queue `handler(*args)` in the child; returns at once."""
        with self._cond:
            if self._closing or not self._reader.is_alive() or not self._process.is_alive():
                raise RuntimeError(f"{self.name}: worker process already stopped; no more jobs accepted")
            job_id, self._next_id = self._next_id, self._next_id + 1
            self._submitted[job_id] = args
        self._jobs.put((job_id, args))

    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._submitted)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has finished; False when `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._submitted, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued jobs, stop the child; False when that took longer than `timeout` seconds (call
        it again to go on waiting)."""
        if self._process.is_alive() and not self._closing:
            self._closing = True
            self._jobs.put(None)
        self._reader.join(timeout)
        if self._reader.is_alive():
            return False
        self._process.join(10)
        return True

    def _finish(self, job_id: int, result: Any, error: str | None) -> None:
        with self._cond:
            args = self._submitted.pop(job_id, ())
        if error is not None:
            self.errors.append(f"{self.name}: {error}")
            print(f"open360.tracking: {self.name}: {error}", file=sys.stderr)
        try:
            self._on_result(args, result, error)
        finally:
            with self._cond:
                self._cond.notify_all()

    def _read(self) -> None:
        while True:
            try:
                item = self._results.get(timeout=1.0)
            except queue.Empty:
                if self._process.is_alive():
                    continue
                code = self._process.exitcode
                with self._cond:
                    lost = list(self._submitted)
                for job_id in lost:
                    self._finish(
                        job_id, None, f"worker process exited (code {code}) before finishing this job"
                    )
                return
            if item is None:
                return
            self._finish(*item)
