"""The numerics that run on secret shares: what :mod:`models.ops` dispatches to for encrypted values.

Models call :mod:`models.ops` (``reciprocal``, ``inv_sqrt``, ``inv_sqrt_wide``, ``gelu``,
``row_max``, ``argmax_last``, ``scaled_rows``); on torch tensors those compute in torch, on
shares they call the implementation installed with ``models.ops.encrypted_kernels``. This module
holds those implementations for CrypTen ``MPCTensor``s (duck-typed; comparisons against public
thresholds go through :func:`protocols.mpc.compare.below`) and :func:`share_kernels`, the
context manager that installs them, optionally with a protocol's fused kernels
(``protocols.mpc.fused_norm``, ``protocols.mpc.fused_gelu``) in place of some.

* **Positive reciprocal and inverse square root**: range-reduced Newton. The bits ``[x < t_j]``
  against public thresholds (8 per octave / power of four over the range: 191 and 103) pick the
  power k and a piecewise-linear first guess at once, then one Newton step: 5 rounds each.
  With FSS comparisons all thresholds of an element share one key and one opening
  (:func:`protocols.mpc.compare.below`): ~1 KB of dealer keys per element, not 191 KB.
  Accurate for ``x / scale`` in [2^-14, 2^10) and [4^-7, 4^6); callers pass a public ``scale``
  that brings the private value into range. The general (signed) reciprocal is CrypTen's own.
* **Wide inverse square root** (SmolLM2's massive activations): the same power-of-four
  reduction, then CrypTen's inverse square root where it is accurate.
* **Fixed-point scale**: CrypTen encodes comparison bits at scale 1, so ``bit * 0.25`` would
  round the constant to 0; :func:`as_fixed_point` multiplies the share by the scale ratio (a
  local operation) to get the same bit at the usual 2^16 scale.
* **GeLU**: ``x / 2 + g(x)`` on [-T, T] (T = 3.5), where ``g(x) = x (Phi(x) - 1/2)`` is even,
  fitted as a degree-6 polynomial in ``v = x^2 / T^2`` (near-minimax on [0, 1], max error
  2.3e-4), and ``relu(x)`` outside (GeLU differs from it by at most 8.1e-4 there); both range
  tests from one truncated 21-bit key per element (:func:`gelu_range`).
* **Row max and arg-max**: comparison tournaments (n - 1 comparisons in ceil(log2 n) levels)
  instead of CrypTen's ``max(dim)``, which also builds the arg-max one-hot. A softmax's max
  runs under the caller's ``compare_bound`` (``models.ops.row_max(bound=, slack=)``: 23-bit
  keys); the arg-max stays exact.
* ``share_kernels("crypten")`` runs CrypTen's own positive reciprocal (exp-seeded Newton, 10
  steps), inverse square root and the sigmoid-form GeLU: what the CrypTen baseline in
  ``bench/mpc_vs_crypten.py`` computes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from models import ops
from protocols.mpc.compare import below

Tensor = Any  # an encrypted tensor with CrypTen's MPCTensor interface

RECIPROCAL_POWERS = (-14, 9)  # k range of x / scale for reciprocals: [2^-14, 2^10)
INV_SQRT_POWERS = (-7, 5)     # k range of x / scale for inverse square roots: [4^-7, 4^6)
RECIPROCAL_PIECES = 8  # first-guess pieces per octave of the reciprocal (one Newton step after)
INV_SQRT_PIECES = 8    # first-guess pieces per power of four of the inverse square root
CRYPTEN_RECIPROCAL_NEWTON_STEPS = 10

GELU_RANGE = 3.5
GELU_COMPARE_BOUND = 2.0 ** 14  # |x| beyond this overflows the ring in x^2's product anyway
GELU_RESOLUTION = 2.0 ** -5  # the range tests may err within 1/32 outside [-T, T] (see gelu_range)
GELU_EVEN_COEFFS = (0.0002246013663433183, 0.3969218679627679 * 3.5 ** 2, -0.06349736554911566 * 3.5 ** 4,
                    0.008262958519470445 * 3.5 ** 6, -0.00069335772060879 * 3.5 ** 8,
                    3.2966547891262465e-05 * 3.5 ** 10, -6.672909071414601e-07 * 3.5 ** 12)
GELU_SIGMOID_SLOPE = 1.702
NUMERICS = ("reduced", "crypten")


def as_fixed_point(bit: Tensor, like: Tensor) -> Tensor:
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


def _power_factors(x: Tensor, base: float, first: int, last: int, exponents: Sequence[float]) -> list[Tensor]:
    """Secret ``base^(-k e)`` for each ``e`` in ``exponents``, where ``base^k <= x < base^(k+1)``
    with k clamped to [first, last]. The bits ``[x < base^p]`` (one key for all thresholds) are
    monotone, so each factor is linear in them (no products)."""
    powers = range(first + 1, last + 1)
    bits = as_fixed_point(below(x, [base ** p for p in powers]), x)
    factors = []
    for e in exponents:
        steps = torch.tensor([base ** (-p * e) - base ** (-(p - 1) * e) for p in powers])
        factors.append(base ** (-last * e) - (bits * steps).sum(-1))
    return factors


@functools.lru_cache(maxsize=8)
def _first_guess_table(base: float, first: int, last: int, pieces: int, exponent: float) -> dict[str, torch.Tensor]:
    """Thresholds and per-interval values of the piecewise first guess of ``x^exponent``.

    The thresholds are ``base^p g_j`` for powers p in [first, last] and ``g_j = base^(j /
    pieces)``; an x in interval (p, j) has ``m = x base^-p`` in [g_j, g_(j+1)), where the line
    ``alpha + beta m`` is the minimax linear approximation of ``m^exponent``. Interval 0 also
    takes every x below the first threshold, the last every x above the last one (a clamped k).
    Returns ``thresholds`` [J] and, per interval [J + 1], ``f`` (``base^-p``), ``out``
    (``base^(p exponent)``), ``alpha`` and ``beta``.
    """
    grid = [base ** (j / pieces) for j in range(pieces + 1)]
    rows = []
    for p in range(first, last + 1):
        for j in range(pieces):
            a, b = grid[j], grid[j + 1]
            m = torch.linspace(a, b, 257, dtype=torch.float64)
            beta = (b ** exponent - a ** exponent) / (b - a)
            gap = m ** exponent - (a ** exponent + beta * (m - a))  # one-signed: the power is convex
            alpha = a ** exponent - beta * a + 0.5 * (float(gap.max()) + float(gap.min()))
            rows.append((base ** p * a, base ** -p, base ** (p * exponent), alpha, beta))
    table = torch.tensor(rows, dtype=torch.float64)
    return {"thresholds": table[1:, 0], "f": table[:, 1], "out": table[:, 2], "alpha": table[:, 3],
            "beta": table[:, 4]}


def _interval_values(x: Tensor, table: dict[str, torch.Tensor], names: Sequence[str]) -> list[Tensor]:
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


def _reciprocal_reduced(x: Tensor) -> Tensor:
    """Positive ``x`` in [2^first, 2^(last+1)): ``m = x 2^-k`` in [1, 2), a piecewise-linear first
    guess ``y`` of ``1 / m`` chosen by the same comparisons that find k (relative error < 1e-3),
    then one Newton step with the factor ``2^-k`` folded in: ``2^-k y (2 - m y) = 2 (2^-k y) -
    (m y)(2^-k y)``. Five rounds: the comparisons, ``m``, ``y``, ``m y`` with ``2^-k y``, their
    product (the Newton steps from one linear guess took nine)."""
    table = _first_guess_table(2.0, *RECIPROCAL_POWERS, RECIPROCAL_PIECES, -1.0)
    factor, alpha, beta = _interval_values(x, table, ("f", "alpha", "beta"))
    m = x * factor
    y = m * beta + alpha
    width = y.shape[-1]
    both = ops.cat([m, factor], dim=-1) * ops.cat([y, y], dim=-1)
    my, fy = both[..., :width], both[..., width:]
    return fy * 2.0 - my * fy


def _reciprocal_exp_seeded(x: Tensor) -> Tensor:
    """CrypTen's positive reciprocal: initial guess ``3 exp(1 - 2x) + 0.003``, all-positive Newton."""
    guess = (1 - 2 * x).exp() * 3 + 0.003
    for _ in range(CRYPTEN_RECIPROCAL_NEWTON_STEPS):
        guess = guess * 2 - guess.square() * x
    return guess


def _inv_sqrt_reduced(x: Tensor) -> Tensor:
    """Positive ``x``: ``m = x 4^-k`` in [1, 4), a piecewise-linear first guess ``y`` of
    ``m^-1/2`` chosen by the comparisons that find k (relative error < 1.5e-3), then one Newton
    step with the factor ``2^-k`` folded in: ``2^-k y (3 - m y^2) / 2 = 1.5 (2^-k y) - 0.5
    ((2^-k m) y) y^2``. Five rounds: the comparisons, ``m``, ``y`` with ``2^-k m``, ``y^2`` with
    ``(2^-k m) y`` and ``2^-k y``, the last product (three Newton steps took nine)."""
    table = _first_guess_table(4.0, *INV_SQRT_POWERS, INV_SQRT_PIECES, -0.5)
    factor4, factor2, alpha, beta = _interval_values(x, table, ("f", "out", "alpha", "beta"))
    m = x * factor4
    width = m.shape[-1]
    guess = ops.cat([beta, factor2], dim=-1) * ops.cat([m, m], dim=-1)
    y, sm = guess[..., :width] + alpha, guess[..., width:]
    three = ops.cat([y, sm, factor2], dim=-1) * ops.cat([y, y, y], dim=-1)
    square, smy, sy = three[..., :width], three[..., width:2 * width], three[..., 2 * width:]
    return sy * 1.5 - smy * square * 0.5


def _reciprocal(x: Tensor, scale: float | torch.Tensor, positive: bool,
                positive_kernel: Callable[[Tensor], Tensor]) -> Tensor:
    """``1 / x`` as ``(1 / (x / scale)) / scale``; ``positive_kernel`` for positive x, else CrypTen's."""
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        inv = 1.0 / torch.as_tensor(scale, dtype=torch.float32)
        return _reciprocal(x * inv, 1.0, positive, positive_kernel) * inv
    return positive_kernel(x) if positive else x.reciprocal()


def reciprocal(x: Tensor, scale: float | torch.Tensor = 1.0, positive: bool = False) -> Tensor:
    """``1 / x`` on shares: range-reduced Newton when ``positive`` (exact for ``x / scale`` in
    [2^-14, 2^10)), otherwise CrypTen's general reciprocal (which also handles the sign)."""
    return _reciprocal(x, scale, positive, _reciprocal_reduced)


def crypten_reciprocal(x: Tensor, scale: float | torch.Tensor = 1.0, positive: bool = False) -> Tensor:
    """``1 / x`` on shares as CrypTen computes it (exp-seeded Newton for positive x)."""
    return _reciprocal(x, scale, positive, _reciprocal_exp_seeded)


def inv_sqrt(x: Tensor, scale: float = 1.0) -> Tensor:
    """``1 / sqrt(x)`` for positive shares: range-reduced Newton on ``x / scale`` (exact for
    ``x / scale`` in [4^-7, 4^6))."""
    if scale != 1.0:
        return inv_sqrt(x * (1.0 / scale)) * (1.0 / math.sqrt(scale))
    return _inv_sqrt_reduced(x)


def crypten_inv_sqrt(x: Tensor, scale: float = 1.0) -> Tensor:
    """``1 / sqrt(x)`` for positive shares with CrypTen's own inverse square root on ``x / scale``."""
    if scale != 1.0:
        return crypten_inv_sqrt(x * (1.0 / scale)) * (1.0 / math.sqrt(scale))
    return x.inv_sqrt()


def inv_sqrt_wide(x: Tensor, lo: float, hi: float) -> Tensor:
    """``1 / sqrt(x)`` for positive shares spanning many orders of magnitude, [lo, hi] public.

    The value is brought into [1, 4) by a public power of four chosen with comparisons against
    public thresholds 4^j (:func:`_power_factors`). Then CrypTen's inverse square root runs where
    it is accurate (its exp-based guess also covers values well above the last threshold, which
    the linear guess of :func:`inv_sqrt` would not). The factors 4^-j are exact in fixed point
    while 2j is at most the fractional bits, so ``hi`` may reach 4^8 at 16 bits.
    """
    fraction_bits = int(x.encoder.scale).bit_length() - 1
    first = math.floor(math.log(lo, 4))
    last = min(max(math.ceil(math.log(hi, 4)), first + 1), fraction_bits // 2) - 1
    factor4, factor2 = _power_factors(x, 4.0, first, last, (1.0, 0.5))
    return (x * factor4).inv_sqrt() * factor2


def gelu_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(inside, w)`` at ``x``'s scale: ``inside = [-T <= x < T]`` and ``w = [x >= T] - [x < -T]``.

    One comparison key per element gives both range tests (``[x < -T - d]`` and ``[x < T]``,
    :func:`protocols.mpc.compare.below`), on a ring of 32 bits (inputs are promised below 2^14,
    where ``x^2`` still fits CrypTen's ring) less the 11 low bits that the resolution ``d`` =
    :data:`GELU_RESOLUTION` = 1/32 lets the gate drop (21-bit keys). A test may err only for
    ``x`` in ``[T, T + d)`` or ``[-T - d, -T)``, where it picks the polynomial instead of ReLU:
    the polynomial's error there is at most 8.2e-4, no worse than ReLU's at ``|x| = T`` (8.1e-4),
    so the kernel's error bound is unchanged (tests/unit/test_gelu_range.py checks both edges).
    """
    t, d = GELU_RANGE, GELU_RESOLUTION
    with ops.compare_bound(GELU_COMPARE_BOUND, d):
        bits = as_fixed_point(below(x, [-t - d, t]), x)
    low, high = bits[..., 0], bits[..., 1]  # [x < -T - d], [x < T]
    return high - low, 1.0 - high - low


def gelu(x: Tensor, form: str = "erf") -> Tensor:
    """GeLU on shares as a piecewise polynomial (max error 8.2e-4 against erf GeLU; the tanh
    ``form`` is within 1e-3 of erf, so both get the same polynomial).

    The range tests :func:`gelu_range` (one comparison key per element), the even part ``g`` as a
    polynomial in ``v = x^2 / T^2`` (powers by squaring), then ``x / 2 + inside * g + w * x /
    2`` in one product: about 91 bytes and 8 rounds per element with FSS comparisons
    (``protocols.mpc.fused_gelu`` opens each operand once: 67 bytes). Outside [-T, T] the powers
    may overflow the ring; they are multiplied by an exact 0 there.
    """
    t = GELU_RANGE
    inside, w = gelu_range(x)
    v = x.square() * (1.0 / (t * t))
    powers = [v, v.square()]
    powers += [powers[1] * v, powers[1].square()]
    powers += [powers[3] * v, powers[2].square()]
    even = sum((p * c for p, c in zip(powers, GELU_EVEN_COEFFS[1:])), start=GELU_EVEN_COEFFS[0])
    weights = type(x).stack([inside, w])
    terms = weights * type(x).stack([even, x * 0.5])
    return x * 0.5 + terms[0] + terms[1]


def crypten_gelu(x: Tensor, form: str = "erf") -> Tensor:
    """GeLU on shares in the sigmoid form ``x * sigmoid(1.702 x)`` (one comparison, exp and
    reciprocal; error 0.021): what the CrypTen baseline computes."""
    return x * (x * GELU_SIGMOID_SLOPE).sigmoid()


def scaled_rows(x: Tensor, finish: Callable[[Tensor], Tensor]) -> Tensor:
    """``x * finish(x * x)`` with two Beaver products (``protocols.mpc.fused_norm`` opens ``x`` once)."""
    return x * finish(x.square())


def row_max(x: Tensor, dim: int = -1) -> Tensor:
    """Max over ``dim`` with the dim kept, by a pairwise tree on shares.

    Each level keeps ``b + relu(a - b)`` of the two halves: n - 1 comparisons per row in
    ceil(log2 n) levels. CrypTen's ``max(dim)`` computes the arg-max one-hot as well (about 2.4x
    the comparisons); measured on [12, 128, 128]: 43.2 MiB and 63 rounds per party instead of
    125.6 MiB and 79. Under a ``compare_bound`` with a resolution (``models.ops.row_max``'s
    ``slack``) a comparison may take ``a`` for ``a - b`` in (-slack, 0]: each level keeps an
    entry within ``slack`` of the larger one, so the result is an entry at most ceil(log2 n) *
    slack below the max (never above it).
    """
    while x.size(dim) > 1:
        n = x.size(dim)
        a, b, rest = x.split([n // 2, n // 2, n % 2], dim=dim)
        gap = a - b
        top = b + gap * (gap > 0)
        x = type(top).cat([top, rest], dim=dim) if n % 2 else top
    return x


def argmax_last(x: Tensor) -> tuple[Tensor, Tensor]:
    """(max, index of the first max) over the last dim of shares ``x`` [..., n] by a tournament.

    Each level compares neighbours once (``a >= b`` with ``a`` the earlier, so ties keep the
    earlier entry, as ``torch.argmax`` does) and moves value and index with one product of the
    comparison bit and the stacked differences: n - 1 comparisons in ceil(log2 n) rounds of them,
    instead of CrypTen's one-hot arg-max (a max tree plus an equality test of every entry against
    the max). The index is a secret integer at the fixed-point scale.
    """
    last = x.dim() - 1
    position: Tensor = torch.arange(x.size(-1), dtype=torch.float32).expand(x.shape)
    while x.size(-1) > 1:
        m = x.size(-1)
        even, odd = torch.arange(0, m - 1, 2), torch.arange(1, m, 2)  # neighbours: a precedes b
        a, b = ops.index(x, last, even), ops.index(x, last, odd)
        ia, ib = ops.index(position, last, even), ops.index(position, last, odd)
        final = torch.tensor([m - 1])
        rest = [(ops.index(x, last, final), ops.index(position, last, final))] if m % 2 else []
        take_a = as_fixed_point(a >= b, a)
        if ops.is_plain(ia):
            x, position = take_a * (a - b) + b, take_a * (ia - ib) + ib
        else:
            both = type(a).stack([a - b, ia - ib]) * take_a
            x, position = both[0] + b, both[1] + ib
        for value, where in rest:  # an odd entry out waits for the next level
            x, position = ops.cat([x, value], dim=-1), ops.cat([position, where], dim=-1)
    return x.squeeze(-1), position.squeeze(-1)


def kernels(method: str = "reduced") -> dict[str, Callable[..., Any]]:
    """The share implementations of every kernel of ``models.ops`` for ``method`` in :data:`NUMERICS`."""
    if method not in NUMERICS:
        raise ValueError(f"unknown numerics {method!r}; expected one of {NUMERICS}")
    table: dict[str, Callable[..., Any]] = {
        "reciprocal": reciprocal, "inv_sqrt": inv_sqrt, "inv_sqrt_wide": inv_sqrt_wide, "gelu": gelu,
        "scaled_rows": scaled_rows, "row_max": row_max, "argmax_last": argmax_last,
    }
    if method == "crypten":
        table.update(reciprocal=crypten_reciprocal, inv_sqrt=crypten_inv_sqrt, gelu=crypten_gelu)
    return table


@contextlib.contextmanager
def share_kernels(method: str = "reduced", **fused: Callable[..., Any]) -> Iterator[None]:
    """Within the block, ``models.ops`` runs on shares with :func:`kernels` of ``method``, and
    ``fused`` (e.g. ``scaled_rows=fused_norm.scaled_rows``) in place of the named ones.

    Kernels are installed per thread (a context variable): enter the block on the thread that
    runs the forward."""
    with ops.encrypted_kernels(**{**kernels(method), **fused}):
        yield
