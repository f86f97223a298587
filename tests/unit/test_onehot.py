"""Secret one-hot vectors from the dealer's rotated unit vector (protocols/mpc/onehot.py), and the
selection primitives that use it (kv_select's rank one-hot and compaction) on two real parties."""

from __future__ import annotations

import pytest
import torch

from models.kv_pruning import PlainSelector
from privinf.ledger.counting import Ledger
from protocols.kv.select import ObliviousSelector, compact, indices_of, rank_topk_mask
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.csprng import new_seed
from protocols.mpc.dealer import compute_correction, expand_shares
from protocols.mpc.onehot import OneHotError, domain_for, one_hot
from protocols.mpc.vocabulary import DealerError, TupleRequest
from protocols.routes.local_run import run_crypten_parties
from tests.unit.test_kv_select import reveal

VALUES = torch.randint(0, 8, (4, 64), generator=torch.Generator().manual_seed(3)).float()


def test_dealer_unit_vector_is_a_sharing_of_e_rho() -> None:
    seeds = {0: new_seed(), 1: new_seed()}
    request = TupleRequest.one_hot((3, 2), 8)
    assert request.output_shape() == (3, 2, 8)
    assert TupleRequest.from_json(request.to_json()) == request
    p0, p1 = (expand_shares(seeds[r], r, 4, request) for r in (0, 1))
    unit = compute_correction(seeds, 4, request) + p1["u"]
    rho = (p0["r"] + p1["r"]) & 7
    assert torch.equal(unit, torch.nn.functional.one_hot(rho, 8) * 2**16)
    for bad in ({"kind": "onehot", "size0": [2], "domain": 6}, {"kind": "onehot", "size0": [2]},
                {"kind": "onehot", "size0": [2], "domain": 2**17}):
        with pytest.raises(DealerError, match="domain"):
            TupleRequest.from_json(bad)


def test_domain_for_rounds_up_to_a_power_of_two() -> None:
    assert [domain_for(c) for c in (1, 2, 3, 64, 65)] == [2, 2, 4, 64, 128]
    with pytest.raises(OneHotError, match="at least one"):
        domain_for(0)


def test_one_hot_on_shares_is_one_opening_and_exact() -> None:
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        x = crypten.cryptensor(VALUES, src=1)
        before = ledger[rank].totals()
        units = one_hot(x, 8, context.provider)
        after = ledger[rank].totals()
        with pytest.raises(OneHotError, match="power of two"):
            one_hot(x, 6, context.provider)
        return {"units": reveal(units), "bytes": after.bytes_sent - before.bytes_sent,
                "rounds": after.rounds - before.rounds}

    (r0, r1), _ = run_crypten_parties(party, mpc_ledgers=ledger)
    want = torch.nn.functional.one_hot(VALUES.long(), 8).float()
    assert torch.equal(r0["units"], want) and torch.equal(r1["units"], want)
    assert r0["rounds"] == 1
    n = VALUES.numel()  # 16 + 3 bits of each residue travel: 3 bytes per value
    assert 3 * n <= r0["bytes"] < 3 * n + 200


def test_selection_one_hots_with_a_dealer_match_plaintext() -> None:
    """Rank one-hot (unordered top-k) and order-preserving compaction on two parties with the
    dealer: the same selection as torch.topk, exact 0/1 entries, and fewer bytes than the
    comparison fallback would send ((k+1) n comparisons)."""
    scores = (torch.randperm(96, generator=torch.Generator().manual_seed(2)).float() / 8.0).reshape(2, 3, 16)
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        enc = crypten.cryptensor(scores, src=0)
        mask = rank_topk_mask(enc, 5)
        before = ledger[rank].totals().bytes_sent
        ordered = compact(mask, 5)
        compact_bytes = ledger[rank].totals().bytes_sent - before
        unordered = ObliviousSelector().top_k(enc, 5, ordered=False)
        return {"ordered": reveal(ordered), "unordered": reveal(unordered), "compact_bytes": compact_bytes}

    (r0, _), _ = run_crypten_parties(party, mpc_ledgers=ledger)
    for name in ("ordered", "unordered"):
        assert ((r0[name] == 0) | (r0[name] == 1)).all(), name
        assert torch.equal(r0[name].sum(-1), torch.ones(2, 3, 5)), name  # one entry per row
    assert torch.equal(indices_of(r0["ordered"]), PlainSelector().top_k(scores, 5, ordered=True))
    assert torch.equal(indices_of(r0["unordered"]), scores.topk(5).indices)
    assert r0["compact_bytes"] < 8 * 6 * 16 + 200  # one opening per entry, not 6 x 16 comparisons each
