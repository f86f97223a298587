"""Process memory knobs for long-running parties (glibc only; elsewhere they do nothing)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_memory() -> None:
    """Give memory the allocator holds but no longer uses back to the system."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def limit_arenas(count: int = 2) -> None:
    """Let at most ``count`` malloc arenas exist: each thread of a process would otherwise get
    its own, each holding freed memory the others cannot reuse."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, count)
