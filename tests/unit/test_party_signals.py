"""Stop requests from signals (mpc_parties/signals.py): a second signal that arrives while the first
one's handler holds a lock returns at once instead of waiting for itself (the server froze so)."""

from __future__ import annotations

import os
import signal
import threading

from mpc_parties.signals import StopOnce, stop_on_signals


def test_signal_inside_the_stop_handler_returns_at_once() -> None:
    lock = threading.Lock()  # what Event.set takes
    calls: list[int] = []

    def stop() -> None:
        assert lock.acquire(timeout=5), "the nested stop request waited for the first one's lock"
        try:
            calls.append(1)
            os.kill(os.getpid(), signal.SIGUSR1)  # the second request, while this one holds the lock
            for _ in range(10_000):  # bytecodes: the handler runs here, in this thread
                pass
        finally:
            lock.release()

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        once = stop_on_signals(stop, (signal.SIGUSR1,))
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(10_000):
            pass
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert once.requested and calls == [1]


def test_stop_runs_once_whoever_asks() -> None:
    calls: list[str] = []
    once = StopOnce(lambda: calls.append("stop"))
    thread = threading.Thread(target=once)  # the launcher went away (stdin watcher)
    thread.start()
    thread.join()
    once()  # then SIGTERM
    assert calls == ["stop"]
