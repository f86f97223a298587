"""GeLU on shares with every operand opened once (``protocols.mpc.numerics.gelu``'s piecewise polynomial).

``numerics.gelu`` evaluates ``x / 2 + inside * g(v) + w * x / 2`` with ``v = x^2 /
T^2``, ``g`` an even degree-6 polynomial in ``v``, ``w = [x > T] - [x < -T]`` and ``inside = 1 -
|w|``. With one fresh Beaver triple per product CrypTen opens ``x`` twice, ``v`` three times and
``v^2`` twice: 7 openings for the powers and the last products, plus 4 for those products'
other operands. Here the dealer's ``gelu`` tuple gives one mask per operand (``x, v, v^2, v^3,
v^4, inside, even, w``) and the products of the pairs that meet (``dealer.GELU_PRODUCTS``), so
each operand is opened once: ``x`` (in the same exchange as the range tests' masked input: one
21-bit key, 3 bytes, :func:`protocols.mpc.numerics.gelu_range_opening`), ``v``, ``v^2``,
``(v^3, v^4)``, ``(inside, g, w)``: five rounds (six with ``x`` opened on its own), 8 ring
elements per element instead of 12 plus the range tests: about 67 bytes per element instead of 91.

Products of two opened operands ``(e1 + a1)(e2 + a2) = e1 e2 + e1 a2 + a1 e2 + a1 a2`` (party 0
adds ``e1 e2``; ``a1 a2`` comes shared from the dealer); every product has two fixed-point
factors (scale 2^32), and each party truncates its share to 2^16, as CrypTen does. Security is
Beaver's: each opened value is masked by its own uniform mask, opened once.
"""

from __future__ import annotations

import torch

from protocols.mpc import fixed_point, gelu_lut, numerics
from protocols.mpc.cryptenlib import MPCTensor, crypten
from protocols.mpc.cryptenlib import provider as crypten_provider
from protocols.mpc.fused_norm import opened_product
from protocols.mpc.vocabulary import GELU_MASKS, GELU_PRODUCTS


class FusedGeluError(ValueError):
    """An operand not at the session's arithmetic fixed-point encoding."""


class _Party:
    """One party's view of the fused evaluation: masks, mask products, openings."""

    def __init__(self, x: MPCTensor) -> None:
        fixed_point.arithmetic_share(x, "GeLU's input", FusedGeluError)
        context = crypten_provider.current()
        self.first = context.rank == 0
        self.comm = crypten.communicator.get()
        masks, products = context.provider.gelu_masks(tuple(x.share.shape))
        self.mask = dict(zip(GELU_MASKS, masks))
        self.product = {pair: products[i] for i, pair in enumerate(GELU_PRODUCTS)}
        self.opened: dict[str, torch.Tensor] = {}

    def open(self, **values: MPCTensor) -> None:
        """Open ``value - mask`` for each named operand, all in one exchange."""
        names = list(values)
        masked = torch.stack([values[n].share - self.mask[n] for n in names])
        for name, opened in zip(names, self.comm.all_reduce(masked)):
            self.opened[name] = opened

    def times(self, left: str, right: str) -> MPCTensor:
        """Shares of ``left * right`` (both opened), truncated to the session's scale."""
        pair = (left, right) if (left, right) in self.product else (right, left)
        return opened_product(self.opened[left], self.mask[left], self.opened[right], self.mask[right],
                              self.product[pair], self.first)


def gelu(x: MPCTensor, form: str = "erf") -> MPCTensor:
    """``numerics.gelu`` (same polynomial and range, for either ``form``), each operand opened once;
    or, where :func:`protocols.mpc.gelu_lut.chosen` says so, its lookup-table form (two rounds)."""
    fixed_point.arithmetic_share(x, "GeLU's input", FusedGeluError)
    if gelu_lut.chosen(x):
        return gelu_lut.gelu(x, form)
    t = numerics.GELU_RANGE
    party = _Party(x)
    inside, w, opened = numerics.gelu_range_opening(x, x.share - party.mask["x"])
    party.opened["x"] = opened  # x's Beaver opening rides in the range tests' exchange
    v = party.times("x", "x") * (1.0 / (t * t))
    party.open(v=v)
    v2 = party.times("v", "v")
    party.open(v2=v2)
    v3, v4 = party.times("v", "v2"), party.times("v2", "v2")
    party.open(v3=v3, v4=v4)
    powers = [v, v2, v3, v4, party.times("v", "v4"), party.times("v3", "v3")]
    coeffs = numerics.GELU_EVEN_COEFFS
    even = sum((p * c for p, c in zip(powers, coeffs[1:])), start=coeffs[0])
    party.open(inside=inside, even=even, w=w)
    return x * 0.5 + party.times("inside", "even") + party.times("w", "x") * 0.5
