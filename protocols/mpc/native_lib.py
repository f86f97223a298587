"""Loading the compiled kernels of ``protocols/mpc/native`` (each ``NAME.c`` built by ``make`` into
``libNAME.so``) with ctypes: the checks every loader makes before it trusts a library, and the
thread count of a call. The kernels' own modules (:mod:`fss_native`, :mod:`dpf_native`,
:mod:`ring_matmul`) declare their functions and fall back to numpy / torch when this says no.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np

NATIVE_DIR = Path(__file__).resolve().parent / "native"


def open_library(name: str, switch: str, abi: int) -> tuple[ctypes.CDLL | None, str]:
    """``libNAME.so`` loaded, or None and the one-line reason it is not used: ``switch=0`` in the
    environment, not built, older than ``NAME.c`` or a header of the directory (make's rule), not
    loadable, or an ABI (its ``NAME_abi()``) other than ``abi``."""
    directory = NATIVE_DIR
    source, library = directory / f"{name}.c", directory / f"lib{name}.so"
    if os.environ.get(switch, "1") == "0":
        return None, f"disabled by {switch}=0"
    if not library.is_file():
        return None, f"{library.name} is not built (run `make native`)"
    for path in (source, *sorted(directory.glob("*.h"))):
        if path.is_file() and path.stat().st_mtime > library.stat().st_mtime:
            return None, f"{library.name} is older than {path.name} (run `make native`)"
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as exc:
        return None, f"{library.name} does not load: {exc}"
    found = getattr(lib, f"{name}_abi")()
    if found != abi:
        return None, f"{library.name} has ABI {found}, expected {abi} (run `make native`)"
    return lib, "loaded"


def host_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_for(count: int, per_thread: int) -> int:
    """Threads for a call on ``count`` points or elements: the host's cores, fewer for small calls
    (at least ``per_thread`` per extra thread)."""
    return max(1, min(host_cores(), count // per_thread))


def pointer(array: np.ndarray, dtype: type, kernel: str, writable: bool = False) -> int:
    """The address of ``array``, which must be a contiguous ``dtype`` buffer (writable if asked)."""
    if array.dtype != dtype or not array.flags.c_contiguous or (writable and not array.flags.writeable):
        raise ValueError(f"the {kernel} kernel needs contiguous {np.dtype(dtype).name} buffers, got {array.dtype}")
    return array.ctypes.data


class Switch:
    """A kernel's per-context off switch: within :meth:`disabled` its module uses the fallback (tests
    and benches compare the two)."""

    def __init__(self, name: str) -> None:
        self._off: ContextVar[bool] = ContextVar(f"{name}_disabled", default=False)

    def off(self) -> bool:
        """Whether the kernel is switched off in this context."""
        return self._off.get()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The fallback path within the block."""
        token = self._off.set(True)
        try:
            yield
        finally:
            self._off.reset(token)
