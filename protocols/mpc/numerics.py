"""The numerics that run on secret shares: what :mod:`models.ops` dispatches to for encrypted values.

Models call :mod:`models.ops` (``reciprocal``, ``inv_sqrt``, ``inv_sqrt_wide``, ``gelu``, ``silu``,
``exp_nonpositive``, ``row_max``, ``argmax_last``, ``scaled_rows``); on torch tensors those compute in torch, on
shares they call the implementation installed with ``models.ops.encrypted_kernels``. This module
holds those implementations for CrypTen ``MPCTensor``s (duck-typed; comparisons against public
thresholds go through :func:`protocols.mpc.compare.below`) and :func:`share_kernels`, the
context manager that installs them, optionally with a protocol's fused kernels
(``protocols.mpc.fused_norm``, ``protocols.mpc.fused_gelu``) in place of some.

* **Positive reciprocal and inverse square root**: range-reduced piecewise polynomials. The
  bits ``[x < t_j]`` against public thresholds (16 per octave for the reciprocal, 128 per power
  of four for the root: 383 and 1,663) pick the power k and the piece at once; a quadratic
  (reciprocal) or a line (root) in the reduced value follows: 4 and 3 rounds
  (:func:`_piecewise_power`; the root may multiply a secret factor in without a round more).
  With FSS comparisons all thresholds of an element share one key and one opening
  (:func:`protocols.mpc.compare.below`): ~1 KB of dealer keys per element, whatever the count.
  Accurate for ``x / scale`` in [2^-14, 2^10) and [4^-7, 4^6); callers pass a public ``scale``
  that brings the private value into range. The general (signed) reciprocal is CrypTen's own.
* **Wide inverse square root** (SmolLM2's massive activations): a secret power of four from
  one comparison key, then the piecewise root with the caller's factor in its last product.
* **SiLU and a softmax's exp** (:mod:`protocols.mpc.pieces`): quadratic pieces from one comparison
  key for their edges (4 rounds) where priced cheaper than CrypTen's ``x * sigmoid(x)`` (17) and
  ``(1 + x/256)^256`` (8).
* **Fixed-point scale**: CrypTen encodes comparison bits at scale 1, so ``bit * 0.25`` would
  round the constant to 0; :func:`protocols.mpc.compare.as_fixed_point` multiplies the share by the scale ratio (a
  local operation) to get the same bit at the usual 2^16 scale.
* **GeLU**: ``x / 2 + g(x)`` on [-T, T] (T = 3.5), where ``g(x) = x (Phi(x) - 1/2)`` is even,
  fitted as a degree-6 polynomial in ``v = x^2 / T^2`` (near-minimax on [0, 1], max error
  2.3e-4), and ``relu(x)`` outside (GeLU differs from it by at most 8.1e-4 there); both range
  tests from one truncated 21-bit key per element (:func:`gelu_range`).
* **Row max and arg-max**: comparison tournaments (:mod:`protocols.mpc.tournament`: binary levels on long
  rows or many rows, all-pairs groups of up to 16 where they are priced cheaper: three rounds
  per level, :mod:`protocols.mpc.kernel_choice`) instead of CrypTen's
  ``max(dim)``, which also builds the arg-max one-hot. A softmax's max runs its binary levels
  under the caller's ``compare_bound`` (``models.ops.row_max(bound=, slack=)``: 23-bit keys);
  the groups' pairs and the arg-max compare exactly.
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
from protocols.mpc.compare import as_fixed_point, below, below_opening
from protocols.mpc.intervals import interval_values
from protocols.mpc.kernel_choice import fold_gain, session_config
from protocols.mpc.pieces import crypten_exp, crypten_silu, exp_nonpositive, silu
from protocols.mpc.tournament import argmax_last, row_max

Tensor = Any  # an encrypted tensor with CrypTen's MPCTensor interface

RECIPROCAL_POWERS = (-14, 9)  # k range of x / scale for reciprocals: [2^-14, 2^10)
INV_SQRT_POWERS = (-7, 5)     # k range of x / scale for inverse square roots: [4^-7, 4^6)
RECIPROCAL_PIECES = 16  # quadratic pieces per octave of the reciprocal
INV_SQRT_PIECES = 128  # linear pieces per power of four of the inverse square root
CRYPTEN_RECIPROCAL_NEWTON_STEPS = 10

GELU_RANGE = 3.5
GELU_COMPARE_BOUND = 2.0 ** 14  # |x| beyond this overflows the ring in x^2's product anyway
GELU_RESOLUTION = 2.0 ** -5  # the range tests may err within 1/32 outside [-T, T] (see gelu_range)
GELU_EVEN_COEFFS = (0.0002246013663433183, 0.3969218679627679 * 3.5 ** 2, -0.06349736554911566 * 3.5 ** 4,
                    0.008262958519470445 * 3.5 ** 6, -0.00069335772060879 * 3.5 ** 8,
                    3.2966547891262465e-05 * 3.5 ** 10, -6.672909071414601e-07 * 3.5 ** 12)
GELU_SIGMOID_SLOPE = 1.702
NUMERICS = ("reduced", "crypten")


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
def _piece_table(base: float, first: int, last: int, pieces: int, exponent: float,
                 degree: int) -> dict[str, torch.Tensor]:
    """Thresholds and per-interval values of a piecewise polynomial for ``x^exponent``.

    The thresholds are ``base^p g_j`` for powers p in [first, last] and ``g_j = base^(j /
    pieces)``; an x in interval (p, j) has ``m = x base^-p`` in [g_j, g_(j+1)), where ``x^exponent
    = base^(p exponent) sum_i c_i u^i`` with ``u = m - g_j`` (``c_i`` fitted for the least
    relative error at Chebyshev nodes: near-minimax). Interval 0 also takes every x below the
    first threshold, the last every x above the last one (a clamped k). Returns ``thresholds``
    [J] and, per interval [J + 1], ``f`` (``base^-p``), ``left`` (``g_j``) and ``d0``..``d<degree>``
    (``base^(p exponent) c_i``).
    """
    grid = [base ** (j / pieces) for j in range(pieces + 1)]
    nodes = 0.5 - 0.5 * torch.cos(torch.linspace(0.0, math.pi, 4 * degree + 9, dtype=torch.float64))
    fits = []  # c_i of each j: the same for every power p (only base^(p exponent) scales them)
    for j in range(pieces):
        a, b = grid[j], grid[j + 1]
        u = nodes * (b - a)
        target = (a + u) ** exponent
        design = torch.stack([u ** i for i in range(degree + 1)], dim=-1) / target[:, None]
        fits.append(torch.linalg.lstsq(design, torch.ones_like(u)[:, None]).solution[:, 0])
    rows = [[base ** p * grid[j], base ** -p, grid[j]] + (base ** (p * exponent) * fits[j]).tolist()
            for p in range(first, last + 1) for j in range(pieces)]
    table = torch.tensor(rows, dtype=torch.float64)
    out = {"thresholds": table[1:, 0], "f": table[:, 1], "left": table[:, 2]}
    out.update({f"d{i}": table[:, 3 + i] for i in range(degree + 1)})
    return {name: column.contiguous() for name, column in out.items()}


def _piecewise_power(x: Tensor, base: float, powers: tuple[int, int], pieces: int, exponent: float,
                     degree: int, times: Tensor | None = None) -> Tensor:
    """``x^exponent`` for positive ``x`` in [base^first, base^(last+1)) from one comparison key:
    the interval's factor ``base^-p``, left end and coefficients are local sums of the bits
    (:func:`~protocols.mpc.intervals.interval_values`), ``u = x base^-p - g_j`` one product, then ``sum_i d_i u^i``: one
    product more for degree 1, two for degree 2 (``d_1 u`` with ``d_2 u``, then ``(d_2 u) u``).

    With secret ``times`` [..., d] (degree 1; ``x`` [..., 1], e.g. a norm's rows): ``times *
    x^exponent = times d_0 + (times d_1) u``, the two products on ``times`` batched with the one
    forming ``u`` (one exchange), then one more: the same three rounds as ``x^exponent`` alone."""
    if degree not in (1, 2) or (times is not None and degree != 1):
        raise ValueError(f"piecewise degree must be 1 or 2 (1 with a factor), got {degree}")
    table = _piece_table(base, *powers, pieces, exponent, degree)
    factor, left, *coeffs = interval_values(x, table, ("f", "left") + tuple(f"d{i}" for i in range(degree + 1)))
    if times is not None:
        shape, rows = tuple(times.shape), x.nelement()
        flat = [v.expand(shape).reshape(-1) for v in coeffs]
        both = ops.cat([x.reshape(-1), times.reshape(-1), times.reshape(-1)]) * ops.cat([factor.reshape(-1), *flat])
        u = both[:rows].reshape(x.shape) - left
        scaled = both[rows:rows + times.nelement()].reshape(shape)
        return scaled + both[rows + times.nelement():].reshape(shape) * u
    u = x * factor - left
    if degree == 1:
        return coeffs[1] * u + coeffs[0]
    width = u.shape[-1]
    linear = ops.cat([coeffs[1], coeffs[2]], dim=-1) * ops.cat([u, u], dim=-1)
    return coeffs[0] + linear[..., :width] + linear[..., width:] * u


def _reciprocal_reduced(x: Tensor) -> Tensor:
    """Positive ``x`` in [2^first, 2^(last+1)): ``1 / x = 2^-k / m`` with ``m = x 2^-k`` in [1, 2),
    a quadratic in ``m`` per sixteenth of an octave chosen by the same comparisons that find k
    (relative error < 3e-6): four rounds (the comparisons, ``m``, two products; the linear
    guess and one Newton step took five, three Newton steps nine)."""
    return _piecewise_power(x, 2.0, RECIPROCAL_POWERS, RECIPROCAL_PIECES, -1.0, 2)


def _reciprocal_exp_seeded(x: Tensor) -> Tensor:
    """CrypTen's positive reciprocal: initial guess ``3 exp(1 - 2x) + 0.003``, all-positive Newton."""
    guess = (1 - 2 * x).exp() * 3 + 0.003
    for _ in range(CRYPTEN_RECIPROCAL_NEWTON_STEPS):
        guess = guess * 2 - guess.square() * x
    return guess


def _inv_sqrt_reduced(x: Tensor, times: Tensor | None = None) -> Tensor:
    """Positive ``x``: ``x^-1/2 = 2^-k m^-1/2`` with ``m = x 4^-k`` in [1, 4), a line in ``m`` per
    1/128 of a power of four chosen by the same comparisons that find k (relative error < 6e-6;
    the norms compare one element per row, so 1,663 thresholds on one key cost little): three
    rounds (the comparisons, ``m``, one product; a linear guess and one Newton step took five)."""
    return _piecewise_power(x, 4.0, INV_SQRT_POWERS, INV_SQRT_PIECES, -0.5, 1, times)


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


def inv_sqrt(x: Tensor, scale: float = 1.0, times: Any = None) -> Tensor:
    """``times / sqrt(x)`` (``times`` None: 1) for positive shares: range-reduced on ``x / scale``
    (exact for ``x / scale`` in [4^-7, 4^6)); a secret ``times`` costs one round, not two
    (:func:`_piecewise_power`)."""
    if scale != 1.0:
        return inv_sqrt(x * (1.0 / scale), times=times) * (1.0 / math.sqrt(scale))
    if times is not None and ops.is_plain(times):
        return _inv_sqrt_reduced(x) * times
    return _inv_sqrt_reduced(x, times)


def crypten_inv_sqrt(x: Tensor, scale: float = 1.0, times: Any = None) -> Tensor:
    """``times / sqrt(x)`` for positive shares with CrypTen's own inverse square root on ``x / scale``."""
    if scale != 1.0:
        return crypten_inv_sqrt(x * (1.0 / scale), times=times) * (1.0 / math.sqrt(scale))
    return x.inv_sqrt() if times is None else times * x.inv_sqrt()


def _wide_powers(x: Tensor, lo: float, hi: float) -> tuple[int, int]:
    """The first and last power j of the thresholds 4^j for :func:`_wide_factors`: the factors
    4^-j are exact in fixed point while 2j is at most the fractional bits, so values above 4^8
    (at 16 bits) stay above 4 after the reduction."""
    fraction_bits = int(x.encoder.scale).bit_length() - 1
    first = math.floor(math.log(lo, 4))
    return first, min(max(math.ceil(math.log(hi, 4)), first + 1), fraction_bits // 2) - 1


def _wide_factors(x: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """Secret ``(4^-j, 2^-j)`` bringing positive ``x`` in [lo, hi] into [1, 4) (values above the
    last threshold above it), from comparisons against public thresholds 4^j."""
    factor4, factor2 = _power_factors(x, 4.0, *_wide_powers(x, lo, hi), (1.0, 0.5))
    return factor4, factor2


def inv_sqrt_wide(x: Tensor, lo: float, hi: float, times: Tensor | None = None) -> Tensor:
    """``times / sqrt(x)`` (``times`` None: 1) for positive shares ``x`` [..., 1] spanning many
    orders of magnitude within the public [lo, hi] (SmolLM2's norms: up to 4^10).

    A secret power of four (:func:`_wide_factors`) brings ``x`` near [1, 4) (at most 4^10 / 4^7
    above it, inside the piecewise root's range [4^-7, 4^6)), then the piecewise root
    (:func:`_inv_sqrt_reduced`) with ``times * 2^-j`` as its factor: ``2^-j / sqrt(x 4^-j) = 1 /
    sqrt(x)``. The two products ``x 4^-j`` and ``times 2^-j`` share one exchange, and the root's
    last product multiplies ``times`` in: the comparisons, one product, then the root's three
    rounds (CrypTen's inverse square root there took 17: an exp guess and three Newton steps).
    A range whose reduced values would pass the piecewise root's (``hi`` from 4^13 on, at 16 bits)
    is refused with ``ValueError`` before any exchange (CrypTen's root was no better there)."""
    limit = 4.0 ** (INV_SQRT_POWERS[1] + 1 + _wide_powers(x, lo, hi)[1])
    if hi >= limit:
        raise ValueError(f"wide inverse square root over [{lo:g}, {hi:g}]: the range must stay below {limit:g}")
    factor4, factor2 = _wide_factors(x, lo, hi)
    if times is None:
        return _inv_sqrt_reduced(x * factor4, factor2)
    rows, factor = x.nelement(), factor2.expand(tuple(times.shape))
    both = ops.cat([x.reshape(-1), times.reshape(-1)]) * ops.cat([factor4.reshape(-1), factor.reshape(-1)])
    return _inv_sqrt_reduced(both[:rows].reshape(x.shape), both[rows:].reshape(tuple(times.shape)))


def crypten_inv_sqrt_wide(x: Tensor, lo: float, hi: float, times: Tensor | None = None) -> Tensor:
    """:func:`inv_sqrt_wide` with CrypTen's own inverse square root on the reduced value (what the
    ``crypten`` numerics run: exp-seeded Newton, 17 rounds)."""
    factor4, factor2 = _wide_factors(x, lo, hi)
    root = (x * factor4).inv_sqrt() * factor2
    return root if times is None else times * root


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
    inside, w, _ = gelu_range_opening(x, None)
    return inside, w


def gelu_range_opening(x: Tensor, extra: torch.Tensor | None) -> tuple[Tensor, Tensor, torch.Tensor | None]:
    """:func:`gelu_range` and the int64 shares ``extra`` opened in the same round
    (:func:`protocols.mpc.compare.below_opening`; the fused GeLU opens its masked input there)."""
    t, d = GELU_RANGE, GELU_RESOLUTION
    with ops.compare_bound(GELU_COMPARE_BOUND, d):
        raw, opened = below_opening(x, [-t - d, t], extra)
    bits = as_fixed_point(raw, x)
    low, high = bits[..., 0], bits[..., 1]  # [x < -T - d], [x < T]
    return high - low, 1.0 - high - low, opened


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


def scaled_rows(x: Tensor, finish: Callable[[Tensor], Tensor], weight: Any = None) -> Tensor:
    """``x * finish(x * x) * weight`` with Beaver products. A secret ``weight`` (a norm's gain, the
    server's) is folded where :func:`protocols.mpc.kernel_choice.fold_gain` prices it cheaper (a
    decoding step's few rows): multiplied into ``x`` in the same product as the squares, and
    ``finish(x * x, x * weight)`` multiplies its row factor into it (:func:`inv_sqrt`'s ``times``),
    so neither the gain nor the final product costs a round of its own; elsewhere (a prefill's
    many rows) it multiplies ``x * finish(x * x)`` after, as ``protocols.mpc.fused_norm`` does
    (``x`` opened once there): two rounds more, about a quarter of the bytes."""
    if weight is None:
        return x * finish(x.square())
    if ops.is_plain(weight):
        return (x * weight) * finish(x.square())
    if not fold_gain(x.nelement() // x.shape[-1], x.shape[-1], session_config(x)):
        return x * finish(x.square()) * weight
    width = x.shape[-1]
    both = ops.cat([x, x], dim=-1) * ops.cat([x, weight.expand(x.shape)], dim=-1)
    return finish(both[..., :width], both[..., width:])


def kernels(method: str = "reduced") -> dict[str, Callable[..., Any]]:
    """The share implementations of every kernel of ``models.ops`` for ``method`` in :data:`NUMERICS`."""
    if method not in NUMERICS:
        raise ValueError(f"unknown numerics {method!r}; expected one of {NUMERICS}")
    table: dict[str, Callable[..., Any]] = {
        "reciprocal": reciprocal, "inv_sqrt": inv_sqrt, "inv_sqrt_wide": inv_sqrt_wide, "gelu": gelu,
        "scaled_rows": scaled_rows, "row_max": row_max, "argmax_last": argmax_last, "silu": silu,
        "exp_nonpositive": exp_nonpositive,
    }
    if method == "crypten":
        table.update(reciprocal=crypten_reciprocal, inv_sqrt=crypten_inv_sqrt, inv_sqrt_wide=crypten_inv_sqrt_wide,
                     gelu=crypten_gelu, silu=crypten_silu, exp_nonpositive=crypten_exp)
    return table


@contextlib.contextmanager
def share_kernels(method: str = "reduced", **fused: Callable[..., Any]) -> Iterator[None]:
    """Within the block, ``models.ops`` runs on shares with :func:`kernels` of ``method``, and
    ``fused`` (e.g. ``scaled_rows=fused_norm.scaled_rows``) in place of the named ones.

    Kernels are installed per thread (a context variable): enter the block on the thread that
    runs the forward."""
    with ops.encrypted_kernels(**{**kernels(method), **fused}):
        yield
