"""Per-interval values of a public table for secret shares, from one comparison key.

Shared by the range-reduced reciprocal and roots (:mod:`protocols.mpc.numerics`) and the piecewise
quadratics (:mod:`protocols.mpc.pieces`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from protocols.mpc.compare import below

Tensor = Any  # an encrypted tensor with CrypTen's MPCTensor interface


def interval_values(x: Tensor, table: dict[str, torch.Tensor], names: Sequence[str]) -> list[Tensor]:
    """Secret per-interval values of ``table`` for ``x`` from one comparison key.

    The bits ``[x < t_j]`` are monotone (a thermometer code; :func:`protocols.mpc.compare.below`
    gets all of them from one key and one opening), so any function of the interval is linear in
    them, ``v_J - sum_j bit_j (v_j - v_(j-1))``: local once the bits are known. The bits' shares
    (scale 1) are multiplied by the integer steps of the values rounded to ``x``'s scale, so the
    sum is exact (no truncation per term: hundreds of thresholds would add up their 1-ulp errors)
    and each value is its rounding to the fixed-point grid."""
    bits = below(x, table["thresholds"].tolist())
    scale = int(x.encoder.scale)
    if int(bits.encoder.scale) != 1:
        raise ValueError(f"comparison bits at scale {bits.encoder.scale}, expected 1")
    out = []
    for name in names:
        ints = torch.round(table[name] * scale).long()
        value = bits.sum(-1)  # a share of the right shape; its share and encoder are replaced
        value.share = -(bits.share * (ints[1:] - ints[:-1])).sum(-1)
        value.encoder = x.encoder
        out.append(value + float(ints[-1]) / scale)
    return out
