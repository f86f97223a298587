"""Server-side evaluation of a trained HE-variant model on CKKS ciphertexts.

The model's ``nn.Module`` cannot run on ciphertexts, so :class:`HeEvaluator` walks its modules
(reading weights and variant parameters) and calls the :mod:`he_kernels` kernels, opening one
ledger scope per module with the model's own path names (``spam-encoder.layer.0.attn.power``).
Supported: ``spam-encoder`` (post-norm encoder, mean pooling, classifier head) and
``vit-digits`` (pre-norm ViT, CLS head), both with power attention (even p), quad GeLU and the
affine norm: every op is a polynomial of depth <= 2.

Parameters: the smallest 128-bit-secure set (:func:`he_kernels.params.params_for_depth`) with
the depth of the deepest atomic op (3, or log2 p for a larger power) at scale 2^30 and enough
slots for the packing: N=8192, coefficient moduli [60, 30, 30, 30, 60] (210 <= 218 bits) for
both models. Few levels keep the Galois keys small (~1.3 MiB each at N=8192, ~14.6 MiB at
N=16384, where the deeper chain would need fewer refreshes). Before each op whose depth exceeds
the levels left, the ciphertexts are refreshed through ``refresh`` (mask, client re-encrypts,
unmask; see :mod:`protocols.routes.he`).

Tricks that save levels: 1/(sqrt(d) tau) folded into W_q; quad GeLU's 0.125 folded into the
next weight; the affine norm is ``x*g - rowsum(x)*(g/d) + beta`` (one level); the softmax
normaliser multiplies the attention output, not the n weight ciphertexts; the pooling mask and
1/n are one plaintext product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tenseal import sealapi as sa
from torch import nn

from he_kernels.attention import attention_rotation_steps, attn_values, qk_scores
from he_kernels.context import HEContext
from he_kernels.linear import matmul_plain, matmul_rotation_steps
from he_kernels.ops import KernelStats, Ops
from he_kernels.params import CkksParams, params_for_depth
from he_kernels.poly import NewtonApprox, PolyApprox, eval_poly_ct, power
from he_kernels.tensor import ColumnLayout, Domain, EncTensor
from models.attention import PowerAttention
from models.layers import AffineNorm, Quad

CKKS_SCALE_BITS = 30
OP_DEPTH = 3  # deepest atomic op: the reciprocal's scaled first guess
PARAMS: CkksParams = params_for_depth(OP_DEPTH, scale_bits=CKKS_SCALE_BITS)  # N=8192, [60,30,30,30,60]
RECIP_TOL = 1e-3

Refresh = Callable[[list, str], list]


class HeModelError(ValueError):
    """The model (or its variant) cannot be evaluated on ciphertexts by this evaluator."""


def reciprocal_approx(lo: float, hi: float, what: str = "reciprocal", degree: int = 3,
                      max_iterations: int = 8) -> NewtonApprox:
    """1/x on [lo, hi]: a first guess minimising the *relative* error |1 - x p(x)| (least squares
    on Chebyshev nodes, so x p(x) stays in (0, 2) where Newton converges), then the fewest Newton
    steps reaching :data:`RECIP_TOL` (checked in float64 by ``max_rel_error``)."""
    if not 0 < lo < hi:
        raise HeModelError(f"{what}: reciprocal range [{lo}, {hi}] must be positive and non-empty")
    nodes = np.cos(np.pi * (np.arange(8 * degree + 8) + 0.5) / (8 * degree + 8))
    t = ((nodes + 1) * (hi - lo) / 2 + lo) / hi
    basis = np.stack([t ** (k + 1) for k in range(degree + 1)], 1)
    c, *_ = np.linalg.lstsq(basis, np.ones_like(t), rcond=None)
    init = PolyApprox(tuple(float(ck) / hi ** (k + 1) for k, ck in enumerate(c)),
                      Domain(lo, hi, what), lambda x: 1.0 / x)
    for iterations in range(max_iterations + 1):
        approx = NewtonApprox("reciprocal", init, iterations)
        if approx.max_rel_error() <= RECIP_TOL:
            return approx
    raise HeModelError(f"{what}: normaliser range [{lo:.3g}, {hi:.3g}] too wide: 1/x does not reach "
                       f"{RECIP_TOL} relative error in {max_iterations} Newton steps")


def _block_for(rows: int) -> int:
    return max(64, 1 << (2 * rows - 1).bit_length())


class HeEvaluator:
    """Walks one trained model; :meth:`plan` is public, :meth:`run` evaluates on ciphertexts."""

    def __init__(self, name: str, model: nn.Module, meta: dict[str, Any]) -> None:
        self.name, self.model, self.meta = name, model, meta
        self.config = model.config
        self.vit = self.config.family == "vit"
        self.rows = self.config.num_patches + 1 if self.vit else int(meta["public"]["seq_len"])
        self.block = _block_for(self.rows)
        p = max(k.p for k in model.modules() if isinstance(k, PowerAttention)) if any(
            isinstance(k, PowerAttention) for k in model.modules()) else 2
        self.params = params_for_depth(max(OP_DEPTH, math.ceil(math.log2(p))), scale_bits=CKKS_SCALE_BITS,
                                       min_slots=self.block * self.config.hidden)
        self.recips: dict[str, NewtonApprox] = {}
        for i, block in enumerate(model.layer):
            self._check_block(i, block)
        for norm in [m for m in model.modules() if "norm" in type(m).__name__.lower()]:
            if not isinstance(norm, AffineNorm) or not norm.calibrated:
                raise HeModelError(f"{name}: HE needs calibrated affine norms (variant norm=affine)")

    # ----- setup ------------------------------------------------------------------------------
    def _check_block(self, i: int, block: nn.Module) -> None:
        kernels = [m for m in block.attn.children() if isinstance(m, PowerAttention)]
        if len(block.attn.groups) != 1 or not kernels:
            raise HeModelError(f"{self.name}: layer {i} must use power attention on every head (attn=power)")
        if not isinstance(block.mlp.act, Quad) or block.mlp.gated:
            raise HeModelError(f"{self.name}: layer {i} must use the quad activation (act=quad)")
        if self.config.head_dim > self.block_cols:
            raise HeModelError(f"head_dim {self.config.head_dim} exceeds {self.block_cols} columns per ct")
        path = f"layer.{i}.attn.{block.attn.groups[0][0]}"
        cal = self.meta.get("he_calibration", {}).get(path)
        if cal is None:
            raise HeModelError(f"{self.name}: no HE calibration for {path} (retrain the model)")
        lo, hi = float(cal["rowsum_min"]) / 1.5, float(cal["rowsum_max"]) * 1.25
        self.recips[path] = reciprocal_approx(lo, hi, f"{self.name}: {path}")

    @property
    def block_cols(self) -> int:
        return self.params.slots // self.block

    def layout(self, cols: int, duplicated: bool = True) -> ColumnLayout:
        return ColumnLayout(self.rows, cols, self.block, self.params.slots, duplicated)

    def rotation_steps(self) -> list[int]:
        lay = self.layout(self.config.hidden)
        steps = set(matmul_rotation_steps(lay)) | set(attention_rotation_steps(lay))
        steps.add(self.params.slots - self.rows)  # duplicate rows after attention
        return sorted(steps)

    def input_spec(self) -> dict[str, Any]:
        """How the client packs its input (public): kind, matrix shape, block, value domain."""
        if self.vit:
            c, s, p = self.config.channels, self.config.image_size, self.config.patch_size
            return {"kind": "image", "shape": [c, s, s], "patch": p, "rows": self.rows,
                    "cols": c * p * p, "block": self.block, "domain": [0.0, 1.0]}
        return {"kind": "tokens", "vocab": list(self.meta["public"]["vocab"]), "seq_len": self.rows,
                "rows": self.rows, "cols": self.config.vocab_size, "block": self.block,
                "domain": [0.0, 1.0]}

    def plan(self) -> dict[str, Any]:
        """Everything public the client needs: parameters, rotation steps, input and output specs."""
        return {"model": self.name, "params": self.params.to_dict(), "rotation_steps": self.rotation_steps(),
                "input": self.input_spec(),
                "output": {"labels": list(self.meta["labels"]), "row": 0}}

    # ----- evaluation -------------------------------------------------------------------------
    def run(self, ctx: HEContext, x: EncTensor, refresh: Refresh, ledger: Any) -> EncTensor:
        """The model on encrypted input ``x`` (packed per :meth:`input_spec`); logits in row 0."""
        run = _Run(self, ctx, refresh, ledger)
        return run.vit(x) if self.vit else run.encoder(x)


def _wt(linear: nn.Module) -> torch.Tensor:
    return linear.weight.detach().double().t()


def _bias(linear: nn.Module) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().double()


class _Run:
    """One inference: scopes, level checks and refreshes around every kernel call."""

    def __init__(self, ev: HeEvaluator, ctx: HEContext, refresh: Refresh, ledger: Any) -> None:
        self.ev, self.ctx, self.refresh, self.ledger = ev, ctx, refresh, ledger
        self.n = ev.rows

    def scope(self, path: str, op: str) -> Any:
        return self.ledger.scope(f"{self.ev.name}.{path}" if path else self.ev.name, op)

    def ensure(self, cts: list, depth: int, path: str) -> list:
        """``cts`` with at least ``depth`` levels left (refreshed through the client if not)."""
        if min(self.ctx.levels_left(ct) for ct in cts) >= depth:
            return cts
        return self.refresh(cts, f"{self.ev.name}.{path}.refresh")

    def ensure_t(self, t: EncTensor, depth: int, path: str) -> EncTensor:
        return EncTensor(self.ensure(t.cts, depth, path), t.layout)

    # ----- ops --------------------------------------------------------------------------------
    def linear(self, x: EncTensor | list[EncTensor], weight: torch.Tensor, bias: torch.Tensor | None,
               path: str, dup: bool | None = None) -> EncTensor:
        xs = [x] if isinstance(x, EncTensor) else x
        xs = [self.ensure_t(t, 1, path) for t in xs]
        with self.scope(path, "matmul"):
            return matmul_plain(self.ctx, xs, weight, bias, out_duplicated=dup, ledger=self.ledger)

    def add_const(self, x: EncTensor, matrix: np.ndarray) -> EncTensor:
        ops = Ops(self.ctx, KernelStats())
        vecs = x.layout.pack(matrix)
        return EncTensor([ops.add_plain(ct, v) for ct, v in zip(x.cts, vecs)], x.layout)

    def residual(self, a: EncTensor, b: EncTensor) -> EncTensor:
        ops = Ops(self.ctx, KernelStats())
        return EncTensor([ops.add(p, q) for p, q in zip(a.cts, b.cts)], a.layout)

    def norm(self, x: EncTensor, norm: AffineNorm, path: str) -> EncTensor:
        """Affine norm: (x - mean) * weight * inv_std + bias in one level."""
        x = self.ensure_t(x, 1, path)
        lay = x.layout
        g = (norm.weight.detach().double() * float(norm.inv_std)).numpy()
        beta = None if norm.bias is None else norm.bias.detach().double().numpy()
        with self.scope(path, "affine_norm"):
            ops = Ops(self.ctx, KernelStats())
            level_in = x.level(self.ctx)
            gs = lay.pack(np.tile(g, (lay.rows, 1)))
            outs = []
            if norm.center:
                total = ops.block_sum(ops.sum_ct(x.cts), lay.block)
            for ct, gv in zip(x.cts, gs):
                out = ops.mul_plain(ct, gv)
                if norm.center:
                    out = ops.sub(out, ops.mul_plain(total, gv / lay.cols))
                outs.append(out)
            if beta is not None:
                outs = [ops.add_plain(ct, v) for ct, v in zip(outs, lay.pack(np.tile(beta, (lay.rows, 1))))]
            ops.finish(outs, level_in, self.ledger)
        return EncTensor(outs, lay)

    def quad(self, u: EncTensor, path: str) -> EncTensor:
        """u^2 + 2u + 4 (= quad GeLU / 0.125; the 0.125 goes into the next weight): one level."""
        u = self.ensure_t(u, 1, path)
        with self.scope(path, "quad"):
            ops = Ops(self.ctx, KernelStats())
            level_in = u.level(self.ctx)
            fours = u.layout.pack(np.full((u.layout.rows, u.layout.cols), 4.0))
            outs = [ops.add(ops.square(ct), ops.add_plain(ops.add(ct, ct), v)) for ct, v in zip(u.cts, fours)]
            ops.finish(outs, level_in, self.ledger)
        return EncTensor(outs, u.layout)

    def mlp(self, h: EncTensor, mlp: nn.Module, path: str) -> EncTensor:
        u = self.linear(h, _wt(mlp.up), _bias(mlp.up), f"{path}.up")
        a = self.quad(u, f"{path}.act")
        return self.linear(a, _wt(mlp.down) * 0.125, _bias(mlp.down), f"{path}.down")

    def attention(self, h: EncTensor, attn: nn.Module, path: str) -> EncTensor:
        heads, hd, cols = attn.heads, attn.head_dim, self.ev.block_cols
        kname = attn.groups[0][0]
        kernel = getattr(attn, kname)
        recip = self.ev.recips[f"{path}.{kname}"]

        def spread(linear: nn.Module, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
            w, b = _wt(linear) * factor, _bias(linear)
            wide = torch.zeros(w.shape[0], heads * cols, dtype=torch.float64)
            bias = torch.zeros(heads * cols, dtype=torch.float64)
            for j in range(heads):
                wide[:, j * cols:j * cols + hd] = w[:, j * hd:(j + 1) * hd]
                if b is not None:
                    bias[j * cols:j * cols + hd] = b[j * hd:(j + 1) * hd] * factor
            return wide, bias

        def split(t: EncTensor) -> list[EncTensor]:
            return [EncTensor([ct], t.layout.with_cols(hd)) for ct in t.cts]

        qs = split(self.linear(h, *spread(attn.q, 1.0 / (math.sqrt(hd) * kernel.tau)), f"{path}.q", dup=False))
        ks = split(self.linear(h, *spread(attn.k, 1.0), f"{path}.k"))
        vs = split(self.linear(h, *spread(attn.v, 1.0), f"{path}.v"))
        outs = [self.head(q, k, v, kernel, recip, f"{path}.{kname}") for q, k, v in zip(qs, ks, vs)]
        o = self.linear(outs, _wt(attn.o), _bias(attn.o), f"{path}.o")
        with self.scope(f"{path}.o", "matmul"):
            ops = Ops(self.ctx, KernelStats())
            cts = [ops.add(ct, ops.rotate(ct, -self.n)) for ct in o.cts]
            ops.finish(cts, o.level(self.ctx), self.ledger)
        return EncTensor(cts, o.layout.with_cols(o.layout.cols, duplicated=True))

    def head(self, q: EncTensor, k: EncTensor, v: EncTensor, kernel: PowerAttention,
             recip: NewtonApprox, path: str) -> EncTensor:
        """One head: scores, (s)^p, attention values, times 1/(sum_j s^p + n eps)."""
        with self.scope(path, kernel.op_kind):
            q, k = self.ensure_t(q, 1, path), self.ensure_t(k, 1, path)
            scores = qk_scores(self.ctx, q, k, ledger=self.ledger)
            levels = max(1, int(math.log2(kernel.p)))
            scores = self.ensure_t(scores, levels, path)
            powered = power(self.ctx, scores, kernel.p, ledger=self.ledger)
            ops = Ops(self.ctx, KernelStats())
            level_in = powered.level(self.ctx)
            # rows >= n hold 0: give them a value inside the reciprocal's domain so Newton stays
            # bounded there (a diverging slot would overflow the modulus and corrupt every slot)
            fill = np.full(self.ev.block, 0.5 * (recip.domain.lo + recip.domain.hi))
            fill[: self.n] = self.n * kernel.eps
            rowsum = ops.add_plain(ops.sum_ct(powered.cts), np.tile(fill, self.ev.params.slots // self.ev.block))
            ops.finish([rowsum], level_in, self.ledger)
            inv = self.reciprocal(rowsum, recip, path)
            powered = self.ensure_t(powered, 1, path)
            v = self.ensure_t(v, 1, path)
            out = attn_values(self.ctx, powered, v, ledger=self.ledger)
            out_cts = self.ensure(out.cts, 1, path)
            inv = self.ensure([inv], 1, path)[0]
            ops = Ops(self.ctx, KernelStats())
            level_in = max(self.ctx.level_used(out_cts[0]), self.ctx.level_used(inv))
            res = [ops.mul(out_cts[0], inv)]
            ops.finish(res, level_in, self.ledger)
        return EncTensor(res, out.layout)

    def reciprocal(self, x: sa.Ciphertext, recip: NewtonApprox, path: str) -> sa.Ciphertext:
        """Polynomial first guess (depth 3 with the scaling), then Newton steps y(2 - xy),
        refreshing between steps."""
        x = self.ensure([x], 3, path)[0]
        ops = Ops(self.ctx, KernelStats())
        level_in = self.ctx.level_used(x)
        hi = recip.domain.hi  # the guess is evaluated in t = x / hi: no tiny coefficients to encode
        t = ops.mul_plain(x, 1.0 / hi)
        y = eval_poly_ct(ops, t, tuple(a * hi**k for k, a in enumerate(recip.init.coeffs)))
        for _ in range(recip.iterations):
            y = self.ensure([y], 2, path)[0]
            neg = sa.Ciphertext()
            ops.ev.negate(ops.mul(x, y), neg)
            y = ops.mul(y, ops.add_plain(neg, 2.0))
        ops.finish([y], level_in, self.ledger)
        return y

    def pool_rows(self, logits: EncTensor, mean: bool) -> EncTensor:
        """Row 0 keeps the (mean of all rows' | own) logits; every other slot becomes 0."""
        path = "pool"
        logits = self.ensure_t(logits, 1, path)
        with self.scope(path, "pool"):
            ops = Ops(self.ctx, KernelStats())
            level_in = logits.level(self.ctx)
            lay = logits.layout
            mask = np.zeros((lay.rows, lay.cols))
            mask[0] = 1.0 / self.n if mean else 1.0
            vec = ColumnLayout(lay.rows, lay.cols, lay.block, lay.slots).pack(mask)
            outs = []
            for ct, mv in zip(logits.cts, vec):
                step = 1
                while mean and step < self.n:
                    ct = ops.add(ct, ops.rotate(ct, step))
                    step *= 2
                outs.append(ops.mul_plain(ct, mv))
            ops.finish(outs, level_in, self.ledger)
        return EncTensor(outs, lay.with_cols(lay.cols, duplicated=False))

    # ----- whole models -----------------------------------------------------------------------
    def encoder(self, x: EncTensor) -> EncTensor:
        m = self.ev.model
        with self.scope("", "model"):
            h = self.linear(x, m.embed.weight.detach().double(), None, "embed")
            pos = m.pos.weight.detach().double()[: self.n].numpy()
            h = self.add_const(h, pos)
            h = self.norm(h, m.embed_norm, "embed_norm")
            for i, block in enumerate(m.layer):
                p = f"layer.{i}"
                a = self.attention(h, block.attn, f"{p}.attn")
                h = self.norm(self.residual(h, a), block.attn_norm, f"{p}.attn_norm")
                f = self.mlp(h, block.mlp, f"{p}.mlp")
                h = self.norm(self.residual(h, f), block.mlp_norm, f"{p}.mlp_norm")
            logits = self.linear(h, _wt(m.head), _bias(m.head), "head")
            return self.pool_rows(logits, mean=True)

    def vit(self, x: EncTensor) -> EncTensor:
        m = self.ev.model
        with self.scope("", "model"):
            h = self.linear(x, _wt(m.patch), None, "patch")
            const = m.pos.detach().double()[0].clone()
            const[0] += m.cls.detach().double()[0, 0]
            if m.patch.bias is not None:
                const[1:] += m.patch.bias.detach().double()
            h = self.add_const(h, const.numpy())
            for i, block in enumerate(m.layer):
                p = f"layer.{i}"
                h = self.residual(h, self.attention(self.norm(h, block.attn_norm, f"{p}.attn_norm"),
                                                    block.attn, f"{p}.attn"))
                h = self.residual(h, self.mlp(self.norm(h, block.mlp_norm, f"{p}.mlp_norm"),
                                              block.mlp, f"{p}.mlp"))
            h = self.norm(h, m.final_norm, "final_norm")
            logits = self.linear(h, _wt(m.head), _bias(m.head), "head")
            return self.pool_rows(logits, mean=False)


def input_matrix(spec: dict[str, Any], value: Any) -> torch.Tensor:
    """Client side: the [rows, cols] matrix to encrypt for ``value``, checked against the domain."""
    from models.data import encode_text
    from models.vit import patchify

    if spec["kind"] == "tokens":
        ids = encode_text(value, spec["vocab"], spec["seq_len"])
        mat = torch.nn.functional.one_hot(ids, spec["cols"]).double()
    else:
        shape = tuple(spec["shape"])
        if not torch.is_tensor(value) or tuple(value.shape) != shape:
            got = list(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise HeModelError(f"expected an image tensor of shape {list(shape)}, got {got}")
        patches = patchify(value.double().unsqueeze(0), spec["patch"])[0]
        mat = torch.cat([torch.zeros(1, patches.shape[1], dtype=torch.float64), patches])
    Domain(float(spec["domain"][0]), float(spec["domain"][1]), "input").check(mat)
    return mat
