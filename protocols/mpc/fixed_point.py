"""Fixed-point encoding on shares: the session's precision and the local truncation after a
product of two fixed-point factors.

The precision is the session's :class:`~protocols.protocol_config.ProtocolConfig`
``fixed_point_bits``: the MPC route sets CrypTen's encoder to it for the session
(:func:`session_precision`), shares carry it in their encoder, and the kernels here read it from
the shares they are handed (or from the session where they encode a public value).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from protocols.mpc.cryptenlib import MPCTensor, crypten


class FixedPointError(ValueError):
    """An operand that is not an arithmetic sharing at the session's fixed-point scale."""


@contextlib.contextmanager
def session_precision(bits: int) -> Iterator[None]:
    """Within the block, CrypTen encodes new values with ``bits`` fractional bits."""
    with crypten.cfg.temp_override({"encoder.precision_bits": int(bits)}):
        yield


def precision_bits() -> int:
    """The fractional bits new encodings use in this session."""
    return int(crypten.cfg.encoder.precision_bits)


def bits_of(x: Any) -> int:
    """The fractional bits of the shares ``x`` carries."""
    return int(x.encoder.scale).bit_length() - 1


def encode(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Public values as ring elements at scale ``2^bits`` (round to nearest). float32 stays float32:
    scaling by a power of two and rounding are exact in it, so widening first changes nothing."""
    values = values.detach()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.to(torch.float64)
    return torch.round(values * (1 << bits)).to(torch.int64)


def arithmetic_share(x: Any, what: str, error: type[ValueError] = FixedPointError) -> torch.Tensor:
    """This party's share of ``x``, which must be an arithmetic MPCTensor at the session's scale."""
    bits = precision_bits()
    if not isinstance(x, MPCTensor) or x.ptype.name != "arithmetic" or x.encoder.scale != 1 << bits:
        raise error(f"{what} must be an arithmetic MPCTensor at scale 2^{bits}")
    return x.share


def local_truncation(share: torch.Tensor, divisor: int | torch.Tensor) -> torch.Tensor:
    """One party's share of ``x / divisor`` from its share of ``x`` in a two-party sharing (CrypTen's
    local truncation: each party divides its own share, rounding toward zero).

    The two results sum to ``x / divisor`` within one unit unless the signed shares' integer sum
    is ``x +- 2^64`` (it "wraps"); then the result is off by ``2^64 / divisor`` (``2^48`` ulps
    after a product at 16 bits: a value error of ``2^32``). With one share uniform that happens
    with probability ``|x| / 2^64`` per element, which is why the kernels keep their double-scale
    values small (``bench/wrap_odds.py`` sums the chance per site; issue 12)."""
    return share.div(divisor, rounding_mode="trunc")


def truncated(share: torch.Tensor, bits: int) -> MPCTensor:
    """A share at scale ``2^(2 bits)`` (a product of two fixed-point factors) truncated locally
    back to ``2^bits`` and wrapped as this party's MPCTensor (:func:`local_truncation`)."""
    return MPCTensor.from_shares(local_truncation(share, 1 << bits), precision=bits)
