"""Simulated MPC: the MPC route's fixed-point arithmetic and approximations, in plaintext and batched.

:class:`SimTensor` stands where a two-party arithmetic ``MPCTensor`` stands, holding the *sum*
of both parties' shares (the ring value in Z_2^64, int64 with wrap-around) and the share's
fixed-point encoder. Its primitives follow CrypTen's ``ArithmeticSharedTensor`` line by line:

* public operands are encoded with CrypTen's own ``FixedPointEncoder`` (``(scale * x).long()``,
  so truncated toward zero, in the operand's float precision), as ``crypten.cryptensor`` and
  ``MPCTensor.add/mul`` encode them;
* a product of two fixed-point factors (public or private) is formed exactly in the ring and
  divided by the scale (``div`` rounding toward zero); a product with a scale-1 factor (a
  comparison bit) or a Python int is not truncated; ``div`` by an integer divides, by a float
  multiplies by its float32 reciprocal; ``mean`` is ``sum`` then integer division;
* comparisons (:meth:`SimTensor._ltz`, and :meth:`SimTensor.compare_below` where
  :func:`protocols.mpc.compare.below` compares against many thresholds) compute what the
  session's gate computes: with FSS keys the most significant bit of ``x' - c`` on ``bits - k``
  bits, ``x'`` the value mod ``2^bits`` with ``k`` low bits dropped, where ``bits``, ``k`` and
  the threshold grid come from the functions the parties use (:func:`compare.bits_for`,
  :func:`compare.shift_for`, :func:`compare.grid`) on the innermost ``models.ops.compare_bound``
  and the session's :class:`~protocols.protocol_config.ProtocolConfig`, wrap-around included;
  with CrypTen's circuit the sign of the 64-bit value (:func:`_gate`).

Everything above the primitives is the real code: CrypTen's own ``exp``, ``reciprocal``,
``inv_sqrt``, ``sigmoid``, ``tanh``, ``softmax``, ``relu``, ``where``, ... (bound from
``crypten.common.functions`` with the same configured iteration counts) and privinf's share
numerics (:mod:`protocols.mpc.numerics`: range-reduced reciprocal and inverse square root,
piecewise GeLU, comparison tournaments) run unchanged on :class:`SimTensor`.

Where a kernel reaches into the parties (shares, the dealer, the communicator) the simulation
computes what the two parties' shares sum to, documented per kernel:

* weight-stationary linears (:mod:`protocols.mpc.secure_linear`): weights rounded to the ring
  (``fixed_point.encode``), the bias at twice the scale, one exact product and one truncation:
  :class:`SimLinear`; the word embedding (a one-hot times the table, exact) is a gather of the
  rounded table: :class:`SimEmbedding`;
* the fused norm (:mod:`protocols.mpc.fused_norm`: ``x`` opened once for ``x^2`` and ``x * s``)
  computes the same two truncated products as ``numerics.scaled_rows``, which runs as is and
  picks the fused or the folded gain per shape as the parties do
  (:func:`protocols.mpc.kernel_choice.fold_gain` on the simulation's configuration);
* the fused GeLU (:mod:`protocols.mpc.fused_gelu`) is :func:`fused_gelu_equivalent`: the same
  products in the same order, each truncated once.

What the simulation cannot reproduce is the 2-party local truncation's noise: each party
truncates its own share, so a real run differs from the simulation by about +-1 unit in the last
place (2^-fixed_point_bits) per truncation (and fails with probability ~|x| / 2^64 per element,
as CrypTen does). Decoders with a KV cache are not simulated (encoders and ViTs are).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from models import ops
from models.layers import Embedding, fold_norm_gains
from protocols.mpc import compare, fixed_point, gelu_lut, numerics
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.model_prep import replace_module, secure_targets
from protocols.protocol_config import RING_BITS, ProtocolConfig

_functions = crypten.common.functions
_ARITHMETIC = crypten.mpc.ptype.arithmetic
_Encoder = crypten.encoder.FixedPointEncoder
_config: contextvars.ContextVar[ProtocolConfig | None] = contextvars.ContextVar("privinf_sim_config",
                                                                                 default=None)


class SimulationError(ValueError):
    """A simulated value used outside a simulation, or an operation the simulation does not model."""


def session_config() -> ProtocolConfig:
    """The protocol configuration of the innermost :func:`simulation` block."""
    config = _config.get()
    if config is None:
        raise SimulationError("simulated MPC values compare only inside protocols.mpc.simulate.simulation()")
    return config


@contextlib.contextmanager
def simulation(config: ProtocolConfig) -> Iterator[None]:
    """Within the block, simulated values use ``config`` (fixed-point bits for new encodings, the
    comparison method and width) and ``models.ops`` runs the MPC route's kernels on them."""
    token = _config.set(config)
    try:
        with fixed_point.session_precision(config.fixed_point_bits), \
                numerics.share_kernels(gelu=fused_gelu_equivalent):
            yield
    finally:
        _config.reset(token)


def _trunc(values: torch.Tensor, divisor: int | torch.Tensor) -> torch.Tensor:
    """``values / divisor`` rounded to the nearest integer: what the 2-party local truncation gives
    in expectation (each party truncates its uniformly random share, so the sum is ``values /
    divisor`` rounded down or up with probabilities that make it unbiased; a deterministic
    truncation toward zero would be biased by half a unit and drift through sums)."""
    return (values + divisor // 2).div(divisor, rounding_mode="floor")


def _gate(x: SimTensor, points: Sequence[float]) -> SimTensor:
    """``[x < c_j]`` at scale 1 as the session's comparison gives it (:mod:`protocols.mpc.compare`).

    CrypTen's circuit (``comparisons = "circuit"``): the sign of ``x - c_j`` in the 64-bit ring,
    ``c_j`` encoded as CrypTen encodes a public operand. FSS keys: the width ``bits`` and the
    dropped low bits ``k`` are what :func:`compare.bits_for` and :func:`compare.shift_for` pick for
    the innermost ``models.ops.compare_bound`` (limit and resolution), the thresholds are rounded
    up to the 2^k grid (:func:`compare.grid`) and the result is the most significant bit of
    ``x' - c_j`` on ``bits - k`` bits, where ``x' = floor((x mod 2^bits) / 2^k) - carry``. The
    real carry (of the two shares' dropped bits) is 1 with probability ``1 - (x mod 2^k + 1) /
    2^k``; the simulation takes the likelier value, ``x' = floor((x mod 2^bits - 2^(k-1)) / 2^k)``,
    so it may differ from a real run only where ``x`` lies within ``2^k`` ulps above a threshold
    (inside the resolution the caller allowed).
    """
    config = session_config()
    if config.comparisons != "fss":
        return SimTensor((x.unsqueeze(-1).share - x.encoder.encode(torch.tensor(list(points), dtype=torch.float64)))
                         .lt(0).long(), _Encoder(0))
    scale = int(x.encoder.scale)
    bits = compare.bits_for(ops.comparison_bound(), config.comparison_bits, config.fixed_point_bits)
    shift = compare.shift_for([c * scale for c in points], ops.comparison_resolution() * scale, bits)
    value = x.share if bits == RING_BITS else x.share & ((1 << bits) - 1)
    if shift:
        value = (value - (1 << (shift - 1))).div(1 << shift, rounding_mode="floor")
    grid = torch.from_numpy(compare.grid(points, scale, shift))
    return SimTensor(((value.unsqueeze(-1) - grid) >> (bits - shift - 1)) & 1, _Encoder(0))


class SimTensor:
    """The plaintext sum of a two-party arithmetic sharing, with CrypTen's fixed-point semantics."""

    def __init__(self, share: torch.Tensor, encoder: Any) -> None:
        if share.dtype != torch.int64:
            raise SimulationError(f"a simulated value holds int64 ring elements, got {share.dtype}")
        self.share = share
        self.encoder = encoder
        self.ptype = _ARITHMETIC

    # construction ------------------------------------------------------------------------------
    @staticmethod
    def new(values: Any, precision: int | None = None) -> SimTensor:
        """A public or client value encoded as ``crypten.cryptensor`` encodes it (session precision)."""
        encoder = _Encoder(precision)
        return SimTensor(torch.as_tensor(encoder.encode(values)).clone(), encoder)

    @staticmethod
    def from_shares(share: torch.Tensor, precision: int | None = None) -> SimTensor:
        """A value from its ring elements at ``2^precision`` (the session's when None)."""
        return SimTensor(share, _Encoder(precision))

    def session_config(self) -> ProtocolConfig:
        """The simulation's protocol configuration (``protocols.mpc.kernel_choice`` prices per-shape
        kernel choices on it, as a party's session does on its own)."""
        return session_config()

    def clone(self) -> SimTensor:
        """A copy with its own ring elements."""
        return SimTensor(self.share.clone(), self.encoder)

    def shallow_copy(self) -> SimTensor:
        """A copy sharing the ring elements."""
        return SimTensor(self.share, self.encoder)

    def copy_(self, other: SimTensor) -> SimTensor:
        """Take ``other``'s value and encoding in place."""
        self.share, self.encoder = other.share, other.encoder
        return self

    def _like(self, share: torch.Tensor) -> SimTensor:
        return SimTensor(share, self.encoder)

    # reading ----------------------------------------------------------------------------------
    def get_plain_text(self) -> torch.Tensor:
        """The value as float (``share / scale``)."""
        return (self.share.double() / self.encoder.scale).float()

    @property
    def data(self) -> torch.Tensor:
        return self.share

    @property
    def device(self) -> torch.device:
        return self.share.device

    @property
    def shape(self) -> torch.Size:
        return self.share.shape

    def size(self, dim: int | None = None) -> Any:
        return self.share.size() if dim is None else self.share.size(dim)

    def dim(self) -> int:
        return self.share.dim()

    def nelement(self) -> int:
        return self.share.nelement()

    numel = nelement

    def __len__(self) -> int:
        return len(self.share)

    def __repr__(self) -> str:
        return f"SimTensor(shape={list(self.share.shape)}, scale=2^{fixed_point.bits_of(self)})"

    # arithmetic (ArithmeticSharedTensor._arithmetic_function) ---------------------------------
    def _encode_as(self, encoder: Any) -> None:
        """Re-encode in place at ``encoder``'s scale (CrypTen's ``encode_``: up exact, down truncated)."""
        if self.encoder.scale < encoder.scale:
            self.share = self.share * (encoder.scale // self.encoder.scale)
        elif self.encoder.scale > encoder.scale:
            self.share = _trunc(self.share, self.encoder.scale // encoder.scale)
        self.encoder = encoder

    def add(self, y: Any) -> SimTensor:
        """``self + y``; a private ``y`` at another scale is re-encoded first (in place, as CrypTen does)."""
        if isinstance(y, SimTensor):
            result = self.clone()
            if result.encoder.scale > y.encoder.scale:
                y._encode_as(result.encoder)
            elif result.encoder.scale < y.encoder.scale:
                result._encode_as(y.encoder)
            return result._like(result.share + y.share)
        return self._like(self.share + self.encoder.encode(y))

    def sub(self, y: Any) -> SimTensor:
        """``self - y``."""
        if isinstance(y, SimTensor):
            return self.add(-y)
        return self._like(self.share - self.encoder.encode(y))

    def _product(self, y: Any, op: str) -> SimTensor:
        fn = getattr(torch, op)
        if isinstance(y, SimTensor):
            result = SimTensor(fn(self.share, y.share), self.encoder)
            if self.encoder.scale > 1 and y.encoder.scale > 1:
                result.share = _trunc(result.share, self.encoder.scale)
            elif self.encoder.scale == 1:
                result.encoder = y.encoder
            return result
        result = self._like(fn(self.share, self.encoder.encode(y)))
        if self.encoder.scale > 1:
            result.share = _trunc(result.share, self.encoder.scale)
        return result

    def mul(self, y: Any) -> SimTensor:
        """``self * y``: a Python int multiplies the ring elements; anything else is a fixed-point product."""
        if isinstance(y, int) and not isinstance(y, bool):
            return self._like(self.share * y)
        return self._product(y, "mul")

    def matmul(self, y: Any) -> SimTensor:
        """``self @ y`` (one truncation)."""
        return self._product(y, "matmul")

    def square(self) -> SimTensor:
        """``self * self`` (one truncation)."""
        return self._like(_trunc(self.share * self.share, self.encoder.scale))

    def neg(self) -> SimTensor:
        return self._like(-self.share)

    def div(self, y: Any) -> SimTensor:
        """``self / y`` for public ``y`` (``MPCTensor.div``); a private ``y`` multiplies by its reciprocal."""
        if isinstance(y, SimTensor):
            return self.mul(y.reciprocal())
        if isinstance(y, float) and int(y) == y:
            y = int(y)
        if torch.is_tensor(y) and y.is_floating_point() and bool(y.frac().eq(0).all()):
            y = y.long()
        if isinstance(y, int) or (torch.is_tensor(y) and not y.is_floating_point()):
            share = torch.broadcast_tensors(self.share, torch.as_tensor(y))[0]
            return self._like(_trunc(share, y))
        if isinstance(y, float):
            y = torch.tensor([y], dtype=torch.float)
        return self.mul(y.reciprocal())

    def __rsub__(self, y: Any) -> SimTensor:
        return (-self).add(y)

    __add__ = __radd__ = add
    __sub__ = sub
    __mul__ = __rmul__ = mul
    __matmul__ = matmul
    __truediv__ = div
    __neg__ = neg

    def add_(self, y: Any) -> SimTensor:
        return self.copy_(self.add(y))

    def sub_(self, y: Any) -> SimTensor:
        return self.copy_(self.sub(y))

    def mul_(self, y: Any) -> SimTensor:
        return self.copy_(self.mul(y))

    def div_(self, y: Any) -> SimTensor:
        return self.copy_(self.div(y))

    __iadd__, __isub__, __imul__, __itruediv__ = add_, sub_, mul_, div_

    # comparison ---------------------------------------------------------------------------------
    def _ltz(self) -> SimTensor:
        """``[self < 0]`` at scale 1, as the session's comparison computes it (see the module doc)."""
        return _gate(self, [0.0]).squeeze(-1)

    def compare_below(self, points: Sequence[float]) -> SimTensor:
        """``[self < c_j]`` [*shape, J] at scale 1, as :func:`protocols.mpc.compare.below` computes it."""
        return _gate(self, points)

    # reductions and shapes ------------------------------------------------------------------------
    def sum(self, *args: Any, **kwargs: Any) -> SimTensor:
        return self._like(self.share.sum(*args, **kwargs))

    def mean(self, *args: Any, **kwargs: Any) -> SimTensor:
        """``sum`` then integer division by the count (CrypTen's ``mean``)."""
        total = self.sum(*args, **kwargs)
        return total.div(self.nelement() // total.nelement())

    def cumsum(self, dim: int) -> SimTensor:
        return self._like(self.share.cumsum(dim))

    def split(self, sizes: Any, dim: int = 0) -> tuple[SimTensor, ...]:
        return tuple(self._like(part) for part in self.share.split(sizes, dim))

    def unbind(self, dim: int = 0) -> tuple[SimTensor, ...]:
        return tuple(self._like(part) for part in self.share.unbind(dim))

    def __getitem__(self, key: Any) -> SimTensor:
        return self._like(self.share[key])

    def _shaped(self, name: str, *args: Any, **kwargs: Any) -> SimTensor:
        return self._like(getattr(self.share, name)(*args, **kwargs))

    def reshape(self, *shape: Any) -> SimTensor:
        return self._shaped("reshape", *shape)

    def view(self, *shape: Any) -> SimTensor:
        return self._shaped("reshape", *shape)

    def transpose(self, a: int, b: int) -> SimTensor:
        return self._shaped("transpose", a, b)

    def t(self) -> SimTensor:
        return self._shaped("t")

    def permute(self, *dims: Any) -> SimTensor:
        return self._shaped("permute", *dims)

    def unsqueeze(self, dim: int) -> SimTensor:
        return self._shaped("unsqueeze", dim)

    def squeeze(self, *dim: Any) -> SimTensor:
        return self._shaped("squeeze", *dim)

    def expand(self, *sizes: Any) -> SimTensor:
        return self._shaped("expand", *sizes)

    def flatten(self, *args: Any) -> SimTensor:
        return self._shaped("flatten", *args)

    def repeat(self, *sizes: Any) -> SimTensor:
        return self._shaped("repeat", *sizes)

    def flip(self, dims: Any) -> SimTensor:
        return self._shaped("flip", dims)

    def narrow(self, dim: int, start: int, length: int) -> SimTensor:
        return self._shaped("narrow", dim, start, length)

    def index_select(self, dim: int, index: torch.Tensor) -> SimTensor:
        return self._shaped("index_select", dim, index)

    def gather(self, dim: int, index: torch.Tensor) -> SimTensor:
        return self._shaped("gather", dim, index)

    @staticmethod
    def cat(tensors: Sequence[SimTensor], dim: int = 0) -> SimTensor:
        """Concatenate ring elements; the result takes the first piece's encoding (as CrypTen's)."""
        return SimTensor(torch.cat([t.share for t in tensors], dim=dim), tensors[0].encoder)

    @staticmethod
    def stack(tensors: Sequence[SimTensor], dim: int = 0) -> SimTensor:
        """Stack ring elements; the result takes the first piece's encoding (as CrypTen's)."""
        return SimTensor(torch.stack([t.share for t in tensors], dim=dim), tensors[0].encoder)


def _bind_crypten_functions() -> None:
    """CrypTen's own implementations above the primitives, as methods of :class:`SimTensor`."""
    names = {
        "logic": ("ge", "gt", "le", "lt", "__ge__", "__gt__", "__le__", "__lt__", "sign", "abs", "relu",
                  "where", "hardtanh"),
        "approximations": ("exp", "log", "reciprocal", "inv_sqrt", "sqrt", "sigmoid", "tanh", "erf", "softmax",
                           "log_softmax"),
        "power": ("pow", "pos_pow", "polynomial"),
    }
    for module_name, functions in names.items():
        module = getattr(_functions, module_name)
        for name in functions:
            setattr(SimTensor, name, getattr(module, name))
    SimTensor.__abs__ = _functions.logic.abs


_bind_crypten_functions()


def fused_gelu_equivalent(x: SimTensor, form: str = "erf") -> SimTensor:
    """What :func:`protocols.mpc.fused_gelu.gelu`'s shares sum to (:func:`gelu_lut.simulated` where it
    takes the lookup table): its range tests (``numerics.gelu_range``, run as is) and ``numerics.gelu``'s
    polynomial with the fused kernel's products (each of two opened operands, truncated once) in its order."""
    if gelu_lut.chosen(x):
        return gelu_lut.simulated(x)
    t = numerics.GELU_RANGE
    inside, w = numerics.gelu_range(x)
    v = x.square() * (1.0 / (t * t))
    v2 = v.square()
    v3, v4, coeffs = v * v2, v2.square(), numerics.GELU_EVEN_COEFFS
    even = sum((p * c for p, c in zip([v, v2, v3, v4, v * v4, v3.square()], coeffs[1:])), start=coeffs[0])
    return x * 0.5 + inside * even + (w * x) * 0.5


class SimLinear(nn.Module):
    """What a weight-stationary linear's shares sum to: ``trunc((x W_r^T + b_rr) / 2^f)`` with ``W_r``
    the weight rounded to the ring at ``2^f`` and ``b_rr`` the bias at ``2^(2f)``
    (:class:`protocols.mpc.secure_linear.SecureLinearServer`)."""

    op_kind = "linear"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("weight_ring", fixed_point.encode(weight, bits).contiguous(), persistent=False)
        self.register_buffer("bias_ring", None if bias is None else fixed_point.encode(bias, 2 * bits),
                             persistent=False)

    def forward(self, x: SimTensor) -> SimTensor:
        from protocols.mpc.secure_linear import times_transposed

        if fixed_point.bits_of(x) != self.bits:
            raise SimulationError(f"linear input at 2^{fixed_point.bits_of(x)}, expected 2^{self.bits}")
        y = times_transposed(x.share, self.weight_ring)
        if self.bias_ring is not None:
            y = y + self.bias_ring
        return SimTensor(_trunc(y, 1 << self.bits), x.encoder)


class SimEmbedding(nn.Module):
    """The word embedding on token ids: the MPC route multiplies a one-hot by the table rounded to
    the ring, an exact product whose truncation returns the rounded rows (the ids stand in for
    the client's one-hot: the same value, without the [tokens, vocab] tensor)."""

    op_kind = "embedding"

    def __init__(self, table: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.num = table.shape[0]
        self.register_buffer("table_ring", fixed_point.encode(table, bits), persistent=False)

    def forward(self, ids: torch.Tensor) -> SimTensor:
        if not torch.is_tensor(ids) or ids.is_floating_point():
            raise SimulationError("the simulated word embedding takes token ids (Long)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num):
            raise SimulationError(f"token id out of range [0, {self.num})")
        return SimTensor(self.table_ring[ids], _Encoder(self.bits))


def prepare(model: nn.Module, config: ProtocolConfig) -> nn.Module:
    """A copy of ``model`` as the MPC route runs it, on simulated values: linears and word embedding
    as :class:`SimLinear` / :class:`SimEmbedding`, other parameters as the server shares them."""
    sim = copy.deepcopy(model).eval()
    bits = config.fixed_point_bits
    for path, module in secure_targets(sim):
        if isinstance(module, Embedding):
            replace_module(sim, path, SimEmbedding(module.weight.detach(), bits))
        else:
            bias = getattr(module, "bias", None)
            replace_module(sim, path, SimLinear(module.weight.detach(), None if bias is None else bias.detach(),
                                                bits))
    fold_norm_gains(sim)
    with fixed_point.session_precision(bits):
        ops.replace_parameters(sim, lambda p: SimTensor.new(p.float()))
    return sim


def run(sim_model: nn.Module, inputs: torch.Tensor, config: ProtocolConfig) -> torch.Tensor:
    """The MPC route's raw output of ``sim_model`` (from :func:`prepare`) on a batch of model inputs
    (token ids [B, T], or floats such as images [B, C, H, W], encoded as the client shares them)."""
    with torch.no_grad(), simulation(config):
        x = inputs if not inputs.is_floating_point() else SimTensor.new(inputs.float())
        out = sim_model(x)
    if not isinstance(out, SimTensor):
        raise SimulationError(f"the model returned {type(out).__name__}, not a simulated value")
    return out.get_plain_text()
