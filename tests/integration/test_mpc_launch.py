"""The MPC route with real processes: dealer and server started by the launcher, the client
here or in its own processes, all over gRPC with mutual TLS."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.registry import load_model
from mpc_parties.handshake import SessionRefused
from mpc_parties.launch import local_deployment
from mpc_parties.party_config import ModelChoice
from privinf.session import connect
from protocols.net.certs import TlsConfig
from protocols.net.channels import PeerAborted, PeerLost, TransportError
from protocols.net.grpc_link import PeerRefused
from protocols.net.grpc_link import connect as dial
from protocols.routes.plain import run_plain

pytestmark = pytest.mark.integration
TEXT = "Private inference keeps the prompt secret."


def _cosine(a: list[float], b: list[float]) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))


@pytest.mark.parametrize("variant", ["exact", "mpcformer"])
def test_private_minilm_matches_plaintext(variant: str, tmp_path: Path) -> None:
    with local_deployment(ModelChoice("minilm", variant), workdir=tmp_path) as deployment:
        with connect(deployment.client) as session:
            result = session.infer(TEXT)
    want = run_plain(load_model("minilm", variant), TEXT).output
    assert _cosine(result.output["embedding"], want["embedding"]) >= 0.99
    report = json.loads(result.report.to_json())
    parties = {row["party"] for row in report["layers"]}
    assert parties == {"client", "server", "dealer"}
    assert report["estimates"]["lan"] and report["estimates"]["wan"]
    storage = report["storage_by_party"]
    assert storage["client"]["by_kind"]["weight_masks"] > 0  # F = W - B, stored by the client


def _client_subprocess(config_path: Path, text: str, report: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "privinf.cli", "party", "--role", "client", "--config", str(config_path),
         "--input", text, "--report", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_server_serves_sessions_in_turn_and_four_at_once(tmp_path: Path) -> None:
    want = run_plain(load_model("gpt2-tiny", "mpcformer"), "abc").output
    with local_deployment(ModelChoice("gpt2-tiny", "mpcformer"), workdir=tmp_path) as deployment:
        for _ in range(2):  # one after another, from this process
            with connect(deployment.client) as session:
                assert session.infer("abc").output == want
        config_path = tmp_path / "client.toml"
        clients = [_client_subprocess(config_path, "abc", tmp_path / f"r{i}.json") for i in range(4)]
        for proc in clients:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-2000:]
            assert want["next_token"] in out
        deployment.check_alive()
    for i in range(4):
        report = json.loads((tmp_path / f"r{i}.json").read_text())
        assert report["output"] == want


def test_mismatched_configs_are_refused_before_anything_moves(tmp_path: Path) -> None:
    with local_deployment(ModelChoice("gpt2-tiny", "mpcformer"), workdir=tmp_path) as deployment:
        other = replace(deployment.client, model=ModelChoice("gpt2-tiny", "exact"))
        started = time.monotonic()
        with pytest.raises(SessionRefused, match="variant mismatch"):
            connect(other).open()
        assert time.monotonic() - started < 10
        wrong_model = replace(deployment.client, model=ModelChoice("vit-tiny", "mpcformer"))
        with pytest.raises(SessionRefused, match="model mismatch"):
            connect(wrong_model).open()
        deployment.check_alive()


def test_front_door_refuses_wrong_role_and_missing_certificates(tmp_path: Path) -> None:
    with local_deployment(ModelChoice("gpt2-tiny", "mpcformer"), workdir=tmp_path) as deployment:
        certs = deployment.workdir / "certs"
        server = deployment.client.peers["server"]
        dealer_as_client = TlsConfig(certs / "ca.pem", certs / "dealer.pem", certs / "dealer.key", "client")
        with pytest.raises(PeerRefused):
            dial(server, dealer_as_client, "server", "s-wrongrole", timeout=10)
        dealer_tls = TlsConfig.load(certs, "dealer")
        with pytest.raises(PeerRefused):
            dial(server, dealer_tls, "server", "s-dealerrole", timeout=10)
        import grpc

        from protocols.net.wire import pb, rpc

        plain = grpc.insecure_channel(server)
        with pytest.raises(grpc.RpcError):
            rpc.PartyLinkStub(plain).Ready(pb.ReadyRequest(session="s-x", role="client"), timeout=5)
        plain.close()
        deployment.check_alive()


@pytest.mark.parametrize("victim", ["dealer", "server"])
def test_a_dying_party_stops_the_others_with_its_name(victim: str, tmp_path: Path) -> None:
    with local_deployment(ModelChoice("gpt2-tiny", "mpcformer"), workdir=tmp_path) as deployment:
        session = connect(deployment.client)
        session.open()
        process = next(p for p in deployment.parties if p.role == victim).process
        if victim == "server":  # the session runs in a worker the server's template forked: kill them all
            for pid in _descendants(process.pid) + [process.pid]:
                os.kill(pid, signal.SIGKILL)
        else:
            process.kill()
        started = time.monotonic()
        with pytest.raises((PeerLost, PeerAborted, TransportError)) as info:
            session.infer("abc")
        assert time.monotonic() - started < 10
        assert victim in str(info.value)
        session.close(failed=True)
        if victim == "dealer":
            server = next(p for p in deployment.parties if p.role == "server")
            assert server.log_lines.wait_for(lambda line: "failed" in line, 10), server.log_lines[-5:]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of ``pid`` (the server's template and the workers it forked)."""
    found = _children(pid)
    return found + [grand for child in found for grand in _descendants(child)]


def test_logs_hold_no_keys_or_shares(tmp_path: Path) -> None:
    with local_deployment(ModelChoice("gpt2-tiny", "mpcformer"), workdir=tmp_path) as deployment:
        with connect(deployment.client) as session:
            session.infer("secret words")
        logs = "\n".join(line for p in deployment.parties for line in p.log_lines)
    assert "session" in logs  # the parties did log
    assert "PRIVATE KEY" not in logs
    assert "tensor(" not in logs and "array(" not in logs
    assert not re.search(r"(-?\d{6,}[, ]+){4}", logs)  # no runs of ring elements
    assert "secret words" not in logs


def test_cli_launch_writes_the_report_schema(tmp_path: Path) -> None:
    report = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "privinf.cli", "launch", "--protocol", "mpc", "--model", "gpt2-tiny",
         "--variant", "mpcformer", "--input", "hi there", "--report", str(report)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "total" in proc.stdout
    data = json.loads(report.read_text())
    for key in ("model", "protocol", "variant", "output", "layers", "totals", "estimates"):
        assert key in data
    assert data["protocol"] == "mpc"
    row = data["layers"][0]
    for key in ("name", "op", "party", "phase", "bytes_sent", "bytes_recv", "rounds", "compute_s",
                "wall_s", "storage_bytes"):
        assert key in row
    assert set(data["estimates"]) >= {"lan", "wan"}


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model"),
    (["--variant", "attn=power:p=3"], "even"),
    (["--variant", "bogus"], "variant"),
    (["--device", "cuda"], "not supported yet"),
])
def test_cli_launch_bad_input_is_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "privinf.cli", "launch", "--protocol", "mpc", "--input", "x", *args],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_dying_client_stops_the_server_session_and_the_dealer(tmp_path: Path) -> None:
    with local_deployment(ModelChoice("gpt2-tiny", "mpcformer"), workdir=tmp_path) as deployment:
        script = ("import sys; from privinf.session import connect; s = connect(sys.argv[1]); s.open(); "
                  "print('open', flush=True); sys.stdin.read()")
        client = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "client.toml")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "open"
        client.kill()
        client.wait()
        server, dealer = (next(p for p in deployment.parties if p.role == r) for r in ("server", "dealer"))
        def failed(line: str) -> bool:
            return "failed" in line and "client" in line

        assert server.log_lines.wait_for(failed, 10), server.log_lines[-5:]
        assert dealer.log_lines.wait_for(failed, 10), dealer.log_lines[-5:]
        deployment.check_alive()  # the long-running parties keep serving
