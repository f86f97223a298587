"""Comparisons on CrypTen shares with FSS sign-gate keys from the dealer (:mod:`protocols.mpc.fss`).

CrypTen computes every comparison (``<``, ``>``, ``relu``, ``sign``, ``max``, ``argmax``, the
sign inside ``sigmoid`` and ``reciprocal``) through ``MPCTensor._ltz``: a conversion to XOR
shares and a 64-bit adder circuit, about 230 bytes and 9 rounds per element and party.
:func:`less_than_zero` is the FSS replacement: each party adds its share of the dealer's mask
``r``, the parties open ``x + r`` (one exchange, one round) and each evaluates its key locally,
giving arithmetic shares of ``[x < 0]`` at scale 1, exactly what ``_ltz`` returns. The opened
values are sent in ``ceil(bits / 8)`` bytes each (:func:`open_low_bits`). The dealer sends the
keys offline (``--preprocess``) or on request.

**Several thresholds, one key** (:func:`below`): ``[x < c_j]`` for public ``c_j`` comes from one
opening of ``x + r`` and one key, evaluated at the points ``y - c_j``
(:meth:`~protocols.mpc.fss.SignKey.evaluate_points`): the piecewise first guesses of the
reciprocal and inverse square root (191 and 103 thresholds per element) and GeLU's two range
tests each take one key per element instead of one per threshold.

**Width** (:func:`bits_for`): the gate looks at ``x mod 2^bits``, so it is exact for ring values
``|x| < 2^(bits - 1)``; with the default configuration (16 fractional bits, comparison_bits =
40; :class:`~protocols.protocol_config.ProtocolConfig`) that is ``|value| < 2^23``. Code that
knows its operands are smaller says so with ``models.ops.compare_bound(limit)``.

**Truncation** (:func:`shift_for`; SIGMA's comparisons on reduced bit widths): with a
``resolution`` in ``compare_bound``, each party drops the low ``k`` bits of its share of ``x mod
2^bits`` before masking, and the gate runs on ``bits - k`` bits. The truncated shares sum to
``floor(x / 2^k) - carry`` (``carry`` in {0, 1}, from the dropped low bits; no wrap-around
failure: the sum is taken mod ``2^(bits-k)`` as the gate's ring), so ``[x < c]`` against ``c``
rounded up to ``c'`` on the 2^k grid is exact except for ``x`` in ``[c', c' + 2^k)``, where it
may say 1. ``k`` is the largest with ``c' + 2^k <= c + resolution`` for every threshold: a
result is 1 for every ``x < c`` and 0 for every ``x >= c + resolution``. Harmless where either
answer is right near the threshold: a max that stabilises an exponential (the tree keeps an
entry within ``resolution`` of the larger one per level), range tests between two pieces that
both approximate the function there (GeLU's polynomial and ReLU just outside [-3.5, 3.5]). Not
for exact predicates: ``argmax`` (a near-tie could pick the wrong token), ReLU of values that
matter near 0, equality. Security is unchanged: the truncated shares are masked by a uniform
``r`` mod ``2^(bits-k)`` before they are opened, so the opened value is uniform.

**Bit-output keys** (:mod:`protocols.mpc.fss_bit`): a gate with one threshold may instead take
the dealer's bit-output keys (~40% fewer key bytes: 128-bit seed corrections and 3 bits per
level, the tree stopped 7 levels early) at the price of a second round, in which the parties
open ``[x < c] xor m`` (one bit each, uniform) and convert it locally with the dealer's shares of
``m``. :func:`protocols.mpc.kernel_choice.comparison_keys` picks per call from public shapes;
both give the same result. Several thresholds keep the arithmetic keys (each point would need
its own mask bit).

Every gate records in the party's ledger row ``fss_keys_<bits>b_shift<k>`` (arithmetic keys at
that width and truncation; the dealer's key bytes follow from
:func:`protocols.mpc.fss.sign_key_words` of ``bits - k``) or ``fss_bitkeys_<bits>b_shift<k>``
(bit-output keys: :func:`protocols.mpc.fss_bit.bit_sign_key_words`) and
``fss_points_<bits>b_shift<k>`` (evaluations). ``comparisons = "circuit"`` in a session keeps
CrypTen's circuit (no width limit, no truncation).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models import ops
from protocols.mpc import fss_bit, kernel_choice
from protocols.mpc.compare_widths import bits_for, shift_for
from protocols.mpc.cryptenlib import MPCTensor, crypten
from protocols.mpc.cryptenlib.binding import bound
from protocols.protocol_config import COMPARISON_METHODS


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
    return open_with(values, bits, None)[0]


def open_with(values: torch.Tensor, bits: int, extra: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`open_low_bits` of ``values`` and, in the same exchange (one round), the sum of both
    parties' int64 shares ``extra`` (e.g. a Beaver opening that does not depend on the result)."""
    comm = crypten.communicator.get()
    low = (1 << bits) - 1 if bits < 64 else -1
    width = (bits + 7) // 8
    tail = torch.zeros(0, dtype=torch.int64) if extra is None else extra.reshape(-1)
    if width >= 8 or sys.byteorder != "little":
        total = comm.all_reduce(torch.cat([values.reshape(-1), tail]))
        return (total[:values.numel()].reshape(values.shape) & low,
                None if extra is None else total[values.numel():].reshape(extra.shape))
    n = values.numel()
    raw = values.reshape(-1).numpy().view(np.uint8).reshape(n, 8)[:, :width]
    packed = np.zeros(-(-n * width // 8) * 8, dtype=np.uint8)
    packed[:n * width] = raw.ravel()
    mine = torch.cat([torch.from_numpy(packed.view(np.int64)), tail])
    gathered = comm.all_gather(mine)
    words = gathered[1 - comm.get_rank()].numpy()
    if words.shape != tuple(mine.shape):
        raise ComparisonError(f"peer opened {words.shape} words, expected {tuple(mine.shape)}")
    theirs = np.zeros((n, 8), dtype=np.uint8)
    theirs[:, :width] = words[:packed.size // 8].view(np.uint8)[:n * width].reshape(n, width)
    opened = (values + torch.from_numpy(theirs.view(np.int64).reshape(values.shape))) & low
    if extra is None:
        return opened, None
    return opened, (tail + torch.from_numpy(words[packed.size // 8:].copy())).reshape(extra.shape)


def truncated(share: np.ndarray, bits: int, shift: int) -> np.ndarray:
    """One party's local truncation ``floor((share mod 2^bits) / 2^shift)`` of int64 shares: both
    parties' results sum to ``floor((x mod 2^bits) / 2^shift) - carry`` mod ``2^(bits - shift)``,
    ``carry`` in {0, 1}."""
    low = np.asarray(share, dtype=np.int64).view(np.uint64) & np.uint64(2 ** bits - 1)
    return (low >> np.uint64(shift)).view(np.int64)


def _gate(x: Any, provider: Any, bits: int, shift: int, points: np.ndarray,
          extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This party's shares of ``[x' < c_j]`` [*x.shape, J] for ``x' = floor((x mod 2^bits) / 2^shift)``
    (the carry of the dropped bits aside) and integer ``points`` on that grid, from one key
    of ``bits - shift`` bits and one opening (with the shares ``extra`` opened in the same
    exchange, :func:`open_with`); a single threshold may take bit-output keys and a second
    round (:func:`protocols.mpc.kernel_choice.comparison_keys`: the same result)."""
    width = bits - shift
    if np.any(np.abs(points) >= 2 ** (width - 2)):
        raise ComparisonError(f"thresholds {points.tolist()} do not fit a {width}-bit gate")
    share = x._tensor.share
    if share.device.type != "cpu":
        raise ComparisonError(f"FSS comparisons run on CPU shares, got {share.device}")
    config = kernel_choice.session_config(x)
    kind = kernel_choice.comparison_keys(share.numel(), width, points.shape[0], config)
    local = truncated(share.reshape(-1).numpy(), bits, shift)
    if kind == "bit":  # bit-output keys: convert the opened d = [x' < point] xor m locally
        bit_key = provider.bit_sign_key(share.shape, width)
        d, extra_opened = _open_masked_bit(bit_key, local, width, int(points[0]), extra)
        bits_out = bit_key.arithmetic(d)
    else:
        key = provider.sign_key(share.shape, width)
        opened, extra_opened = open_with(torch.from_numpy(key.masked(local)), width, extra)
        bits_out = key.evaluate_points(opened.numpy(), points)
    _record_gate(kind, bits, shift, share.numel(), bits_out.size)
    return torch.from_numpy(bits_out).reshape(*share.shape, points.shape[0]), extra_opened


def _open_masked_bit(key: Any, local: np.ndarray, width: int, point: int,
                     extra: torch.Tensor | None) -> tuple[np.ndarray, torch.Tensor | None]:
    """With a bit-output key (:class:`~protocols.mpc.fss_bit.BitSignKey`): open ``x' + r`` (with
    ``extra``), then ``d = [x' < point] xor m`` (one bit each: uniform, as ``m`` is); returns the
    opened ``d`` (0/1) and ``extra`` opened."""
    opened, extra_opened = open_with(torch.from_numpy(key.masked(local)), width, extra)
    return open_xor_bits(key.xor_share(opened.numpy(), point)), extra_opened


def _record_gate(kind: str, bits: int, shift: int, keys: int, points: int) -> None:
    """The gate's key and evaluation counts in the party's ledger row (see the module doc)."""
    ledger = getattr(crypten.communicator.get(), "ledger", None)
    if ledger is not None:
        ledger.record_extra(f"fss_{'bitkeys' if kind == 'bit' else 'keys'}_{bits}b_shift{shift}", keys)
        ledger.record_extra(f"fss_points_{bits}b_shift{shift}", points)


def open_xor_bits(bits01: np.ndarray) -> np.ndarray:
    """``mine xor theirs`` of 0/1 values (uint8), sent packed 64 to an int64 word: one exchange
    through CrypTen's communicator, one round, ``ceil(n / 64) * 8`` bytes per party."""
    comm = crypten.communicator.get()
    mine = fss_bit.pack(bits01)
    gathered = comm.all_gather(torch.from_numpy(mine))
    theirs = gathered[1 - comm.get_rank()].numpy()
    if theirs.shape != mine.shape:
        raise ComparisonError(f"peer opened {theirs.shape} bit words, expected {mine.shape}")
    return fss_bit.unpack(mine ^ theirs, bits01.shape[0])


def below_zero_times(x: Any, values: Any) -> tuple[Any, Any]:
    """``([x < 0], [x < 0] * values)`` for ``x`` [*S] and ``values`` [*S, c]: the bit at scale 1,
    the product exact at ``values``' scale (no truncation), under the innermost
    ``models.ops.compare_bound`` as :func:`less_than_zero`.

    With the session's FSS comparisons the product's opening rides on the comparison's rounds
    (two in all, where a comparison on bit keys and a product after it take three): the bit-output
    key's mask bit ``m`` is known before the comparison, so round one opens ``x' + r`` together
    with the Beaver openings ``e = values - A`` and ``g = m - B`` of ``m * values`` (a dealer triple);
    round two opens ``d = [x' < 0] xor m``; then ``b = d + (1 - 2d) m`` and ``b * values = d * values
    + (1 - 2d) (m * values)`` locally. Otherwise (a simulation, CrypTen's circuit, value keys forced
    by the configuration, torch tensors): the comparison, then the product.
    """
    context = bound()
    if (getattr(x, "compare_below", None) is not None or ops.is_plain(x) or context is None
            or not context.compares_with_keys(x) or context.config.comparison_keys == "value"):
        bit = x < 0
        bit = bit.to(values.dtype) if ops.is_plain(bit) else bit
        return bit, values * bit.unsqueeze(-1)
    config, provider = context.config, context.provider
    bits = bits_for(ops.comparison_bound(), config.comparison_bits, config.fixed_point_bits)
    shift = shift_for([0.0], ops.comparison_resolution() * int(x.encoder.scale), bits)
    share, payload = x._tensor.share, values._tensor.share
    if share.device.type != "cpu" or tuple(payload.shape[:-1]) != tuple(share.shape):
        raise ComparisonError(f"a selected product needs CPU shares [*S] and [*S, c], got {list(share.shape)} "
                              f"on {share.device} and {list(payload.shape)}")
    shape = tuple(share.shape)
    key = provider.bit_sign_key(shape, bits - shift)
    a, b, c = (t.share for t in provider.generate_additive_triple(tuple(payload.shape), shape + (1,), "mul"))
    mask_bit = torch.from_numpy(key.bit_share).reshape(shape + (1,))
    openings = torch.cat([(payload - a).reshape(-1), (mask_bit - b).reshape(-1)])
    d, both = _open_masked_bit(key, truncated(share.reshape(-1).numpy(), bits, shift), bits - shift, 0, openings)
    e, g = both[:payload.numel()].reshape(payload.shape), both[payload.numel():].reshape(mask_bit.shape)
    masked = c + e * b + g * a + (e * g if crypten.communicator.get().get_rank() == 0 else 0)  # m * values
    flip = torch.from_numpy(d.astype(np.int64)).reshape(shape + (1,))
    _record_gate("bit", bits, shift, len(d), len(d))
    precision = int(values.encoder.scale).bit_length() - 1
    return (MPCTensor.from_shares(torch.from_numpy(key.arithmetic(d)).reshape(shape), precision=0),
            MPCTensor.from_shares(flip * payload + (1 - 2 * flip) * masked, precision=precision))


def grid(points: Sequence[float], scale: int, shift: int) -> np.ndarray:
    """Thresholds in ulps rounded up to the 2^shift grid, in units of the grid (in numpy: a norm's
    table has ~1,700 thresholds; the same float64 products and ceilings as one by one)."""
    units = np.ceil(np.asarray(points, dtype=np.float64) * scale / 2 ** shift)
    if not np.all(np.abs(units) < 2.0 ** 62):
        raise ComparisonError(f"thresholds out of any gate's range: {np.asarray(points)[:8].tolist()}")
    return units.astype(np.int64)


def less_than_zero(x: Any, provider: Any, bits: int) -> Any:
    """``[x < 0]`` as an arithmetic MPCTensor at scale 1 (CrypTen's ``_ltz`` contract), with the
    innermost ``models.ops.compare_bound``'s resolution (exact without one).

    ``provider`` is the party's :class:`~protocols.mpc.cryptenlib.provider.DealerProvider` (it fetches
    the keys); the opening goes through CrypTen's communicator, so it is counted like any other.
    """
    shift = shift_for([0.0], ops.comparison_resolution() * int(x.encoder.scale), bits)
    bit, _ = _gate(x, provider, bits, shift, np.zeros(1, dtype=np.int64))
    return MPCTensor.from_shares(bit.reshape(x._tensor.share.shape), precision=0)


def below(x: Any, points: Sequence[float]) -> Any:
    """``[x < c_j]`` for public thresholds ``points`` as a tensor [*x.shape, J] at scale 1.

    With the session's FSS comparisons: one key and one opening for all thresholds, as wide as
    ``models.ops.compare_bound`` allows (its limit bounds ``|x - c_j|``) and truncated to its
    resolution. Otherwise (CrypTen's circuit, or no privinf party bound to the thread) CrypTen's
    ``x - c_j < 0``.
    """
    return below_opening(x, points, None)[0]


def below_opening(x: Any, points: Sequence[float], extra: torch.Tensor | None) -> tuple[Any, torch.Tensor | None]:
    """:func:`below`, and the sum of both parties' int64 shares ``extra`` opened in the same round
    (without FSS comparisons: in an exchange of its own through CrypTen's communicator)."""
    simulated = getattr(x, "compare_below", None)  # a protocols.mpc.simulate value computes the gate's result
    if simulated is not None:
        return simulated(points), extra
    context = bound()
    if context is None or not context.compares_with_keys(x):
        bits = (x.unsqueeze(-1) - torch.tensor(list(points), dtype=torch.float64)) < 0
        return bits, (None if extra is None else crypten.communicator.get().all_reduce(extra))
    config = context.config
    scale = int(x.encoder.scale)
    bits = bits_for(ops.comparison_bound(), config.comparison_bits, config.fixed_point_bits)
    shift = shift_for([c * scale for c in points], ops.comparison_resolution() * scale, bits)
    result, opened = _gate(x, context.provider, bits, shift, grid(points, scale, shift), extra)
    return MPCTensor.from_shares(result, precision=0), opened


def as_fixed_point(bit: Any, like: Any) -> Any:
    """A comparison result re-encoded at ``like``'s fixed-point scale (identity in torch).

    CrypTen encodes comparison bits at scale 1; multiplying the share by the scale ratio (local,
    in place) gives the same bit at ``like``'s scale, so ``bit * 0.25`` no longer rounds to 0.
    """
    if ops.is_plain(bit):
        return bit.to(like.dtype) if ops.is_plain(like) else bit
    factor = int(like.encoder.scale) // int(bit.encoder.scale)
    if factor != 1:
        bit.share = bit.share * factor
        bit.encoder = like.encoder
    return bit
