"""GeLU from a DPF lookup table (protocols/mpc/gelu_lut.py): the lines' error on every ulp where
either neighbour may be read, the whole kernel's bound on edge values, two real parties against
the simulation, and the per-shape rule that picks it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import ops
from privinf.ledger.counting import Ledger
from protocols.mpc import fused_gelu, gelu_lut, numerics, simulate
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_crypten_parties

BITS = 16
ULP = 2.0 ** -BITS
H = 2.0 ** -gelu_lut.SEGMENT_BITS
T, D = numerics.GELU_RANGE, numerics.GELU_RESOLUTION
BORDERS = np.arange(-3.5, 3.5 + H, H)
EDGES = torch.tensor(sorted({0.0, ULP, -ULP, T, -T, T - ULP, -T - ULP, T + D, -T - D, T + D - ULP, -T - D + ULP,
                             4.0, -4.0, 100.0, -100.0, 3000.0, -3000.0}
                            | {float(b + o) for b in BORDERS for o in (-ULP, 0.0, ULP)}), dtype=torch.float64)
BOUND = 8.2e-4  # the polynomial form's bound (ReLU outside [-T, T]): the lookup form must not exceed it


def test_every_line_is_accurate_on_its_segment_and_the_next_at_every_ulp() -> None:
    """The carry of the dropped low bits may read the segment below: both candidates, every ulp of [-4, 4)."""
    table = gelu_lut.tables(BITS).astype(np.float64) * ULP
    x = np.arange(-4 * 2**BITS, 4 * 2**BITS, dtype=np.float64) * ULP
    segment = np.floor(x / H).astype(np.int64)
    g = gelu_lut._even_part(x)
    rounding = 4.0 * ULP / 2 + ULP / 2  # slope rounded (times |x| <= 4) and intercept rounded
    for index in (segment, segment - 1):
        usable = index * H >= -4.0  # the segment below [-4, -4 + h) is outside the table
        v = index[usable] & ((1 << gelu_lut.LUT_BITS) - 1)
        error = np.abs(table[0][v] * x[usable] + table[1][v] - g[usable])
        assert error.max() <= gelu_lut.LINE_ERROR + rounding


def _simulated(x: torch.Tensor, config: ProtocolConfig) -> torch.Tensor:
    with torch.no_grad(), simulate.simulation(config):
        return simulate.fused_gelu_equivalent(simulate.SimTensor.new(x.float())).get_plain_text().double()


def test_lookup_gelu_stays_within_the_polynomial_bound_on_edges_and_segment_borders() -> None:
    want = torch.nn.functional.gelu(EDGES)
    lut = _simulated(EDGES, ProtocolConfig(gelu_form="lut"))
    poly = _simulated(EDGES, ProtocolConfig(gelu_form="poly"))
    assert (lut - want).abs().max() <= BOUND + 4 * ULP
    inside = EDGES.abs() <= T
    assert (lut - want)[inside].abs().max() <= gelu_lut.LINE_ERROR + 4 * ULP
    assert (poly - want).abs().max() <= BOUND + 4 * ULP
    assert not torch.equal(lut, poly)  # the form really changed


def test_lookup_gelu_on_two_parties_is_two_rounds_43_bytes_and_matches_the_simulation() -> None:
    x = torch.cat([EDGES, torch.linspace(-5.0, 5.0, 101, dtype=torch.float64)]).float().reshape(2, -1)
    config = ProtocolConfig(gelu_form="lut")
    mpc = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        context.config = config
        shares = crypten.cryptensor(x, src=0)
        start = mpc[rank].totals()
        with numerics.share_kernels(gelu=fused_gelu.gelu):
            out = ops.gelu(shares)
        end = mpc[rank].totals()
        return {"y": out.get_plain_text().double(), "bytes": end.bytes_sent - start.bytes_sent,
                "rounds": end.rounds - start.rounds, "extra": dict(end.extra)}

    (r0, r1), _ = run_crypten_parties(party, mpc_ledgers=mpc)
    want = torch.nn.functional.gelu(x.double())
    assert torch.equal(r0["y"], r1["y"])
    assert (r0["y"] - want).abs().max() <= BOUND + 8 * ULP
    sim = _simulated(x.double(), config)
    # the simulation reads the likelier neighbour; a real run may read the other: both lines within LINE_ERROR
    assert (r0["y"] - sim).abs().max() <= 2 * gelu_lut.LINE_ERROR + 8 * ULP
    n = x.numel()
    assert r0["rounds"] == 2
    assert r0["extra"]["dpf_keys_8b_p2"] == n and r0["extra"]["dpf_points_8b"] == 256 * n
    assert 43 * n <= r0["bytes"] < 43 * n + 400  # 3 + 8 bytes in the first round, a 4-element Beaver product


@pytest.mark.parametrize(("elements", "profile", "lut"), [
    (128 * 3072, "lan", False),  # BERT-base layer, seq 128
    (128 * 1536, "lan", False),  # MiniLM, 128 tokens
    (16 * 1536, "lan", False),   # MiniLM, 16 tokens
    (3072, "lan", False),        # a GPT-2 decode step
    (3072, "wan", True),         # ... where rounds cost 40 ms
    (16 * 1536, "wan", False),
    (128 * 3072, "wan", False),
    (512, "lan", True),          # a small tensor: rounds dominate even on the LAN
])
def test_the_lookup_form_runs_only_where_it_is_priced_cheaper(elements: int, profile: str, lut: bool) -> None:
    config = ProtocolConfig(kernel_profile=profile)
    costs = gelu_lut.costs(elements, config)
    assert (costs["lut"] < costs["poly"]) is lut
    with simulate.simulation(config):
        assert gelu_lut.chosen(simulate.SimTensor.new(torch.zeros(elements))) is lut  # the simulation's choice
    for form in ("poly", "lut"):
        with simulate.simulation(ProtocolConfig(kernel_profile=profile, gelu_form=form)):
            assert gelu_lut.chosen(simulate.SimTensor.new(torch.zeros(elements))) is (form == "lut")
