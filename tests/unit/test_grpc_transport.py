"""GrpcChannel and PartyServer over real gRPC + mutual TLS on loopback (one process)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from privinf.ledger.counting import Ledger
from protocols.net.certs import TlsConfig, write_certs
from protocols.net.channels import Frame, FrameKind, PeerLost, ProtocolError, run_parties
from protocols.net.grpc_link import (
    CHUNK_BYTES,
    GRPC_PREFIX_BYTES,
    FrameAssembler,
    GrpcChannel,
    PartyServer,
    PeerRefused,
    TransportConfigError,
    connect,
    encode_chunks,
)
from protocols.net.wire import pb, rpc


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    return write_certs(tmp_path_factory.mktemp("certs"), roles=("client", "server", "dealer"))


@pytest.fixture()
def server(certs: dict[str, TlsConfig]) -> Iterator[PartyServer]:
    srv = PartyServer(certs["server"], peers=("client", "dealer")).start()
    yield srv
    srv.stop(grace=0)


def _pair(server: PartyServer, tls: TlsConfig, session: str = "s1") -> tuple[GrpcChannel, GrpcChannel]:
    client = connect(server.address, tls, "server", session, Ledger(tls.role), timeout=10, timeout_s=10)
    served = server.accept(session, tls.role, timeout=10, ledger=Ledger("server"), timeout_s=10)
    return client, served


def _close(*channels: GrpcChannel) -> None:
    for channel in channels:
        channel.close()


DTYPES = ["int64", "int32", "int16", "int8", "uint8", "bool", "float64", "float32", "float16"]


def test_round_trip_dtypes_bytes_json(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    client, served = _pair(server, certs["client"])
    rng = np.random.default_rng(0)
    arrays = [(rng.standard_normal((3, 4, 5)) * 100).astype(d) for d in DTYPES]
    arrays += [np.zeros((0, 7), dtype=np.int64), np.array(3.5), np.arange(6, dtype=np.int64).reshape(2, 3).T]
    for i, array in enumerate(arrays):
        client.send(f"a{i}", array)
    client.send("raw", b"\x00\xff" * 10)
    client.send_json("meta", {"n": 3, "ok": True})
    for i, array in enumerate(arrays):
        got = served.recv(f"a{i}")
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    assert served.recv("raw") == b"\x00\xff" * 10
    assert served.recv_json("meta") == {"n": 3, "ok": True}
    served.send("reply", np.arange(4))
    np.testing.assert_array_equal(client.recv("reply"), np.arange(4))
    _close(served, client)


def test_large_message_chunks_and_counts(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    client, served = _pair(server, certs["client"])
    big = np.arange((5 << 20) // 4 + 3, dtype=np.float32)  # > 4 MiB, last chunk partial
    client.send("big", big)
    np.testing.assert_array_equal(served.recv("big"), big)
    chunks = -(-big.nbytes // CHUNK_BYTES)
    assert chunks == 6
    # the link carries payload plus a small header per chunk; both ends count the same bytes
    assert big.nbytes < client.stats.wire_sent < big.nbytes + chunks * (64 + GRPC_PREFIX_BYTES)
    assert client.stats.wire_sent == served.stats.wire_recv
    assert client.stats.payload_sent == served.stats.payload_recv == big.nbytes
    assert client.ledger.totals().bytes_sent == client.stats.wire_sent
    assert served.ledger.totals().bytes_recv == served.stats.wire_recv
    assert served.ledger.totals().messages_recv == 1
    _close(served, client)


def test_simultaneous_large_sends_do_not_deadlock(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    client, served = _pair(server, certs["client"])
    a = np.full(3 << 20, 1, dtype=np.int64)  # 24 MiB each way, both sending before receiving
    b = np.full(3 << 20, 2, dtype=np.int64)

    def exchange(channel: GrpcChannel, mine: np.ndarray) -> np.ndarray:
        channel.send("x", mine)
        return channel.recv("x")

    got_client, got_served = run_parties(lambda: exchange(client, a), lambda: exchange(served, b), timeout_s=60)
    assert (got_client == 2).all() and (got_served == 1).all()
    _close(served, client)


def test_concurrent_sessions_on_one_server(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    def session(name: str, value: int) -> list[int]:
        client = connect(server.address, certs["client"], "server", name, timeout=10, timeout_s=10)
        served = server.accept(name, "client", timeout=10, timeout_s=10)
        seen = []
        for i in range(20):
            client.send("v", np.array([value, i]))
            got = served.recv("v")
            served.send("echo", got * 2)
            seen.append(int(client.recv("echo")[0]))
        _close(served, client)
        return seen

    out_a, out_b, out_d = run_parties(lambda: session("sess-a", 1), lambda: session("sess-b", 5),
                                      lambda: session("sess-c", 9), timeout_s=60)
    assert out_a == [2] * 20 and out_b == [10] * 20 and out_d == [18] * 20


def test_same_session_different_peers(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    c_client, s_client = _pair(server, certs["client"], "shared")
    c_dealer, s_dealer = _pair(server, certs["dealer"], "shared")
    assert (s_client.peer, s_dealer.peer) == ("client", "dealer")
    c_dealer.send("t", np.array([7]))
    c_client.send("t", np.array([3]))
    assert int(s_client.recv("t")[0]) == 3 and int(s_dealer.recv("t")[0]) == 7
    _close(s_client, s_dealer, c_client, c_dealer)


def test_duplicate_session_refused(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    client, served = _pair(server, certs["client"], "dup")
    with pytest.raises(PeerRefused, match="client already has a link for session 'dup'"):
        connect(server.address, certs["client"], "server", "dup", timeout=10, timeout_s=5)
    channel, stub = _raw_stub(server, certs["client"])  # the stream itself is refused too
    call = stub.Link(iter([]), metadata=(("privinf-session", "dup"), ("privinf-role", "client")))
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    channel.close()
    _close(served, client)


def _raw_stub(server: PartyServer, tls: TlsConfig | None,
              peer_role: str = "server") -> tuple[grpc.Channel, rpc.PartyLinkStub]:
    if tls is None:
        creds = grpc.ssl_channel_credentials(root_certificates=(server.tls.ca.read_bytes()))
    else:
        ca, cert, key = tls.read()
        creds = grpc.ssl_channel_credentials(ca, key, cert)
    override = [("grpc.ssl_target_name_override", f"{peer_role}.privinf")]
    channel = grpc.secure_channel(server.address, creds, options=override)
    return channel, rpc.PartyLinkStub(channel)


def test_client_without_certificate_refused(server: PartyServer) -> None:
    channel, stub = _raw_stub(server, None)
    with pytest.raises(grpc.RpcError) as info:
        stub.Ready(pb.ReadyRequest(session="x", role="client"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    with pytest.raises(PeerLost, match="did not open session 'x'"):
        server.accept("x", "client", timeout=0.2)


def test_client_with_cert_of_other_ca_refused(server: PartyServer, tmp_path: Path) -> None:
    foreign = write_certs(tmp_path, roles=("client",))["client"]
    foreign = TlsConfig(server.tls.ca, foreign.cert, foreign.key, "client")  # trusts our CA
    # the server ends the handshake; to the client that is a closed socket
    with pytest.raises(PeerLost, match="Socket closed"):
        connect(server.address, foreign, "server", "x", timeout=5)
    with pytest.raises(PeerLost, match="did not open session"):
        server.accept("x", "client", timeout=0.2)


def test_wrong_role_claim_refused(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    dealer = certs["dealer"]
    liar = TlsConfig(dealer.ca, dealer.cert, dealer.key, "client")  # dealer's cert, claims "client"
    with pytest.raises(PeerRefused, match="certificate is for role 'dealer' but the caller claims 'client'"):
        connect(server.address, liar, "server", "x", timeout=5)
    channel, stub = _raw_stub(server, dealer)  # the stream checks the claim too
    call = stub.Link(iter([]), metadata=(("privinf-session", "x"), ("privinf-role", "client")))
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()


def test_role_not_allowed_refused(certs: dict[str, TlsConfig]) -> None:
    with PartyServer(certs["server"], peers=("client",)) as only_client:
        with pytest.raises(PeerRefused, match="role 'dealer' may not connect"):
            connect(only_client.address, certs["dealer"], "server", "x", timeout=5)


def test_server_must_have_expected_role(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    with pytest.raises(PeerRefused, match="Hostname Verification"):
        connect(server.address, certs["client"], "dealer", "x", timeout=5)


def test_unreachable_peer_is_lost(certs: dict[str, TlsConfig]) -> None:
    srv = PartyServer(certs["server"]).start()
    address = srv.address
    srv.stop(grace=0)
    with pytest.raises(PeerLost, match="unreachable"):
        connect(address, certs["client"], "server", "x", timeout=5)


def test_server_stop_is_peer_lost_quickly(certs: dict[str, TlsConfig]) -> None:
    srv = PartyServer(certs["server"]).start()
    client, served = _pair(srv, certs["client"])
    threading.Timer(0.3, lambda: srv.stop(grace=0)).start()
    started = time.perf_counter()
    with pytest.raises(PeerLost, match="server"):
        client.recv("never", timeout=30)
    assert time.perf_counter() - started < 10
    with pytest.raises(PeerLost):
        client.send("after", np.array([1]))
    client.close()


def test_client_dropped_is_peer_lost_quickly(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    client, served = _pair(server, certs["client"])
    client.send("last", np.array([1]))
    threading.Timer(0.3, client.drop).start()
    started = time.perf_counter()
    np.testing.assert_array_equal(served.recv("last"), [1])  # what was sent before still arrives
    with pytest.raises(PeerLost, match="client"):
        served.recv("never", timeout=30)
    assert time.perf_counter() - started < 10
    served.close()


def test_orderly_close_seen_by_peer(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    client, served = _pair(server, certs["client"])

    def dialer() -> None:
        client.send("bye", np.array([5]))
        client.close()  # returns once the serving end has closed too

    def serving() -> int:
        value = int(served.recv("bye")[0])
        with pytest.raises(PeerLost, match="client closed the session"):
            served.recv("more")
        served.close()
        return value

    assert run_parties(dialer, serving, timeout_s=30) == [None, 5]
    assert client.wait_peer_closed(0) and served.wait_peer_closed(5)


def test_abort_reaches_peer(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    from protocols.net.channels import PeerAborted

    client, served = _pair(server, certs["client"])
    served.abort("x" * 5000)
    with pytest.raises(PeerAborted, match="server aborted"):
        client.recv("anything")
    client.close()


def _crafted(server: PartyServer, tls: TlsConfig, frames: list[pb.Frame], session: str
             ) -> tuple[GrpcChannel, grpc.Channel, grpc.Call]:
    """Send hand-made chunks on a raw stream; return the server's channel, the raw channel, the call."""
    channel, stub = _raw_stub(server, tls)
    call = stub.Link(iter(frames), metadata=(("privinf-session", session), ("privinf-role", tls.role)))
    return server.accept(session, tls.role, timeout=10, timeout_s=10), channel, call


def _chunks(session: str, seq: int, tag: str, array: np.ndarray, chunk: int) -> list[pb.Frame]:
    frame = Frame(session, seq, tag, FrameKind.DATA, array.dtype.name, array.shape, array.tobytes())
    return encode_chunks(frame, chunk)[0]


def test_out_of_order_frame_is_protocol_error(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    frames = _chunks("ooo", 1, "t", np.arange(4), 1 << 20) + _chunks("ooo", 0, "t", np.arange(4), 1 << 20)
    served, channel, call = _crafted(server, certs["client"], frames, "ooo")
    with pytest.raises(ProtocolError, match="out of order"):
        served.recv("t")
    served.close()
    call.cancel()
    channel.close()


def test_truncated_chunk_set_is_protocol_error(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    first = _chunks("trunc", 0, "t", np.arange(12), 32)[:2]  # 96 bytes in 3 chunks; only 2 sent
    frames = first + _chunks("trunc", 1, "t", np.arange(4), 32)
    served, channel, call = _crafted(server, certs["client"], frames, "trunc")
    with pytest.raises(ProtocolError, match="frame 0 truncated: frame 1 began after 2 of 3 chunks"):
        served.recv("t")
    with pytest.raises(ProtocolError):  # the link stays failed
        served.recv("t")
    served.close()
    call.cancel()
    channel.close()


def test_wrong_session_frame_is_protocol_error(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    served, channel, call = _crafted(server, certs["client"], _chunks("other", 0, "t", np.arange(2), 64), "mine")
    with pytest.raises(ProtocolError, match="session 'other', expected 'mine'"):
        served.recv("t")
    served.close()
    call.cancel()
    channel.close()


def _head(**overrides: object) -> pb.Frame:
    fields = dict(session="s", seq=0, tag="t", kind=pb.FRAME_KIND_DATA, dtype="int64", shape=[2],
                  chunk_index=0, chunk_count=1, total_bytes=16, payload=b"\x00" * 16)
    fields.update(overrides)
    return pb.Frame(**fields)


@pytest.mark.parametrize("overrides, message", [
    ({"dtype": "object"}, "unknown dtype 'object'"),
    ({"kind": 9}, "unknown kind 9"),
    ({"shape": [3]}, "needs 24 bytes, header says 16"),
    ({"chunk_index": 1, "chunk_count": 2}, "earlier chunks missing"),
    ({"payload": b"\x00" * 8}, "has 8 bytes, header says 16"),
    ({"payload": b"\x00" * 24}, "more than its 16 bytes"),
    ({"dtype": "bytes", "shape": [15]}, r"bytes shape \[15\] != \[16\]"),
    ({"total_bytes": 1 << 40, "shape": [1 << 37], "chunk_count": 1 << 20}, "above the"),
    ({"total_bytes": 4 << 20, "shape": [1 << 19]}, "1 chunks cannot hold"),
])
def test_assembler_rejects_bad_frames(overrides: dict, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        FrameAssembler("peer").feed(_head(**overrides))


def test_assembler_rejects_disagreeing_chunks() -> None:
    assembler = FrameAssembler("peer")
    assert assembler.feed(_head(chunk_count=2, payload=b"\x00" * 8)) is None
    assert "1 of 2 chunks" in assembler.pending()
    with pytest.raises(ProtocolError, match="disagrees on tag"):
        assembler.feed(_head(chunk_index=1, chunk_count=2, tag="u", payload=b"\x00" * 8))
    assembler = FrameAssembler("peer")
    assembler.feed(_head(chunk_count=2, payload=b"\x00" * 8))
    with pytest.raises(ProtocolError, match="chunk 3 arrived, expected 1"):
        assembler.feed(_head(chunk_index=3, chunk_count=2, payload=b"\x00" * 8))


def test_bad_arguments(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    with pytest.raises(TransportConfigError, match="invalid session id"):
        connect(server.address, certs["client"], "server", "bad session!", timeout=1)
    with pytest.raises(TransportConfigError, match="chunk size"):
        GrpcChannel("a", "b", "s", chunk_bytes=0)
    with pytest.raises(ValueError, match="invalid role name"):
        server.accept("s", "Not A Role", timeout=0.1)


def test_throughput_64_mib_exchange(server: PartyServer, certs: dict[str, TlsConfig]) -> None:
    """Both parties send 64 MiB at once (the all_reduce pattern); both ends in this process."""
    client, served = _pair(server, certs["client"])
    data = np.arange(8 << 20, dtype=np.int64)

    def exchange(channel: GrpcChannel) -> bool:
        channel.send("bulk", data)
        return bool(np.array_equal(channel.recv("bulk", timeout=120), data))

    started = time.perf_counter()
    assert run_parties(lambda: exchange(client), lambda: exchange(served), timeout_s=180) == [True, True]
    seconds = time.perf_counter() - started
    print(f"\n64 MiB each way at once, one process: {64 / seconds:.0f} MiB/s per direction")
    assert 64 / seconds > 5
    _close(served, client)


_CHILD = """
import sys
from protocols.net.certs import TlsConfig
from protocols.net.grpc_link import connect
channel = connect(sys.argv[1], TlsConfig.load(sys.argv[2], "client"), "server", sys.argv[3], timeout=30)
channel.send("hello", b"hi")
sys.stdin.read()
"""


@pytest.mark.integration
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_dead_or_frozen_peer_process_is_lost(server: PartyServer, certs: dict[str, TlsConfig],
                                             signal_name: str) -> None:
    """A killed peer resets the connection; a frozen one stops answering keepalive pings."""
    import signal
    import subprocess
    import sys

    session = f"proc-{signal_name.lower()}"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, server.address, str(certs["client"].cert.parent), session],
                             stdin=subprocess.PIPE)
    try:
        served = server.accept(session, "client", timeout=30, timeout_s=30)
        assert served.recv("hello") == b"hi"
        child.send_signal(getattr(signal, signal_name))
        started = time.perf_counter()
        with pytest.raises(PeerLost, match="client"):
            served.recv("never")
        assert time.perf_counter() - started < 10
    finally:
        child.kill()
        child.wait()
