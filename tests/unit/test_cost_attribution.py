"""Dealer material is charged to the layer and op that consume it, online and preprocessed, and
the request labels that carry the scope to the dealer are public, bounded and checked."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from privinf.ledger.counting import ROOT_SCOPE, Ledger, Phase, Row
from privinf.ledger.reports import Report
from protocols.mpc.vocabulary import DealerError, RequestSchedule, ScopeLabel, TupleRequest
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_local_session, threaded_crypten

MODEL = "gpt2-tiny"


def test_attribute_charges_one_thread_to_a_named_scope() -> None:
    ledger = Ledger("dealer")
    other_done = threading.Event()

    def other_thread() -> None:
        ledger.record_send(7)  # follows the most recent context: the attributed scope
        other_done.set()

    with ledger.attribute("m.layer.0.attn.softmax", "softmax"):
        assert ledger.current_scope == "m.layer.0.attn.softmax" and ledger.current_op == "softmax"
        ledger.record_send(100)
        with ledger.phase(Phase.OFFLINE):
            ledger.record_send(40)
            ledger.record_storage("triples", 40)
        with ledger.attribute("m.layer.0.mlp.act", "gelu", step="decode.0"):
            ledger.record_send(5)
    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert other_done.is_set()
    ledger.record_send(1)
    cells = {(r.name, r.phase, r.step): r for r in ledger.rows()}
    softmax = cells[("m.layer.0.attn.softmax", Phase.ONLINE, "")]
    assert softmax.op == "softmax" and softmax.counters.bytes_sent == 100
    offline = cells[("m.layer.0.attn.softmax", Phase.OFFLINE, "")]
    assert offline.counters.bytes_sent == 40 and offline.counters.storage == {"triples": 40}
    assert cells[("m.layer.0.mlp.act", Phase.ONLINE, "decode.0")].op == "gelu"
    assert cells[(ROOT_SCOPE, Phase.ONLINE, "")].counters.bytes_sent == 8  # after the block: the stack's scope
    assert ledger.current_scope == ROOT_SCOPE
    with pytest.raises(ValueError, match="non-empty"):
        with ledger.attribute("", "op"):
            pass


def test_attribute_leaves_the_owner_threads_stack_alone() -> None:
    ledger = Ledger("client")
    with ledger.scope("m.layer.0", "block"):
        seen: list[str] = []

        def helper() -> None:
            with ledger.attribute("m.layer.1", "block"):
                seen.append(ledger.current_scope)
                ledger.record_recv(3)

        thread = threading.Thread(target=helper)
        thread.start()
        thread.join()
        assert seen == ["m.layer.1"] and ledger.current_scope == "m.layer.0"
        ledger.record_recv(2)
    got = {r.name: r.counters.bytes_recv for r in ledger.rows()}
    assert got["m.layer.1"] == 3 and got["m.layer.0"] == 2


def test_labels_are_public_bounded_and_checked() -> None:
    label = ScopeLabel("gpt2-tiny.layer.0.attn.softmax", "softmax", "decode.3")
    request = TupleRequest.sign((2, 3), 16).labelled(label)
    data = request.to_json()
    assert data["label"] == {"scope": label.scope, "op": "softmax", "step": "decode.3"}
    back = TupleRequest.from_json(data)
    assert back.label == label and back == TupleRequest.sign((2, 3), 16)  # labels never change the material
    assert RequestSchedule.from_json(RequestSchedule([request]).to_json())[0].label == label
    for bad in ({"scope": "x" * 201, "op": "a"}, {"scope": "a b", "op": "a"}, {"scope": "a", "op": ""},
                {"scope": "a", "op": "b", "extra": 1}, {"scope": 3, "op": "b"}, ["a", "b"]):
        with pytest.raises(DealerError, match="label"):
            TupleRequest.from_json({**TupleRequest("square", (2,)).to_json(), "label": bad})


def _dealer_sent(rows: list[Row], phase: Phase) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        if row.party == "dealer" and row.phase == phase:
            out[row.name] = out.get(row.name, 0) + row.counters.bytes_sent
    return out


@pytest.fixture(scope="module")
def two_inferences() -> list[list[list[Row]]]:
    """gpt2-tiny exact, twice in one session: online dealer material, then preprocessed."""
    def work(client: Any) -> list[list[list[Row]]]:
        return [client.infer("private text")[1] for _ in range(2)]

    with threaded_crypten():
        session = run_local_session(MODEL, "exact", work, ProtocolConfig(preprocess=2), timeout_s=300)
    return session.result


def test_online_dealer_material_lands_in_the_consuming_layer(two_inferences: Any) -> None:
    client, server, dealer = two_inferences[0]
    sent = _dealer_sent(dealer, Phase.ONLINE)
    total = sum(sent.values())
    assert total > 1_000_000
    assert sent.get(ROOT_SCOPE, 0) < total // 100  # the session row no longer holds the bulk
    softmax = f"{MODEL}.layer.0.attn.softmax"
    assert sent[softmax] > total // 20
    party_scopes = {(r.name, r.op) for r in client + server}
    dealer_scopes = {(r.name, r.op) for r in dealer if r.counters.bytes_sent}
    assert dealer_scopes - {(ROOT_SCOPE, "session")} <= party_scopes  # the same layer/op paths
    # what the dealer sent to a layer is what the parties received there from it (and more from their peer)
    received = sum(r.counters.bytes_recv for r in client + server if r.name == softmax and r.phase == Phase.ONLINE)
    assert received >= sent[softmax]


def test_preprocessed_material_is_charged_offline_to_its_layer(two_inferences: Any) -> None:
    client, server, dealer = two_inferences[1]
    assert sum(_dealer_sent(dealer, Phase.ONLINE).values()) == 0
    offline = _dealer_sent(dealer, Phase.OFFLINE)
    softmax = f"{MODEL}.layer.1.attn.softmax"
    assert offline[softmax] > sum(offline.values()) // 20
    assert offline.get(ROOT_SCOPE, 0) < sum(offline.values()) // 100
    stored = {r.name: r.counters.storage for r in client if r.phase == Phase.OFFLINE}
    assert stored[softmax].get("comparison keys", 0) > 0 and stored[softmax].get("triples", 0) > 0
    assert all("comparison keys" in stored[r.name] for r in server if r.name == softmax and r.phase == Phase.OFFLINE)


def test_chart_honours_depth_and_writes_a_png(two_inferences: Any, tmp_path: Path) -> None:
    report = Report.from_rows(*two_inferences[0], model=MODEL, protocol="mpc", variant="exact", output=None)
    full = report.chart_data()
    blocks = report.chart_data(depth=2)
    names = {r.name for r in report.rows}
    assert len(full.labels) == len(names)
    assert len(blocks.labels) == len({".".join(n.split(".")[:2]) for n in names})
    assert f"{MODEL}.layer" in blocks.labels and len(blocks.labels) < len(full.labels)
    dealer_online = blocks.mib_sent["online"]["dealer"]
    assert max(dealer_online) == dealer_online[blocks.labels.index(f"{MODEL}.layer")]
    assert "depth 2" in blocks.title
    path = report.to_png(tmp_path / "chart.png", depth=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
