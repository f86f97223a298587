"""Ring products ``x @ W^T mod 2^64`` with a compiled kernel (``protocols/mpc/native/ring_matmul.c``).

**Why.** The weight-stationary server multiplies a uniform int64 vector by its plaintext weight
every step: for a decoder's vocabulary tables (the word embedding and the LM head, 50,257 x
1,024 at MPCache's setting) that is a pass over ~400 MB of int64 per product, and torch's
integer matmul (no BLAS) runs it at memory speed at best, slower on a transposed table. The
server's fixed-point weights fit in 32 bits (random tables in 16), so the table can be held as
int32 (int16): the kernel sign-extends each entry and multiplies in uint64, which is the exact
ring product (the same bits as torch's int64 matmul of the widened table) while reading half (a
quarter of) the bytes, with AVX-512's 64-bit multiply where the CPU has it.

**Which.** A C shared library loaded with ctypes (as :mod:`protocols.mpc.fss_native`), built by
``make`` with the system C compiler; ctypes releases the GIL for the call. It reads W in either
layout torch hands it over (row-major ``[out, in]``, or the transposed view of an embedding
table ``[vocab, dim]``), so no copy is made. Products of more than 2^22 multiply-adds are split
over plain pthreads (the host's cores, as the FSS kernel: the vocabulary products of a decode
step run on both cores of a 2-core host while the client waits for them; a party's thread-CPU
clock then counts only its own thread's share): a row-major weight by output rows, a transposed
table by blocks of its rows, each thread summing a partial product that is added up at the end
(split by output columns, each thread would stream half of every table row and gain nothing:
50,257 x 1,024 int16 embedding, 2 threads, 16.9 ms before, 10.1 ms after, 18.0 ms on one).

**Fallback.** Without the library (no compiler, a library older than its source, or
``PRIVINF_RING_MATMUL=0``), :func:`times_transposed` computes the same product with torch's
int64 matmul (a narrow weight widened first), bit for bit (tests/unit/test_ring_matmul.py).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from protocols.mpc.native_lib import NATIVE_DIR, open_library, threads_for

ABI = 3
LIBRARY = NATIVE_DIR / "libring_matmul.so"
WORK_PER_THREAD = 1 << 22  # multiply-adds per extra thread, at least
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


def _load() -> tuple[ctypes.CDLL | None, str]:
    """The library, or None and the reason it is not used."""
    lib, reason = open_library("ring_matmul", "PRIVINF_RING_MATMUL", ABI)
    if lib is None:
        return None, reason
    lib.ring_matmul.argtypes = [_P, _I64, _I64, _P, _INT, _INT, _I64, _P, _INT]
    lib.ring_matmul_batched.argtypes = [_P, _I64, _I64, _I64, _P, _I64, _INT, _INT, _I64, _I64, _P, _INT]
    level = ("the default target", "AVX2", "AVX-512")[lib.ring_matmul_init()]
    return lib, f"kernel loaded ({level})"


_LIB, REASON = _load()
if _LIB is None and LIBRARY.is_file():
    logging.getLogger(__name__).warning("ring products use torch: %s", REASON)


def available() -> bool:
    """Whether the compiled kernel is built and loaded."""
    return _LIB is not None


NARROW = (torch.int16, torch.int32)  # weight types the kernel reads besides int64, narrowest first
_BITS = {torch.int16: 16, torch.int32: 32, torch.int64: 64}


def compact_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (int64 ring elements) as the narrowest of int16 / int32 that holds every entry
    when the kernel is loaded (a quarter / half of the bytes per pass, the same ring products),
    else unchanged. Keeps its layout. (At 16 fractional bits int16 holds weights below 0.5 in
    magnitude: randomly initialised tables; trained ones such as SmolLM2's embedding, up to 1.96,
    take int32.)"""
    if _LIB is None or weight.dtype != torch.int64 or _layout(weight) is None or weight.numel() == 0:
        return weight
    low, high = int(weight.min()), int(weight.max())
    for dtype in NARROW:
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return weight.to(dtype)
    return weight


def _layout(weight: torch.Tensor) -> int | None:
    """0: row-major [out, in]; 1: the transpose of a row-major [in, out]; None: neither."""
    if weight.dim() != 2:
        return None
    out, inner = weight.shape
    rows, cols = weight.stride()  # a dim of size 1 may have any stride
    if (cols == 1 or inner == 1) and (rows == inner or out == 1):
        return 0
    if (rows == 1 or out == 1) and (cols == out or inner == 1):
        return 1
    return None


def times_transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` mod 2^64: ``x`` int64 [..., in], ``weight`` int16, int32 or int64 [out, in]
    (row-major, or the transposed view of a row-major table); int64 [..., out], contiguous."""
    flat = x.reshape(-1, x.shape[-1])
    layout = _layout(weight)
    if _LIB is None or layout is None or weight.dtype not in _BITS or x.dtype != torch.int64:
        return _torch_product(flat, weight).reshape(*x.shape[:-1], weight.shape[0])
    flat = flat.contiguous()
    rows, (out, inner) = flat.shape[0], weight.shape
    if flat.shape[1] != inner:
        raise ValueError(f"x has {flat.shape[1]} features, weight {list(weight.shape)}")
    y = torch.empty(rows, out, dtype=torch.int64)
    status = _LIB.ring_matmul(flat.data_ptr(), rows, inner, weight.data_ptr(), _BITS[weight.dtype], layout, out,
                              y.data_ptr(), threads_for(rows * inner * out, WORK_PER_THREAD))
    if status != 0:
        raise ValueError(f"the ring product kernel refused shapes {list(flat.shape)} x {list(weight.shape)}")
    return y.reshape(*x.shape[:-1], out)


def times_transposed_batched(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x[g] @ weight[g]^T`` mod 2^64 for every g: ``x`` int64 [G, n, in], ``weight`` [G, out, in]
    whose entries are each in one layout of :func:`times_transposed` at one stride apart (the
    heads of a KV-stationary product, a view of the cache); int64 [G, n, out], contiguous. One
    kernel call for the batch (the entries split over the host's cores) instead of one per entry
    (~20 us of call overhead each), else :func:`times_transposed` per entry."""
    if x.dim() != 3 or weight.dim() != 3 or x.shape[0] != weight.shape[0] or x.shape[2] != weight.shape[2]:
        raise ValueError(f"batched ring product of {list(x.shape)} and {list(weight.shape)}")
    batch, n, inner = x.shape
    out = weight.shape[1]
    layout = _layout(weight[0]) if batch else None
    if _LIB is None or layout is None or weight.dtype not in _BITS or x.dtype != torch.int64 or n == 0:
        return torch.stack([times_transposed(x[g], weight[g]) for g in range(batch)]) if batch and n else \
            torch.zeros(batch, n, out, dtype=torch.int64)
    x = x.contiguous()
    y = torch.empty(batch, n, out, dtype=torch.int64)
    status = _LIB.ring_matmul_batched(x.data_ptr(), n * inner, n, inner, weight.data_ptr(), weight.stride(0),
                                      _BITS[weight.dtype], layout, out, batch, y.data_ptr(),
                                      threads_for(batch * n * inner * out, WORK_PER_THREAD))
    if status != 0:
        raise ValueError(f"the ring product kernel refused shapes {list(x.shape)} x {list(weight.shape)}")
    return y


def _torch_product(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The fallback: torch's int64 matmul (no BLAS, so ``W @ x^T``: up to 30x faster than
    ``x @ W^T`` on a transposed operand; one row is a matrix-vector product)."""
    weight = weight.to(torch.int64)
    if flat.shape[0] == 1:
        return torch.mv(weight, flat[0]).unsqueeze(0)
    return torch.matmul(weight, flat.t()).t().contiguous()
