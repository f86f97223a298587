"""Encrypted attention for one head: Q K^T, power-softmax, scores x V (n <= block/2, d_head <= B).

Inputs are [n, d_head] in the column layout with one ciphertext each: K and V duplicated (rows
n..2n-1 repeat 0..n-1, so a rotation by r < n reads key (i + r) mod n at row i), Q with zero
rows beyond n (``matmul_plain(..., out_duplicated=False)``), which also zeroes the garbage a
rotation drags in from the next block. Fold 1/sqrt(d_head) into W_q.

* scores: D_r = block_sum(Q * rot_r(K)) holds S[i, (i+r) % n] in every block (diagonal layout);
  n ct x ct products, (n-1) + n*log2(B) rotations, one level.
* power-softmax: A_r = D_r^p * recip(sum_r D_r^p); log2(p) + recip.depth + 1 levels.
* values: out = sum_r A_r * rot_r(V) in the column layout; n products, n-1 rotations, one level.
"""

from __future__ import annotations

from he_kernels.context import HEContext
from he_kernels.ops import KernelStats, Ops, block_sum_steps
from he_kernels.poly import NewtonApprox, newton_ct, power_ct
from he_kernels.tensor import ColumnLayout, DiagonalLayout, EncTensor, LayoutError


def attention_rotation_steps(layout: ColumnLayout) -> list[int]:
    """Rotation steps the attention kernels need for Q/K/V in ``layout``."""
    return list(range(1, layout.rows)) + block_sum_steps(layout.block, layout.slots)


def _head_layout(t: EncTensor, what: str, duplicated: bool | None) -> ColumnLayout:
    lay = t.layout
    if not isinstance(lay, ColumnLayout) or len(t.cts) != 1:
        raise LayoutError(f"{what} must be one ciphertext in the column layout (d_head <= blocks per ct)")
    if lay.block < 2 * lay.rows:
        raise LayoutError(f"{what}: block {lay.block} < 2n={2 * lay.rows}; pack with duplicated rows")
    if duplicated is not None and lay.duplicated != duplicated:
        raise LayoutError(f"{what} must {'' if duplicated else 'not '}have duplicated rows")
    return lay


def qk_scores(ctx: HEContext, q: EncTensor, k: EncTensor, ledger: object | None = None) -> EncTensor:
    """S = Q K^T in the diagonal layout (one ciphertext per diagonal r = 0..n-1)."""
    lq = _head_layout(q, "Q", False)
    lk = _head_layout(k, "K", True)
    if (lq.rows, lq.cols, lq.block) != (lk.rows, lk.cols, lk.block):
        raise LayoutError(f"Q {q.shape} and K {k.shape} layouts differ")
    ctx.check_rotations(attention_rotation_steps(lk))
    ops = Ops(ctx, KernelStats())
    level_in = max(q.level(ctx), k.level(ctx))
    outs = []
    for r in range(lq.rows):
        prod = ops.mul(q.cts[0], ops.rotate(k.cts[0], r))
        outs.append(ops.block_sum(prod, lq.block))
    ops.finish(outs, level_in, ledger)
    return EncTensor(outs, DiagonalLayout(lq.rows, lq.block, lq.slots))


def power_softmax(
    ctx: HEContext, scores: EncTensor, p: int, recip: NewtonApprox, ledger: object | None = None
) -> EncTensor:
    """A = S^p / sum_j S^p row-wise (p even); ``recip``'s domain must hold the row sums."""
    if not isinstance(scores.layout, DiagonalLayout):
        raise LayoutError("power_softmax needs scores in the diagonal layout")
    if p < 2 or p % 2:
        raise ValueError(f"power-softmax needs an even power p >= 2, got {p}")
    if recip.kind != "reciprocal":
        raise ValueError("power_softmax needs a reciprocal approximation")
    ops = Ops(ctx, KernelStats())
    level_in = scores.level(ctx)
    powered = [power_ct(ops, ct, p) for ct in scores.cts]
    inv = newton_ct(ops, ops.sum_ct(powered), recip)
    outs = [ops.mul(e, inv) for e in powered]
    ops.finish(outs, level_in, ledger)
    return EncTensor(outs, scores.layout)


def attn_values(ctx: HEContext, weights: EncTensor, v: EncTensor, ledger: object | None = None) -> EncTensor:
    """A V for diagonal-layout A [n, n] and duplicated V [n, d_head]: [n, d_head], column layout."""
    lv = _head_layout(v, "V", True)
    la = weights.layout
    if not isinstance(la, DiagonalLayout) or (la.rows, la.block) != (lv.rows, lv.block):
        raise LayoutError("attention weights must be diagonal-layout scores matching V")
    ctx.check_rotations(range(1, lv.rows))
    ops = Ops(ctx, KernelStats())
    level_in = max(weights.level(ctx), v.level(ctx))
    acc = None
    for r, a_r in enumerate(weights.cts):
        term = ops.mul(a_r, ops.rotate(v.cts[0], r))
        acc = term if acc is None else ops.add(acc, term)
    ops.finish([acc], level_in, ledger)
    return EncTensor([acc], lv.with_cols(lv.cols, duplicated=False))
