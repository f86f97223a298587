"""The one adapter that lets the same forward run on torch tensors and on encrypted tensors.

Models never import crypto. A value is *plain* when ``torch.is_tensor`` says so; anything else is
treated as an encrypted tensor with CrypTen's ``MPCTensor`` method names (``matmul``,
``reciprocal``, ``inv_sqrt``, ``exp``, ``relu``, ``square``, ``cumsum``, ``max(dim)`` returning
``(values, one_hot)``, ...). Public constants (masks, divisors) are always torch tensors or floats.

Ops that are plain method calls (``exp``, ``relu``, ``softmax``, ``matmul``, ...) dispatch by
type. The kernels in :data:`KERNELS` (``reciprocal``, ``inv_sqrt``, ``gelu``, ``row_max``, ...)
compute in torch on plain values; on encrypted values they call the implementation the protocol
installs with :func:`encrypted_kernels` (the MPC route installs ``protocols.mpc.numerics``'
share numerics and its fused kernels around each forward), and raise :class:`MissingKernelError`
when none is installed (``silu`` and ``exp_nonpositive`` fall back to the value's own methods).
:func:`compare_bound` lets model code promise a magnitude bound to the secure comparisons inside
a block.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Tensor = Any  # torch.Tensor or an encrypted tensor with the MPCTensor interface
KERNELS = ("reciprocal", "inv_sqrt", "inv_sqrt_wide", "gelu", "silu", "exp_nonpositive", "scaled_rows", "row_max",
           "argmax_last")


class MissingKernelError(LookupError):
    """A kernel ran on an encrypted value with no implementation installed for it."""


def is_plain(x: Tensor) -> bool:
    """Whether ``x`` is a torch tensor (anything else is an encrypted tensor)."""
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
    """Softmax over ``dim``."""
    return torch.softmax(x, dim) if is_plain(x) else x.softmax(dim)


def exp(x: Tensor) -> Tensor:
    """Elementwise exponential."""
    return torch.exp(x) if is_plain(x) else x.exp()


def exp_nonpositive(x: Tensor) -> Tensor:
    """Elementwise exponential of values at most ~0 (a softmax's scores less their row max, which
    exceed 0 by at most the max's slack); on encrypted values the installed approximation, or the
    value's own ``exp`` where none is installed."""
    return torch.exp(x) if is_plain(x) else _kernel_or("exp_nonpositive", lambda v: v.exp())(x)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar[Any], value: Any) -> Iterator[None]:
    """``var`` set to ``value`` within the block."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


_kernels: contextvars.ContextVar[Mapping[str, Callable[..., Any]] | None] = contextvars.ContextVar(
    "privinf_kernels", default=None)
_compare_bound: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "privinf_compare_bound", default=None)


@contextlib.contextmanager
def encrypted_kernels(**impls: Callable[..., Any]) -> Iterator[None]:
    """Within the block, the named kernels of :data:`KERNELS` run ``impls`` on encrypted values
    (on top of those an enclosing block installed). A protocol installs its implementations
    here, so models never import it; names outside :data:`KERNELS` are refused. The setting is
    a context variable: it holds on the thread (or task) that entered the block."""
    unknown = sorted(set(impls) - set(KERNELS))
    if unknown:
        raise ValueError(f"unknown encrypted kernel(s) {unknown}; expected some of {list(KERNELS)}")
    with _setting(_kernels, {**(_kernels.get() or {}), **impls}):
        yield


def _kernel_or(name: str, default: Callable[..., Any]) -> Callable[..., Any]:
    """The installed implementation of kernel ``name`` for encrypted values, else ``default``."""
    return (_kernels.get() or {}).get(name) or default


def _kernel(name: str) -> Callable[..., Any]:
    """The installed implementation of kernel ``name`` for encrypted values."""
    impl = (_kernels.get() or {}).get(name)
    if impl is None:
        raise MissingKernelError(
            f"models.ops.{name} got an encrypted value but no encrypted implementation of {name!r} is "
            "installed; run the forward inside protocols.mpc.numerics.share_kernels() "
            "(or models.ops.encrypted_kernels)")
    return impl


def scaled_rows(x: Tensor, finish: Callable[[Tensor], Tensor], weight: Tensor | None = None) -> Tensor:
    """``x * finish(x * x) * weight``: a norm's input times a row factor computed from its
    squares, times a per-column gain (``None``: none). ``finish(squares)`` returns the row
    factor; ``finish(squares, times)`` must return ``times`` times it (an encrypted kernel with a
    secret gain passes ``x * weight`` so the factor's last product includes it). On shares the
    products share the operand ``x``; a fused kernel opens it once, or forms ``x * weight`` with
    the squares (two rounds fewer than multiplying by the factor, then a secret gain)."""
    if is_plain(x):
        out = x * finish(square(x))
        return out if weight is None else out * weight
    return _kernel("scaled_rows")(x, finish, weight)


@contextlib.contextmanager
def compare_bound(limit: float, resolution: float = 0.0) -> Iterator[None]:
    """Promise that the values compared within the block (``x < y`` forms ``x - y``) stay below
    ``limit`` in magnitude, and accept that values closer than ``resolution`` to the threshold
    may compare either way (``x < c`` is still 1 for every ``x < c`` and 0 for ``x >= c +
    resolution``). A secure comparison may then use a narrower ring and drop low bits (smaller,
    faster FSS keys, :mod:`protocols.mpc.compare`); values beyond the promise may compare wrongly."""
    if not limit > 0:
        raise ValueError(f"compare_bound needs a positive limit, got {limit!r}")
    if not resolution >= 0:
        raise ValueError(f"compare_bound needs a resolution >= 0, got {resolution!r}")
    with _setting(_compare_bound, (float(limit), float(resolution))):
        yield


def comparison_bound() -> float | None:
    """The innermost :func:`compare_bound` promise, if any."""
    promise = _compare_bound.get()
    return None if promise is None else promise[0]


def comparison_resolution() -> float:
    """The innermost :func:`compare_bound`'s resolution (0: comparisons exact)."""
    promise = _compare_bound.get()
    return 0.0 if promise is None else promise[1]


def reciprocal(x: Tensor, scale: float | torch.Tensor = 1.0, positive: bool = False) -> Tensor:
    """``1 / x``. On encrypted values ``scale`` (public) brings ``x / scale`` into the range where
    the installed approximation is accurate; ``positive=True`` promises ``x > 0`` (normalisers of
    non-negative attention weights plus eps), which allows a cheaper approximation."""
    if is_plain(x):
        return 1.0 / x
    return _kernel("reciprocal")(x, scale, positive)


def inv_sqrt(x: Tensor, scale: float = 1.0, times: Tensor | None = None) -> Tensor:
    """``times / sqrt(x)`` (``times`` None: ``1 / sqrt(x)``) for positive x; ``scale`` as in
    :func:`reciprocal`. On shares a secret ``times`` may share the approximation's last product."""
    if is_plain(x):
        return torch.rsqrt(x) if times is None else times * torch.rsqrt(x)
    return _kernel("inv_sqrt")(x, scale, times)


def rowdot(x: Tensor, y: Tensor) -> Tensor:
    """``sum(x * y, -1)`` keeping the dim; on shares one batched matmul, so the sum is formed
    at double scale and truncated once (an elementwise product truncates every term)."""
    if is_plain(x) and is_plain(y):
        return (x * y).sum(-1, keepdim=True)
    return x.unsqueeze(-2).matmul(y.unsqueeze(-1)).squeeze(-1)


def inv_sqrt_wide(x: Tensor, lo: float, hi: float, times: Tensor | None = None) -> Tensor:
    """``times / sqrt(x)`` (``times`` None: ``1 / sqrt(x)``) for positive ``x`` [..., 1] spanning
    many orders of magnitude within the public range [lo, hi]; on encrypted values a
    range-reduced approximation, where a secret ``times`` [..., d] may share its last product."""
    if is_plain(x):
        return torch.rsqrt(x) if times is None else times * torch.rsqrt(x)
    return _kernel("inv_sqrt_wide")(x, lo, hi, times)


def relu(x: Tensor) -> Tensor:
    """ReLU on plain or encrypted values."""
    return torch.relu(x) if is_plain(x) else x.relu()


def sigmoid(x: Tensor) -> Tensor:
    """The logistic function on plain or encrypted values."""
    return torch.sigmoid(x) if is_plain(x) else x.sigmoid()


def tanh(x: Tensor) -> Tensor:
    """tanh on plain or encrypted values."""
    return torch.tanh(x) if is_plain(x) else x.tanh()


def square(x: Tensor) -> Tensor:
    """``x * x``; encrypted values use their own squaring (one product, no second operand)."""
    return x * x if is_plain(x) else x.square()


def pow_even(x: Tensor, p: int) -> Tensor:
    """``x ** p`` for even ``p`` by repeated squaring (log2 p rounds of multiplication; CrypTen's
    ``pow`` is wrong for odd p > 3)."""
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


def gelu(x: Tensor, form: str = "erf") -> Tensor:
    """GeLU: exact erf (or tanh) ``form`` in torch; on encrypted values the installed
    approximation (on shares a piecewise polynomial within 8.1e-4 of erf GeLU)."""
    if is_plain(x):
        return F.gelu(x, approximate="none" if form == "erf" else "tanh")
    return _kernel("gelu")(x, form)


def silu(x: Tensor) -> Tensor:
    """SiLU ``x * sigmoid(x)``: exact in torch; on encrypted values the installed approximation,
    or the value's own ``x * x.sigmoid()`` where none is installed."""
    return F.silu(x) if is_plain(x) else _kernel_or("silu", lambda v: v * v.sigmoid())(x)


STABILISING_SLACK = 2.0 ** -6  # per comparison of a max that only shifts an exponential (row_max)


def row_max(x: Tensor, dim: int = -1, bound: float | None = None, slack: float = 0.0) -> Tensor:
    """Max over ``dim`` with the dim kept (values only; on shares a comparison tree).

    On shares, ``bound`` promises ``|x_i - x_j| < bound`` within a row and ``slack`` lets each
    comparison confuse entries closer than ``slack`` (:func:`compare_bound`): the result is then
    an entry at most ``ceil(log2 n) * slack`` below the max, enough to stabilise an exponential,
    on smaller comparison keys."""
    if bound is None and slack:
        raise ValueError("row_max: a slack needs a bound")
    if is_plain(x):
        return x.amax(dim=dim, keepdim=True)
    if bound is None:
        return _kernel("row_max")(x, dim)
    with compare_bound(bound, slack):
        return _kernel("row_max")(x, dim)


def argmax_last(x: Tensor) -> tuple[Tensor, Tensor]:
    """(max, index of the first max) over the last dim of ``x`` [..., n]; the index is a value
    of ``x``'s own type (on shares a secret integer at the fixed-point scale)."""
    if is_plain(x):
        values, first = x.max(dim=-1)
        return values, first.to(x.dtype)
    return _kernel("argmax_last")(x)


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
