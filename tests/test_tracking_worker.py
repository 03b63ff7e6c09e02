"""Tracking workers: jobs run in order in a child process, results come back, the child dies with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from open360.tracking.worker import BackgroundWorker, ProcessWorker


class Doubler:
    """A job handler: returns twice its argument, raises on a negative one."""

    def __call__(self, x: int) -> int:
        if x < 0:
            raise ValueError(f"negative {x}")
        return 2 * x


def test_results_come_back_in_order_with_errors() -> None:
    got: list[tuple] = []
    worker = ProcessWorker("t", Doubler, (), lambda args, result, error: got.append((args, result, error)))
    for x in (1, -1, 3):
        worker.submit(x)
    assert worker.drain(60)
    worker.close()
    assert got == [((1,), 2, None), ((-1,), None, "ValueError: negative -1"), ((3,), 6, None)]


class Sleeper:
    """A job handler that sleeps `s` seconds (a slow push)."""

    def __call__(self, s: float) -> float:
        time.sleep(s)
        return s


def test_close_can_be_waited_on_in_slices_until_the_jobs_finish() -> None:
    got: list[tuple] = []
    worker = ProcessWorker("t", Sleeper, (), lambda args, result, error: got.append((result, error)))
    worker.submit(3.0)
    worker.submit(0.1)
    assert not worker.close(timeout=0.5) and worker.pending() >= 1
    with pytest.raises(RuntimeError, match="already stopped"):  # queued behind the stop, it would never run
        worker.submit(0.1)
    assert worker.close(timeout=60)
    assert got == [(3.0, None), (0.1, None)]


def test_the_end_of_a_run_reports_add_push_jobs_that_keep_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hung or slow remote: the run's end says, every `wait_report_s`, what it waits for and that Ctrl-C is safe."""
    from open360.tracking.dvc_callback import DvcVersioner

    versioner = DvcVersioner(tmp_path)
    versioner._worker = ProcessWorker("dvc[r]", Sleeper, (), lambda *_: None)
    versioner._worker.submit(2.0)
    versioner.wait_report_s = 0.5
    versioner.on_run_end({"status": "finished"})
    err = capsys.readouterr().err
    assert "waiting for 1 DVC add/push job(s)" in err
    assert "still waiting for 1 DVC add/push job(s) after" in err and "Ctrl-C stops the wait and loses no checkpoint" in err
    assert versioner.wait() and versioner.errors == []


def test_a_thread_worker_refuses_jobs_once_told_to_close() -> None:
    """A job submitted after `close()` timed out would sit behind the stop, never run, and keep `drain()` waiting:
    it is refused (a late checkpoint record then says it was not delivered)."""
    worker = BackgroundWorker("t")
    ran: list[int] = []
    worker.submit(time.sleep, 1.0)
    assert not worker.close(timeout=0.1)
    with pytest.raises(RuntimeError, match="already closed"):
        worker.submit(ran.append, 1)
    assert worker.close(timeout=60) and worker.drain(10) and ran == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not status.is_file() or "State:\tZ" not in status.read_text()


def test_the_child_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the trainer (no cleanup runs) must not leave the worker process sleeping forever."""
    pid_file = tmp_path / "child.pid"
    script = (
        f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_tracking_worker import Doubler\n"
        "from open360.tracking.worker import ProcessWorker\n"
        "w = ProcessWorker('t', Doubler, (), lambda *a: None)\n"
        f"open({str(pid_file)!r}, 'w').write(str(w._process.pid)); time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    child = 0
    try:
        deadline = time.time() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.time() < deadline, "the worker did not start"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.time() + 30
        while _alive(child) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child and _alive(child):  # never leave an orphan behind, even when the test fails
            os.kill(child, signal.SIGKILL)
