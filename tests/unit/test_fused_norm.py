"""Norms on shares with one opening of their input (protocols/mpc/fused_norm.py): the dealer's
rowscale tuple, the fused kernel against CrypTen's two products, and the LayerNorm using it."""

from __future__ import annotations

import copy

import pytest
import torch

from models import ops
from models.layers import LayerNorm
from privinf.ledger.counting import Ledger
from protocols.mpc import fused_norm
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.csprng import new_seed
from protocols.mpc.dealer import compute_correction, expand_shares
from protocols.mpc.numerics import share_kernels
from protocols.mpc.vocabulary import TupleRequest
from protocols.routes.local_run import run_crypten_parties

X = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4)) * 3


def _inv_rms(squares: object) -> object:
    return ops.inv_sqrt(squares.mean(-1, keepdim=True) + 1e-5, 16.0)  # type: ignore[attr-defined]


def test_rowscale_tuple_shares_a_squared_and_a_times_the_row_mask() -> None:
    seeds = {0: new_seed(), 1: new_seed()}
    request = TupleRequest("rowscale", (3, 4))
    assert request.output_shape() == (2, 3, 4)
    assert TupleRequest.from_json(request.to_json()) == request
    p0, p1 = (expand_shares(seeds[r], r, 7, request) for r in (0, 1))
    assert p0["b"].shape == (3, 1) and "ab" not in p0
    products = compute_correction(seeds, 7, request) + p1["ab"]
    a, b = p0["a"] + p1["a"], p0["b"] + p1["b"]
    assert torch.equal(products[0], a * a) and torch.equal(products[1], a * b)


def test_fused_kernel_matches_two_products_with_one_opening_less() -> None:
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        x = crypten.cryptensor(X, src=0)
        start = ledger[rank].totals()
        with share_kernels():
            two = x * _inv_rms(ops.square(x))
        middle = ledger[rank].totals()
        with share_kernels(scaled_rows=fused_norm.scaled_rows):
            fused = ops.scaled_rows(x, _inv_rms)
        end = ledger[rank].totals()
        with pytest.raises(fused_norm.FusedNormError, match="row factor has shape"):
            fused_norm.scaled_rows(x, lambda sq: sq)
        return {"two": two.get_plain_text(), "fused": fused.get_plain_text(),
                "two_bytes": middle.bytes_sent - start.bytes_sent, "fused_bytes": end.bytes_sent - middle.bytes_sent}

    (r0, r1), _ = run_crypten_parties(party, mpc_ledgers=ledger)
    want = X * torch.rsqrt((X * X).mean(-1, keepdim=True) + 1e-5)
    for out in (r0, r1):
        assert (out["fused"] - want).abs().max() < 1e-3
        assert (out["fused"] - out["two"]).abs().max() < 1e-3
    assert r0["two_bytes"] - r0["fused_bytes"] == 8 * X.numel()  # x is opened once, not twice


def test_layernorm_on_shares_uses_the_fused_kernel_when_installed() -> None:
    norm = LayerNorm(32, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        want = norm(X)
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        mine = copy.deepcopy(norm)  # each party thread converts its own copy
        ops.replace_parameters(mine, lambda p: crypten.cryptensor(p, src=1))
        x = crypten.cryptensor(X, src=0)
        start = ledger[rank].totals()
        with share_kernels():
            plain_path = mine(x)
        middle = ledger[rank].totals()
        with share_kernels(scaled_rows=fused_norm.scaled_rows):
            fused = mine(x)
        end = ledger[rank].totals()
        return {"plain_path": plain_path.get_plain_text(), "fused": fused.get_plain_text(),
                "saved": (middle.bytes_sent - start.bytes_sent) - (end.bytes_sent - middle.bytes_sent),
                "rounds": (middle.rounds - start.rounds, end.rounds - middle.rounds)}

    (r0, _), _ = run_crypten_parties(party, mpc_ledgers=ledger)
    for name in ("plain_path", "fused"):
        assert (r0[name] - want).abs().max() < 2e-3, name
    # the gain is the server's secret: both kernels form x * weight with the squares (one product),
    # then the inverse square root times x * weight (3 rounds: the comparisons, m with the two
    # products on x * weight, the last product): 4 rounds, not 6 (fused x^2 and x * s, then the gain)
    assert r0["saved"] == 0 and r0["rounds"] == (4, 4)
