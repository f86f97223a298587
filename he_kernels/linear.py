"""Ciphertext x plaintext-weight matmul in the column-block layout.

With B column blocks per ciphertext, rotating input ciphertext g by r blocks puts input column
g*B + (c + r) % B at block c. Output ciphertext h (columns h*B .. h*B + B - 1) is then

    out_h = sum_g sum_r rot_r(in_g) * P[g, h, r],   P[g, h, r] at block c = W[g*B + (c+r)%B, h*B + c]

(a block-generalised Halevi-Shoup diagonal method). Costs for [n, d_in] @ [d_in, d_out] with
G = ceil(d_in/B), H = ceil(d_out/B): G*(B-1) rotations shared by every output, G*H*B plaintext
products accumulated before a single rescale per output (one level), G*H*B plaintext encodings.
Because a weight entry is broadcast over all n tokens of its block, the product count is
d_in*d_out*n/slots: every slot does useful work. TenSEAL's generic ``CKKSVector.mm`` instead
handles one token at a time with d_out rotations-and-sums per token (see bench/he_kernels.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from he_kernels.context import HEContext
from he_kernels.ops import KernelStats, Ops
from he_kernels.tensor import ColumnLayout, EncTensor, LayoutError


def matmul_rotation_steps(layout: ColumnLayout) -> list[int]:
    """Rotation steps :func:`matmul_plain` needs for inputs in ``layout``."""
    return [r * layout.block for r in range(1, layout.cols_per_ct)]


def _column_map(inputs: Sequence[EncTensor]) -> tuple[list, list[np.ndarray], ColumnLayout]:
    """Flatten (possibly several, column-concatenated) inputs into (ct, global column per block)."""
    first = inputs[0].layout
    if not isinstance(first, ColumnLayout):
        raise LayoutError("matmul_plain needs inputs in the column layout")
    cts, maps, offset = [], [], 0
    for enc in inputs:
        lay = enc.layout
        if not isinstance(lay, ColumnLayout) or (lay.rows, lay.block, lay.duplicated) != (
            first.rows, first.block, first.duplicated
        ):
            raise LayoutError("concatenated matmul inputs must share rows, block and duplication")
        for g, ct in enumerate(enc.cts):
            cols = g * lay.cols_per_ct + np.arange(lay.cols_per_ct)
            cts.append(ct)
            maps.append(np.where(cols < lay.cols, cols + offset, -1))
        offset += lay.cols
    return cts, maps, first.with_cols(offset)


def matmul_plain(
    ctx: HEContext,
    x: EncTensor | Sequence[EncTensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_duplicated: bool | None = None,
    ledger: object | None = None,
) -> EncTensor:
    """Encrypted [n, d_in] (or several column-concatenated inputs) @ plaintext [d_in, d_out].

    ``out_duplicated`` False zeroes the duplicated rows of a duplicated input (attention's
    queries need that); None keeps the input's duplication. Consumes one level.
    """
    inputs = [x] if isinstance(x, EncTensor) else list(x)
    if not inputs:
        raise LayoutError("matmul_plain needs at least one input")
    cts, maps, in_layout = _column_map(inputs)
    if weight.dim() != 2 or weight.shape[0] != in_layout.cols:
        raise LayoutError(f"weight shape {tuple(weight.shape)} does not match {in_layout.cols} input columns")
    dup = in_layout.duplicated if out_duplicated is None else out_duplicated
    if dup and not in_layout.duplicated:
        raise LayoutError("cannot produce duplicated rows from an input without them")
    d_out = weight.shape[1]
    out_layout = in_layout.with_cols(d_out, duplicated=dup)
    big_b, block = in_layout.cols_per_ct, in_layout.block
    w = weight.detach().double().cpu().numpy()
    w_pad = np.zeros((in_layout.cols + 1, out_layout.n_cts * big_b))
    w_pad[: in_layout.cols, :d_out] = w  # row -1 (index cols) stays zero for empty blocks
    row_mask = out_layout.row_mask()
    ops = Ops(ctx, KernelStats())
    level_in = max(ctx.level_used(ct) for ct in cts)
    ctx.check_rotations(matmul_rotation_steps(in_layout))
    acc: list = [None] * out_layout.n_cts
    lanes = np.arange(big_b)
    for ct, cmap in zip(cts, maps):
        for r in range(big_b):
            in_cols = cmap[(lanes + r) % big_b]
            if np.all(in_cols < 0):
                continue
            rot = None
            for h in range(out_layout.n_cts):
                vals = w_pad[in_cols, h * big_b + lanes]
                if not vals.any():
                    continue
                rot = rot if rot is not None else ops.rotate(ct, r * block)
                prod = ops.mul_plain_raw(rot, ops.encode_for_mul(np.outer(vals, row_mask).ravel(), rot))
                acc[h] = prod if acc[h] is None else ops.add_inplace(acc[h], prod)
    outs = []
    for h, ct in enumerate(acc):
        if ct is None:  # an all-zero weight slice: a fresh encryption of zero at the output level
            ct = ops.zero_at_level(cts[0], drop=1)
        else:
            ct = ops.rescale(ct)
        if bias is not None:
            ct = ops.add_plain(ct, _bias_vector(bias, h, big_b, d_out, row_mask))
        outs.append(ct)
    ops.finish(outs, level_in, ledger)
    return EncTensor(outs, out_layout)


def _bias_vector(bias: torch.Tensor, h: int, big_b: int, d_out: int, row_mask: np.ndarray) -> np.ndarray:
    if bias.shape != (d_out,):
        raise LayoutError(f"bias shape {tuple(bias.shape)} does not match {d_out} outputs")
    vals = np.zeros(big_b)
    chunk = bias.detach().double().cpu().numpy()[h * big_b : (h + 1) * big_b]
    vals[: chunk.size] = chunk
    return np.outer(vals, row_mask).ravel()
