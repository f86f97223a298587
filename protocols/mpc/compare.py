"""Comparisons on CrypTen shares with FSS sign-gate keys from the dealer (:mod:`protocols.mpc.fss`).

CrypTen computes every comparison (``<``, ``>``, ``relu``, ``sign``, ``max``, ``argmax``, the
sign inside ``sigmoid`` and ``reciprocal``) through ``MPCTensor._ltz``: a conversion to XOR
shares and a 64-bit adder circuit, about 230 bytes and 9 rounds per element and party.
:func:`less_than_zero` is the FSS replacement: each party adds its share of the dealer's mask
``r``, the parties open ``x + r`` (one exchange, one round) and each evaluates its key locally,
giving arithmetic shares of ``[x < 0]`` at scale 1, exactly what ``_ltz`` returns. The opened
values are sent in ``ceil(bits / 8)`` bytes each (5 at 40 bits, 4 for GeLU's 32-bit range
tests; :func:`open_low_bits`). The dealer sends the keys offline (``--preprocess``) or on
request.

Comparison width: the gate looks at ``x mod 2^bits``, so it is exact for ring values
``|x| < 2^(bits - 1)``; with the default configuration (16 fractional bits, comparison_bits =
40; :class:`~protocols.protocol_config.ProtocolConfig`) that is ``|value| < 2^23`` (8.4
million). Larger values (CrypTen's own products overflow near ``|x * y| >= 2^31``) would compare
wrongly (``models.ops.inv_sqrt_wide``'s energies stay below 2^21 through its calibrated shift).
Code that knows its operands are smaller says so with ``models.ops.compare_bound(limit)``; the
gate then runs on :func:`bits_for` bits (GeLU's range tests: 32 bits, 20% smaller and faster
keys). ``comparisons = "circuit"`` in a session keeps CrypTen's circuit (no width limit).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch

from protocols.mpc.cryptenlib import MPCTensor, crypten
from protocols.protocol_config import COMPARISON_METHODS


def bits_for(bound: float | None, default: int, fraction_bits: int) -> int:
    """Ring width for comparing values below ``bound`` in magnitude (``models.ops.compare_bound``):
    the integer bits, the ``fraction_bits``, a sign bit and one bit of headroom; never above
    ``default`` (the session's ``comparison_bits``)."""
    if bound is None:
        return default
    return max(2, min(default, math.ceil(math.log2(bound)) + fraction_bits + 2))


class ComparisonError(ValueError):
    """An unknown comparison method or an unusable bit width."""


def check_comparisons(method: str) -> str:
    """``method`` if it is a comparison method the protocol knows."""
    if method not in COMPARISON_METHODS:
        raise ComparisonError(f"unknown comparison method {method!r}; expected one of {', '.join(COMPARISON_METHODS)}")
    return method


def open_low_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``(mine + theirs) mod 2^bits`` for int64 ``values`` already in ``[0, 2^bits)``, sending
    ``ceil(bits / 8)`` bytes per element (packed into int64 words, so CrypTen's own counters
    stay in bytes) instead of 8: one exchange through CrypTen's communicator, one round."""
    comm = crypten.communicator.get()
    low = (1 << bits) - 1 if bits < 64 else -1
    width = (bits + 7) // 8
    if width >= 8 or sys.byteorder != "little":
        return comm.all_reduce(values) & low
    n = values.numel()
    raw = values.reshape(-1).numpy().view(np.uint8).reshape(n, 8)[:, :width]
    packed = np.zeros(-(-n * width // 8) * 8, dtype=np.uint8)
    packed[:n * width] = raw.ravel()
    gathered = comm.all_gather(torch.from_numpy(packed.view(np.int64)))
    words = gathered[1 - comm.get_rank()].numpy()
    if words.shape != (packed.size // 8,):
        raise ComparisonError(f"peer opened {words.shape} words, expected {packed.size // 8}")
    theirs = np.zeros((n, 8), dtype=np.uint8)
    theirs[:, :width] = words.view(np.uint8)[:n * width].reshape(n, width)
    return (values + torch.from_numpy(theirs.view(np.int64).reshape(values.shape))) & low


def less_than_zero(x: Any, provider: Any, bits: int) -> Any:
    """``[x < 0]`` as an arithmetic MPCTensor at scale 1 (CrypTen's ``_ltz`` contract).

    ``provider`` is the party's :class:`~protocols.mpc.cryptenlib.provider.DealerProvider` (it fetches
    the keys); the opening goes through CrypTen's communicator, so it is counted like any other.
    """
    share = x._tensor.share
    if share.device.type != "cpu":
        raise ComparisonError(f"FSS comparisons run on CPU shares, got {share.device}")
    key = provider.sign_key(share.shape, bits)
    masked = torch.from_numpy(key.masked(share.reshape(-1).numpy()))
    opened = open_low_bits(masked, bits)
    bit = torch.from_numpy(key.evaluate(opened.numpy())).reshape(share.shape)
    return MPCTensor.from_shares(bit, precision=0)
