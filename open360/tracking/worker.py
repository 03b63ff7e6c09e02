"""One background thread per tracking concern: jobs run in order, off the training loop, errors kept."""

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
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue `fn(*args, **kwargs)`; returns at once."""
        if not self._thread.is_alive():
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
        if not self._thread.is_alive():
            return True
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
