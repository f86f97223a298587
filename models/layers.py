"""Building blocks: Linear, Embedding, norms and activations, each its own module with ``op_kind``.

Every non-linearity is a submodule so cost-ledger scopes read like ``decoder.layer.3.mlp.act``.
Forward passes go through :mod:`models.ops`, so they run on torch tensors and on shares alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from models import ops
from models.config import ModelConfig
from models.variants import OpSpec


class NotCalibratedError(ValueError):
    """An affine norm was run before :func:`calibrate` gave it its statistics."""


class Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` [out, in]; protocols find and replace these by type."""

    op_kind = "matmul"

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Any) -> Any:
        return ops.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Lookup from Long ids (gather) or from a float one-hot [..., vocab] (one-hot @ table)."""

    op_kind = "embedding"

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.num, self.dim = num, dim
        self.weight = nn.Parameter(torch.empty(num, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Any) -> Any:
        if ops.is_plain(x) and not torch.is_floating_point(x):
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.num):
                raise IndexError(f"embedding id out of range [0, {self.num})")
            if ops.is_plain(self.weight):
                return torch.nn.functional.embedding(x, self.weight)
            return self.weight[x]
        if x.shape[-1] != self.num:
            raise ValueError(f"one-hot input has {x.shape[-1]} classes, table has {self.num}")
        return ops.matmul(x, self.weight)


class Calibrated(nn.Module):
    """A module with a public power-of-two ``mpc_scale`` measured on plaintext calibration data.

    On shares, Newton iterations are accurate only in a range (``protocols.mpc.numerics``: the positive
    reciprocal on [2^-14, 2^10), the inverse square root on [4^-7, 4^6); CrypTen's general
    reciprocal only on about [0.002, 10], exploding past ~200).
    Dividing the private value by ``mpc_scale`` first (free: a public constant) maps the largest
    calibration value to ``target_max``, leaving head-room above and dynamic range below. In
    torch the scale cancels exactly. The scale is public: it reveals the order of magnitude of
    one statistic per module, not any input.
    """

    target_max = 16.0

    def __init__(self) -> None:
        super().__init__()
        self.mpc_scale = 1.0
        self._record: list[float] | None = None

    def _observe(self, value: Any) -> None:
        if self._record is not None and ops.is_plain(value):
            self._record.append(float(value.detach().float().max()))

    def start_calibration(self) -> None:
        self._record = []

    def finish_calibration(self) -> None:
        if self._record:
            peak = max(max(self._record), 1e-12)
            self.mpc_scale = float(2.0 ** math.ceil(math.log2(peak / self.target_max)))
        self._record = None

    def public_calibration(self) -> dict[str, Any]:
        """The public constants calibration produced (what a server sends to its client)."""
        return {"mpc_scale": self.mpc_scale}

    def load_public_calibration(self, data: dict[str, Any]) -> None:
        self.mpc_scale = float(data["mpc_scale"])


class _Norm(Calibrated):
    """Norms share the 1/sqrt(mean square) computation, with a wide-range mode.

    Narrow mode (BERT/MiniLM-like activations): ``inv_sqrt(mean(x^2) / mpc_scale)``.
    Wide mode, chosen at calibration when per-token energies span more than ``WIDE_RATIO`` or
    their squares would come near the ring's limit (LLM "massive activations": SmolLM2's
    residual stream reaches 2e4 on some tokens): the sum of squares is a row dot product with
    ``x / 2^shift`` (formed at double scale and truncated once, kept below 2^SAFE_BITS, where
    2-party local truncation fails with probability ~2^(SAFE_BITS-63)), and the inverse square
    root is range-reduced with public thresholds (:func:`models.ops.inv_sqrt_wide`). The shift
    and the range are public calibration constants, like ``mpc_scale``.
    """

    WIDE_RATIO = 2.0 ** 10
    SAFE_BITS = 50

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.wide: dict[str, float] | None = None
        self._energy: list[float] | None = None

    def start_calibration(self) -> None:
        super().start_calibration()
        self.wide = None
        self._energy = []

    def finish_calibration(self) -> None:
        super().finish_calibration()
        if self._energy:
            lo = max(min(self._energy), self.eps * self.dim, 1e-6)
            hi = max(max(self._energy), lo)
            shift = max(0, math.ceil(math.log2(hi)) + 32 - self.SAFE_BITS)
            if hi / lo > self.WIDE_RATIO or shift > 0:
                scale = 2.0 ** -shift
                self.wide = {"shift": float(shift), "lo": lo * scale / 4, "hi": hi * scale * 4}
        self._energy = None

    def public_calibration(self) -> dict[str, Any]:
        return {**super().public_calibration(), "wide": self.wide}

    def load_public_calibration(self, data: dict[str, Any]) -> None:
        super().load_public_calibration(data)
        wide = data.get("wide")
        self.wide = None if wide is None else {k: float(wide[k]) for k in ("shift", "lo", "hi")}

    def _normalize(self, x: Any, weight: Any) -> Any:
        """``x / sqrt(mean(x^2, -1) + eps) * weight``; in narrow mode through
        :func:`models.ops.scaled_rows` (the products on ``x``, which a protocol may fuse or batch:
        ``x * weight`` in the same round as ``x^2``)."""
        if self.wide is not None or self._energy is not None:
            return self._over_rms(x) * weight
        return ops.scaled_rows(x, self._inv_from_squares, weight)

    def _inv_from_squares(self, squares: Any, times: Any = None) -> Any:
        """``1 / sqrt(mean(squares) + eps)`` per row (times ``times`` when given)."""
        ms = squares.mean(-1, keepdim=True) + self.eps
        self._observe(ms)
        return ops.inv_sqrt(ms, self.mpc_scale, times)

    def _over_rms(self, x: Any) -> Any:
        """``x / sqrt(mean(x^2, -1) + eps)``; in wide mode ``x`` rides in the root's last product."""
        if self._energy is not None and ops.is_plain(x):
            energy = ops.square(x.detach().float()).sum(-1)
            self._energy += [float(energy.min()), float(energy.max())]
        if self.wide is None:
            return x * self._inv_from_squares(ops.square(x))
        scale = 2.0 ** -self.wide["shift"]
        energy = ops.rowdot(x, x * scale) + self.eps * self.dim * scale
        return ops.inv_sqrt_wide(energy, self.wide["lo"], self.wide["hi"], times=x) * math.sqrt(self.dim * scale)


class LayerNorm(_Norm):
    op_kind = "layernorm"

    def __init__(self, dim: int, eps: float, bias: bool = True) -> None:
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Any) -> Any:
        centred = x - x.mean(-1, keepdim=True)
        out = self._normalize(centred, self.weight)
        return out if self.bias is None else out + self.bias


class RMSNorm(_Norm):
    op_kind = "rmsnorm"

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Any) -> Any:
        return self._normalize(x, self.weight)


class AffineNorm(_Norm):
    """MPC-cheap norm: centre (LayerNorm models) and multiply by a calibrated 1/std.

    The per-token inverse square root is replaced by one constant measured on a plaintext
    calibration batch, so the norm is linear on shares (no communication beyond truncation).
    The constant is a model parameter (the server's), so it is encrypted with the weights.
    """

    op_kind = "affine_norm"

    def __init__(self, dim: int, eps: float, center: bool, bias: bool) -> None:
        super().__init__(dim, eps)
        self.center = center
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.inv_std = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.calibrated = False
        self.gain_folded = False

    def forward(self, x: Any) -> Any:
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        if self._record is not None:
            var = ops.square(x).mean(-1, keepdim=True) + self.eps
            self._record.append(float(var.sqrt().mean()))
            out = x * torch.rsqrt(var) * self.weight
        elif not self.calibrated:
            raise NotCalibratedError("affine norm is not calibrated: call models.layers.calibrate")
        elif self.gain_folded:
            out = x * self.weight
        else:
            out = x * (self.weight * self.inv_std)
        return out if self.bias is None else out + self.bias

    def fold_gain(self) -> None:
        """Make the gain ``weight * inv_std`` (and 1/std one), computed in plaintext before a protocol
        shares the parameters: on shares the norm then costs one product per call, not two (the gain's
        own product is input-independent). New tensors, so copies sharing the old storage keep it."""
        if self.gain_folded:
            return
        if not self.calibrated:
            raise NotCalibratedError("affine norm is not calibrated: call models.layers.calibrate")
        self.weight = nn.Parameter(self.weight.detach() * self.inv_std.detach(), self.weight.requires_grad)
        self.inv_std = nn.Parameter(torch.ones_like(self.inv_std), requires_grad=False)
        self.gain_folded = True

    def finish_calibration(self) -> None:
        if self._record:
            std = sum(self._record) / len(self._record)
            with torch.no_grad():
                self.inv_std.fill_(1.0 / max(std, 1e-12))
            self.calibrated = True
        self._record = None


class GeLU(nn.Module):
    op_kind = "gelu"

    def __init__(self, form: str = "erf") -> None:
        super().__init__()
        self.form = form

    def forward(self, x: Any) -> Any:
        return ops.gelu(x, self.form)


class Quad(nn.Module):
    """MPCFormer's quad GeLU replacement 0.125x^2 + 0.25x + 0.5 (one multiplication), as
    ``2 h^2 + h + 0.5`` with ``h = x / 4``: on shares the square's double-scale values are 16 times
    smaller, and so is its two-party truncation's chance of wrapping (issue 12); ``* 2`` is exact."""

    op_kind = "quad"

    def forward(self, x: Any) -> Any:
        h = x * 0.25
        return ops.square(h) * 2 + h + 0.5


class ReLU(nn.Module):
    op_kind = "relu"

    def forward(self, x: Any) -> Any:
        return ops.relu(x)


class SiLU(nn.Module):
    op_kind = "silu"

    def forward(self, x: Any) -> Any:
        return ops.silu(x)


def make_norm(spec: OpSpec | None, config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm a layer runs: the variant's choice, or the model's native one when None."""
    kind = spec.kind if spec is not None else config.norm
    dim = dim or config.hidden
    if kind == "layernorm":
        return LayerNorm(dim, config.norm_eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    native_ln = config.norm == "layernorm"
    return AffineNorm(dim, config.norm_eps, center=native_ln, bias=native_ln)


def make_act(spec: OpSpec | None, config: ModelConfig) -> nn.Module:
    """The activation a layer runs: the variant's choice, or the model's native one when None."""
    if spec is None:
        native = {"gelu": GeLU("erf"), "gelu_tanh": GeLU("tanh"), "silu": SiLU(), "relu": ReLU()}
        return native[config.act]
    if spec.kind == "gelu":
        return GeLU(spec.get("form"))
    return {"quad": Quad, "relu": ReLU, "silu": SiLU}[spec.kind]()


def norm_params_from(target: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy a source norm's affine parameters into any of our norms (bias dropped if unused)."""
    with torch.no_grad():
        target.weight.copy_(weight)
        if getattr(target, "bias", None) is not None:
            target.bias.copy_(bias if bias is not None else torch.zeros_like(target.bias))


@contextmanager
def _calibrating(model: nn.Module) -> Iterator[list[Calibrated]]:
    norms = [m for m in model.modules() if isinstance(m, Calibrated)]
    for norm in norms:
        norm.start_calibration()
    try:
        yield norms
    finally:
        for norm in norms:
            norm.finish_calibration()


def fold_norm_gains(model: nn.Module) -> None:
    """Fold every calibrated affine norm's 1/std into its gain (:meth:`AffineNorm.fold_gain`)."""
    for module in model.modules():
        if isinstance(module, AffineNorm) and module.calibrated:
            module.fold_gain()


def calibrate(model: nn.Module, run: Callable[[], Any]) -> None:
    """Run plaintext forward pass(es) via ``run()`` and set every module's calibrated statistics.

    Affine norms get their 1/std constant; LayerNorm/RMSNorm and attention normalisers get
    ``mpc_scale`` (see :class:`Calibrated`).
    """
    with torch.no_grad(), _calibrating(model):
        run()
