"""The one adapter that lets the same forward run on torch tensors and on encrypted tensors.

Models never import crypto. A value is *plain* when ``torch.is_tensor`` says so; anything else is
treated as an encrypted tensor with CrypTen's ``MPCTensor`` method names (``matmul``,
``reciprocal``, ``inv_sqrt``, ``exp``, ``relu``, ``square``, ``cumsum``, ``max(dim)`` returning
``(values, one_hot)``, ...). Public constants (masks, divisors) are always torch tensors or floats.

Numerics on shares: the positive reciprocal and the inverse square root are range-reduced
Newton iterations (one batched comparison picks the power of two / four, then a linear guess
and 3 Newton steps; accurate for ``x / scale`` in [2^-14, 2^10) and [4^-7, 4^6), 9 and 12 rounds
where CrypTen's exp-seeded versions take 28 and 17 and hold only on about [0.002, 10] and
[0.1, 100]); callers pass a public ``scale`` that brings the private value into range; ``x**p``
uses repeated squaring (CrypTen's ``pow`` is wrong for odd p > 3); GeLU on shares is a piecewise
polynomial (see :func:`gelu`). A protocol may compute :func:`scaled_rows` (norms) with its own
kernel (:func:`fused_kernels`), e.g. one opening of ``x`` for both of its products.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

GELU_SIGMOID_SLOPE = 1.702
Tensor = Any  # torch.Tensor or an encrypted tensor with the MPCTensor interface


def is_plain(x: Tensor) -> bool:
    return torch.is_tensor(x)


def _swap_last(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for any mix of plain and encrypted operands (encrypted has no __rmatmul__)."""
    if is_plain(a) and not is_plain(b):
        return _swap_last(_swap_last(b).matmul(_swap_last(a)))
    return a.matmul(b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` with ``weight`` [out, in]; either side may be encrypted."""
    if is_plain(x) and is_plain(weight) and (bias is None or is_plain(bias)):
        return F.linear(x, weight, bias)
    if is_plain(x) and is_plain(weight):
        out = F.linear(x, weight)
    elif is_plain(x):
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        out = weight.matmul(flat.t()).t().reshape(*lead, weight.shape[0])
    else:
        out = x.matmul(weight.t())
    return out if bias is None else out + bias


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    return torch.softmax(x, dim) if is_plain(x) else x.softmax(dim)


def exp(x: Tensor) -> Tensor:
    return torch.exp(x) if is_plain(x) else x.exp()


# Range reduction on shares: one batched comparison of x against public powers of the base
# picks k with base^k <= x < base^(k+1); x * base^-k then lies in [1, base), where a linear
# first guess and a few Newton steps are accurate (relative error 1/17 and 0.086 at the start,
# squared by every step). Rounds: 1 comparison + 1 product + 2 (reciprocal) or 3 (inverse
# square root) per Newton step + 1 product, against CrypTen's exp-based first guess (8 squarings)
# and 10 / 3 Newton steps.
RECIPROCAL_POWERS = (-14, 9)  # k range of x / scale for reciprocals: [2^-14, 2^10)
INV_SQRT_POWERS = (-7, 5)     # k range of x / scale for inverse square roots: [4^-7, 4^6)
RECIPROCAL_NEWTON_STEPS = 3
INV_SQRT_NEWTON_STEPS = 3
NUMERICS = ("reduced", "crypten")
_numerics: contextvars.ContextVar[str] = contextvars.ContextVar("privinf_numerics", default="reduced")


_compare_bound: contextvars.ContextVar[float | None] = contextvars.ContextVar("privinf_compare_bound",
                                                                            default=None)
@contextlib.contextmanager
def _setting(var: contextvars.ContextVar[Any], value: Any) -> Iterator[None]:
    """``var`` set to ``value`` within the block."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


KERNELS = ("scaled_rows", "gelu")
_kernels: contextvars.ContextVar[dict[str, Callable[..., Any]] | None] = contextvars.ContextVar(
    "privinf_kernels", default=None)


@contextlib.contextmanager
def fused_kernels(**kernels: Callable[..., Any]) -> Iterator[None]:
    """Within the block, encrypted :func:`scaled_rows` / :func:`gelu` run a protocol's kernel
    (same function, fewer openings; the MPC parties install ``protocols.mpc.fused_norm.scaled_rows``
    and ``protocols.mpc.fused_gelu.gelu``). Names outside :data:`KERNELS` are refused."""
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"unknown fused kernel(s) {unknown}; expected some of {list(KERNELS)}")
    with _setting(_kernels, dict(kernels)):
        yield


def _kernel(name: str) -> Callable[..., Any] | None:
    return (_kernels.get() or {}).get(name)


def scaled_rows(x: Tensor, finish: Callable[[Tensor], Tensor]) -> Tensor:
    """``x * finish(x * x)``: a norm's input times a row factor computed from its squares. On
    shares the two products share the operand ``x``; a fused kernel opens it once."""
    kernel = _kernel("scaled_rows")
    if is_plain(x) or kernel is None:
        return x * finish(square(x))
    return kernel(x, finish)


@contextlib.contextmanager
def compare_bound(limit: float) -> Iterator[None]:
    """Promise that the values compared within the block (``x < y`` forms ``x - y``) stay below
    ``limit`` in magnitude. A secure comparison may then use a narrower ring (smaller, faster
    FSS keys, :mod:`protocols.mpc.compare`); values beyond the promise may compare wrongly."""
    if not limit > 0:
        raise ValueError(f"compare_bound needs a positive limit, got {limit!r}")
    with _setting(_compare_bound, float(limit)):
        yield


def comparison_bound() -> float | None:
    """The innermost :func:`compare_bound` promise, if any."""
    return _compare_bound.get()


@contextlib.contextmanager
def numerics(method: str) -> Iterator[None]:
    """Within the block, ``"crypten"`` runs CrypTen's own positive reciprocal (exp-seeded Newton,
    10 steps) and inverse square root instead of the range-reduced ones: the CrypTen baseline in
    ``bench/mpc_vs_crypten.py`` uses it so that route computes what CrypTen itself would."""
    if method not in NUMERICS:
        raise ValueError(f"unknown numerics {method!r}; expected one of {NUMERICS}")
    with _setting(_numerics, method):
        yield


def reciprocal(x: Tensor, scale: float | torch.Tensor = 1.0, positive: bool = False) -> Tensor:
    """``1 / x``; on shares computed as ``(1 / (x / scale)) / scale`` to stay in range.

    ``positive=True`` (normalisers of non-negative attention weights plus eps) uses the
    range-reduced Newton iteration (:func:`_reciprocal_reduced`, exact for ``x / scale`` in
    [2^-14, 2^10)); otherwise CrypTen's general reciprocal (which also handles the sign).
    """
    if is_plain(x):
        return 1.0 / x
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        inv = 1.0 / torch.as_tensor(scale, dtype=torch.float32)
        return reciprocal(x * inv, positive=positive) * inv
    if not positive:
        return x.reciprocal()
    if _numerics.get() == "crypten":
        guess = (1 - 2 * x).exp() * 3 + 0.003  # CrypTen's initial guess, all-positive Newton
        for _ in range(10):
            guess = guess * 2 - guess.square() * x
        return guess
    return _reciprocal_reduced(x)


def inv_sqrt(x: Tensor, scale: float = 1.0) -> Tensor:
    """``1 / sqrt(x)`` for positive x; on shares range-reduced Newton on ``x / scale``
    (exact for ``x / scale`` in [4^-7, 4^6))."""
    if is_plain(x):
        return torch.rsqrt(x)
    if scale != 1.0:
        return inv_sqrt(x * (1.0 / scale)) * (1.0 / math.sqrt(scale))
    if _numerics.get() == "crypten":
        return x.inv_sqrt()
    return _inv_sqrt_reduced(x, *INV_SQRT_POWERS)


def _power_factors(x: Tensor, base: float, first: int, last: int,
                   exponents: Sequence[float]) -> list[Tensor]:
    """Secret ``base^(-k e)`` for each ``e`` in ``exponents``, where ``base^k <= x < base^(k+1)``
    with k clamped to [first, last]. The comparison bits against the public thresholds are
    monotone, so each factor is linear in them (no products)."""
    powers = range(first + 1, last + 1)
    bits = as_fixed_point((x.unsqueeze(-1) - torch.tensor([base ** p for p in powers])) > 0, x)
    factors = []
    for e in exponents:
        steps = torch.tensor([base ** (-p * e) - base ** (-(p - 1) * e) for p in powers])
        factors.append((bits * steps).sum(-1) + base ** (-first * e))
    return factors


def _reciprocal_reduced(x: Tensor) -> Tensor:
    """Positive ``x`` in [2^first, 2^(last+1)): ``m = x 2^-k`` in [1, 2), Newton from the
    linear guess 24/17 - 8/17 m, times 2^-k."""
    (factor,) = _power_factors(x, 2.0, *RECIPROCAL_POWERS, (1.0,))
    m = x * factor
    y = m * (-8.0 / 17.0) + 24.0 / 17.0
    for _ in range(RECIPROCAL_NEWTON_STEPS):
        y = y * (2.0 - m * y)
    return y * factor


def _inv_sqrt_reduced(x: Tensor, first: int, last: int) -> Tensor:
    """Positive ``x``: ``m = x 4^-k`` in [1, 4), Newton from the linear guess
    1.06639 - 0.15234 m (minimax, relative error 0.086), times 2^-k."""
    factor4, factor2 = _power_factors(x, 4.0, first, last, (1.0, 0.5))
    m = x * factor4
    y = m * -0.15234 + 1.06639
    for _ in range(INV_SQRT_NEWTON_STEPS):
        # y (3 - m y^2) / 2 = 1.5 y - 0.5 (m y) y^2: y^2 and m y in one batched product, then
        # their product: two rounds a step instead of three
        both = cat([y, m], dim=-1) * cat([y, y], dim=-1)
        square, my = both[..., :y.shape[-1]], both[..., y.shape[-1]:]
        y = y * 1.5 - my * square * 0.5
    return y * factor2


def as_fixed_point(bit: Tensor, like: Tensor) -> Tensor:
    """A comparison result re-encoded at ``like``'s fixed-point scale (identity in torch).

    CrypTen encodes comparison bits at scale 1, so ``bit * 0.25`` would round the constant to 0;
    multiplying the share by the scale ratio (local) gives the same bit at the usual scale.
    """
    if is_plain(bit):
        return bit.to(like.dtype) if is_plain(like) else bit
    factor = int(like.encoder.scale) // int(bit.encoder.scale)
    if factor != 1:
        bit.share = bit.share * factor
        bit.encoder = like.encoder
    return bit


def rowdot(x: Tensor, y: Tensor) -> Tensor:
    """``sum(x * y, -1)`` keeping the dim; on shares one batched matmul, so the sum is formed
    at double scale and truncated once (an elementwise product truncates every term)."""
    if is_plain(x) and is_plain(y):
        return (x * y).sum(-1, keepdim=True)
    return x.unsqueeze(-2).matmul(y.unsqueeze(-1)).squeeze(-1)


def inv_sqrt_wide(x: Tensor, lo: float, hi: float) -> Tensor:
    """``1 / sqrt(x)`` for positive ``x`` spanning many orders of magnitude, [lo, hi] public.

    On shares the value is brought into [1, 4) by a public power of four chosen with
    comparisons against public thresholds 4^j (:func:`_power_factors`: one batched comparison,
    factors linear in the monotone bits). Then CrypTen's inverse square root runs where it is
    accurate (its exp-based guess also covers values well above the last threshold, which the
    linear guess of :func:`inv_sqrt` would not). Powers of two down to 2^-16 are exact in fixed
    point, so ``hi`` may reach 4^8.
    """
    if is_plain(x):
        return torch.rsqrt(x)
    first = math.floor(math.log(lo, 4))
    last = min(max(math.ceil(math.log(hi, 4)), first + 1), 8) - 1
    factor4, factor2 = _power_factors(x, 4.0, first, last, (1.0, 0.5))
    return (x * factor4).inv_sqrt() * factor2

def relu(x: Tensor) -> Tensor:
    return torch.relu(x) if is_plain(x) else x.relu()


def sigmoid(x: Tensor) -> Tensor:
    return torch.sigmoid(x) if is_plain(x) else x.sigmoid()


def tanh(x: Tensor) -> Tensor:
    return torch.tanh(x) if is_plain(x) else x.tanh()


def square(x: Tensor) -> Tensor:
    return x * x if is_plain(x) else x.square()


def pow_even(x: Tensor, p: int) -> Tensor:
    """``x ** p`` for even ``p`` by repeated squaring (log2 p rounds of multiplication)."""
    if p < 2 or p % 2:
        raise ValueError(f"pow_even needs an even p >= 2, got {p}")
    result: Tensor | None = None
    base, n = x, p
    while n:
        if n & 1:
            result = base if result is None else result * base
        n >>= 1
        if n:
            base = square(base)
    return result


# GeLU on shares: x / 2 + g(x) on [-T, T], where g(x) = x (Phi(x) - 1/2) is even, fitted as a
# degree-6 polynomial in v = x^2 / T^2 (near-minimax on [0, 1], max error 2.3e-4), and relu(x)
# outside (GeLU differs from it by at most 8.1e-4 there).
GELU_RANGE = 3.5
GELU_COMPARE_BOUND = 2.0 ** 14  # |x| beyond this overflows the ring in x^2's product anyway
GELU_EVEN_COEFFS = (0.0002246013663433183, 0.3969218679627679 * 3.5 ** 2, -0.06349736554911566 * 3.5 ** 4,
                    0.008262958519470445 * 3.5 ** 6, -0.00069335772060879 * 3.5 ** 8,
                    3.2966547891262465e-05 * 3.5 ** 10, -6.672909071414601e-07 * 3.5 ** 12)


def gelu(x: Tensor, form: str = "erf") -> Tensor:
    """GeLU: exact erf (or tanh) form in torch; on shares a piecewise polynomial (max error
    8.1e-4 against erf GeLU; the tanh form is within 1e-3 of erf).

    On shares: two comparisons in one batch, ``above = [x > T]`` and ``below = [x < -T]``
    (T = 3.5), the even part ``g`` as a polynomial in ``v = x^2 / T^2`` (powers by squaring),
    then ``x / 2 + inside * g + (above - below) * x / 2`` with ``inside = 1 - above - below``
    in one product: about 104 bytes and 8 rounds per element with FSS comparisons (a fused
    kernel, ``protocols.mpc.fused_gelu``, opens each operand once: 72 bytes) (on a
    32-bit ring: inputs are promised below 2^14, where ``x^2`` still fits CrypTen's ring). Outside
    [-T, T] the powers may overflow the ring; they are multiplied by an exact 0 there. Under
    ``numerics("crypten")`` the earlier sigmoid form ``x * sigmoid(1.702 x)`` (one comparison,
    exp and reciprocal; error 0.021) is used, which is what the CrypTen baseline computes.
    """
    if is_plain(x):
        return F.gelu(x, approximate="none" if form == "erf" else "tanh")
    if _numerics.get() == "crypten":
        return x * (x * GELU_SIGMOID_SLOPE).sigmoid()
    kernel = _kernel("gelu")
    if kernel is not None:
        return kernel(x)
    t = GELU_RANGE
    with compare_bound(GELU_COMPARE_BOUND):
        outside = as_fixed_point(type(x).stack([t - x, x + t]) < 0, x)  # [x > T], [x < -T]
    above, below = outside[0], outside[1]
    v = square(x) * (1.0 / (t * t))
    powers = [v, square(v)]
    powers += [powers[1] * v, square(powers[1])]
    powers += [powers[3] * v, square(powers[2])]
    even = sum((p * c for p, c in zip(powers, GELU_EVEN_COEFFS[1:])), start=GELU_EVEN_COEFFS[0])
    inside = 1.0 - above - below
    weights = type(x).stack([inside, above - below])
    terms = weights * type(x).stack([even, x * 0.5])
    return x * 0.5 + terms[0] + terms[1]


def silu(x: Tensor) -> Tensor:
    return F.silu(x) if is_plain(x) else x * x.sigmoid()


def row_max(x: Tensor, dim: int = -1) -> Tensor:
    """Max over ``dim`` with the dim kept (values only).

    On shares a pairwise tree: each level keeps ``b + relu(a - b)`` of the two halves, n - 1
    comparisons per row in ceil(log2 n) levels. CrypTen's ``max(dim)`` computes the arg-max
    one-hot as well (about 2.4x the comparisons); measured on [12, 128, 128]: 43.2 MiB and 63
    rounds per party instead of 125.6 MiB and 79.
    """
    if is_plain(x):
        return x.amax(dim=dim, keepdim=True)
    while x.size(dim) > 1:
        n = x.size(dim)
        a, b, rest = x.split([n // 2, n // 2, n % 2], dim=dim)
        gap = a - b
        top = b + gap * (gap > 0)
        x = type(top).cat([top, rest], dim=dim) if n % 2 else top
    return x


def argmax_last(x: Tensor) -> tuple[Tensor, Tensor]:
    """(max, index of the first max) over the last dim of ``x`` [..., n]; the index is a value
    of ``x``'s own type (on shares a secret integer at the fixed-point scale).

    On shares a tournament: each level compares neighbours once (``a >= b`` with ``a`` the
    earlier, so ties keep the earlier entry, as ``torch.argmax`` does) and moves value and index
    with one product of the comparison bit and the stacked differences: n - 1 comparisons in
    ceil(log2 n) rounds of them, instead of CrypTen's one-hot arg-max (a max tree plus an equality test of every
    entry against the max).
    """
    if is_plain(x):
        values, first = x.max(dim=-1)
        return values, first.to(x.dtype)
    last = x.dim() - 1
    position: Tensor = torch.arange(x.size(-1), dtype=torch.float32).expand(x.shape)
    while x.size(-1) > 1:
        m = x.size(-1)
        even, odd = torch.arange(0, m - 1, 2), torch.arange(1, m, 2)  # neighbours: a precedes b
        a, b = index(x, last, even), index(x, last, odd)
        ia, ib = index(position, last, even), index(position, last, odd)
        final = torch.tensor([m - 1])
        rest = [(index(x, last, final), index(position, last, final))] if m % 2 else []
        take_a = as_fixed_point(a >= b, a)
        if is_plain(ia):
            x, position = take_a * (a - b) + b, take_a * (ia - ib) + ib
        else:
            both = type(a).stack([a - b, ia - ib]) * take_a
            x, position = both[0] + b, both[1] + ib
        for value, where in rest:  # an odd entry out waits for the next level
            x, position = cat([x, value], dim=-1), cat([position, where], dim=-1)
    return x.squeeze(-1), position.squeeze(-1)


def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """Concatenate; plain pieces next to encrypted ones are lifted to the encrypted type."""
    if not tensors:
        raise ValueError("cat of an empty list")
    if all(is_plain(t) for t in tensors):
        return torch.cat(list(tensors), dim=dim)
    ref = next(t for t in tensors if not is_plain(t))
    pieces = [ref.new(t) if is_plain(t) else t for t in tensors]
    return type(ref).cat(pieces, dim=dim)


def index(x: Tensor, dim: int, idx: torch.Tensor) -> Tensor:
    """Select entries ``idx`` (public Long indices) along ``dim``."""
    if is_plain(x):
        return x.index_select(dim, idx)
    key = (slice(None),) * (dim % x.dim()) + (idx,)
    return x[key]


def replace_parameters(module: torch.nn.Module, fn: Callable[[torch.Tensor], Any]) -> None:
    """Turn every ``nn.Parameter`` into ``fn(param)`` stored as a plain attribute.

    A protocol uses this to make the server's weights encrypted tensors; the model code reads
    ``self.weight`` and keeps working. Buffers (public constants such as RoPE tables) stay.
    A parameter shared by several modules (tied embeddings) is converted once.
    """
    done: dict[int, Any] = {}
    for sub in module.modules():
        for name in list(sub._parameters):
            param = sub._parameters.pop(name)
            if param is not None and id(param) not in done:
                done[id(param)] = fn(param.detach())
            object.__setattr__(sub, name, None if param is None else done[id(param)])
