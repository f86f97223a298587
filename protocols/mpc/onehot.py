"""Secret one-hot vectors from a dealer's random unit vector: one opening per value.

Turning a secret small integer ``v`` in ``[0, D)`` into shares of the unit vector ``e_v`` with
comparisons costs ``D`` of them (``[v > t - 1/2]`` for every slot ``t``). Here the dealer gives
the parties shares of a random ``rho`` (uniform mod ``D``, a power of two) and of ``e_rho``
(offline material, ``D`` ring elements per value, expanded from the seeds like any Beaver
tuple). The parties open ``s = v - rho mod D`` (one exchange of one ring element per value) and
each rotates its share of ``e_rho`` by ``s``: ``e_v[t] = e_rho[(t - s) mod D]``, a local gather.

Security (semi-honest, non-colluding dealer): ``s`` is uniform and independent of ``v`` because
``rho`` is, and the opened share residues ``x_i - r_i 2^16 mod 2^(16 + log2 D)`` sum to ``s 2^16``
with the other party's residue masked by its unknown ``r_i``. The rotated shares are a fresh
additive sharing of ``e_v`` masked by the dealer's ``e_rho`` sharing.

Promise: ``v`` is held exactly (shares of ``v * 2^16``, as sums of comparison bits and public
integers are) and lies in ``[0, D)``; otherwise the result is a wrong one-hot, not an error.
"""

from __future__ import annotations

from typing import Any

import torch

from protocols.mpc import fixed_point
from protocols.mpc.compare import open_low_bits
from protocols.mpc.cryptenlib import MPCTensor


class OneHotError(ValueError):
    """A domain that is not a power of two, or an operand not at the session's fixed-point scale."""


def domain_for(count: int) -> int:
    """The smallest power of two (>= 2) that holds ``count`` values."""
    if count < 1:
        raise OneHotError(f"a one-hot domain needs at least one value, got {count}")
    return max(2, 1 << (count - 1).bit_length())


def one_hot(x: Any, domain: int, provider: Any) -> Any:
    """Shares of ``e_v`` [*x.shape, domain] at ``x``'s scale for a secret integer ``x`` in [0, domain).

    ``provider`` is the party's :class:`~protocols.mpc.cryptenlib.provider.DealerProvider`; the opening
    goes through CrypTen's communicator, so it is counted like any other.
    """
    if domain < 2 or domain & (domain - 1):
        raise OneHotError(f"a one-hot domain must be a power of two >= 2, got {domain}")
    share = fixed_point.arithmetic_share(x, "one_hot's operand", OneHotError)
    bits = fixed_point.bits_of(x)
    if share.device.type != "cpu":
        raise OneHotError(f"one_hot runs on CPU shares, got {share.device}")
    r, unit = provider.one_hot_mask(share.shape, domain)
    modulus = (domain << bits) - 1
    residue = (share - r * (1 << bits)) & modulus
    shift = open_low_bits(residue, bits + domain.bit_length() - 1) >> bits
    slots = torch.arange(domain)
    index = (slots - shift.unsqueeze(-1)) & (domain - 1)
    return MPCTensor.from_shares(unit.gather(-1, index), precision=bits)
