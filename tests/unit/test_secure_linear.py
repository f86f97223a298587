"""Weight-stationary secure linear: correctness, exact online bytes, storage, who holds what."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import pytest
import torch
from torch import nn

from privinf.ledger.counting import Ledger, Phase
from protocols.mpc import secure_linear
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.csprng import new_seed
from protocols.mpc.dealer import Dealer
from protocols.mpc.secure_linear import (
    TAG_E,
    LayerSpec,
    SecureLinearClient,
    SecureLinearError,
    SecureLinearServer,
    activation_masks,
    dealer_corrections,
    encode,
    preprocess_message,
    preprocess_server,
    server_correction,
    swap_linears,
    times_transposed,
    weight_mask,
)
from protocols.net.channels import HEADER_BYTES, memory_pair
from protocols.routes.local_run import run_crypten_parties

torch.set_num_threads(1)
CLIENT, SERVER = 0, 1


def _held_values(obj: Any) -> list[Any]:
    """Every tensor and bytes object reachable from a module's attributes (not its peers')."""
    out: list[Any] = []
    stack = list(vars(obj).values())
    while stack:
        value = stack.pop()
        if isinstance(value, (torch.Tensor, bytes)):
            out.append(value)
        elif isinstance(value, (list, tuple, deque)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return out


def _holds(obj: Any, secret: Any) -> bool:
    for value in _held_values(obj):
        if isinstance(secret, bytes) and value == secret:
            return True
        if isinstance(secret, torch.Tensor) and isinstance(value, torch.Tensor) and value.shape == secret.shape \
                and torch.equal(value, secret):
            return True
    return False


def _run(linear: nn.Linear, x: torch.Tensor, inferences: int = 1, open_early: bool = False,
         precompute: int = 0) -> dict[str, Any]:
    """Offline setup + ``inferences`` online runs of one weight-stationary layer, both parties
    (``open_early``: the client opens each input with ``open_input`` before the forward;
    ``precompute``: the client precomputes that many inferences in one call first)."""
    name = "encoder.0.attn.q"
    ledgers = {CLIENT: Ledger("client"), SERVER: Ledger("server")}
    dealer = Dealer(ledger=Ledger("dealer"))
    to_server, to_client = memory_pair("client", "server", "ws", ledgers[CLIENT], ledgers[SERVER])

    def party(rank: int, context: cp.PartyContext) -> dict[str, Any]:
        ledger = ledgers[rank]
        if rank == CLIENT:
            layer: nn.Module = SecureLinearClient(name, linear.in_features, linear.out_features, context.seed,
                                                  to_server, ledger)
            layer.receive_weight_mask()
            layer.precompute(tuple(x.shape), precompute)
            ready = len(layer._ready)
        else:
            layer = SecureLinearServer.from_linear(name, linear, context.seed, to_client, ledger)
            layer.send_weight_mask()
            preprocess_server([layer], [tuple(x.shape)], inferences, context.provider.dealer, CLIENT)
        outputs, xs, seconds, sent, rounds, early = [], [], [], [], [], []
        for i in range(inferences):
            xi = crypten.cryptensor(x * (i + 1), src=CLIENT)
            before = ledger.totals(Phase.ONLINE)
            if open_early and rank == CLIENT:
                layer.open_input(xi)
                opened = ledger.totals(Phase.ONLINE)
                early.append((opened.bytes_sent - before.bytes_sent, opened.rounds - before.rounds))
                before = opened
            started = time.perf_counter()
            y = layer(xi)
            seconds.append(time.perf_counter() - started)
            after = ledger.totals(Phase.ONLINE)
            sent.append(after.bytes_sent - before.bytes_sent)
            rounds.append(after.rounds - before.rounds)
            outputs.append(y.get_plain_text())
            xs.append(xi.share.clone())
        return {"layer": layer, "outputs": outputs, "x_share": xs, "sent": sent, "rounds": rounds,
                "seconds": seconds, "seed": context.seed, "ledger": ledger, "early": early,
                "ready": ready if rank == CLIENT else 0}

    (client, server), _ = run_crypten_parties(party, dealer=dealer, ledgers=ledgers)
    return {"client": client, "server": server, "dealer": dealer}


def _expected(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return (x.double() @ linear.weight.detach().double().t() + linear.bias.detach().double()).float()


def test_secure_linear_matches_plaintext_over_several_inferences() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    x = torch.randn(2, 5, 16)
    out = _run(linear, x, inferences=3)
    for i, (y0, y1) in enumerate(zip(out["client"]["outputs"], out["server"]["outputs"])):
        expected = _expected(linear, x * (i + 1))
        assert torch.equal(y0, y1)
        assert torch.allclose(y0, expected, atol=4 / 2 ** 16 * 16 + 1e-4), (y0 - expected).abs().max()
    assert out["client"]["layer"].inferences == out["server"]["layer"].inferences == 3


def test_online_traffic_is_the_activation_only_and_storage_is_recorded() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(12, 20)
    x = torch.randn(7, 12)
    out = _run(linear, x, inferences=2)
    tag = f"{TAG_E}.encoder.0.attn.q"
    assert out["client"]["sent"] == [7 * 12 * 8 + HEADER_BYTES + len(tag)] * 2
    assert out["client"]["rounds"] == [1, 1] and out["server"]["rounds"] == [1, 1]
    assert out["server"]["sent"] == [0, 0]
    client_store = out["client"]["ledger"].totals(Phase.OFFLINE).storage
    server_store = out["server"]["ledger"].totals(Phase.OFFLINE).storage
    assert client_store["weight_masks"] == 20 * 12 * 8
    assert server_store["triples"] == 2 * 7 * 20 * 8
    assert out["dealer"].ledger.totals(Phase.OFFLINE).storage["seeds"] == 32


def test_inferences_precomputed_in_one_pass_are_used_in_order_and_give_the_products() -> None:
    torch.manual_seed(3)
    linear = nn.Linear(16, 8)
    x = torch.randn(1, 1, 16)
    out = _run(linear, x, inferences=3, precompute=3)
    for i, (y0, y1) in enumerate(zip(out["client"]["outputs"], out["server"]["outputs"])):
        assert torch.equal(y0, y1)
        assert torch.allclose(y0, _expected(linear, x * (i + 1)), atol=4 / 2 ** 16 * 16 + 1e-4)
    assert out["client"]["ready"] == 3 and not out["client"]["layer"]._ready  # all three used in order


def test_an_input_opened_before_the_forward_is_not_sent_again_and_gives_the_same_product() -> None:
    torch.manual_seed(2)
    linear = nn.Linear(12, 20)
    x = torch.randn(3, 12)
    out = _run(linear, x, inferences=2, open_early=True)
    tag = f"{TAG_E}.encoder.0.attn.q"
    assert out["client"]["early"] == [(3 * 12 * 8 + HEADER_BYTES + len(tag), 1)] * 2
    assert out["client"]["sent"] == [0, 0] and out["client"]["rounds"] == [0, 0]
    assert out["server"]["rounds"] == [1, 1]
    for i, (y0, y1) in enumerate(zip(out["client"]["outputs"], out["server"]["outputs"])):
        assert torch.equal(y0, y1)
        assert torch.allclose(y0, _expected(linear, x * (i + 1)), atol=4 / 2 ** 16 * 12 + 1e-4)


def test_one_request_for_two_runs_gives_each_runs_corrections_expanding_each_mask_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seeds = {CLIENT: new_seed(), SERVER: new_seed()}
    prefill = [LayerSpec("l1", 4, 3, (1, 5, 4)), LayerSpec("l2", 3, 2, (1, 5, 3))]
    decode = [LayerSpec("l1", 4, 3, (1, 1, 4)), LayerSpec("l2", 3, 2, (1, 1, 3))]
    want = [server_correction(seeds[CLIENT], seeds[SERVER], spec, 7) for spec in prefill]
    want += [server_correction(seeds[CLIENT], seeds[SERVER], spec, j) for j in (8, 9) for spec in decode]
    expanded: list[str] = []
    real = secure_linear.weight_mask
    monkeypatch.setattr(secure_linear, "weight_mask", lambda seed, name, *dims: expanded.append(name) or real(
        seed, name, *dims))
    got = list(dealer_corrections(seeds, SERVER, preprocess_message([(prefill, 1), (decode, 2)], 7, CLIENT)))
    assert sorted(expanded) == ["l1", "l2"]
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    clash = [LayerSpec("l1", 4, 6, (1, 1, 4))]
    with pytest.raises(SecureLinearError, match="two weight shapes"):
        list(dealer_corrections(seeds, SERVER, preprocess_message([(prefill, 1), (clash, 1)], 0, CLIENT)))
    with pytest.raises(SecureLinearError, match="no runs"):
        list(dealer_corrections(seeds, SERVER, {"type": "ws_preprocess", "start": 0, "client_rank": CLIENT}))


def test_client_and_server_hold_none_of_each_others_secrets() -> None:
    torch.manual_seed(2)
    linear = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    out = _run(linear, x)
    client, server = out["client"]["layer"], out["server"]["layer"]
    w = encode(linear.weight, 16)
    b_mask = weight_mask(out["server"]["seed"], client.name, 4, 6)
    assert _holds(server, w) and _holds(client, w - b_mask)  # the check can see what is there
    assert not _holds(client, w) and not _holds(client, b_mask)
    assert not _holds(client, out["server"]["seed"])
    assert not _holds(server, out["client"]["seed"])
    assert not _holds(server, out["client"]["x_share"][0])
    spec = LayerSpec(client.name, 6, 4, (3, 6))
    a_mask, _ = activation_masks(out["client"]["seed"], spec, 0)
    assert not _holds(server, a_mask)
    assert not _holds(client, server_correction(out["client"]["seed"], out["server"]["seed"], spec, 0))


def test_misuse_raises_clear_errors() -> None:
    channel, _ = memory_pair("a", "b")
    client = SecureLinearClient("l", 4, 3, new_seed(), channel)
    server = SecureLinearServer("l", torch.randn(3, 4), torch.randn(3), new_seed(), channel)
    with pytest.raises(SecureLinearError, match="MPCTensor"):
        server(torch.randn(2, 4))
    with pytest.raises(SecureLinearError, match="2-D"):
        SecureLinearServer("l", torch.randn(4), None, new_seed(), channel)
    with pytest.raises(SecureLinearError, match="bias shape"):
        SecureLinearServer("l", torch.randn(3, 4), torch.randn(4), new_seed(), channel)
    with pytest.raises(SecureLinearError, match="does not end in in_features"):
        LayerSpec("l", 4, 3, (2, 5))
    with pytest.raises(SecureLinearError, match="int64"):
        server.accept_corrections(LayerSpec("l", 4, 3, (2, 4)), [torch.zeros(2, 4, dtype=torch.int64)])
    with pytest.raises(SecureLinearError, match="one input shape per layer"):
        preprocess_server([server], [], 1, channel, CLIENT)
    twin = SecureLinearServer("l", torch.randn(3, 4), None, new_seed(), channel)
    with pytest.raises(SecureLinearError, match="unique"):
        preprocess_server([server, twin], [(2, 4), (2, 4)], 1, channel, CLIENT)

    def party(rank: int, context: cp.PartyContext) -> None:
        x = crypten.cryptensor(torch.randn(2, 4), src=0)
        with pytest.raises(SecureLinearError, match="receive_weight_mask"):
            client(x)
        with pytest.raises(SecureLinearError, match="no offline correction"):
            server(x)
        with pytest.raises(SecureLinearError, match="expected \\[..., 4\\]"):
            server(crypten.cryptensor(torch.randn(2, 5), src=0))

    run_crypten_parties(party)


def test_bert_base_shape_online_bytes_and_time() -> None:
    """[128x768] @ [768x768]: the client sends 128*768*8 bytes in one message (CrypTen: 5.25 MiB/party)."""
    torch.manual_seed(3)
    linear = nn.Linear(768, 768)
    x = torch.randn(128, 768)
    out = _run(linear, x)
    assert out["client"]["sent"][0] - HEADER_BYTES - len(f"{TAG_E}.encoder.0.attn.q") == 128 * 768 * 8
    assert out["server"]["sent"] == [0]
    assert torch.allclose(out["client"]["outputs"][0], _expected(linear, x), atol=0.05)

    mpc_ledgers = {CLIENT: Ledger("client"), SERVER: Ledger("server")}

    def crypten_private_weight(rank: int, context: cp.PartyContext) -> tuple[int, float]:
        xs = crypten.cryptensor(x, src=CLIENT)
        ws = crypten.cryptensor(linear.weight.detach(), src=SERVER)
        before = mpc_ledgers[rank].totals().bytes_sent
        started = time.perf_counter()
        xs.matmul(ws.t())
        return mpc_ledgers[rank].totals().bytes_sent - before, time.perf_counter() - started

    (base, _), _ = run_crypten_parties(crypten_private_weight, mpc_ledgers=mpc_ledgers)
    # CrypTen opens x - a and W - b: 5.25 MiB per party (+ one frame header)
    assert (128 * 768 + 768 * 768) * 8 <= base[0] < (128 * 768 + 768 * 768) * 8 + 200
    print(f"\n[128x768]@[768x768] online, client->server: weight-stationary {out['client']['sent'][0]} B "
          f"(client {out['client']['seconds'][0] * 1e3:.1f} ms, server {out['server']['seconds'][0] * 1e3:.1f} ms); "
          f"CrypTen private W {base[0]} B per party ({base[1] * 1e3:.1f} ms); "
          f"ratio {base[0] / out['client']['sent'][0]:.2f}x")


def test_swap_linears_replaces_each_linear_by_path() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(4, 4)
            self.ffn = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

    model = nn.Sequential(Block(), Block())
    channel, _ = memory_pair("client", "server")
    seed = new_seed()
    names = swap_linears(model, lambda path, lin: SecureLinearClient(path, lin.weight.shape[1], lin.weight.shape[0],
                                                                     seed, channel))
    assert names == ["0.q", "0.ffn.0", "0.ffn.2", "1.q", "1.ffn.0", "1.ffn.2"]
    assert isinstance(model[1].ffn[2], SecureLinearClient) and model[1].ffn[2].name == "1.ffn.2"
    assert model[0].ffn[2].in_features == 8 and model[0].ffn[2].out_features == 4
    assert swap_linears(model, lambda path, lin: lin) == []



@pytest.mark.parametrize("rows", [1, 3])
def test_times_transposed_is_x_times_w_transposed_and_contiguous(rows: int) -> None:
    """Ring products with wrap-around, one row (matrix-vector) and several; the result keeps
    the row-major layout of ``x @ W^T`` (a transposed result view broke SmolLM2's tokens)."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randint(-2**62, 2**62, (7, 5), generator=gen)
    x = torch.randint(-2**62, 2**62, (2, rows, 5), generator=gen)
    out = times_transposed(x, weight)
    assert torch.equal(out, x @ weight.t()) and out.is_contiguous()
    assert torch.equal(times_transposed(x, weight.t().contiguous().t()), x @ weight.t())
