"""Norms on shares with one opening of their input: ``x * f(x * x)`` with a shared Beaver mask.

A LayerNorm (or RMSNorm) on shares computes ``x^2`` (for the variance) and then ``x * s`` with
``s = 1 / sqrt(mean(x^2) + eps)`` per row. CrypTen opens a masked ``x`` for each product: two
openings of the whole ``[n, d]`` activation. Both products have ``x`` as an operand, so one mask
``a`` serves both: the dealer's ``rowscale`` tuple gives shares of ``a`` [n, d], a row mask ``b``
[n, 1], ``a * a`` and ``a * b``; the parties open ``e = x - a`` once and ``f = s - b`` (one
element per row), and

    x^2   = e^2 + 2 e a + a^2
    x * s = e f + e b + a f + a b

(party 0 adds the public products). Security is Beaver's: ``e`` is the same opening both
products need (opening it once reveals nothing a second opening would not), ``b`` is fresh, and
the dealer refuses nothing new because each request index is used once.

Fixed point as CrypTen: operands at 2^16, products at 2^32, each party truncates its own share.
``models.ops.scaled_rows`` calls :func:`scaled_rows` when a session installs it with
``protocols.mpc.numerics.share_kernels`` (the MPC session does, on the party's thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from protocols.mpc import fixed_point, kernel_choice, numerics
from protocols.mpc.cryptenlib import MPCTensor, crypten
from protocols.mpc.cryptenlib import provider as crypten_provider


class FusedNormError(ValueError):
    """An operand not at the session's arithmetic fixed-point encoding, or a row factor of the wrong shape."""


def _share(x: Any, what: str) -> torch.Tensor:
    return fixed_point.arithmetic_share(x, what, FusedNormError)


def opened_product(e1: torch.Tensor, a1: torch.Tensor, e2: torch.Tensor, a2: torch.Tensor,
                   a1a2: torch.Tensor, first: bool) -> MPCTensor:
    """This party's shares of ``(e1 + a1)(e2 + a2)`` from the opened ``e``s, its mask shares and
    its share of ``a1 a2`` (party 0 adds ``e1 e2``), truncated from the double scale to the session's."""
    z = e1 * a2 + a1 * e2 + a1a2
    if first:
        z = z + e1 * e2
    return fixed_point.truncated(z, fixed_point.precision_bits())


def scaled_rows(x: MPCTensor, finish: Callable[[MPCTensor], MPCTensor], weight: Any = None) -> MPCTensor:
    """``x * finish(x * x) * weight`` with ``x`` [..., n, d] opened once; ``finish`` maps the
    squares to a row factor [..., n, 1] (e.g. the inverse root mean square). A secret ``weight``
    (a norm's gain) multiplies the result (two rounds more, about 2 nd elements sent in all)
    unless :func:`protocols.mpc.kernel_choice.fold_gain` prices folding it cheaper for this shape
    (a decoding step's few rows): then :func:`protocols.mpc.numerics.scaled_rows` forms ``x *
    weight`` with the squares (4 rounds in all, about 9 nd elements; the rowscale tuple has no
    mask for the gain)."""
    if weight is None:
        return _fused(x, finish)
    if torch.is_tensor(weight):
        return _fused(x, finish) * weight
    if kernel_choice.fold_gain(x.nelement() // x.shape[-1], x.shape[-1], kernel_choice.session_config(x)):
        return numerics.scaled_rows(x, finish, weight)
    return _fused(x, finish) * weight


def _fused(x: MPCTensor, finish: Callable[[MPCTensor], MPCTensor]) -> MPCTensor:
    """``x * finish(x * x)`` from one opening of ``x`` and one of the row factor."""
    share = _share(x, "the normalised operand")
    context = crypten_provider.current()
    comm = crypten.communicator.get()
    first = context.rank == 0
    a, b, products = context.provider.row_scale_masks(tuple(share.shape))
    e = comm.all_reduce(share - a)
    factor = finish(opened_product(e, a, e, a, products[0], first))
    row = _share(factor, "the row factor")
    if tuple(row.shape) != tuple(b.shape):
        raise FusedNormError(f"the row factor has shape {list(row.shape)}, expected {list(b.shape)}")
    f = comm.all_reduce(row - b)
    return opened_product(e, a, f, b, products[1], first)
