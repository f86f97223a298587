"""LayerNorm over the features of a column-layout [n, d] tensor, with Newton inverse sqrt.

Row statistics need a sum over columns: add the G ciphertexts, then sum the B blocks by
rotations, so every block holds the row total. The variance is taken of the centred values,
(x - mean) * mask / sqrt(d) squared and summed (no E[x^2] - mean^2 cancellation, which costs
most of the precision at 30-bit scales when activations have a large mean); the mask keeps the
real columns and valid rows (x - mean is -mean in empty blocks). The output is
((x - mean) * gamma_masked) * inv_sqrt(var + eps) + beta.
Levels: inv_sqrt.depth + 4 (see :func:`layernorm_depth`).
"""

from __future__ import annotations

import numpy as np
import torch

from he_kernels.context import HEContext
from he_kernels.ops import KernelStats, Ops, block_sum_steps
from he_kernels.poly import NewtonApprox, newton_ct
from he_kernels.tensor import ColumnLayout, EncTensor, LayoutError


def layernorm_rotation_steps(layout: ColumnLayout) -> list[int]:
    """The rotation steps a LayerNorm on ``layout`` needs (its block sums): the Galois keys to make."""
    return block_sum_steps(layout.block, layout.slots)


def layernorm_depth(inv_sqrt: NewtonApprox) -> int:
    """Levels :func:`layernorm` consumes."""
    return 3 + inv_sqrt.depth + 1


def _per_column(values: torch.Tensor | None, default: float, lay: ColumnLayout, g: int) -> np.ndarray:
    vals = np.zeros(lay.cols_per_ct)
    cols = np.arange(g * lay.cols_per_ct, (g + 1) * lay.cols_per_ct)
    real = cols < lay.cols
    if values is None:
        vals[real] = default
    else:
        if values.shape != (lay.cols,):
            raise LayoutError(f"LayerNorm parameter shape {tuple(values.shape)} != ({lay.cols},)")
        vals[real] = values.detach().double().cpu().numpy()[cols[real]]
    return np.outer(vals, lay.row_mask()).ravel()


def layernorm(
    ctx: HEContext,
    x: EncTensor,
    inv_sqrt: NewtonApprox,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    eps: float = 1e-5,
    ledger: object | None = None,
) -> EncTensor:
    """LayerNorm(x) * gamma + beta; ``inv_sqrt``'s domain must hold var + eps of every row."""
    lay = x.layout
    if not isinstance(lay, ColumnLayout):
        raise LayoutError("layernorm needs the column layout")
    if inv_sqrt.kind != "inv_sqrt":
        raise ValueError("layernorm needs an inverse-sqrt approximation")
    ctx.check_rotations(layernorm_rotation_steps(lay))
    ops = Ops(ctx, KernelStats())
    level_in = x.level(ctx)
    mean = ops.mul_plain(ops.block_sum(ops.sum_ct(x.cts), lay.block), 1.0 / lay.cols)
    diffs = [ops.sub(ct, mean) for ct in x.cts]
    scaled = [ops.mul_plain(dv, _per_column(None, lay.cols ** -0.5, lay, g)) for g, dv in enumerate(diffs)]
    var = ops.block_sum(ops.sum_ct([ops.square(ct) for ct in scaled]), lay.block)
    inv_std = newton_ct(ops, ops.add_plain(var, eps), inv_sqrt)
    outs = []
    for g, dv in enumerate(diffs):
        out = ops.mul(ops.mul_plain(dv, _per_column(gamma, 1.0, lay, g)), inv_std)
        if beta is not None:
            out = ops.add_plain(out, _per_column(beta, 0.0, lay, g))
        outs.append(out)
    ops.finish(outs, level_in, ledger)
    return EncTensor(outs, lay)
