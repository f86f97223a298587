"""FSS sign-gate keys for one large request, generated in element ranges on several threads.

Each element's DCF key and mask shares are drawn independently of every other element's
(:func:`protocols.mpc.fss.sign_gen`), so the keys of ``n`` elements are the keys of ranges of
them laid side by side: the dealer generates ranges of at most ``part`` elements (multiples of
64, the packing of the control bits) on several threads (the AES and numpy work release the
GIL) and joins each party's pieces field by field
through :class:`~protocols.mpc.fss.SignKey` (the wire layout stays fss's). Keys are the same in
distribution as one call's; the randomness is ``os.urandom`` as before. tests/unit/test_dealer_pool.py
checks joined keys against the gate on edge and random inputs.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor

import numpy as np

from protocols.mpc import fss

SPLIT_ELEMENTS = 1 << 16  # requests above this many elements are generated in ranges of this size


def _urandom_shares(count: int) -> np.ndarray:
    return np.frombuffer(os.urandom(8 * count), dtype=np.int64)


def generate(count: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Both parties' sign keys for ``count`` elements in one call."""
    return fss.sign_gen(count, bits, os.urandom, _urandom_shares)


def ranges(count: int, part: int = SPLIT_ELEMENTS) -> list[int]:
    """Sizes of the element ranges a request of ``count`` elements is generated in."""
    part = max(64, part - part % 64)
    return [min(part, count - start) for start in range(0, count, part)] or [0]


def join(pieces: list[np.ndarray], sizes: list[int], party: int, bits: int) -> np.ndarray:
    """One party's keys for all elements from its keys for consecutive ranges of ``sizes``."""
    keys = [fss.SignKey.from_array(party, bits, n, piece) for piece, n in zip(pieces, sizes)]
    dcfs = [k.dcf for k in keys]
    dcf = fss.DcfKey(party, dcfs[0].bits, np.concatenate([d.seed for d in dcfs]),
                     np.concatenate([d.cw_seed for d in dcfs], axis=1),
                     np.concatenate([d.cw_value for d in dcfs], axis=1),
                     np.concatenate([d.cw_final for d in dcfs]),
                     np.concatenate([d.cw_t for d in dcfs], axis=1))
    return np.concatenate([dcf.to_array(), *(k.mask_share for k in keys), *(k.top_share for k in keys)])


def generate_split(count: int, bits: int, executor: Executor | None, helpers: int = 1,
                   part: int = SPLIT_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """Both parties' sign keys for ``count`` elements, made in ranges by this thread and up to
    ``helpers`` tasks on ``executor`` (whoever is free takes the next range); one call when the
    request is small or there is no executor."""
    sizes = ranges(count, part)
    if executor is None or helpers < 1 or len(sizes) == 1:
        return generate(count, bits)
    pieces: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(sizes)
    order = iter(range(len(sizes)))
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            pieces[i] = generate(sizes[i], bits)

    futures = [executor.submit(drain) for _ in range(min(helpers, len(sizes) - 1))]
    drain()
    for future in futures:
        future.result()
    done = [p for p in pieces if p is not None]
    return join([p[0] for p in done], sizes, 0, bits), join([p[1] for p in done], sizes, 1, bits)
