"""Stopping session workers (mpc_parties/worker_pool.py): each worker's group gets SIGTERM, the wait
for their exits is woken by their pidfds, one that ignores SIGTERM is killed, all are reaped."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from mpc_parties import worker_pool


def _worker(ignore_sigterm: bool) -> int:
    """Fork a child that leads its own group and waits for signals (as a session worker does)."""
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_sigterm else signal.SIG_DFL)
            os.write(ready_write, b"r")
            while True:
                signal.pause()
        finally:
            os._exit(0)
    os.close(ready_write)
    assert os.read(ready_read, 1) == b"r"  # its SIGTERM disposition is set
    os.close(ready_read)
    return pid


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # not our child any more: reaped already
    return False


def test_stop_children_terminates_kills_and_reaps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_pool, "KILL_AFTER_S", 1.0)
    polite, stubborn = _worker(False), _worker(True)
    children = {polite, stubborn}
    worker_pool._stop_children(children)
    for pid in (polite, stubborn):
        assert _reaped(pid) and not Path(f"/proc/{pid}").exists()


def test_wait_exits_returns_when_every_child_exited() -> None:
    pids = {_worker(False), _worker(False)}
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    worker_pool._wait_exits(pids, timeout=60.0)  # woken by the pidfds, not by the deadline
    for pid in pids:
        done, status = os.waitpid(pid, os.WNOHANG)
        assert done == pid and os.WIFSIGNALED(status)  # had exited before the wait returned
