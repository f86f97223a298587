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

**DPF keys instead** (:func:`uses_dpf`): for larger domains the dealer's ``D`` ring elements per
value (party 0's correction; party 1 expands its share) outweigh a DPF key at ``rho``
(:mod:`protocols.mpc.fss_dpf`: ``16 (m - 1) + 16`` bytes and ``2 (m - 1)`` bits to each party,
``D = 2^m``; root seeds and ``rho`` from each party's stream). The opening is the same; each party
evaluates its key on the whole domain (shares of ``e_rho``) and rotates it by ``s`` in the same
way: the same shares' sum, a fresh sharing of ``e_v`` masked by the key's pseudorandom outputs
(DPF security, :mod:`protocols.mpc.fss_dpf`). The key is chosen where it is smaller *and* the
bytes it saves, priced on the session's kernel profile, outweigh the local full-domain
evaluation (:data:`protocols.mpc.fss_dpf.EVAL_NS_PER_POINT` per point): a public rule of the
domain and the configuration, so both parties choose alike.

Promise: ``v`` is held exactly (shares of ``v * 2^16``, as sums of comparison bits and public
integers are) and lies in ``[0, D)``; otherwise the result is a wrong one-hot, not an error.
"""

from __future__ import annotations

from typing import Any

import torch

from protocols.mpc import fixed_point, fss_dpf
from protocols.mpc.compare import open_low_bits
from protocols.mpc.cryptenlib import MPCTensor, crypten
from protocols.mpc.kernel_choice import session_config
from protocols.protocol_config import ProtocolConfig


class OneHotError(ValueError):
    """A domain that is not a power of two, or an operand not at the session's fixed-point scale."""


def domain_for(count: int) -> int:
    """The smallest power of two (>= 2) that holds ``count`` values."""
    if count < 1:
        raise OneHotError(f"a one-hot domain needs at least one value, got {count}")
    return max(2, 1 << (count - 1).bit_length())


def material_bytes(domain: int) -> dict[str, float]:
    """Dealer bytes per value sent to the party that gets more: the unit vector's ``8 D`` (party 0)
    or a DPF key's shared words (each party)."""
    return {"unit": 8.0 * domain, "dpf": fss_dpf.key_bytes(domain.bit_length() - 1, 1, with_seed=False)}


def uses_dpf(domain: int, config: ProtocolConfig) -> bool:
    """Whether a one-hot over ``domain`` takes a DPF key rather than the dealer's unit vector: the
    key is smaller, and the bytes it saves per value on the kernel profile's bandwidth take longer
    than its full-domain evaluation (``domain`` points at :data:`fss_dpf.EVAL_NS_PER_POINT`)."""
    sizes = material_bytes(domain)
    saved_s = (sizes["unit"] - sizes["dpf"]) * 8 / config.kernel_network().bandwidth_bps
    return sizes["dpf"] < sizes["unit"] and saved_s > domain * fss_dpf.EVAL_NS_PER_POINT * 1e-9


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
    key = None
    if uses_dpf(domain, session_config(x)):
        r, key = provider.dpf_key(share.shape, domain.bit_length() - 1)
    else:
        r, unit = provider.one_hot_mask(share.shape, domain)
    modulus = (domain << bits) - 1
    residue = (share - r * (1 << bits)) & modulus
    shift = open_low_bits(residue, bits + domain.bit_length() - 1) >> bits
    if key is not None:
        fss_dpf.record(getattr(crypten.communicator.get(), "ledger", None), key)
        rotated = fss_dpf.unit_vectors(key, shift.reshape(-1).numpy()) * (1 << bits)  # at the fixed-point scale
        return MPCTensor.from_shares(torch.from_numpy(rotated).reshape(*share.shape, domain), precision=bits)
    slots = torch.arange(domain)
    index = (slots - shift.unsqueeze(-1)) & (domain - 1)
    return MPCTensor.from_shares(unit.gather(-1, index), precision=bits)
