"""GeLU on shares with each operand opened once (protocols/mpc/fused_gelu.py): the dealer's gelu
tuple, and the kernel against protocols.mpc.numerics.gelu's CrypTen products and torch's GeLU."""

from __future__ import annotations

import pytest
import torch

from models import ops
from privinf.ledger.counting import Ledger
from protocols.mpc import fused_gelu
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.csprng import new_seed
from protocols.mpc.dealer import compute_correction, expand_shares
from protocols.mpc.numerics import share_kernels
from protocols.mpc.vocabulary import GELU_MASKS, GELU_PRODUCTS, TupleRequest
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_crypten_parties

# inside [-3.5, 3.5], both edges, and far outside (where the powers overflow and are zeroed)
X = torch.cat([torch.linspace(-6.0, 6.0, 250), torch.tensor([-3.5, 3.5, 0.0, 100.0, -100.0, 3000.0])]).reshape(2, -1)


def test_gelu_tuple_shares_the_products_of_the_masks_that_meet() -> None:
    seeds = {0: new_seed(), 1: new_seed()}
    request = TupleRequest("gelu", (2, 3))
    assert request.output_shape() == (len(GELU_PRODUCTS), 2, 3)
    assert TupleRequest.from_json(request.to_json()) == request
    p0, p1 = (expand_shares(seeds[r], r, 2, request) for r in (0, 1))
    assert "products" not in p0
    products = compute_correction(seeds, 2, request) + p1["products"]
    masks = dict(zip(GELU_MASKS, p0["masks"] + p1["masks"]))
    for k, (i, j) in enumerate(GELU_PRODUCTS):
        assert torch.equal(products[k], masks[i] * masks[j]), (i, j)


def test_fused_gelu_matches_the_unfused_one_and_sends_a_quarter_less() -> None:
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        context.config = ProtocolConfig(gelu_form="poly")  # the polynomial form (auto takes the table at this size)
        x = crypten.cryptensor(X, src=0)
        start = ledger[rank].totals()
        with share_kernels():
            unfused = ops.gelu(x)
        middle = ledger[rank].totals()
        with share_kernels(gelu=fused_gelu.gelu):
            fused = ops.gelu(x)
        end = ledger[rank].totals()
        with pytest.raises(fused_gelu.FusedGeluError, match="scale"):
            fused_gelu.gelu(x > 0)
        return {"unfused": unfused.get_plain_text(), "fused": fused.get_plain_text(),
                "unfused_bytes": middle.bytes_sent - start.bytes_sent,
                "fused_bytes": end.bytes_sent - middle.bytes_sent, "fused_rounds": end.rounds - middle.rounds}

    (r0, r1), _ = run_crypten_parties(party, mpc_ledgers=ledger)
    want = torch.nn.functional.gelu(X)
    for out in (r0, r1):
        assert (out["fused"] - want).abs().max() < 1e-3  # the polynomial's 8.2e-4 plus fixed point
        assert (out["fused"] - out["unfused"]).abs().max() < 1e-3
    n = X.numel()
    # one 21-bit comparison key (3 bytes opened) + 8 openings of 8 bytes = 67 B per element (unfused: 91)
    assert 67 * n <= r0["fused_bytes"] < 67 * n + 800
    assert r0["unfused_bytes"] > 88 * n
    assert r0["fused_rounds"] <= 8  # comparison, 5 exchanges, and the dealer round trips
