"""KV-stationary cache blocks: a layer's K and V blocks are opened in one round, with the same
shares and products as one block at a time (two CrypTen parties over memory channels)."""

from __future__ import annotations

from typing import Any

import torch

from privinf.ledger.counting import Ledger
from protocols.kv.stationary import StationaryDealer, StationaryParty, _Rows
from protocols.mpc.cryptenlib import MPCTensor, crypten, crypten_session, parties_as_threads
from protocols.mpc.csprng import new_seed
from protocols.mpc.vocabulary import MSG_END, TAG_MSG
from protocols.net.channels import memory_pair, run_parties


def _run(keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, together: bool) -> list[dict[str, Any]]:
    seeds = {0: new_seed(), 1: new_seed()}
    p0, p1 = memory_pair("client", "server", timeout_s=60)
    d0, dd = memory_pair("client", "dealer", timeout_s=60)
    dealer = StationaryDealer(seeds)

    def party(rank: int) -> dict[str, Any]:
        peer = p0 if rank == 0 else p1
        ledger = Ledger(peer.local)
        peer.ledger = ledger
        kvs = StationaryParty(rank, seeds[rank], peer, d0 if rank == 0 else None, ledger)
        with crypten_session(peer, rank, ledger, randomness="crypten"):
            k_sh, v_sh = crypten.cryptensor(keys, src=1), crypten.cryptensor(values, src=1)
            q_sh = crypten.cryptensor(q, src=0)
            ks = vs = None
            rounds = ledger.totals().rounds
            for start, stop in ((0, 5), (5, 6)):
                idx = torch.arange(start, stop)
                if together:
                    ks, vs = kvs.append_many([(ks, 0, "k", k_sh[:, :, idx]), (vs, 0, "v", v_sh[:, :, idx])])
                else:
                    ks, vs = kvs.append(ks, 0, "k", k_sh[:, :, idx]), kvs.append(vs, 0, "v", v_sh[:, :, idx])
            rounds = ledger.totals().rounds - rounds
            scores = kvs.scores(q_sh, kvs.view(ks, 0, "k")).get_plain_text()
            cache_v = MPCTensor.from_shares(vs.share(rank)).get_plain_text()
        if rank == 0:
            d0.send_json(TAG_MSG, {"type": MSG_END})
        return {"rounds": rounds, "scores": scores, "values": cache_v, "opened": kvs.opened_rows,
                "blocks": (ks.blocks, vs.blocks)}

    with parties_as_threads():  # CrypTen's reciprocal swaps its config: one per party thread
        return run_parties(lambda: party(0), lambda: party(1), lambda: dealer.serve(dd), timeout_s=120)[:2]


def test_k_and_v_blocks_open_in_one_round_with_the_same_cache() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(5)
    keys, values = torch.randn(1, 2, 6, 4, generator=gen), torch.randn(1, 2, 6, 4, generator=gen)
    q = torch.randn(1, 2, 1, 4, generator=gen)
    batched, separate = _run(keys, values, q, together=True), _run(keys, values, q, together=False)
    for out in batched + separate:
        assert (out["scores"] - q @ keys.transpose(-2, -1)).abs().max() < 1e-3
        assert (out["values"] - values).abs().max() < 1e-4
        assert out["opened"] == 12 and out["blocks"] == ([(0, 5), (1, 1)], [(0, 5), (1, 1)])
    assert [out["rounds"] for out in batched] == [2, 2]  # one round per append_many
    assert [out["rounds"] for out in separate] == [4, 4]


def test_rows_append_in_place_and_keep_older_snapshots() -> None:
    """A decode step's append writes into spare capacity; an older snapshot keeps its rows, and
    appending to it copies instead of overwriting the newer snapshot's rows."""
    first = torch.arange(2 * 3 * 2).reshape(1, 2, 3, 2)
    rows = _Rows((first,), 4)
    one = torch.full((1, 2, 1, 2), -1)
    grown = rows.extend(3, (one,))
    assert grown is rows and torch.equal(grown.buffers[0][:, :, :4], torch.cat([first, one], dim=2))
    other = torch.full((1, 2, 1, 2), -7)
    branch = rows.extend(3, (other,))  # the snapshot of 3 rows again: a copy
    assert branch is not rows
    assert torch.equal(rows.buffers[0][:, :, 3:4], one) and torch.equal(branch.buffers[0][:, :, 3:4], other)
    full = branch.extend(4, (torch.zeros(1, 2, 40, 2, dtype=torch.long),))  # past the capacity: a copy
    assert full.rows == 44 and torch.equal(full.buffers[0][:, :, :3], first)


def test_dealer_joins_extended_blocks_as_from_scratch() -> None:
    """The dealer's incrementally joined masks give the same corrections as a fresh dealer."""
    seeds = {0: new_seed(), 1: new_seed()}
    incremental = StationaryDealer(seeds)
    blocks: list[list[int]] = [[0, 5]]
    for index in range(3):
        msg = {"type": "kvs_triple", "op": "qk", "kind": "k", "layer": 0, "index": index, "a_shape": [1, 2, 1, 4],
               "lead": [1, 2], "dim": 4, "heads": [0, 1], "blocks": [list(b) for b in blocks]}
        got = incremental.correction(msg)
        assert torch.equal(got, StationaryDealer(seeds).correction(msg))
        blocks.append([index + 1, 1])
    swapped = dict(msg, index=9, heads=[1, 0])
    assert torch.equal(incremental.correction(swapped), StationaryDealer(seeds).correction(swapped))
