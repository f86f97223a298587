"""What an unauthenticated or greedy peer can make a party hold: the hello phase's frame and
buffer limits, streams nobody accepts, per-client and global stream limits, and a shutdown that
tells the peers why (gRPC + mutual TLS on loopback, one process)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from protocols.net.certs import TlsConfig, write_certs
from protocols.net.channels import Frame, FrameKind, PeerAborted
from protocols.net.grpc_link import (
    HELLO_LIMITS,
    SESSION_LIMITS,
    GrpcChannel,
    LimitExceeded,
    PartyServer,
    PeerBusy,
    PeerRefused,
    connect,
    encode_chunks,
)
from protocols.net.wire import pb, rpc


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    return write_certs(tmp_path_factory.mktemp("certs"), roles=("client", "server", "dealer"),
                       clients=("alice", "bob"))


def _raw_call(server: PartyServer, tls: TlsConfig, session: str, frames: Iterator[pb.Frame]
              ) -> tuple[grpc.Channel, grpc.Future]:
    ca, cert, key = tls.read()
    channel = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(ca, key, cert),
                                  options=[("grpc.ssl_target_name_override", "server.privinf")])
    call = rpc.PartyLinkStub(channel).Link(frames, metadata=(("privinf-session", session),
                                                             ("privinf-role", tls.role)))
    return channel, call


def _frame(session: str, seq: int, payload: bytes) -> list[pb.Frame]:
    frame = Frame(session, seq, "t", FrameKind.DATA, "bytes", (len(payload),), payload)
    return encode_chunks(frame)[0]


def _ended_with(call: grpc.Future) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    return info.value.code()


def test_large_frame_before_the_hello_is_cut_at_its_first_chunk(certs: dict[str, TlsConfig]) -> None:
    with PartyServer(certs["server"], peers=("client",)) as server:
        head = pb.Frame(session="big", seq=0, tag="hello", kind=pb.FRAME_KIND_DATA, dtype="bytes",
                        shape=[1 << 31], chunk_index=0, chunk_count=2048, total_bytes=1 << 31,
                        payload=b"\x00" * (1 << 20))
        channel, call = _raw_call(server, certs["client"], "big", iter([head] * 3))
        served = server.accept_any("client", timeout=10, limits=HELLO_LIMITS)
        with pytest.raises(LimitExceeded, match="above the 16384-byte limit of the hello phase"):
            served.recv_json("hello", timeout=10)
        assert _ended_with(call) == grpc.StatusCode.CANCELLED  # the peer's stream is cut, not drained
        assert server.wait_until(lambda open_, _pending: open_ == 0, timeout=10)
        channel.close()


def test_many_small_frames_before_the_hello_exceed_the_buffer(certs: dict[str, TlsConfig]) -> None:
    with PartyServer(certs["server"], peers=("client",)) as server:
        frames = [chunk for seq in range(8) for chunk in _frame("many", seq, b"x" * (15 << 10))]
        channel, call = _raw_call(server, certs["client"], "many", iter(frames))
        served = server.accept_any("client", timeout=10, limits=HELLO_LIMITS)
        assert served.recv("t", timeout=10) == b"x" * (15 << 10)  # the first frame is read in time
        assert _ended_with(call) == grpc.StatusCode.CANCELLED  # the rest overflowed 64 KiB unread
        with pytest.raises(LimitExceeded, match="above the 65536-byte limit of the hello phase"):
            for _ in range(8):  # what arrived within the bound is still read, then the error
                served.recv("t", timeout=10)
        channel.close()


def test_limits_lifted_after_the_hello(certs: dict[str, TlsConfig]) -> None:
    with PartyServer(certs["server"], peers=("client",)) as server:
        client = connect(server.address, certs["client"], "server", "lift", timeout=10, timeout_s=10)
        served = server.accept("lift", "client", timeout=10, limits=HELLO_LIMITS)
        client.send_json("hello", {"n": 1})
        assert served.recv_json("hello") == {"n": 1}
        served.set_limits(SESSION_LIMITS)
        served.send_json("welcome", {})
        assert client.recv_json("welcome") == {}
        big = np.arange(1 << 20, dtype=np.int64)  # 8 MiB
        client.send("big", big)
        np.testing.assert_array_equal(served.recv("big"), big)
        served.close()
        client.close()


def test_stream_nobody_accepts_is_cut_after_the_deadline(certs: dict[str, TlsConfig]) -> None:
    with PartyServer(certs["server"], peers=("client", "server"), accept_deadline_s=0.3) as server:
        frames = _frame("orphan", 0, b"x" * 100)
        channel, call = _raw_call(server, certs["client"], "orphan", iter(frames))
        assert _ended_with(call) == grpc.StatusCode.CANCELLED
        assert server.wait_until(lambda open_, _pending: open_ == 0, timeout=10) and server.pending_count() == 0
        channel.close()


def test_cancelled_stream_is_forgotten_at_once(certs: dict[str, TlsConfig]) -> None:
    with PartyServer(certs["server"], peers=("client",), accept_deadline_s=600) as server:
        client = connect(server.address, certs["client"], "server", "gone", timeout=10, timeout_s=10)
        assert server.wait_until(lambda _open, pending: pending == 1, timeout=10)
        client.drop()
        assert server.wait_until(lambda open_, _pending: open_ == 0, timeout=10)
        assert server.pending_count() == 0


def test_per_client_stream_limit_leaves_room_for_others(certs: dict[str, TlsConfig]) -> None:
    with PartyServer(certs["server"], peers=("client",), max_sessions=8, max_streams_per_client=2) as server:
        alice = [connect(server.address, certs["client-alice"], "server", f"a{i}", timeout=10) for i in range(2)]
        with pytest.raises(PeerBusy, match=r"busy: client/alice already holds 2 links.*retry after \d+ s") as info:
            connect(server.address, certs["client-alice"], "server", "a2", timeout=10)
        assert info.value.retry_after_s > 0
        bob = connect(server.address, certs["client-bob"], "server", "b0", timeout=10, timeout_s=10)
        served = server.accept("b0", "client", timeout=10)
        bob.send("t", np.array([4]))
        assert int(served.recv("t")[0]) == 4
        served.close()
        for channel in [bob, *alice]:
            channel.drop()


def test_full_server_is_busy_not_exhausted(certs: dict[str, TlsConfig]) -> None:
    with PartyServer(certs["server"], peers=("client",), max_sessions=2) as server:
        held = [connect(server.address, certs["client"], "server", f"h{i}", timeout=10) for i in range(2)]
        with pytest.raises(PeerBusy, match=r"busy: server has 2 links open; retry after"):
            connect(server.address, certs["client"], "server", "h2", timeout=10)
        held[0].drop()
        assert server.wait_until(lambda open_, _pending: open_ == 1, timeout=10)
        extra = connect(server.address, certs["client"], "server", "h3", timeout=10)
        for channel in (held[1], extra):
            channel.drop()


def test_only_expected_sessions_are_served(certs: dict[str, TlsConfig]) -> None:
    with PartyServer(certs["server"], peers=("client",), sessions=("mine",)) as server:
        with pytest.raises(PeerRefused, match="session 'other' is not served here"):
            connect(server.address, certs["client"], "server", "other", timeout=10)
        channel, call = _raw_call(server, certs["client"], "other", iter([]))
        assert _ended_with(call) == grpc.StatusCode.NOT_FOUND
        channel.close()
        client = connect(server.address, certs["client"], "server", "mine", timeout=10)
        server.accept("mine", "client", timeout=10).close()
        client.close()


def test_shutdown_tells_live_peers_why(certs: dict[str, TlsConfig]) -> None:
    server = PartyServer(certs["server"], peers=("client",)).start()
    client = connect(server.address, certs["client"], "server", "live", timeout=10, timeout_s=10)
    server.accept("live", "client", timeout=10)
    assert server.shutdown("server is shutting down", drain_s=0.1) == 1
    with pytest.raises(PeerAborted, match="server aborted: server is shutting down"):
        client.recv("anything")
    client.close()


def test_shutdown_refuses_new_links_and_drains(certs: dict[str, TlsConfig]) -> None:
    server = PartyServer(certs["server"], peers=("client",)).start()
    client = connect(server.address, certs["client"], "server", "live", timeout=10, timeout_s=10)
    served = server.accept("live", "client", timeout=10)
    aborted: list[int] = []
    stopping = threading.Thread(target=lambda: aborted.append(server.shutdown("stopping", drain_s=30)))
    stopping.start()
    with pytest.raises(PeerRefused, match="server is shutting down"):
        connect(server.address, certs["client"], "server", "late", timeout=10)
    client.send("last", np.array([1]))  # the live session still works while the server drains
    assert int(served.recv("last")[0]) == 1
    served.close()
    client.close()
    stopping.join(30)
    assert aborted == [0]


def test_channel_limits_are_checked() -> None:
    channel = GrpcChannel("a", "b", "s", limits=HELLO_LIMITS)
    assert channel.max_message_bytes == 16 << 10
    channel.set_limits(SESSION_LIMITS)
    assert channel.limits.max_buffered_bytes is None
