"""The compiled full-domain DPF kernel (``protocols/mpc/native/dpf_native.c``) for :mod:`protocols.mpc.fss_dpf`.

**Which and why.** A C shared library loaded with ctypes, built by ``make`` like the DCF kernel
(:mod:`protocols.mpc.fss_native` says why ctypes: no Python C-API code, the GIL released for the
whole call). AES is AES-NI, used after a run-time CPU check, four tree nodes (eight blocks) in
flight; the tree of one element is expanded in place, level by level, and a lookup multiplies the
leaves into the rotated tables without writing the domain out; elements are split over pthreads.
The numpy path spends most of its time in per-level array passes and in the ``2^m``-wide
matrix product; the kernel is about 20x faster (bench/dpf_lookup.py).

**Fallback.** Without the library (no compiler, another architecture, no AES-NI, a library older
than its source, or ``PRIVINF_DPF_NATIVE=0``) :func:`active` is false, :data:`REASON` says why,
and :mod:`fss_dpf` runs numpy, which gives the same outputs bit for bit (tests/unit/test_fss_dpf.py).
"""

from __future__ import annotations

import ctypes
import logging
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np

from protocols.mpc.fss_prg import PRG_KEY, SEED_LEFT, SEED_RIGHT, TWEAKS
from protocols.mpc.native_lib import NATIVE_DIR, Switch, open_library, pointer, threads_for

if TYPE_CHECKING:
    from protocols.mpc.fss_dpf import DpfKey

ABI = 1
LIBRARY = NATIVE_DIR / "libdpf_native.so"
THREAD_POINTS = 1 << 17  # domain points (elements x 2^m) per extra thread, at least
_SWITCH = Switch("dpf_native")
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


def _load(leaf_tweaks: np.ndarray) -> tuple[ctypes.CDLL | None, str]:
    """The initialised library, or None and the reason it is not used."""
    lib, reason = open_library("dpf_native", "PRIVINF_DPF_NATIVE", ABI)
    if lib is None:
        return None, reason
    if not lib.dpf_native_supported():
        return None, "this CPU has no AES-NI"
    lib.dpf_native_init.argtypes = [ctypes.c_char_p, _P, _P]
    sides = np.ascontiguousarray(TWEAKS[[SEED_LEFT, SEED_RIGHT]], dtype=np.uint64)
    leaves = np.ascontiguousarray(leaf_tweaks, dtype=np.uint64)
    if lib.dpf_native_init(PRG_KEY, sides.ctypes.data, leaves.ctypes.data) != 0:
        return None, "the kernel refused the PRG's key or tweaks"
    lib.dpf_native_eval.argtypes = [_INT, _INT, _INT, _I64] + [_P] * 4 + [_I64, _I64, _P, _INT, _P, _P, _INT]
    return lib, "AES-NI kernel loaded"


_LIB: ctypes.CDLL | None = None
REASON = "not loaded"


def load(leaf_tweaks: np.ndarray) -> None:
    """Load the library once with the leaf tweaks of :mod:`fss_dpf` (which calls this on import)."""
    global _LIB, REASON
    _LIB, REASON = _load(leaf_tweaks)
    if _LIB is None and LIBRARY.is_file():  # built but not usable: say so once
        logging.getLogger(__name__).warning("DPF evaluation uses the numpy path: %s", REASON)


def active() -> bool:
    """Whether :mod:`fss_dpf` uses the kernel in this context (loaded and not :func:`disabled`)."""
    return _LIB is not None and not _SWITCH.off()


def disabled() -> AbstractContextManager[None]:
    """The numpy path in this context (tests and benches compare the two)."""
    return _SWITCH.disabled()


def _ptr(array: np.ndarray, dtype: type) -> int:
    return pointer(array, dtype, "DPF")


def evaluate(key: DpfKey, lo: int, hi: int, shift: np.ndarray | None = None,
             tables: np.ndarray | None = None) -> np.ndarray:
    """Full-domain outputs [hi - lo, 2^m, P] of ``key`` (a :class:`~protocols.mpc.fss_dpf.DpfKey`) for
    elements [lo, hi), or with ``shift`` [hi - lo] and ``tables`` [K, 2^m] their lookups [hi - lo, K, P]."""
    assert _LIB is not None
    bits, payload, n = key.bits, key.payload, key.count
    arrays = [key.seed, key.cw_seed, key.cw_leaf, key.cw_t]
    pointers = [_ptr(a, d) for a, d in zip(arrays, (np.uint64, np.uint64, np.int64, np.uint64))]
    if shift is None:
        out = np.empty((hi - lo, 1 << bits, payload), dtype=np.int64)
        extra = [None, 0, None]
    else:
        shift = np.ascontiguousarray(shift, dtype=np.int64)
        tables = np.ascontiguousarray(tables, dtype=np.int64)
        out = np.empty((hi - lo, tables.shape[0], payload), dtype=np.int64)
        extra = [shift.ctypes.data, tables.shape[0], tables.ctypes.data]
    status = _LIB.dpf_native_eval(key.party, bits, payload, n, *pointers, lo, hi, *extra, out.ctypes.data,
                                  threads_for((hi - lo) << bits, THREAD_POINTS))
    if status != 0:
        raise ValueError(f"the DPF kernel refused an evaluation (status {status})")
    return out
