"""Compact comparison material (issue 16): one sign-gate key evaluated at several public points,
comparisons on truncated shares, and the width each call site records in its ledger row.

The numpy part checks the gate's contract on random and edge inputs for every (width, shift)
the layer uses: ``[x < c]`` is 1 for every ``x < c`` and 0 for every ``x >= c + resolution``
(exact when nothing is dropped). The CrypTen part runs two party threads with the dealer.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from models import ops
from privinf.ledger.counting import Ledger
from protocols.mpc import compare, fss, fused_gelu, numerics
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.numerics import share_kernels
from protocols.mpc.vocabulary import KEY_KINDS
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_crypten_parties

RNG = np.random.default_rng(16)
SCALE = 2 ** 16
T, D = numerics.GELU_RANGE, numerics.GELU_RESOLUTION
# (value width, thresholds in ulps, resolution in ulps, expected shift): the call sites of the layer
SITES = {
    "gelu": (32, [(-T - D) * SCALE, T * SCALE], D * SCALE, 11),
    "row max": (33, [0.0], ops.STABILISING_SLACK * SCALE, 10),
    "reciprocal": (40, [2.0 ** p * SCALE for p in range(-13, 10)] + [3 * 2.0 ** -14 * SCALE + 0.5], 0.0, 0),
    "default": (40, [0.0], 0.0, 0),
}


def _shares(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x1 = RNG.integers(-(2 ** 63), 2 ** 63 - 1, x.shape[0], dtype=np.int64)
    with np.errstate(over="ignore"):
        return x - x1, x1


def _gate(x: np.ndarray, bits: int, shift: int, points: np.ndarray) -> np.ndarray:
    """Both parties' gate on shares of ``x`` as compare._gate computes it, summed: [N, J]."""
    n, width = x.shape[0], bits - shift
    shares1 = lambda k: RNG.integers(-(2 ** 63), 2 ** 63 - 1, k, dtype=np.int64)  # noqa: E731
    arrays = fss.sign_gen(n, width, os.urandom, shares1)
    keys = [fss.SignKey.from_array(p, width, n, arrays[p]) for p in (0, 1)]
    x0, x1 = _shares(x)
    with np.errstate(over="ignore"):
        opened = keys[0].masked(compare.truncated(x0, bits, shift)) + keys[1].masked(compare.truncated(x1, bits, shift))
        return keys[0].evaluate_points(opened, points) + keys[1].evaluate_points(opened, points)


def _edge_inputs(bits: int, shift: int, thresholds: list[float], count: int) -> np.ndarray:
    limit = 2 ** (bits - 2)  # bits_for leaves a bit of headroom above the promised bound
    edges = [0, 1, -1, 2 ** shift, -(2 ** shift), limit - 1, -limit + 1]
    for c in thresholds:
        base = math.ceil(c)
        edges += [base + d for d in (-1, 0, 1, 2 ** shift - 1, 2 ** shift, 2 ** (shift + 1), -(2 ** shift))]
    spread = RNG.integers(-limit + 1, limit, count, dtype=np.int64)
    near = np.array([math.ceil(c) for c in thresholds], dtype=np.int64)[RNG.integers(0, len(thresholds), count)]
    near = near + RNG.integers(-(2 ** (shift + 2)), 2 ** (shift + 2) + 1, count, dtype=np.int64)
    return np.concatenate([np.array(edges, dtype=np.int64), spread, near])


@pytest.mark.parametrize("site", list(SITES))
def test_truncated_gate_is_exact_outside_the_resolution_at_every_width_used(site: str) -> None:
    bits, thresholds, resolution, shift = SITES[site]
    assert compare.shift_for(thresholds, resolution, bits) == shift
    x = _edge_inputs(bits, shift, thresholds, 3000)
    got = _gate(x, bits, shift, compare.grid([c / SCALE for c in thresholds], SCALE, shift))
    assert set(np.unique(got).tolist()) <= {0, 1}
    c = np.array(thresholds)[None, :]
    below, beyond = x[:, None] < c, x[:, None] >= c + resolution
    assert np.array_equal(got[below], np.ones(below.sum(), dtype=np.int64)), site
    assert np.array_equal(got[beyond], np.zeros(beyond.sum(), dtype=np.int64)), site
    if shift == 0:  # nothing dropped: exact everywhere
        assert np.array_equal(got, below.astype(np.int64))


def test_points_evaluation_equals_one_evaluation_per_shifted_opening() -> None:
    """The multi-point evaluator against the single-point one (the old path) on the same keys."""
    n, bits = 700, 23
    arrays = fss.sign_gen(n, bits, os.urandom, lambda k: RNG.integers(-(2 ** 63), 2 ** 63 - 1, k, dtype=np.int64))
    keys = [fss.SignKey.from_array(p, bits, n, arrays[p]) for p in (0, 1)]
    opened = RNG.integers(0, 2 ** bits, n, dtype=np.int64)
    points = np.array([0, 1, -1, 2 ** (bits - 2) - 1, -(2 ** (bits - 2)), 12345], dtype=np.int64)
    for key in keys:
        many = key.evaluate_points(opened, points)
        for j, c in enumerate(points):
            assert np.array_equal(many[:, j], key.evaluate((opened - c) & (2 ** bits - 1))), c


def test_shift_for_keeps_every_threshold_within_its_resolution() -> None:
    assert compare.shift_for([0.0], 0.0, 40) == 0
    assert compare.shift_for([0.0], 1024.0, 33) == 10  # 2^10 + 0 <= 1024
    assert compare.shift_for([1.0], 1024.0, 33) == 9   # ceil(1 / 2^10) 2^10 + 2^10 = 2048 > 1025
    assert compare.shift_for([0.0], 2.0 ** 40, 12) == 9  # never more than bits - 3
    with pytest.raises(compare.ComparisonError, match="do not fit"):
        compare._gate(None, None, 8, 0, np.array([100], dtype=np.int64))  # checked before any key is asked for


def test_grid_rounds_each_threshold_up_as_python_does_and_refuses_unusable_ones() -> None:
    table = numerics._piece_table(4.0, *numerics.INV_SQRT_POWERS, numerics.INV_SQRT_PIECES, -0.5, 1)
    points = [*table["thresholds"].tolist(), *(RNG.standard_normal(500) * 1e4).tolist(), 0.0, -0.0, -3.5]
    for shift in (0, 3, 9):
        exact = [math.ceil(c * SCALE / 2 ** shift) for c in points]
        assert compare.grid(points, SCALE, shift).tolist() == exact
    for bad in ([float("nan")], [1e30], [-1e30]):
        with pytest.raises(compare.ComparisonError, match="out of any gate"):
            compare.grid(bad, SCALE, 0)


def test_gelu_polynomial_stays_within_its_bound_where_the_range_tests_may_err() -> None:
    """Just outside [-T, T] (within the resolution) either piece may be chosen: both stay within
    8.2e-4 of erf GeLU, the kernel's bound inside."""
    def poly(x: torch.Tensor) -> torch.Tensor:
        v = x * x / (T * T)
        return x / 2 + sum(c * v ** i for i, c in enumerate(numerics.GELU_EVEN_COEFFS))

    edge = torch.cat([torch.linspace(T, T + D, 4001, dtype=torch.float64),
                      torch.linspace(-T - D, -T, 4001, dtype=torch.float64)])
    want = torch.nn.functional.gelu(edge)
    assert (poly(edge) - want).abs().max() < 8.2e-4
    assert (edge.clamp(min=0) - want).abs().max() < 8.2e-4


# ----- on CrypTen shares with the dealer ----------------------------------------------------------
EDGE = T + torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 2047.0, 2048.0, 2049.0, 4096.0]) / SCALE
GELU_X = torch.cat([EDGE, -EDGE, torch.linspace(-8.0, 8.0, 101), torch.tensor([0.0, 1e3, -1e3, 16000.0])])
ROW_X = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(3)) * 4
ROW_X[0, 0, :2] = torch.tensor([5.0, 5.0 + 2.0 ** -8])  # a near-tie within the slack


def _site_rows(rank: int, context: cp.PartyContext, ledger: Ledger) -> dict[str, object]:
    out: dict[str, object] = {}
    context.config = ProtocolConfig(gelu_form="poly")  # the polynomial form (auto takes the table at this size)
    x = crypten.cryptensor(GELU_X, src=0)
    rows = crypten.cryptensor(ROW_X, src=0)
    with context.provider.recording() as schedule:
        with ledger.scope("gelu"), share_kernels(gelu=fused_gelu.gelu):
            out["gelu"] = ops.gelu(x).get_plain_text()
        with ledger.scope("max"), share_kernels():
            out["max"] = ops.row_max(rows, bound=2.0e4, slack=ops.STABILISING_SLACK).get_plain_text()
    out["widths"] = [(r.size0, r.bits, r.kind) for r in schedule.requests if r.kind in KEY_KINDS]
    return out


def test_each_site_records_its_width_and_the_keys_have_it() -> None:
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}
    (r0, r1), _ = run_crypten_parties(lambda rank, ctx: _site_rows(rank, ctx, ledger[rank]), mpc_ledgers=ledger)
    assert (r0["gelu"] - torch.nn.functional.gelu(GELU_X)).abs().max() < 1e-3
    levels = math.ceil(math.log2(ROW_X.shape[-1]))
    true_max = ROW_X.amax(-1, keepdim=True)
    assert (r0["max"] <= true_max + 1e-3).all()
    assert (r0["max"] >= true_max - levels * ops.STABILISING_SLACK - 1e-3).all()
    # one 21-bit key per GeLU input; a row of 16 is one group of the tournament: its 120 pairs
    # exact on 33 bits (1,440 single-threshold comparisons: value keys, below the LAN break-even of
    # kernel_choice.comparison_keys), then each entry's win count against 15 on 23 bits, on the
    # bit keys whose mask bit lets the product ride on the comparison's rounds
    assert r0["widths"] == [((GELU_X.numel(),), 21, "sign"), ((3, 4, 1, 120), 33, "sign"),
                            ((3, 4, 1, 16), 23, "signbit")]
    extra = {r.name: r.counters.extra for r in ledger[0].rows()}
    assert extra["gelu"] == {"fss_keys_32b_shift11": GELU_X.numel(), "fss_points_32b_shift11": 2 * GELU_X.numel()}
    assert extra["max"] == {"fss_keys_33b_shift0": 12 * 120, "fss_points_33b_shift0": 12 * 120,
                            "fss_bitkeys_23b_shift0": 12 * 16, "fss_points_23b_shift0": 12 * 16}


def _normalisers(rank: int, context: cp.PartyContext, x: torch.Tensor) -> dict[str, object]:
    with context.provider.recording() as schedule, share_kernels():
        reciprocal = ops.reciprocal(crypten.cryptensor(x, src=0), positive=True).get_plain_text()
        root = ops.inv_sqrt(crypten.cryptensor(x, src=0)).get_plain_text()
    return {"reciprocal": reciprocal, "root": root,
            "widths": [(r.size0, r.bits) for r in schedule.requests if r.kind == "sign"]}


def test_reciprocal_and_inv_sqrt_take_one_key_per_element_for_all_thresholds() -> None:
    x = torch.tensor([2.0 ** -14, 0.01, 0.5, 1.0, 1.0 + 2.0 ** -16, 3.0, 40.0, 300.0, 1000.0])
    (r0, _), _ = run_crypten_parties(lambda rank, ctx: _normalisers(rank, ctx, x))
    assert ((r0["reciprocal"] - 1 / x).abs() * x).max() < 0.02  # the single-party test's tolerance
    assert ((r0["root"] - x.rsqrt()).abs() / x.rsqrt())[1:].max() < 2e-3
    assert r0["widths"] == [((x.numel(),), 40), ((x.numel(),), 40)]
