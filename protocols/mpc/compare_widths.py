"""The bit width and the dropped low bits of an FSS comparison (:mod:`protocols.mpc.compare`), from
the ranges the code promises (``models.ops.compare_bound``): pure functions of public numbers,
shared by the gate and by the per-shape pricing (:mod:`protocols.mpc.kernel_choice`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence


def bits_for(bound: float | None, default: int, fraction_bits: int) -> int:
    """Ring width for comparing values below ``bound`` in magnitude (``models.ops.compare_bound``):
    the integer bits, the ``fraction_bits``, a sign bit and one bit of headroom; never above
    ``default`` (the session's ``comparison_bits``)."""
    if bound is None:
        return default
    return max(2, min(default, math.ceil(math.log2(bound)) + fraction_bits + 2))


def shift_for(points: Sequence[float], resolution: float, bits: int) -> int:
    """Low bits a gate on ``bits`` may drop for thresholds ``points`` and a ``resolution`` (both
    in ring units, ulps): the largest ``k <= bits - 3`` with ``ceil(c / 2^k) 2^k + 2^k <= c +
    resolution`` for every ``c`` (0: no truncation, exact)."""
    return _shift_for(tuple(points), resolution, bits)


@functools.lru_cache(maxsize=256)
def _shift_for(points: tuple[float, ...], resolution: float, bits: int) -> int:
    """:func:`shift_for`, cached (a tournament asks it per level and step with the same numbers)."""
    shift = 0
    while shift + 1 <= bits - 3:
        step = 2 ** (shift + 1)
        if any(math.ceil(c / step) * step + step > c + resolution for c in points):
            break
        shift += 1
    return shift
