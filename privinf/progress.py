"""A progress display for long private runs: one tqdm line on a terminal, nothing in pipes and logs.

:class:`PhaseDisplay` is the callback :func:`privinf.session.connect` takes (``progress(phase,
done, total)``): each new phase replaces the line ("set-up", "offline", "online" with a bar over
the model's layers). A phase without a total shows its name and a clock that keeps ticking, so a
long offline phase still shows that the run is alive. The line is cleared when the display closes.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

TICK_S = 1.0
DEFAULT_SCREEN = (80, 24)
_COUNTED = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} layers [{elapsed}]"
_OPEN_ENDED = "{desc} [{elapsed}]"


class PhaseDisplay:
    """Shows the current phase of a run on ``stream``; call it as ``display(phase, done, total)``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bar: tqdm | None = None
        self._phase: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="privinf-progress")
        self._ticker.start()

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        """Report ``done`` of ``total`` steps (None: unknown) in ``phase``; a new phase or a restart
        at 0 opens a new line."""
        with self._lock:
            if self._stop.is_set():
                return
            restart = self._bar is not None and done == 0 and self._bar.n > 0
            if self._bar is None or phase != self._phase or restart or total != self._bar.total:
                self._open(phase, total)
            self._bar.n = done
            self._bar.refresh()

    def _open(self, phase: str, total: int | None) -> None:
        self._close_bar()
        self._phase = phase
        columns, lines = _screen(self._stream)
        self._bar = tqdm(desc=phase, total=total, file=self._stream, leave=False, ncols=columns, nrows=lines,
                         bar_format=_COUNTED if total else _OPEN_ENDED, mininterval=0)

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Clear the line and stop the clock."""
        with self._lock:
            self._stop.set()
            self._close_bar()
        self._ticker.join()


def _screen(stream: TextIO) -> tuple[int, int]:
    """The terminal's (columns, lines), with 80 x 24 where it reports none (a pseudo-terminal
    without a size: tqdm would otherwise draw nothing)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return DEFAULT_SCREEN
    columns, lines = DEFAULT_SCREEN
    return (size.columns if size.columns > 0 else columns, size.lines if size.lines > 0 else lines)


@contextmanager
def terminal_progress(stream: TextIO | None = None) -> Iterator[PhaseDisplay | None]:
    """A :class:`PhaseDisplay` on ``stream`` (default stderr) if it is a terminal, else None."""
    stream = sys.stderr if stream is None else stream
    if not stream.isatty():
        yield None
        return
    display = PhaseDisplay(stream)
    try:
        yield display
    finally:
        display.close()
