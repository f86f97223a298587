"""Stop requests from signals, safe against a second signal arriving while the first is handled.

A Python signal handler runs in the main thread between bytecodes, so a second signal can run its
handler *inside* the first one. A handler that takes a lock (``threading.Event.set`` does) and is
interrupted while holding it then waits for itself forever: two SIGTERMs in a row (a launcher
asking all its parties to stop, then each again) froze the server that way until it was killed.
:class:`StopOnce` marks the request before it calls anything that locks, so a nested or repeated
signal returns at once.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopOnce:
    """Calls ``stop`` the first time it is called (from a signal handler or a thread), never again."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self.requested = False

    def __call__(self, *_args: object) -> None:
        if self.requested:
            return
        self.requested = True  # before anything that may lock: a nested call now returns at once
        self._stop()


def stop_on_signals(stop: Callable[[], None], signals: Iterable[int] = STOP_SIGNALS) -> StopOnce:
    """Install a :class:`StopOnce` of ``stop`` as the handler of ``signals``; return it."""
    once = StopOnce(stop)
    for signum in signals:
        signal.signal(signum, once)
    return once
