"""Benchmark: encrypted activations [n, d_in] @ plaintext weights [d_in, d_out] under CKKS.

Baseline: TenSEAL's generic vector-matrix product (``CKKSVector.mm``), one encrypted token row
at a time, 2 threads. It takes seconds per row, so we time ``--baseline-rows`` rows and
extrapolate linearly to n rows (printed as such). Ours: he_kernels.linear.matmul_plain on all n
rows at once (column-block layout), single-threaded. Both at N=8192, coeff moduli [60,40,40,60],
scale 2^40. Prints times, the speedup and the max abs error of each against torch.

Run: ``.venv/bin/python bench/he_kernels.py [--rows 128 --din 768 --dout 768]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import tenseal as ts
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from he_kernels.context import HEContext
from he_kernels.linear import matmul_plain, matmul_rotation_steps
from he_kernels.params import CkksParams
from he_kernels.tensor import ColumnLayout, decrypt_matrix, encrypt_matrix
from privinf.ledger.counting import Ledger


def baseline(x: torch.Tensor, w: torch.Tensor, rows: int) -> tuple[float, float]:
    """Seconds per row of TenSEAL's generic mm, and its max abs error on those rows."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60], n_threads=2)
    ctx.global_scale = 2**40
    ctx.generate_galois_keys()
    w_list = w.double().tolist()
    times, err = [], 0.0
    for i in range(rows):
        vec = ts.ckks_vector(ctx, x[i].double().tolist())
        start = time.perf_counter()
        out = vec.mm(w_list)
        times.append(time.perf_counter() - start)
        ref = (x[i].double() @ w.double()).numpy()
        err = max(err, float(np.abs(np.array(out.decrypt()) - ref).max()))
    return float(np.median(times)), err


def ours(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float, dict[str, float], float]:
    """Seconds for the whole [n, d_in] @ [d_in, d_out], max abs error, ledger extras, key MiB."""
    params = CkksParams(8192, (60, 40, 40, 60), 40)
    layout = ColumnLayout.for_shape(x.shape[0], x.shape[1], params.slots)
    ctx = HEContext.create_client(params, matmul_rotation_steps(layout))
    server = HEContext.from_bytes(ctx.public_bytes())
    enc = encrypt_matrix(ctx, x)
    ledger = Ledger("server")
    with ledger.scope("bench.matmul", op="matmul"):
        start = time.perf_counter()
        out = matmul_plain(server, enc, w, ledger=ledger)
        seconds = time.perf_counter() - start
    err = float((decrypt_matrix(ctx, out) - x.double() @ w.double()).abs().max())
    return seconds, err, ledger.totals().extra, server.galois_key_bytes() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--din", type=int, default=768)
    parser.add_argument("--dout", type=int, default=768)
    parser.add_argument("--baseline-rows", type=int, default=2)
    parser.add_argument("--breakdown-model", default="spam-encoder", choices=["spam-encoder", "vit-digits", "none"],
                        help="also print the per-layer HE latency breakdown of this trained model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.din, generator=gen)
    w = torch.randn(args.din, args.dout, generator=gen) / args.din**0.5

    per_row, base_err = baseline(x, w, args.baseline_rows)
    base_total = per_row * args.rows
    print(f"shape [{args.rows}x{args.din}] @ [{args.din}x{args.dout}], N=8192, scale 2^40")
    print(f"TenSEAL CKKSVector.mm (2 threads): {per_row:.3f} s/row measured on "
          f"{args.baseline_rows} rows -> {base_total:.1f} s for {args.rows} rows "
          f"(EXTRAPOLATED x{args.rows}), max abs err {base_err:.2e}")
    seconds, err, extra, key_mib = ours(x, w)
    print(f"he_kernels.matmul_plain (1 thread): {seconds:.2f} s for all {args.rows} rows "
          f"(measured), max abs err {err:.2e}")
    print(f"  ct_ops={extra['ct_ops']:.0f} ct_pt_mults={extra['ct_pt_mults']:.0f} "
          f"rotations={extra['rotations']:.0f} levels={extra['levels']:.0f} "
          f"out ct_bytes={extra['ct_bytes'] / 2**20:.1f} MiB, Galois keys {key_mib:.1f} MiB")
    print(f"speedup: {base_total / seconds:.1f}x")
    if args.breakdown_model != "none":
        from bench.he_breakdown import print_breakdown

        print()
        print_breakdown(args.breakdown_model)


if __name__ == "__main__":
    main()
