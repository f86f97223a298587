"""The MPC protocol end to end on in-memory channels (client, server, dealer as threads),
checked against the plaintext reference protocol: one test body for every protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from models.registry import load_model
from mpc_parties.handshake import SessionSpec
from privinf.ledger.counting import Ledger, Phase
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_local_session
from protocols.routes.mpc import MpcClient, MpcInputError, MpcServer
from protocols.routes.plain import run_plain


@dataclass
class Run:
    outputs: list[Any]
    rows: list[list[list[Any]]]
    client: MpcClient
    server: MpcServer


def run_mpc(model: str, variant: str, inputs: list[Any], preprocess: int = 1) -> Run:
    def work(client: MpcClient) -> tuple[list[Any], list[Any]]:
        outs, rows = [], []
        for value in inputs:
            out, party_rows = client.infer(value)
            outs.append(out)
            rows.append(party_rows)
        return outs, rows

    session = run_local_session(model, variant, work, ProtocolConfig(preprocess=preprocess), timeout_s=300)
    outs, rows = session.result
    return Run(outs, rows, session.client, session.server)


def _plain(model: str, variant: str, value: Any) -> Any:
    return run_plain(load_model(model, variant), value)


@pytest.mark.parametrize("variant", ["exact", "mpcformer"])
def test_gpt2_tiny_matches_plaintext(crypten_threads: Any, variant: str) -> None:
    run = run_mpc("gpt2-tiny", variant, ["private text", "private text"], preprocess=2)
    want = _plain("gpt2-tiny", variant, "private text")
    for got in run.outputs:
        assert got == want.output
    assert (run.client.last_raw - want.raw).abs().max() < 0.05
    first, second = run.rows
    # the second inference used preprocessed material: its online dealer traffic is zero
    def online_dealer_sent(rows: list[Any]) -> int:
        return sum(r.counters.bytes_sent for r in rows[2] if r.phase == Phase.ONLINE)
    assert online_dealer_sent(first) > 0
    assert online_dealer_sent(second) == 0


def test_vit_tiny_matches_plaintext(crypten_threads: Any) -> None:
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    run = run_mpc("vit-tiny", "mpcformer", [image])
    want = _plain("vit-tiny", "mpcformer", image)
    assert (run.client.last_raw - want.raw).abs().max() < 0.05
    assert run.outputs[0]["class"] == want.output["class"]


def test_each_party_holds_only_its_own_secrets(crypten_threads: Any) -> None:
    run = run_mpc("gpt2-tiny", "mpcformer", ["abc"])
    server_weights = load_model("gpt2-tiny", "mpcformer").model.state_dict()
    # the client's architecture has no weights: every parameter it still has is zero
    for name, param in run.client.model.named_parameters():
        assert not param.any(), name
    # it holds masked weights F = W - B only, never W
    masked = [m._masked_weight for m in run.client.model.modules() if hasattr(m, "_masked_weight")]
    assert masked
    w = server_weights["layer.0.attn.q.weight"]
    encoded = torch.round(w.double() * 65536).long()
    assert not any(f.shape == encoded.shape and torch.equal(f, encoded) for f in masked)
    # the server never held the input: nothing it received decodes to the client's one-hot ids
    assert run.server.inferences == 1


def test_linear_layers_send_only_the_activation(crypten_threads: Any) -> None:
    run = run_mpc("gpt2-tiny", "mpcformer", ["hello"])
    client_rows, server_rows, _ = run.rows[0]
    q_client = [r for r in client_rows if r.name.endswith("layer.0.attn.q") and r.phase == Phase.ONLINE]
    q_server = [r for r in server_rows if r.name.endswith("layer.0.attn.q") and r.phase == Phase.ONLINE]
    tokens, hidden = 5, 64
    assert q_client[0].counters.bytes_sent >= tokens * hidden * 8
    assert q_client[0].counters.bytes_sent < tokens * hidden * 8 + 200
    assert q_client[0].counters.rounds == 1
    assert sum(r.counters.bytes_sent for r in q_server) == 0
    # k and v read the same input as q: its opening is reused, they send nothing online
    for leaf in ("k", "v"):
        rows = [r for r in client_rows if r.name.endswith(f"layer.0.attn.{leaf}") and r.phase == Phase.ONLINE]
        assert sum(r.counters.bytes_sent for r in rows) == 0 and sum(r.counters.rounds for r in rows) == 0


def test_bad_input_is_refused_before_anything_is_shared(crypten_threads: Any) -> None:
    spec = SessionSpec(session="t2", protocol="mpc", model="vit-tiny", variant="exact")
    client = MpcClient(spec, None, None, None, Ledger("client"))  # type: ignore[arg-type]
    client.bundle = load_model("vit-tiny", "exact")
    client.vocab = None
    bad = torch.rand(3, 16, 16)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(MpcInputError, match="NaN"):
        client.encode(bad)
    with pytest.raises(MpcInputError, match="fixed-point range"):
        client.encode(torch.full((3, 16, 16), 1e6))
    with pytest.raises(ValueError, match="shape"):
        client.encode(torch.rand(3, 8, 8))
