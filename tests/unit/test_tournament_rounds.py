"""Issue 14's round cuts on two CrypTen parties with the dealer's FSS keys: the max / arg-max
tournament (binary levels, then all-pairs groups), the piecewise reciprocal and inverse square
root, the wide inverse square root of SmolLM2's norms, SiLU's and the softmax exp's quadratic
pieces, and the range tests sharing their exchange with the fused GeLU's first opening."""

from __future__ import annotations

import pytest
import torch

from models import ops
from privinf.ledger.counting import Ledger
from protocols.mpc import fused_gelu, numerics
from protocols.mpc import pieces as piecewise
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.numerics import share_kernels
from protocols.mpc.simulate import SimTensor, simulation
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_crypten_parties

LONG = 300  # > ALL_PAIRS_LIMIT: two binary levels (300 -> 150 -> 75), then groups (75 -> 5 -> 1)
ENERGY = torch.tensor([[1.5], [37.0], [900.0], [2.5e4], [9.9e5]])  # a wide norm's row energies (SmolLM2: 1.42-1.01e6)
WIDE = (1.42, 1.01e6)
SILU_IN = torch.cat([torch.linspace(-14.0, 14.0, 1400), piecewise._silu_table()["thresholds"].float(),
                     torch.tensor([-3000.0, -40.0, 40.0, 3000.0])])  # a decoding step's size: the pieces
EXP_IN = torch.cat([torch.linspace(-14.0, 0.2, 400), piecewise._exp_table()["thresholds"].float(),
                    torch.tensor([-2.0e4, -300.0])])  # a softmax's shifted scores at a short context


def _rows() -> torch.Tensor:
    x = torch.randn(2, LONG, generator=torch.Generator().manual_seed(14)) * 3
    x[0, 7], x[0, 200] = 20.0, 20.0  # a tie for the arg-max: the earlier entry wins
    x[1, 40], x[1, 41] = 20.0, 20.0 + 2.0 ** -9  # a near-tie within the max's slack
    return x


def _rounds(ledger: Ledger, run: object) -> tuple[object, int]:
    before = ledger.totals().rounds
    out = run()  # type: ignore[operator]
    return out, ledger.totals().rounds - before


def _party(rank: int, context: cp.PartyContext, ledger: Ledger) -> dict[str, object]:
    context.config = ProtocolConfig(gelu_form="poly")  # the polynomial form (auto takes the table at this size)
    x = crypten.cryptensor(_rows(), src=0)
    positive = crypten.cryptensor(torch.tensor([[2.0 ** -13, 0.01, 0.7, 1.0, 3.3, 40.0, 900.0]]), src=0)
    gelu_in = crypten.cryptensor(torch.linspace(-6.0, 6.0, 97), src=0)
    out: dict[str, object] = {}
    with share_kernels(gelu=fused_gelu.gelu):
        top, out["max_rounds"] = _rounds(ledger, lambda: ops.row_max(x, bound=2.0e4, slack=ops.STABILISING_SLACK))
        out["max"] = top.get_plain_text()
        (value, index), out["argmax_rounds"] = _rounds(ledger, lambda: ops.argmax_last(x))
        out["argmax"] = (value.get_plain_text(), index.get_plain_text())
        recip, out["recip_rounds"] = _rounds(ledger, lambda: ops.reciprocal(positive, positive=True))
        root, out["root_rounds"] = _rounds(ledger, lambda: ops.inv_sqrt(positive))
        gelu, out["gelu_rounds"] = _rounds(ledger, lambda: ops.gelu(gelu_in))
        out.update(recip=recip.get_plain_text(), root=root.get_plain_text(), gelu=gelu.get_plain_text())
        energy = crypten.cryptensor(ENERGY, src=0)
        rows = crypten.cryptensor(_wide_rows(), src=0)
        wide, out["wide_rounds"] = _rounds(ledger, lambda: ops.inv_sqrt_wide(energy, *WIDE, times=rows))
        out["wide"] = wide.get_plain_text()
        silu_in = crypten.cryptensor(SILU_IN, src=0)
        silu, out["silu_rounds"] = _rounds(ledger, lambda: ops.silu(silu_in))
        out["silu"] = silu.get_plain_text()
        exp_in = crypten.cryptensor(EXP_IN, src=0)
        exp, out["exp_rounds"] = _rounds(ledger, lambda: ops.exp_nonpositive(exp_in))
        out["exp"] = exp.get_plain_text()
    with share_kernels("crypten"):  # CrypTen's inverse square root on the reduced value; its x * sigmoid(x)
        _, out["crypten_wide_rounds"] = _rounds(ledger, lambda: ops.inv_sqrt_wide(energy, *WIDE, times=rows))
        _, out["crypten_silu_rounds"] = _rounds(ledger, lambda: ops.silu(silu_in))
        _, out["crypten_exp_rounds"] = _rounds(ledger, lambda: ops.exp_nonpositive(exp_in))
    return out


def _wide_rows() -> torch.Tensor:
    return torch.randn(len(ENERGY), 6, generator=torch.Generator().manual_seed(3)) * ENERGY.sqrt() / 3


def _run() -> dict[str, object]:
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}
    (r0, _), _ = run_crypten_parties(lambda rank, ctx: _party(rank, ctx, ledger[rank]), mpc_ledgers=ledger)
    return r0


RESULT: dict[str, object] = {}


def _result() -> dict[str, object]:
    if not RESULT:
        RESULT.update(_run())
    return RESULT


def test_tournament_max_and_argmax_over_a_long_row() -> None:
    r = _result()
    x = _rows()
    true_max = x.amax(-1, keepdim=True)
    got = r["max"]
    assert (got <= true_max + 1e-3).all()  # type: ignore[operator]
    assert (got >= true_max - 2 * ops.STABILISING_SLACK - 1e-3).all()  # type: ignore[operator]
    value, index = r["argmax"]  # type: ignore[misc]
    assert torch.equal(index, torch.tensor([7.0, 41.0]))  # ties keep the earlier entry; exact comparisons
    assert torch.allclose(value, x.amax(-1), atol=1e-3)
    # two binary levels (2 rounds each), two all-pairs group levels (3 each); the group levels'
    # 1,050 and 10 exact pairs keep value keys (kernel_choice.comparison_keys)
    assert r["max_rounds"] == r["argmax_rounds"] == 2 * 2 + 2 * 3


def test_piecewise_reciprocal_and_inverse_square_root_rounds_and_accuracy() -> None:
    r = _result()
    x = torch.tensor([[2.0 ** -13, 0.01, 0.7, 1.0, 3.3, 40.0, 900.0]])
    assert ((r["recip"] - 1 / x).abs() * x).max() < 0.02  # type: ignore[operator]
    assert ((r["recip"] - 1 / x).abs() * x)[:, 1:5].max() < 1e-3  # type: ignore[operator]
    assert ((r["root"] - x.rsqrt()).abs() / x.rsqrt()).max() < 2e-3  # type: ignore[operator]
    assert r["recip_rounds"] == 4 and r["root_rounds"] == 3


def test_wide_inverse_square_root_takes_the_piecewise_root_and_its_factor() -> None:
    r = _result()
    want = _wide_rows() * ENERGY.rsqrt()
    assert (r["wide"] - want).abs().max() < 2e-3  # type: ignore[operator]
    # the power of four's comparisons, [x 4^-j, times 2^-j] in one exchange, the root's three
    # rounds with times in its last product; CrypTen's root there: 17 rounds, then times
    assert r["wide_rounds"] == 5
    assert r["crypten_wide_rounds"] == 1 + 1 + 17 + 1 + 1


@pytest.mark.parametrize(("name", "kernel", "inputs", "exact", "error", "crypten_rounds"), [
    ("silu", ops.silu, SILU_IN, torch.nn.functional.silu, 4e-4, 17),
    ("exp", ops.exp_nonpositive, EXP_IN, torch.exp, 2.5e-4, 8)])
def test_quadratic_pieces_are_four_rounds_and_match_the_simulation(name, kernel, inputs, exact, error,
                                                                   crypten_rounds) -> None:
    r = _result()
    want = exact(inputs.double())
    assert (r[name] - want).abs().max() < error  # type: ignore[operator]
    assert r[f"{name}_rounds"] == 4 and r[f"crypten_{name}_rounds"] == crypten_rounds
    with simulation(ProtocolConfig()), share_kernels():
        simulated = kernel(SimTensor.new(inputs))
    assert (simulated.share.double() / simulated.encoder.scale - want).abs().max() < error


def test_fused_gelu_opens_its_input_with_the_range_tests() -> None:
    r = _result()
    x = torch.linspace(-6.0, 6.0, 97)
    assert (r["gelu"] - torch.nn.functional.gelu(x)).abs().max() < 1e-3  # type: ignore[operator]
    assert r["gelu_rounds"] == 5


def test_piece_tables_meet_their_relative_error() -> None:
    for base, powers, pieces, exponent, degree, bound in (
            (2.0, numerics.RECIPROCAL_POWERS, numerics.RECIPROCAL_PIECES, -1.0, 2, 3e-6),
            (4.0, numerics.INV_SQRT_POWERS, numerics.INV_SQRT_PIECES, -0.5, 1, 6e-6)):
        table = numerics._piece_table(base, *powers, pieces, exponent, degree)
        x = torch.logspace(powers[0] + 0.01, powers[1] + 0.99, 20001, base=base, dtype=torch.float64)
        j = torch.bucketize(x, table["thresholds"], right=True)
        u = x * table["f"][j] - table["left"][j]
        y = sum(table[f"d{i}"][j] * u ** i for i in range(degree + 1))
        assert (y / x ** exponent - 1).abs().max() < bound


def test_tournament_levels_follow_the_session_config() -> None:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(16)) * 3
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        shares = crypten.cryptensor(x, src=0)
        out: dict[str, object] = {}
        for name, config in (("default", ProtocolConfig()), ("no_pairs", ProtocolConfig(all_pairs_budget=0))):
            context.config = config
            with share_kernels():
                (value, index), out[f"{name}_rounds"] = _rounds(ledger[rank], lambda: ops.argmax_last(shares))
            out[name] = (value.get_plain_text(), index.get_plain_text())
        return out

    (r0, _), _ = run_crypten_parties(party, mpc_ledgers=ledger)
    assert r0["default_rounds"] == 3  # three rows of 16: one all-pairs group level
    assert r0["no_pairs_rounds"] == 2 * 4  # no pairs allowed: four binary levels
    for name in ("default", "no_pairs"):
        value, index = r0[name]  # type: ignore[misc]
        assert torch.equal(index, x.argmax(-1).float()) and torch.allclose(value, x.amax(-1), atol=1e-3)
