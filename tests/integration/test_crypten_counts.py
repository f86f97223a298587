"""CrypTen's own gloo communicator vs ours over gRPC + mTLS: same rounds, same bytes.

Two real process pairs run one small CrypTen workload: (a) CrypTen's DistributedCommunicator
over torch.distributed (gloo), (b) ChannelCommunicator over a GrpcChannel with mutual TLS.
CrypTen's verbose statistics must agree exactly between (a) and (b), our transport's payload
bytes must equal CrypTen's byte count, and the ledger's rounds CrypTen's round count. The gRPC
pair also measures its channel's throughput for a 64 MiB exchange.

Run as a script, this file is one party: ``python test_crypten_counts.py gloo|grpc RANK ...``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

THIS = Path(__file__).resolve()
SEED = 1234
BULK_MIB = 64


def _inputs() -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(16, 32, generator=gen), torch.randn(32, 24, generator=gen)


def _workload(crypten: Any) -> dict[str, Any]:
    """The same CrypTen calls in both modes; returns exactly decoded outputs."""
    x, w = _inputs()
    cx = crypten.cryptensor(x, src=0)
    cw = crypten.cryptensor(w, src=1)
    h = cx.matmul(cw)
    out = {"matmul": h, "softmax": h.softmax(-1), "relu_mul": h.relu() * h, "gt": (h > 0.5)}
    return {k: (v._tensor.reveal().double() / v._tensor.encoder.scale).tolist() for k, v in out.items()}


def _party_gloo(rank: int, rendezvous: str) -> dict[str, Any]:
    os.environ.update(DISTRIBUTED_BACKEND="gloo", RENDEZVOUS=rendezvous, WORLD_SIZE="2", RANK=str(rank))
    from protocols.mpc.cryptenlib import crypten

    crypten.cfg.communicator.verbose = True
    crypten.init()
    comm = crypten.communicator.get()
    comm.reset_communication_stats()
    started = time.perf_counter()
    outputs = _workload(crypten)
    seconds = time.perf_counter() - started
    stats = comm.get_communication_stats()
    crypten.uninit()
    return {"stats": {"rounds": stats["rounds"], "bytes": stats["bytes"]}, "outputs": outputs, "seconds": seconds}


def _bulk_exchange(channel: Any) -> dict[str, float]:
    """64 MiB one way, then 64 MiB both ways at once (CrypTen's all_reduce pattern)."""
    import numpy as np

    data = np.arange(BULK_MIB << 17, dtype=np.int64)
    result = {}
    for mode in ("one_way", "both_ways"):
        channel.send_json("bulk.go", mode)
        channel.recv_json("bulk.go")
        started = time.perf_counter()
        if channel.local == "client" or mode == "both_ways":
            channel.send("bulk", data)
        if channel.local == "server" or mode == "both_ways":
            if not np.array_equal(channel.recv("bulk"), data):
                raise AssertionError("bulk data corrupted")
        channel.send_json("bulk.done", mode)
        channel.recv_json("bulk.done")
        result[mode] = BULK_MIB / (time.perf_counter() - started)
    return result


def _party_grpc(rank: int, cert_dir: str, address: str | None) -> dict[str, Any]:
    from privinf.ledger.counting import Ledger
    from protocols.mpc.cryptenlib import crypten, crypten_session
    from protocols.net.certs import TlsConfig
    from protocols.net.grpc_link import PartyServer, connect

    role, peer = ("server", "client") if rank == 0 else ("client", "server")
    tls = TlsConfig.load(cert_dir, role)
    ledger = Ledger(role)
    server = None
    if rank == 0:
        server = PartyServer(tls, peers=("client",)).start()
        print(f"PORT {server.port}", flush=True)  # announce, the test starts the client on it
        channel = server.accept("counts", "client", timeout=60, ledger=ledger)
    else:
        channel = connect(address, tls, "server", "counts", ledger, timeout=60)
    crypten.cfg.communicator.verbose = True
    with crypten_session(channel, rank, ledger, randomness="crypten") as comm:
        comm.reset_communication_stats()
        ledger.reset()
        before = channel.stats.payload_sent + channel.stats.payload_recv
        started = time.perf_counter()
        outputs = _workload(crypten)
        seconds = time.perf_counter() - started
        payload = channel.stats.payload_sent + channel.stats.payload_recv - before
        stats = comm.get_communication_stats()
        rounds = ledger.totals().rounds
    throughput = _bulk_exchange(channel)
    channel.close()
    channel.wait_peer_closed(10)
    if server is not None:
        server.stop()
    return {"stats": {"rounds": stats["rounds"], "bytes": stats["bytes"]}, "outputs": outputs, "seconds": seconds,
            "payload_bytes": payload, "ledger_rounds": rounds, "mib_s": throughput}


def _spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(THIS), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _result(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate(timeout=90)
    if proc.returncode != 0:
        raise AssertionError(f"party failed (exit {proc.returncode}):\n{err[-3000:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _close_to_plain(outputs: dict[str, Any]) -> None:
    import torch

    x, w = _inputs()
    h = x @ w
    want = {"matmul": h, "softmax": h.softmax(-1), "relu_mul": h.relu() * h, "gt": (h > 0.5).double()}
    tolerance = {"matmul": 1e-3, "softmax": 2e-2, "relu_mul": 5e-2, "gt": 0}
    for name, value in want.items():
        got = torch.tensor(outputs[name], dtype=torch.float64)
        assert torch.allclose(got, value.double(), atol=tolerance[name], rtol=1e-3), name


def test_same_counts_as_gloo(tmp_path: Path) -> None:
    from protocols.net.certs import write_certs

    write_certs(tmp_path / "certs", roles=("server", "client"))
    gloo = [_spawn("gloo", str(rank), f"file://{tmp_path / 'rendezvous'}") for rank in (0, 1)]
    server = _spawn("grpc", "0", str(tmp_path / "certs"))
    port_line = server.stdout.readline()
    if not port_line.startswith("PORT "):
        server.kill()
        raise AssertionError(f"server did not announce its port: {port_line!r} {server.stderr.read()[-2000:]}")
    client = _spawn("grpc", "1", str(tmp_path / "certs"), f"127.0.0.1:{int(port_line.split()[1])}")
    gloo_out = [_result(p) for p in gloo]
    grpc_out = [_result(p) for p in (server, client)]

    for rank in (0, 1):
        ours, theirs = grpc_out[rank], gloo_out[rank]
        assert ours["stats"] == theirs["stats"], f"rank {rank}: CrypTen stats differ from gloo"
        assert ours["payload_bytes"] == ours["stats"]["bytes"], f"rank {rank}: transport payload != CrypTen bytes"
        assert ours["ledger_rounds"] == ours["stats"]["rounds"], f"rank {rank}: ledger rounds != CrypTen rounds"
        _close_to_plain(ours["outputs"])
        _close_to_plain(theirs["outputs"])
    assert grpc_out[0]["stats"]["rounds"] > 20
    mib_s = grpc_out[1]["mib_s"]
    print(f"\nrounds {grpc_out[0]['stats']['rounds']}, CrypTen bytes/party {grpc_out[0]['stats']['bytes']}; "
          f"workload s: gloo {gloo_out[0]['seconds']:.3f}, grpc {grpc_out[0]['seconds']:.3f}; "
          f"gRPC 64 MiB: one way {mib_s['one_way']:.0f} MiB/s, both ways {mib_s['both_ways']:.0f} MiB/s per direction")
    assert min(mib_s.values()) > 5


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    mode, rank = argv[0], int(argv[1])
    result = _party_gloo(rank, argv[2]) if mode == "gloo" else _party_grpc(rank, argv[2], argv[3] if rank else None)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
