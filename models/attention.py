"""Multi-head attention with swappable attention kernels (per head), RoPE, GQA and KV cache.

Masking is multiplicative: a public 0/1 mask multiplies the kernel's output *after* its
non-linearity, and normalisers count only visible keys. No -inf tricks, so polynomial kernels
stay polynomial. Normalisers are divided by a public constant (visible keys times a per-kernel
scale) before the reciprocal, keeping CrypTen's Newton iteration in its accurate range; in
torch the same formula is computed exactly. ``scale`` and ``linear`` run re-associated,
``q (K^T V)`` in O(n d^2), with a prefix-sum form for causal decoders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import ops
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.layers import Calibrated, Linear
from models.variants import LayerVariant, OpSpec

MASK_OFFSET = 1.0e4  # public offset that keeps masked scores out of the row max (softmax only)
ROW_MAX_BOUND = 2 * MASK_OFFSET  # what the softmax promises its row max: differences below twice the offset


@dataclass(frozen=True)
class AttnMask:
    """Public visibility: query/key absolute positions, causality and an optional key mask."""

    query_pos: torch.Tensor
    key_pos: torch.Tensor
    causal: bool
    key_mask: torch.Tensor | None = None  # [batch, keys] 0/1 (padding), None = all visible

    def dense(self) -> torch.Tensor:
        """[batch|1, 1, Tq, Tk] float 0/1."""
        mask = torch.ones(len(self.query_pos), len(self.key_pos))
        if self.causal:
            mask = (self.key_pos[None, :] <= self.query_pos[:, None]).float()
        mask = mask[None, None]
        if self.key_mask is not None:
            mask = mask * self.key_mask[:, None, None, :].float()
        return mask

    def counts(self) -> torch.Tensor:
        """Visible keys per query, [batch|1, 1, Tq, 1], at least 1."""
        return self.dense().sum(-1, keepdim=True).clamp(min=1.0)

    def prefix_index(self) -> torch.Tensor:
        """For causal prefix sums: index of the last key each query may see."""
        return (self.key_pos[None, :] <= self.query_pos[:, None]).sum(-1) - 1


class _Kernel(Calibrated):
    """Maps (q, k, v) [B, h, T, d] to the attention output [B, h, Tq, d]."""

    target_max = 8.0  # for the reciprocal of the normaliser

    def __init__(self, spec: OpSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, q: Any, k: Any, v: Any, mask: AttnMask) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define forward")


class _Quadratic(_Kernel):
    """Kernels on the n x n score matrix: numerator f(s), masked, normalised over visible keys.

    ``probs = f(s) m / n / (sum f(s) m / n + eps)`` with n the visible keys of the row.
    """

    eps = 0.0

    def numerator(self, scores: Any, dense: torch.Tensor) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define numerator")

    def shrunk_numerator(self, scores: Any, dense: torch.Tensor) -> tuple[Any, float]:
        """``(f(s) / shrink, shrink)`` for a public ``shrink`` (here 1); a kernel whose numerator can
        be large computes it already divided, so its products stay small on shares."""
        return self.numerator(scores, dense), 1.0

    def forward(self, q: Any, k: Any, v: Any, mask: AttnMask) -> Any:
        # q scaled before the product: the score matmul's double-scale sums are sqrt(d) times smaller
        scores = ops.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
        dense = mask.dense()
        num, shrink = self.shrunk_numerator(scores, dense)
        if not bool(dense.all()):  # all keys visible: multiplying by ones would only round on shares
            num = num * dense
        inv_n = 1.0 / mask.counts()
        den = num.sum(-1, keepdim=True) * inv_n + self.eps / shrink  # the normaliser / shrink
        if ops.is_plain(den):
            self._observe(den * shrink)
        # normalise after the product with V: [T, d] instead of [T, T] products on shares
        return ops.matmul(num, v) * (ops.reciprocal(den, self.mpc_scale / shrink, positive=True) * inv_n)


class SoftmaxAttention(_Quadratic):
    op_kind = "softmax"

    def numerator(self, scores: Any, dense: torch.Tensor) -> Any:
        shifted = scores * dense + (dense - 1.0) * MASK_OFFSET
        return ops.exp_nonpositive(shifted - ops.row_max(shifted, bound=ROW_MAX_BOUND, slack=ops.STABILISING_SLACK))


class PowerAttention(_Quadratic):
    """Power-Softmax: (s / tau)^p, normalised by mean over visible keys + eps."""

    op_kind = "power"

    def __init__(self, spec: OpSpec) -> None:
        super().__init__(spec)
        self.p, self.tau, self.eps = spec.get("p"), float(spec.get("tau")), float(spec.get("eps"))

    def numerator(self, scores: Any, dense: torch.Tensor) -> Any:
        return ops.pow_even(scores * (1.0 / self.tau), self.p)


class TwoQuadAttention(_Quadratic):
    """MPCFormer 2Quad: (s + c)^2; before calibration the normaliser scale is c^2."""

    op_kind = "2quad"

    def __init__(self, spec: OpSpec) -> None:
        super().__init__(spec)
        self.c, self.eps = float(spec.get("c")), float(spec.get("eps"))
        self.mpc_scale = float(2.0 ** round(math.log2(max(self.c * self.c, 1.0))))

    def numerator(self, scores: Any, dense: torch.Tensor) -> Any:
        return ops.square(scores + self.c)

    def shrunk_numerator(self, scores: Any, dense: torch.Tensor) -> tuple[Any, float]:
        """``((s + c) / K)^2`` with ``K^2`` the largest power of four up to the calibrated peak of the
        normaliser (``target_max * mpc_scale``; 1 below 4), so the normaliser comes out at most about
        1: the squares, their sum and their product with V are ``K^2`` times smaller than with
        ``(s + c)^2``, and so is their two-party truncation's chance of wrapping (``|x| / 2^64`` per
        element; issue 12: the product with V dominated a whole MiniLM inference's chance).
        ``1 / K`` is a power of two, exact in fixed point."""
        root = 2.0 ** max(math.floor(math.log2(self.target_max * self.mpc_scale) / 2), 0)
        return ops.square((scores + self.c) * (1.0 / root)), root * root


class ReluAttention(_Quadratic):
    op_kind = "relu"

    def __init__(self, spec: OpSpec) -> None:
        super().__init__(spec)
        self.eps = float(spec.get("eps"))

    def numerator(self, scores: Any, dense: torch.Tensor) -> Any:
        return ops.relu(scores)


def _kv_state(k: Any, v: Any, mask: AttnMask) -> Any:
    """sum_j k_j^T v_j: [B,h,d,d] (non-causal) or per-query prefix sums [B,h,Tq,d,d]."""
    if mask.key_mask is not None:
        k = k * mask.key_mask[:, None, :, None].float()
    if not mask.causal:
        return ops.matmul(k.transpose(-2, -1), v)
    outer = ops.matmul(k.unsqueeze(-1), v.unsqueeze(-2))
    return ops.index(outer.cumsum(2), 2, mask.prefix_index())


def _apply_state(q: Any, state: Any, causal: bool) -> Any:
    if not causal:
        return ops.matmul(q, state)
    return ops.matmul(q.unsqueeze(-2), state).squeeze(-2)


class ScaleAttention(_Kernel):
    """MPCViT scaling attention: (s / n) V = q (K^T V) / (sqrt(d) n), no normaliser."""

    op_kind = "scale"

    def forward(self, q: Any, k: Any, v: Any, mask: AttnMask) -> Any:
        out = _apply_state(q, _kv_state(k, v, mask), mask.causal)
        return out * (1.0 / (mask.counts() * math.sqrt(q.shape[-1])))


class LinearAttention(_Kernel):
    """phi(q) S / n / (phi(q) z / n + eps), S = sum phi(k)^T v, z = sum phi(k) (visible keys)."""

    op_kind = "linear_attn"

    def __init__(self, spec: OpSpec) -> None:
        super().__init__(spec)
        self.phi, self.eps = spec.get("phi"), float(spec.get("eps"))

    def _feature(self, x: Any) -> Any:
        return ops.relu(x) if self.phi == "relu" else ops.square(x)

    def forward(self, q: Any, k: Any, v: Any, mask: AttnMask) -> Any:
        fq, fk = self._feature(q), self._feature(k)
        ones = torch.ones(*v.shape[:-1], 1)
        state = _kv_state(fk, ops.cat([v, ones], dim=-1), mask)
        both = _apply_state(fq, state, mask.causal)
        inv_n = 1.0 / mask.counts()
        num, den = both[..., :-1], both[..., -1:] * inv_n + self.eps
        self._observe(den)
        return num * (ops.reciprocal(den, self.mpc_scale, positive=True) * inv_n)


_KERNELS = {
    "softmax": SoftmaxAttention, "power": PowerAttention, "2quad": TwoQuadAttention,
    "relu": ReluAttention, "scale": ScaleAttention, "linear": LinearAttention,
}


def make_kernel(spec: OpSpec) -> _Kernel:
    """The attention kernel module for one variant spec."""
    return _KERNELS[spec.kind](spec)


class RoPE(nn.Module):
    """Rotary position embedding (Llama's rotate-half convention); tables are public buffers."""

    op_kind = "rope"

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Any, positions: torch.Tensor) -> Any:
        half = x.shape[-1] // 2
        rotated = ops.cat([x[..., half:] * -1.0, x[..., :half]], dim=-1)
        return x * self.cos[positions] + rotated * self.sin[positions]


class Attention(nn.Module):
    """Q/K/V projections, per-head kernels (heterogeneous allowed), output projection."""

    op_kind = "attention"

    def __init__(self, config: ModelConfig, variant: LayerVariant) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.heads, config.kv_heads, config.head_dim
        hd = self.head_dim
        self.q = Linear(config.hidden, self.heads * hd, bias=config.qkv_bias)
        self.k = Linear(config.hidden, self.kv_heads * hd, bias=config.qkv_bias)
        self.v = Linear(config.hidden, self.kv_heads * hd, bias=config.qkv_bias)
        self.o = Linear(self.heads * hd, config.hidden, bias=config.out_bias)
        self.rope = (
            RoPE(hd, config.max_positions, config.rope_theta) if config.position == "rope" else None
        )
        self.groups: list[tuple[str, list[int]]] = []
        for head, spec in enumerate(variant.head_kinds(self.heads)):
            name = spec.kind if spec.kind != "linear" else "linear_attn"
            for key, members in self.groups:
                if self._spec_of(key) == spec:
                    members.append(head)
                    break
            else:
                if hasattr(self, name):
                    name = f"{name}_{len(self.groups)}"
                self.add_module(name, make_kernel(spec))
                self.groups.append((name, [head]))
        order = [h for _, members in self.groups for h in members]
        self._inverse = torch.argsort(torch.tensor(order))

    def _spec_of(self, name: str) -> OpSpec:
        return getattr(self, name).spec

    def _split(self, x: Any, heads: int) -> Any:
        b, t, _ = x.shape
        return x.reshape(b, t, heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: Any, mask: AttnMask, cache: KVCache | None = None, layer: int = 0
    ) -> Any:
        q, k, v = self._split(self.q(x), self.heads), self._split(self.k(x), self.kv_heads), \
            self._split(self.v(x), self.kv_heads)
        if self.rope is not None:
            q, k = self.rope(q, mask.query_pos), self.rope(k, mask.query_pos)
        if cache is not None:
            if mask.key_mask is not None:
                raise ValueError("a key padding mask cannot be combined with a KV cache")
            k, v = cache.update(layer, k, v, mask.query_pos)
            mask = AttnMask(mask.query_pos, cache.positions[layer], mask.causal)
        if self.kv_heads != self.heads:
            expand = torch.arange(self.heads) // (self.heads // self.kv_heads)
            k, v = ops.index(k, 1, expand), ops.index(v, 1, expand)
        if len(self.groups) == 1:
            out = getattr(self, self.groups[0][0])(q, k, v, mask)
        else:
            parts = []
            for name, members in self.groups:
                idx = torch.tensor(members)
                parts.append(
                    getattr(self, name)(ops.index(q, 1, idx), ops.index(k, 1, idx),
                                        ops.index(v, 1, idx), mask)
                )
            out = ops.index(ops.cat(parts, dim=1), 1, self._inverse)
        b, _, t, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
