"""CrypTen over ChannelCommunicator: two parties as two threads over memory_pair channels, with
CrypTen's own randomness and provider (the transport alone; privinf's are tested with the dealer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.distributed import ReduceOp

from privinf.ledger.counting import Ledger
from protocols.mpc.cryptenlib import crypten, crypten_session, install, parties_as_threads, uninstall
from protocols.mpc.cryptenlib.communicator import ChannelCommunicator, CommunicatorError
from protocols.net.channels import ProtocolError, memory_pair, run_parties

TOL = 1e-3  # 16-bit fixed point, a few truncations
SOFTMAX_TOL = 1e-2  # CrypTen's exp (limit) and reciprocal (Newton) approximations: ~2.3e-3 seen


def plain(value: Any) -> torch.Tensor:
    """Reveal and decode exactly: CrypTen's decode can be off by 1.0 just above negative integers."""
    shared = value._tensor
    return (shared.reveal().double() / shared.encoder.scale).float()


def two_parties(body: Callable[[int, ChannelCommunicator, Ledger], Any], verbose: bool = False) -> list[Any]:
    """Run ``body(rank, comm, ledger)`` as both parties; return both results."""
    torch.set_num_threads(1)
    ch0, ch1 = memory_pair("server", "client", timeout_s=30)
    previous = crypten.cfg.communicator.verbose
    crypten.cfg.communicator.verbose = verbose

    def party(rank: int, channel: Any) -> Any:
        ledger = Ledger(channel.local)
        with crypten_session(channel, rank, ledger, randomness="crypten") as comm:
            return body(rank, comm, ledger)

    try:
        with parties_as_threads():  # CrypTen's softmax swaps its config: one per party thread
            return run_parties(lambda: party(0, ch0), lambda: party(1, ch1), timeout_s=60)
    finally:
        crypten.cfg.communicator.verbose = previous


def test_arithmetic_and_comparisons_match_plaintext() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=gen)
    w = torch.randn(8, 5, generator=gen)
    y = torch.randn(6, 8, generator=gen)

    def body(rank: int, comm: ChannelCommunicator, ledger: Ledger) -> dict[str, torch.Tensor]:
        cx = crypten.cryptensor(x, src=0)
        cw = crypten.cryptensor(w, src=1)
        cy = crypten.cryptensor(y, src=1)
        return {
            "mul": plain(cx * cy),
            "matmul": plain(cx.matmul(cw)),
            "softmax": plain(cx.softmax(-1)),
            "gt": plain(cx > cy),
            "lt0": plain(cx < 0),
            "relu": plain(cx.relu()),
            "max": plain(cx.max(dim=-1)[0]),
        }

    out0, out1 = two_parties(body)
    expected = {"mul": x * y, "matmul": x @ w, "softmax": x.softmax(-1), "gt": (x > y).float(),
                "lt0": (x < 0).float(), "relu": x.relu(), "max": x.max(dim=-1)[0]}
    for name, want in expected.items():
        tol = SOFTMAX_TOL if name == "softmax" else TOL
        assert torch.allclose(out0[name], want, atol=tol, rtol=0), name
        assert torch.equal(out0[name], out1[name]), f"{name}: parties disagree"


def test_ledger_rounds_and_payload_match_crypten_stats() -> None:
    x = torch.randn(4, 16)

    def body(rank: int, comm: ChannelCommunicator, ledger: Ledger) -> tuple[dict, int, int]:
        comm.reset_communication_stats()
        ledger.reset()
        before = comm.channel.stats.payload_sent + comm.channel.stats.payload_recv
        cx = crypten.cryptensor(x, src=0)
        (cx.softmax(-1) * cx).sum().get_plain_text()
        payload = comm.channel.stats.payload_sent + comm.channel.stats.payload_recv - before
        return comm.get_communication_stats(), ledger.totals().rounds, payload

    (stats0, rounds0, payload0), (stats1, rounds1, payload1) = two_parties(body, verbose=True)
    assert stats0["rounds"] > 10 and stats0["rounds"] == stats1["rounds"]
    assert rounds0 == stats0["rounds"] and rounds1 == stats1["rounds"]
    assert payload0 == stats0["bytes"] and payload1 == stats1["bytes"]


def test_collectives_directly() -> None:
    def body(rank: int, comm: ChannelCommunicator, ledger: Ledger) -> dict[str, Any]:
        mine = torch.tensor([[1, 2], [3, 4]]) * (rank + 1)
        out: dict[str, Any] = {}
        out["sum"] = comm.all_reduce(mine)
        out["xor"] = comm.all_reduce([mine, mine[0]], op=ReduceOp.BXOR, batched=True)
        out["reduce"] = comm.reduce(mine, 1)
        out["gather"] = comm.gather(mine, 0)
        out["all_gather"] = comm.all_gather(mine)
        out["scatter"] = comm.scatter([torch.tensor([10]), torch.tensor([20])] if rank == 0 else
                                      [torch.zeros(1, dtype=torch.long)] * 2, 0)
        seed = torch.tensor(42 if rank == 0 else 0)
        out["broadcast"] = comm.broadcast(seed, 0).item()
        pair = [torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long)]
        if rank == 1:
            pair = [torch.tensor([1, 2]), torch.tensor([3, 4, 5])]
        comm.broadcast(pair, 1, batched=True)
        out["bcast_batched"] = pair
        comm.barrier()
        if rank == 0:
            comm.send(torch.tensor([7, 8]), 1)
            out["p2p"] = comm.recv(torch.zeros(3, dtype=torch.long), 1)
        else:
            out["p2p"] = comm.recv(torch.zeros(2, dtype=torch.long), 0)
            comm.send(torch.tensor([9, 9, 9]), 0)
        out["obj"] = comm.broadcast_obj((torch.Size([2, 3]), {"k": [1.5, None, "s"]}, torch.arange(3)) if rank == 0
                                        else None, 0)
        if rank == 1:
            comm.send_obj({"n": 5}, 0)
        else:
            out["recv_obj"] = comm.recv_obj(1)
        out["rounds"] = ledger.totals().rounds
        return out

    r0, r1 = two_parties(body)
    base = torch.tensor([[1, 2], [3, 4]])
    for r in (r0, r1):
        assert torch.equal(r["sum"], base * 3)
        assert torch.equal(r["xor"][0], base ^ (base * 2)) and torch.equal(r["xor"][1], base[0] ^ (base[0] * 2))
        assert r["broadcast"] == 42
        assert [t.tolist() for t in r["bcast_batched"]] == [[1, 2], [3, 4, 5]]
        assert [t.tolist() for t in r["all_gather"]] == [base.tolist(), (base * 2).tolist()]
        size, meta, tensor = r["obj"]
        assert size == torch.Size([2, 3]) and isinstance(size, torch.Size)
        assert meta == {"k": [1.5, None, "s"]} and tensor.tolist() == [0, 1, 2]
    assert r0["reduce"] is None and torch.equal(r1["reduce"], base * 3)
    assert [t.tolist() for t in r0["gather"]] == [base.tolist(), (base * 2).tolist()] and r1["gather"] == [None]
    assert r0["scatter"].tolist() == [10] and r1["scatter"].tolist() == [20]
    assert r1["p2p"].tolist() == [7, 8] and r0["p2p"].tolist() == [9, 9, 9]
    assert r0["recv_obj"] == {"n": 5}
    # init (seed exchange + global seed) 2, then 9 collectives, 1 receive, broadcast_obj, recv_obj
    assert r0["rounds"] == 2 + 9 + 1 + 1 + 1 and r1["rounds"] == 2 + 9 + 1 + 1


def test_parties_issuing_different_calls_fail_clearly() -> None:
    def body(rank: int, comm: ChannelCommunicator, ledger: Ledger) -> None:
        if rank == 0:
            comm.all_reduce(torch.ones(3, dtype=torch.long))
        else:
            comm.broadcast(torch.ones(3, dtype=torch.long), 1)

    with pytest.raises(ProtocolError, match="expected 'crypten.all_reduce' from client, got 'crypten.broadcast'"):
        two_parties(body)


def test_unsupported_calls_raise() -> None:
    def body(rank: int, comm: ChannelCommunicator, ledger: Ledger) -> list[str]:
        errors = []
        for call in (lambda: comm.send_obj(object(), 1 - rank),
                     lambda: comm.all_reduce(torch.ones(2, dtype=torch.long), op=ReduceOp.MAX),
                     lambda: comm.broadcast(torch.ones(1), 0, group=object()),
                     lambda: comm.send(torch.ones(1), rank),
                     lambda: comm.get_ttp_rank()):
            with pytest.raises(CommunicatorError) as info:
                call()
            errors.append(str(info.value))
        return errors

    errors, _ = two_parties(body)
    assert "without pickle" in errors[0] and "not supported" in errors[1]
    assert "process groups" in errors[2] and "not the peer" in errors[3] and "TTP" in errors[4]


def test_install_rules_and_restore() -> None:
    original = crypten.communicator.DistributedCommunicator
    original_generators = crypten.generators
    a, _ = memory_pair("a", "b")
    with pytest.raises(CommunicatorError, match="rank must be 0 or 1"):
        install(a, 2)
    with pytest.raises(CommunicatorError, match="needs a protocols.net.channels.Channel"):
        install(object(), 0)  # type: ignore[arg-type]
    with pytest.raises(CommunicatorError, match="randomness must be one of"):
        install(a, 0, randomness="torch")
    install(a, 0)
    try:
        assert crypten.communicator.DistributedCommunicator is ChannelCommunicator
        with pytest.raises(CommunicatorError, match="another party is already installed"):
            install(a, 1)
    finally:
        uninstall()
    assert crypten.communicator.DistributedCommunicator is original
    assert crypten.generators is original_generators
    with pytest.raises(CommunicatorError, match="before crypten.init"):
        ChannelCommunicator.initialize(0, 1)
