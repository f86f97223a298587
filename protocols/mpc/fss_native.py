"""The compiled DCF kernel (``protocols/mpc/native/fss_native.c``) for :mod:`protocols.mpc.fss`.

**Which and why.** A C shared library loaded with ctypes, built by ``make`` (``make install``,
``make test`` and ``make run`` depend on it; ``make native`` alone) with the system C compiler,
offline. Not a CPython extension: the kernel only walks raw buffers, so ctypes needs no
Python C-API code, releases the GIL for the whole call (the parties' threads and the dealer
pool's threads run in parallel with it), and a source change is rebuilt by make's own
dependency rule. AES is AES-NI (``_mm_aesenc_si128``), compiled for that target only and
used after a run-time CPU check; several blocks per level are kept in flight, and large calls
are split over plain pthreads (``threads``: the host's cores, one for small calls).

**Why it is faster.** The numpy path calls OpenSSL's AES (already AES-NI, pipelined) once per
level on the whole chunk, but spends most of its time in the per-level tree logic: about a dozen
numpy passes over the chunk per level, each reading and writing memory. The kernel keeps a
point's walk in registers and touches each key word once.

**Fallback.** Without the library (no compiler at install time, a non-x86-64 host, a CPU
without AES-NI, a library older than its source, or ``PRIVINF_FSS_NATIVE=0`` in the
environment) :func:`active` is false, :data:`REASON` says why in one line, and :mod:`fss` runs
its numpy path, which gives bit-identical keys and shares (tests/unit/test_fss_native.py).
"""

from __future__ import annotations

import ctypes
import logging
from contextlib import AbstractContextManager

import numpy as np

from protocols.mpc.fss_prg import PRG_KEY, TWEAKS
from protocols.mpc.native_lib import NATIVE_DIR, Switch, open_library, pointer, threads_for

ABI = 2  # 2: the bit-output DCF of protocols/mpc/fss_bit.py
LIBRARY = NATIVE_DIR / "libfss_native.so"
THREAD_MIN = 8192  # points (or elements to generate) per extra thread, at least
_SWITCH = Switch("fss_native")
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def _load() -> tuple[ctypes.CDLL | None, str]:
    """The initialised library, or None and the reason it is not used."""
    lib, reason = open_library("fss_native", "PRIVINF_FSS_NATIVE", ABI)
    if lib is None:
        return None, reason
    if not lib.fss_native_supported():
        return None, "this CPU has no AES-NI"
    lib.fss_native_init.argtypes = [ctypes.c_char_p, _P]
    tweaks = np.ascontiguousarray(TWEAKS, dtype=np.uint64)
    if lib.fss_native_init(PRG_KEY, tweaks.ctypes.data) != 0:
        return None, "the kernel refused the PRG's key or tweaks"
    lib.fss_dcf_eval.argtypes = [ctypes.c_int, ctypes.c_int, _I64, _I64] + [_P] * 7 + [ctypes.c_int]
    lib.fss_dcf_gen.argtypes = [ctypes.c_int, _I64, _I64, _I64] + [_P] * 7 + [ctypes.c_int]
    lib.fss_bit_eval.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, _I64] + [_P] * 6 + [ctypes.c_int]
    lib.fss_bit_gen.argtypes = [ctypes.c_int, ctypes.c_int, _I64, _I64, _I64] + [_P] * 5 + [ctypes.c_int]
    return lib, "AES-NI kernel loaded"


_LIB, REASON = _load()
if _LIB is None and LIBRARY.is_file():  # built but not usable: say so once (not built at all: make said so)
    logging.getLogger(__name__).warning("FSS keys use the numpy path: %s", REASON)


def available() -> bool:
    """Whether the compiled kernel is built, loadable and usable on this CPU."""
    return _LIB is not None


def active() -> bool:
    """Whether :mod:`fss` uses the kernel in this context (available and not :func:`disabled`)."""
    return _LIB is not None and not _SWITCH.off()


def disabled() -> AbstractContextManager[None]:
    """The numpy path in this context (tests and benches compare the two)."""
    return _SWITCH.disabled()


def _ptr(array: np.ndarray, dtype: type, writable: bool = False) -> int:
    return pointer(array, dtype, "FSS", writable)


def dcf_eval(party: int, bits: int, keys: tuple[np.ndarray, ...], x: np.ndarray, repeat: int) -> np.ndarray:
    """int64 shares at ``x`` (uint64 [n * repeat]) of the keys ``(seed, cw_seed, cw_value, cw_final,
    cw_t)`` (:class:`protocols.mpc.fss.DcfKey`'s arrays), as :func:`protocols.mpc.fss.dcf_eval`."""
    assert _LIB is not None
    seed, cw_seed, cw_value, cw_final, cw_t = keys
    n = seed.shape[0]
    x = np.ascontiguousarray(x, dtype=np.uint64)
    out = np.empty(x.shape[0], dtype=np.int64)
    pointers = [_ptr(seed, np.uint64), _ptr(cw_seed, np.uint64), _ptr(cw_value, np.int64), _ptr(cw_final, np.int64),
                _ptr(cw_t, np.uint64), _ptr(x, np.uint64), _ptr(out, np.int64, True)]
    status = _LIB.fss_dcf_eval(party, bits, n, repeat, *pointers, threads_for(x.shape[0], THREAD_MIN))
    if status != 0:
        raise ValueError(f"the FSS kernel refused an evaluation (status {status})")
    return out


def dcf_gen(bits: int, lo: int, alpha: np.ndarray, beta: np.ndarray, seeds: np.ndarray,
            corrections: tuple[np.ndarray, ...]) -> None:
    """Correction words of key elements [lo, lo + m) into ``corrections`` ``(cw_seed, cw_value,
    cw_final, cw_t)`` (party 0's :class:`~protocols.mpc.fss.DcfKey` arrays, whole key) from
    ``alpha`` [m], ``beta`` [m] and both parties' initial seeds [2, m, 2]."""
    assert _LIB is not None
    cw_seed, cw_value, cw_final, cw_t = corrections
    m = alpha.shape[0]
    alpha = np.ascontiguousarray(alpha, dtype=np.uint64)
    beta = np.ascontiguousarray(beta, dtype=np.int64)
    seeds = np.ascontiguousarray(seeds, dtype=np.uint64)
    pointers = [_ptr(alpha, np.uint64), _ptr(beta, np.int64), _ptr(seeds, np.uint64), _ptr(cw_seed, np.uint64, True),
                _ptr(cw_value, np.int64, True), _ptr(cw_final, np.int64, True), _ptr(cw_t, np.uint64, True)]
    status = _LIB.fss_dcf_gen(bits, cw_final.shape[0], lo, m, *pointers, threads_for(m, THREAD_MIN))
    if status != 0:
        raise ValueError(f"the FSS kernel refused a key generation (status {status})")


def _levels(bits: int) -> int:
    return bits - min(7, bits)  # protocols.mpc.fss_bit.levels (that module imports this one)


def bit_dcf_eval(party: int, bits: int, keys: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    """XOR shares (uint8 0/1) at ``x`` (uint64 [n], one point per key) of the bit-output keys
    ``(seed, cw_seed, cw_leaf, cw_bits)`` (:class:`protocols.mpc.fss_bit.BitDcfKey`'s arrays)."""
    assert _LIB is not None
    seed, cw_seed, cw_leaf, cw_bits = keys
    n = seed.shape[0]
    x = np.ascontiguousarray(x, dtype=np.uint64)
    out = np.empty(n, dtype=np.uint8)
    pointers = [_ptr(seed, np.uint64), _ptr(cw_seed, np.uint64), _ptr(cw_leaf, np.uint64), _ptr(cw_bits, np.uint64),
                _ptr(x, np.uint64), _ptr(out, np.uint8, True)]
    status = _LIB.fss_bit_eval(party, bits, _levels(bits), n, *pointers, threads_for(n, THREAD_MIN))
    if status != 0:
        raise ValueError(f"the FSS kernel refused a bit-output evaluation (status {status})")
    return out


def bit_dcf_gen(bits: int, alpha: np.ndarray, seeds: np.ndarray, corrections: tuple[np.ndarray, ...]) -> None:
    """Correction words of all key elements into ``corrections`` ``(cw_seed, cw_leaf, cw_bits)``
    (party 0's :class:`~protocols.mpc.fss_bit.BitDcfKey` arrays) from ``alpha`` [n] and both
    parties' initial seeds [2, n, 2]."""
    assert _LIB is not None
    cw_seed, cw_leaf, cw_bits = corrections
    n = alpha.shape[0]
    alpha = np.ascontiguousarray(alpha, dtype=np.uint64)
    seeds = np.ascontiguousarray(seeds, dtype=np.uint64)
    pointers = [_ptr(alpha, np.uint64), _ptr(seeds, np.uint64), _ptr(cw_seed, np.uint64, True),
                _ptr(cw_leaf, np.uint64, True), _ptr(cw_bits, np.uint64, True)]
    status = _LIB.fss_bit_gen(bits, _levels(bits), n, 0, n, *pointers, threads_for(n, THREAD_MIN))
    if status != 0:
        raise ValueError(f"the FSS kernel refused a bit-output key generation (status {status})")
