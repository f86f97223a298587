"""EE route over in-memory channels (and once over gRPC + mTLS): equal to plaintext, generation with
the compute node's KV cache, what the compute node receives, ledger rows, refusals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from models.bundle import ModelBundle
from models.registry import load_model
from models.toy import make_input, make_model
from models.variants import as_variant
from privinf.ledger.counting import Ledger, Phase
from protocols.net.certs import write_certs
from protocols.net.channels import Channel, PeerAborted, memory_pair, run_parties
from protocols.net.grpc_link import PartyServer, connect
from protocols.routes.ee import (
    TAG_INPUT,
    TAG_ROW_COUNTS,
    TAG_ROWS,
    TAG_WEIGHT,
    EeOwner,
    EeProtocolError,
    RowReceiver,
    RowSender,
    serve_ee_session,
)
from protocols.routes.plain import run_plain

SEED = bytes(range(16))


class _Spec:
    def __init__(self, model: str) -> None:
        self.session, self.protocol, self.model, self.variant = "t", "ee", model, "exact"


class _Config:
    def __init__(self, model: str, variant: str = "exact") -> None:
        self.model = type("ModelChoice", (), {"name": model, "variant": variant, "overrides": None})()


def _recording(channel: Channel, log: list[tuple[str, Any]]) -> Channel:
    """Wrap ``channel.recv`` so every array the compute node receives lands in ``log``."""
    plain_recv = channel.recv

    def recv(tag: str, timeout: float | None = None) -> Any:
        value = plain_recv(tag, timeout)
        log.append((tag, value))
        return value

    channel.recv = recv
    return channel


def _session(bundle: ModelBundle, owner_work: Callable[[EeOwner], Any], variant: str = "exact",
             received: list | None = None) -> Any:
    lc, ls = Ledger("client"), Ledger("server")
    c, s = memory_pair("client", "server", "t", lc, ls)
    if received is not None:
        _recording(s, received)
    owner = EeOwner(_Spec(bundle.name), _Config(bundle.name), c, lc, bundle=bundle, seed=SEED)

    def run_owner() -> Any:
        try:
            owner.start()
            out = owner_work(owner)
            owner.finish()
            return out
        except BaseException as exc:
            c.abort(f"owner failed: {exc}")
            raise

    def run_node() -> None:
        try:
            serve_ee_session(_Spec(bundle.name), _Config(bundle.name, variant), s, ls)
        except BaseException as exc:
            s.abort(f"compute node failed: {exc}")
            raise

    return run_parties(run_owner, run_node, timeout_s=300)[0]


def _toy_bundle(family: str) -> ModelBundle:
    model = make_model(family)
    kind = "image" if family == "vit" else "text"
    return ModelBundle(f"toy-{family}", model.config, model, kind, lambda x: x, lambda raw: raw, as_variant("exact"))


@pytest.mark.parametrize("name", ["gpt2-tiny", "vit-tiny", "minilm"])
def test_ee_inference_equals_plaintext(name: str) -> None:
    bundle = load_model(name)
    value = torch.rand(3, 16, 16) if bundle.input_kind == "image" else "Private inference keeps secrets."
    output, rows = _session(bundle, lambda owner: owner.infer(value))
    want = run_plain(bundle, value)
    key = "embedding" if name == "minilm" else "logits" if name == "vit-tiny" else None
    if key is None:
        assert output == want.output
    else:
        got, ref = torch.tensor(output[key]), torch.tensor(want.output[key])
        assert (got - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
    client_rows, server_rows = rows
    assert any(r.name == f"{name}.layer.0.attn" and r.party == "server" for r in server_rows)
    storage = sum(r.counters.storage.get("ee_weights", 0) for r in server_rows)
    assert storage == 4 * sum(p.numel() for p in bundle.model.parameters())
    assert sum(r.counters.storage.get("ee_key", 0) for r in client_rows) > 0
    shipped = [r for r in client_rows if r.phase == Phase.OFFLINE and r.op == "ship"]
    assert shipped and shipped[0].counters.bytes_sent >= storage
    online = [r for r in client_rows if r.phase == Phase.ONLINE]
    assert sum(r.counters.rounds for r in online) == 1


def test_ee_generation_on_the_compute_node_equals_plaintext_greedy() -> None:
    bundle = load_model("gpt2-tiny")

    def work(owner: EeOwner) -> Any:
        return [owner.generate(prompt, 6) for prompt in ("hello", "Secret sharing")]

    results = _session(bundle, work)
    for prompt, (output, rows) in zip(("hello", "Secret sharing"), results):
        assert output["token_ids"] == bundle.model.generate_greedy(bundle.encode(prompt), 6)
        steps = {r.step for r in rows[1]}
        assert {"prefill", "decode.0", "decode.4"} <= steps


def test_compute_node_receives_only_transformed_ids_and_weights() -> None:
    bundle = _toy_bundle("gpt2")
    ids = make_input("gpt2", length=8)
    received: list[tuple[str, Any]] = []
    seen_keys = []

    def work(owner: EeOwner) -> Any:
        seen_keys.append(owner.key)
        return owner.infer(ids)

    output, _ = _session(bundle, work, received=received)
    with torch.no_grad():
        assert torch.allclose(output, bundle.model(ids)[:, -1:], atol=1e-5)  # a decoder returns the last position
    weights = [value for tag, value in received if tag == TAG_WEIGHT]
    originals = [p.detach().numpy() for p in bundle.model.parameters()]
    assert len(weights) == len(originals)
    for got, original in zip(weights, originals):
        assert got.shape == original.shape and not np.array_equal(got, original)
    [sent] = [value for tag, value in received if tag == TAG_INPUT]
    assert np.array_equal(sent, seen_keys[0].vocab[ids].numpy()) and not np.array_equal(sent, ids.numpy())


def test_ee_vit_toy_and_encoder_toy_equal_plaintext() -> None:
    for family in ("vit", "bert"):
        bundle = _toy_bundle(family)
        x = make_input(family)
        output, _ = _session(bundle, lambda owner, x=x: owner.infer(x))
        with torch.no_grad():
            assert torch.allclose(output, bundle.model(x), atol=1e-5)


def test_refusals_are_clear() -> None:
    bundle = _toy_bundle("bert")
    with pytest.raises(EeProtocolError, match="not a decoder"):
        _session(bundle, lambda owner: owner.generate(make_input("bert"), 2))
    decoder = _toy_bundle("gpt2")
    with pytest.raises(EeProtocolError, match="policy none"):
        _session(decoder, lambda owner: owner.generate(make_input("gpt2"), 2, policy="window", budget=4))
    with pytest.raises((EeProtocolError, PeerAborted), match="variant"):
        _session(decoder, lambda owner: owner.infer(make_input("gpt2")), variant="mpcformer")


def test_ee_over_grpc_with_mutual_tls(tmp_path) -> None:
    certs = write_certs(tmp_path / "certs", roles=("client", "server"))
    server = PartyServer(certs["server"], peers=("client",)).start()
    bundle = load_model("gpt2-tiny")
    lc, ls = Ledger("client"), Ledger("server")
    try:
        owner_link = connect(server.address, certs["client"], "server", "t", lc, timeout=10, timeout_s=60)
        node_link = server.accept("t", "client", timeout=10, ledger=ls, timeout_s=60)
        owner = EeOwner(_Spec(bundle.name), _Config(bundle.name), owner_link, lc, bundle=bundle, seed=SEED)

        def run_owner() -> Any:
            owner.start()
            out = owner.generate("hello", 4)
            owner.finish()
            return out

        (output, rows), _ = run_parties(run_owner, lambda: serve_ee_session(_Spec(bundle.name), _Config(bundle.name),
                                                                             node_link, ls), timeout_s=120)
        owner_link.close()
        node_link.close()
    finally:
        server.stop(grace=0)
    assert output["token_ids"] == bundle.model.generate_greedy(bundle.encode("hello"), 4)
    assert sum(r.counters.bytes_recv for r in rows[1]) > 0


def test_ledger_rows_round_trip_in_their_compact_form() -> None:
    ledger = Ledger("server")
    with ledger.phase(Phase.OFFLINE), ledger.scope("m.weights", "ship"):
        ledger.record_storage("ee_weights", 1234)
        ledger.record_send(2**40 + 3)
    with ledger.step("decode.0"), ledger.scope("m.layer.0", "block"):
        ledger.record_rounds(2)
        ledger.record_extra("tokens", 1.5)
    rows = ledger.rows()
    a, b = memory_pair("server", "client", "t")
    sender, receiver = RowSender(a), RowReceiver(b)
    sender.send(rows)
    assert receiver.recv() == rows
    frames = a.stats.frames_sent
    sender.send(rows)  # same labels: the counts array alone
    assert a.stats.frames_sent == frames + 1
    got = receiver.recv()
    assert got == rows and got[0].counters is not rows[0].counters
    got[0].counters.storage["ee_weights"] = 0  # fresh objects: the next reply is not affected
    with ledger.scope("m.layer.1", "block"):
        ledger.record_rounds(1)
    more = ledger.rows()
    sender.send(more)  # new labels: sent again
    assert receiver.recv() == more and a.stats.frames_sent == frames + 3
    sender.send([])
    assert receiver.recv() == []
    a.send(TAG_ROW_COUNTS, np.array([[2.0, 1, 0, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(EeProtocolError, match="negative"):
        receiver.recv()
    a.send(TAG_ROW_COUNTS, np.array([[9.0, 1, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0]]))
    a.send_json(TAG_ROWS, {"version": 8, "party": "server", "labels": [["x", "op", "online", ""]], "sparse": {}})
    with pytest.raises(EeProtocolError, match="label set"):
        receiver.recv()
