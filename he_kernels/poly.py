"""Polynomials on ciphertexts with depth tracking, and the approximations built from them.

Polynomial evaluation is baby-step giant-step: baby powers x..x^(k-1) (k a power of two near
sqrt(degree)), giant powers x^k, x^2k, x^4k...; p = low + x^g * high, recursively, with the
leaves done as sums of scalar multiples of baby powers. Its depth is :func:`poly_depth`.
Each approximation states its domain; its maximum error against torch over that domain is
measured in float64 by :meth:`max_error` (and checked under encryption by the tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tenseal import sealapi as sa

from he_kernels.context import HEContext
from he_kernels.ops import KernelStats, Ops
from he_kernels.tensor import Domain, EncTensor

Fn = Callable[[torch.Tensor], torch.Tensor]


def _ceil_log2(i: int) -> int:
    return 0 if i <= 1 else (i - 1).bit_length()


def _baby(degree: int) -> int:
    return max(2, 1 << _ceil_log2(math.ceil(math.sqrt(degree + 1))))


def poly_depth(degree: int) -> int:
    """Levels :func:`eval_poly` consumes for a polynomial of this degree (>= 1)."""
    if degree < 1:
        raise ValueError(f"polynomial degree must be >= 1, got {degree}")
    return _depth_rec(degree, _baby(degree))


def _depth_rec(degree: int, k: int) -> int:
    if degree < k:
        return _ceil_log2(degree) + 1
    g = k
    while 2 * g <= degree:
        g *= 2
    high = degree - g
    giant = _ceil_log2(g)
    high_depth = giant + 1 if high == 0 else max(_depth_rec(high, k), giant) + 1
    low_depth = _depth_rec(g - 1, k)
    return max(low_depth, high_depth)


@dataclass(frozen=True)
class PolyApprox:
    """A power-basis polynomial valid on ``domain`` (coefficients low to high)."""

    coeffs: tuple[float, ...]
    domain: Domain
    target: Fn | None = field(default=None, compare=False)

    @classmethod
    def fit(cls, f: Fn, degree: int, lo: float, hi: float, name: str) -> PolyApprox:
        """Least-squares fit on Chebyshev nodes of [lo, hi] (near-minimax), power basis."""
        nodes = np.cos(np.pi * (np.arange(4 * degree + 4) + 0.5) / (4 * degree + 4))
        xs = (nodes + 1) * (hi - lo) / 2 + lo
        ys = f(torch.from_numpy(xs)).double().numpy()
        cheb = np.polynomial.chebyshev.Chebyshev.fit(xs, ys, degree, domain=[lo, hi])
        coeffs = cheb.convert(kind=np.polynomial.Polynomial, domain=[-1, 1], window=[-1, 1]).coef
        coeffs[np.abs(coeffs) < 1e-12 * np.abs(coeffs).max()] = 0.0  # exact zeros stay zero
        return cls(tuple(float(c) for c in coeffs), Domain(lo, hi, name), f)

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    @property
    def depth(self) -> int:
        return poly_depth(self.degree)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The polynomial in float64 (what the encrypted evaluation should reproduce)."""
        x = x.double()
        out = torch.zeros_like(x)
        for c in reversed(self.coeffs):
            out = out * x + c
        return out

    def max_error(self, f: Fn | None = None, points: int = 4001) -> float:
        """Max |poly - f| over the domain (f defaults to the function it approximates)."""
        f = f or self.target
        if f is None:
            raise ValueError(f"{self.domain.name}: no reference function to measure against")
        xs = torch.linspace(self.domain.lo, self.domain.hi, points, dtype=torch.float64)
        return float((self.plain(xs) - f(xs).double()).abs().max())


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


def gelu_quad(lo: float = -4.0, hi: float = 4.0) -> PolyApprox:
    """MPCFormer's quad GeLU 0.125x^2 + 0.25x + 0.5 (a distillation target, not a close fit)."""
    return PolyApprox((0.5, 0.25, 0.125), Domain(lo, hi, "gelu_quad"), _gelu)


def gelu_poly(degree: int = 8, lo: float = -4.0, hi: float = 4.0) -> PolyApprox:
    """Near-minimax GeLU fit of ``degree`` on [lo, hi]."""
    return PolyApprox.fit(_gelu, degree, lo, hi, f"gelu_poly{degree}")


# ----- ciphertext evaluation -------------------------------------------------------------------
class _Powers:
    """Lazily computed powers of one ciphertext (x^(2^a) by squaring, others by products)."""

    def __init__(self, ops: Ops, x: sa.Ciphertext) -> None:
        self.ops, self.cache = ops, {1: x}

    def get(self, i: int) -> sa.Ciphertext:
        if i not in self.cache:
            top = 1 << (i.bit_length() - 1)
            if top == i:
                half = self.get(i // 2)
                self.cache[i] = self.ops.square(half)
            else:
                self.cache[i] = self.ops.mul(self.get(top), self.get(i - top))
        return self.cache[i]


def _eval_rec(ops: Ops, coeffs: list[float], pw: _Powers, k: int) -> sa.Ciphertext | float:
    """Ciphertext result, or a float when every non-constant coefficient is zero."""
    degree = len(coeffs) - 1
    if degree < k:
        acc = None
        for i in range(1, degree + 1):
            if coeffs[i] != 0.0:
                term = ops.mul_plain(pw.get(i), coeffs[i])
                acc = term if acc is None else ops.add(acc, term)
        return _plus(ops, acc, coeffs[0])
    g = k
    while 2 * g <= degree:
        g *= 2
    low = _eval_rec(ops, coeffs[:g], pw, k)
    high = _eval_rec(ops, coeffs[g:], pw, k)
    if isinstance(high, float):
        high = ops.mul_plain(pw.get(g), high) if high != 0.0 else None
    else:
        high = ops.mul(high, pw.get(g))
    if isinstance(low, float):
        return _plus(ops, high, low)
    return low if high is None else ops.add(low, high)


def _plus(ops: Ops, ct: sa.Ciphertext | None, const: float) -> sa.Ciphertext | float:
    if ct is None:
        return float(const)
    return ops.add_plain(ct, const) if const != 0.0 else ct


def eval_poly_ct(ops: Ops, x: sa.Ciphertext, coeffs: tuple[float, ...]) -> sa.Ciphertext:
    """Evaluate a power-basis polynomial (degree >= 1) on one ciphertext."""
    result = _eval_rec(ops, list(coeffs), _Powers(ops, x), _baby(len(coeffs) - 1))
    if isinstance(result, float):
        raise ValueError("polynomial has no non-constant term")
    return result


def power_ct(ops: Ops, x: sa.Ciphertext, p: int) -> sa.Ciphertext:
    """x^p by repeated squaring (depth ceil(log2 p))."""
    if p < 1:
        raise ValueError(f"power must be >= 1, got {p}")
    result, base = None, x
    while p:
        if p & 1:
            result = base if result is None else ops.mul(result, base)
        p >>= 1
        if p:
            base = ops.square(base)
    return result


def _map(ctx: HEContext, x: EncTensor, fn: Callable[[Ops, sa.Ciphertext], sa.Ciphertext],
         ledger: object | None) -> EncTensor:
    ops = Ops(ctx, KernelStats())
    level_in = x.level(ctx)
    outs = [fn(ops, ct) for ct in x.cts]
    ops.finish(outs, level_in, ledger)
    return EncTensor(outs, x.layout)


def eval_poly(ctx: HEContext, x: EncTensor, approx: PolyApprox, ledger: object | None = None) -> EncTensor:
    """Slot-wise polynomial on an encrypted tensor (any layout); ``approx.depth`` levels."""
    return _map(ctx, x, lambda ops, ct: eval_poly_ct(ops, ct, approx.coeffs), ledger)


def power(ctx: HEContext, x: EncTensor, p: int, ledger: object | None = None) -> EncTensor:
    """Slot-wise x^p; ceil(log2 p) levels."""
    return _map(ctx, x, lambda ops, ct: power_ct(ops, ct, p), ledger)


# ----- Newton iterations ----------------------------------------------------------------------
@dataclass(frozen=True)
class NewtonApprox:
    """1/x or 1/sqrt(x) on ``domain``: a polynomial first guess refined by Newton steps."""

    kind: str  # "reciprocal" or "inv_sqrt"
    init: PolyApprox
    iterations: int

    @classmethod
    def build(cls, kind: str, lo: float, hi: float, tol: float = 1e-4, init_degree: int = 3,
              max_iterations: int = 6) -> NewtonApprox:
        """Fewest iterations whose float64 simulation reaches relative error ``tol`` on [lo, hi]."""
        if lo <= 0:
            raise ValueError(f"{kind} domain must be positive, got [{lo}, {hi}]")
        target = _TARGETS[kind]
        init = PolyApprox.fit(target, init_degree, lo, hi, kind)
        for iterations in range(max_iterations + 1):
            approx = cls(kind, init, iterations)
            if approx.max_rel_error() <= tol:
                return approx
        raise ValueError(f"{kind} on [{lo}, {hi}] does not reach {tol} in {max_iterations} Newton steps")

    @property
    def domain(self) -> Domain:
        return self.init.domain

    @property
    def depth(self) -> int:
        if self.kind == "inv_sqrt" and self.iterations:  # 0.5*x takes a level before step one
            return max(self.init.depth, 1) + 2 * self.iterations
        return self.init.depth + 2 * self.iterations

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        y = self.init.plain(x)
        for _ in range(self.iterations):
            y = y * (2 - x * y) if self.kind == "reciprocal" else 1.5 * y - (0.5 * x * y) * (y * y)
        return y

    def max_rel_error(self, points: int = 4001) -> float:
        xs = torch.linspace(self.domain.lo, self.domain.hi, points, dtype=torch.float64)
        ref = _TARGETS[self.kind](xs)
        return float(((self.plain(xs) - ref) / ref).abs().max())


_TARGETS: dict[str, Fn] = {"reciprocal": lambda x: 1.0 / x, "inv_sqrt": torch.rsqrt}


def newton_ct(ops: Ops, x: sa.Ciphertext, approx: NewtonApprox) -> sa.Ciphertext:
    """Evaluate a :class:`NewtonApprox` on one ciphertext."""
    y = eval_poly_ct(ops, x, approx.init.coeffs)
    if approx.kind == "reciprocal":
        for _ in range(approx.iterations):
            y = ops.mul(y, _two_minus(ops, ops.mul(x, y)))
        return y
    half_x = ops.mul_plain(x, 0.5) if approx.iterations else x
    for _ in range(approx.iterations):
        cube = ops.mul(ops.mul(y, half_x), ops.square(y))
        y = ops.sub(ops.mul_plain(y, 1.5), cube)
    return y


def _two_minus(ops: Ops, t: sa.Ciphertext) -> sa.Ciphertext:
    neg = sa.Ciphertext()
    ops.ev.negate(t, neg)
    return ops.add_plain(neg, 2.0)


def newton(ctx: HEContext, x: EncTensor, approx: NewtonApprox, ledger: object | None = None) -> EncTensor:
    """Slot-wise 1/x or 1/sqrt(x) on an encrypted tensor; ``approx.depth`` levels."""
    return _map(ctx, x, lambda ops, ct: newton_ct(ops, ct, approx), ledger)
