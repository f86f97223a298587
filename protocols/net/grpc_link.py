"""Party links over gRPC bidirectional streams with mutual TLS.

One session between two parties is one ``PartyLink.Link`` stream (see ``wire/privinf.proto``).
The serving party runs a :class:`PartyServer` (port 0, announced after start) and takes the
stream a given peer opened for a given session with :meth:`PartyServer.accept`; the dialing
party calls :func:`connect`. Both ends get a :class:`GrpcChannel`, the network twin of
:class:`~protocols.net.channels.MemoryChannel`: same framing, same checks, same counting.

Why it is built this way:
- Sending never waits for the peer to read: frames are cut into 1 MiB chunks and queued for
  gRPC's sender thread, and each link has a reader thread that drains the stream into an inbox.
  Both parties send at once in CrypTen's ``all_reduce``; blocking sends would deadlock.
- Roles are authenticated both ways. The server reads the client's role from its certificate
  (common name, and ``{role}.privinf`` in its SANs) and refuses a stream that claims another
  role; the dialer verifies the server's certificate against ``{peer_role}.privinf``.
- HTTP/2 keepalive pings find a silent dead peer within seconds; a crashed process resets its
  TCP connection at once. Either way the next receive raises :class:`PeerLost` naming the peer.
- Counting: the ledger gets the bytes each frame took on the link, i.e. the serialized chunk
  messages plus gRPC's 5-byte message prefix (HTTP/2 and TLS framing are not counted).
"""

from __future__ import annotations

import math
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np

from privinf.ledger.counting import Ledger
from protocols.net.certs import TlsConfig, check_role, role_hostname
from protocols.net.channels import (
    ARRAY_DTYPES,
    DEFAULT_TIMEOUT_S,
    Channel,
    Frame,
    FrameKind,
    PeerLost,
    ProtocolError,
    TransportError,
)
from protocols.net.wire import pb, rpc

CHUNK_BYTES = 1 << 20
GRPC_PREFIX_BYTES = 5  # gRPC's length-prefixed message header: flag byte + 4-byte length
MAX_MESSAGE_BYTES = 1 << 31  # largest logical message a receiver accepts (2 GiB)
_GRPC_MAX_CHUNK_MESSAGE = CHUNK_BYTES + (64 << 10)  # a chunk plus generous header room
_SESSION_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_META_SESSION = "privinf-session"
_META_ROLE = "privinf-role"
_TEXT_DTYPES = {"bytes", "json"}
_KIND_TO_WIRE = {FrameKind.DATA: pb.FRAME_KIND_DATA, FrameKind.ABORT: pb.FRAME_KIND_ABORT,
                 FrameKind.CLOSE: pb.FRAME_KIND_CLOSE}
_WIRE_TO_KIND = {v: k for k, v in _KIND_TO_WIRE.items()}


class PeerRefused(TransportError):
    """A link was refused: TLS handshake, certificate role, or a session already open."""


class TransportConfigError(ValueError):
    """Bad transport argument (session id, role, sizes)."""


def check_session(session: str) -> str:
    """Return ``session`` if it is a valid session id (1-128 of ``A-Za-z0-9._:-``)."""
    if not isinstance(session, str) or not _SESSION_RE.match(session):
        raise TransportConfigError(f"invalid session id {session!r}: 1-128 chars of A-Za-z0-9._:-")
    return session


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive: ping every ``interval_s``; a peer silent ``timeout_s`` longer is dead."""

    interval_s: float = 2.0
    timeout_s: float = 5.0

    def options(self, server: bool) -> list[tuple[str, int]]:
        opts = [
            ("grpc.keepalive_time_ms", int(self.interval_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_s * 1000)),
            # any unanswered ping (keepalive or BDP) ends the link; gRPC's default waits 60 s
            ("grpc.http2.ping_timeout_ms", int(self.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if server:  # accept the client's pings at our interval without calling them abuse
            opts += [
                ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.interval_s * 500)),
                ("grpc.http2.max_ping_strikes", 0),
            ]
        return opts


def _message_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", _GRPC_MAX_CHUNK_MESSAGE),
            ("grpc.max_send_message_length", _GRPC_MAX_CHUNK_MESSAGE)]


# ----- framing ------------------------------------------------------------------------------
def encode_chunks(frame: Frame, chunk_bytes: int = CHUNK_BYTES) -> tuple[list[pb.Frame], int]:
    """Wire chunks of ``frame`` and the bytes they take on the link (messages + gRPC prefixes)."""
    if not 1 <= chunk_bytes <= CHUNK_BYTES:
        raise TransportConfigError(f"chunk size must be 1..{CHUNK_BYTES} bytes, got {chunk_bytes}")
    data = memoryview(frame.payload)
    count = max(1, math.ceil(len(data) / chunk_bytes))
    chunks = []
    wire = 0
    for index in range(count):
        msg = pb.Frame(session=frame.session, seq=frame.seq, tag=frame.tag,
                       kind=_KIND_TO_WIRE[frame.kind], dtype=frame.dtype, shape=frame.shape,
                       chunk_index=index, chunk_count=count, total_bytes=len(data),
                       payload=bytes(data[index * chunk_bytes:(index + 1) * chunk_bytes]))
        wire += msg.ByteSize() + GRPC_PREFIX_BYTES
        chunks.append(msg)
    return chunks, wire


class FrameAssembler:
    """Rebuilds whole frames from wire chunks, checking that the chunks of a frame agree.

    Order, session and tag of whole frames are checked by :class:`Channel` on receive.
    """

    _HEADER_FIELDS = ("session", "seq", "tag", "kind", "dtype", "chunk_count", "total_bytes")

    def __init__(self, peer: str, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.peer = peer
        self.max_message_bytes = max_message_bytes
        self._head: pb.Frame | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._wire = 0

    def pending(self) -> str | None:
        """Describe a frame whose chunks are not all in, or None."""
        if self._head is None:
            return None
        return f"frame {self._head.seq} ({self._head.tag!r}) has {len(self._parts)} of {self._head.chunk_count} chunks"

    def _fail(self, what: str) -> ProtocolError:
        return ProtocolError(f"bad frame from {self.peer}: {what}")

    def _check_head(self, msg: pb.Frame) -> None:
        if msg.kind not in _WIRE_TO_KIND:
            raise self._fail(f"frame {msg.seq} has unknown kind {msg.kind}")
        if msg.chunk_index != 0:
            raise self._fail(f"frame {msg.seq} starts at chunk {msg.chunk_index}: earlier chunks missing")
        if msg.total_bytes > self.max_message_bytes:
            raise self._fail(f"frame {msg.seq} announces {msg.total_bytes} bytes, above the "
                             f"{self.max_message_bytes}-byte limit")
        if msg.chunk_count < max(1, math.ceil(msg.total_bytes / CHUNK_BYTES)):
            raise self._fail(f"frame {msg.seq}: {msg.chunk_count} chunks cannot hold {msg.total_bytes} bytes")
        if msg.dtype in _TEXT_DTYPES:
            if list(msg.shape) != [msg.total_bytes]:
                raise self._fail(f"frame {msg.seq}: {msg.dtype} shape {list(msg.shape)} != [{msg.total_bytes}]")
        elif msg.dtype in ARRAY_DTYPES:
            expected = int(np.prod(list(msg.shape), dtype=np.float64)) * np.dtype(msg.dtype).itemsize
            if expected != msg.total_bytes:
                raise self._fail(f"frame {msg.seq}: dtype {msg.dtype} shape {list(msg.shape)} needs "
                                 f"{expected} bytes, header says {msg.total_bytes}")
        else:
            raise self._fail(f"frame {msg.seq} has unknown dtype {msg.dtype!r}")

    def feed(self, msg: pb.Frame) -> Frame | None:
        """Take one chunk; return the whole frame when its last chunk arrives."""
        if len(msg.payload) > CHUNK_BYTES:
            raise self._fail(f"chunk of {len(msg.payload)} bytes exceeds {CHUNK_BYTES}")
        head = self._head
        if head is None:
            self._check_head(msg)
            head = self._head = msg
        else:
            if msg.chunk_index == 0:
                raise self._fail(f"frame {head.seq} truncated: frame {msg.seq} began after "
                                 f"{len(self._parts)} of {head.chunk_count} chunks")
            if msg.chunk_index != len(self._parts):
                raise self._fail(f"frame {head.seq}: chunk {msg.chunk_index} arrived, expected {len(self._parts)}")
            for name in self._HEADER_FIELDS:
                if getattr(msg, name) != getattr(head, name):
                    raise self._fail(f"chunk {msg.chunk_index} of frame {head.seq} disagrees on {name}")
            if list(msg.shape) != list(head.shape):
                raise self._fail(f"chunk {msg.chunk_index} of frame {head.seq} disagrees on shape")
        self._parts.append(msg.payload)
        self._size += len(msg.payload)
        self._wire += msg.ByteSize() + GRPC_PREFIX_BYTES
        if self._size > head.total_bytes:
            raise self._fail(f"frame {head.seq} carries more than its {head.total_bytes} bytes")
        if len(self._parts) < head.chunk_count:
            return None
        if self._size != head.total_bytes:
            raise self._fail(f"frame {head.seq} has {self._size} bytes, header says {head.total_bytes}")
        payload = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        frame = Frame(head.session, head.seq, head.tag, _WIRE_TO_KIND[head.kind], head.dtype,
                      tuple(int(d) for d in head.shape), payload, self._wire)
        self._head, self._parts, self._size, self._wire = None, [], 0, 0
        return frame


# ----- channel ------------------------------------------------------------------------------
class GrpcChannel(Channel):
    """A :class:`Channel` over one gRPC bidi stream. Made by :func:`connect` or
    :meth:`PartyServer.accept`, not directly.

    Closing: the serving end's ``close()`` returns at once (its server's ``stop()`` flushes);
    the dialing end's ``close()`` waits, up to ``close_timeout_s``, for the serving end to close
    too, so that nothing still queued is lost when the process exits. Close the serving end
    first when one thread holds both ends.
    """

    def __init__(self, local: str, peer: str, session: str, ledger: Ledger | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, chunk_bytes: int = CHUNK_BYTES,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        super().__init__(local, peer, session, ledger, timeout_s)
        if not 1 <= chunk_bytes <= CHUNK_BYTES:
            raise TransportConfigError(f"chunk size must be 1..{CHUNK_BYTES} bytes, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self._outbox: queue.SimpleQueue[pb.Frame | None] = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue[Frame | TransportError] = queue.SimpleQueue()
        self._link_error: TransportError | None = None
        self._reader_done = threading.Event()
        self._release: Callable[[bool], None] | None = None

    def outgoing(self) -> Iterator[pb.Frame]:
        """The chunks this end sends, in order; ends when the channel closes."""
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            yield msg

    def start_reader(self, stream: Iterable[pb.Frame]) -> None:
        """Drain the peer's stream into the inbox on a daemon thread."""
        threading.Thread(target=self._read, args=(stream,), daemon=True,
                         name=f"grpc-reader-{self.local}<-{self.peer}").start()

    def _read(self, stream: Iterable[pb.Frame]) -> None:
        assembler = FrameAssembler(self.peer, self.max_message_bytes)
        ended = False  # the peer sent CLOSE or ABORT: what follows does not matter
        error: TransportError | None = None
        try:
            for msg in stream:
                frame = assembler.feed(msg)
                if frame is not None:
                    self._inbox.put(frame)
                    ended = ended or frame.kind != FrameKind.DATA
            pending = assembler.pending()
            if pending is not None:
                error = ProtocolError(f"{self.local}: stream from {self.peer} ended inside a frame: {pending}")
            elif not ended:
                error = PeerLost(f"{self.local}: {self.peer} ended session {self.session!r} without closing it")
        except ProtocolError as exc:
            error = exc
        except grpc.RpcError as exc:
            if not ended:
                code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
                details = exc.details() if hasattr(exc, "details") else str(exc)
                details = details or "connection reset or keepalive timeout"
                error = PeerLost(f"{self.local}: lost link to {self.peer} in session "
                                 f"{self.session!r} ({code}: {details})")
        except Exception as exc:
            error = PeerLost(f"{self.local}: link to {self.peer} failed: {type(exc).__name__}: {exc}")
        finally:
            if error is not None:
                self._link_error = error
                self._inbox.put(error)
            self._reader_done.set()

    def _send_frame(self, frame: Frame) -> int:
        if isinstance(self._link_error, PeerLost):
            raise PeerLost(f"{self.local}: cannot send {frame.tag!r}: {self._link_error}")
        chunks, wire = encode_chunks(frame, self.chunk_bytes)
        for msg in chunks:
            self._outbox.put(msg)
        return wire

    def _recv_frame(self, timeout: float) -> Frame:
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if isinstance(item, TransportError):
            self._inbox.put(item)  # sticky: every later receive fails the same way
            raise item
        return item

    def wait_peer_closed(self, timeout: float) -> bool:
        """Wait until the peer's stream has ended; True if it did within ``timeout``."""
        return self._reader_done.wait(timeout)

    def _shutdown(self) -> None:
        self._outbox.put(None)
        if self._release is not None:
            self._release(True)

    def drop(self) -> None:
        """Cut the link without a CLOSE frame, as a crash would (the peer sees PeerLost)."""
        self._closed = True
        self._outbox.put(None)
        if self._release is not None:
            self._release(False)


# ----- server -------------------------------------------------------------------------------
def _peer_role(context: grpc.ServicerContext) -> str | None:
    """The role in the verified client certificate: its CN, which must also be in its SANs."""
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    if len(names) != 1:
        return None
    role = names[0].decode(errors="replace")
    if role_hostname(role).encode() not in (auth.get("x509_subject_alternative_name") or []):
        return None
    return role


class _Servicer(rpc.PartyLinkServicer):
    def __init__(self, server: PartyServer) -> None:
        self._server = server

    def _authenticate(self, context: grpc.ServicerContext, claimed: str) -> str:
        role = _peer_role(context)
        if role is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "client certificate carries no privinf role")
        if claimed != role:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"certificate is for role {role!r} but the caller claims {claimed!r}")
        allowed = self._server.peers
        if allowed is not None and role not in allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"role {role!r} may not connect to {self._server.role}")
        return role

    def Ready(self, request: pb.ReadyRequest, context: grpc.ServicerContext) -> pb.ReadyReply:  # noqa: N802
        role = self._authenticate(context, request.role)
        if self._server._taken(request.session, role):
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{role} already has a link for session {request.session!r}")
        return pb.ReadyReply(role=self._server.role)

    def Link(self, request_iterator: Iterator[pb.Frame], context: grpc.ServicerContext) -> Iterator[pb.Frame]:  # noqa: N802
        meta = dict(context.invocation_metadata())
        role = self._authenticate(context, meta.get(_META_ROLE, ""))
        session = meta.get(_META_SESSION, "")
        if not _SESSION_RE.match(session):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid session id {session!r}")
        channel = self._server._register(session, role)
        if channel is None:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{role} already has a link for session {session!r}")
        context.add_callback(lambda: channel._outbox.put(None))  # RPC over: stop our sender
        channel._release = lambda orderly: None if orderly else context.cancel()
        channel.start_reader(request_iterator)
        try:
            yield from channel.outgoing()
        finally:
            self._server._unregister(session, role, channel)


class PartyServer:
    """gRPC server of one party: mTLS on ``host:port`` (port 0 picks a free one), one bidi
    stream per (session, peer role), several sessions at once."""

    def __init__(self, tls: TlsConfig, host: str = "127.0.0.1", port: int = 0, *,
                 peers: Iterable[str] | None = None, max_sessions: int = 16,
                 keepalive: Keepalive = Keepalive(), chunk_bytes: int = CHUNK_BYTES,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if max_sessions < 1:
            raise TransportConfigError(f"max_sessions must be >= 1, got {max_sessions}")
        self.tls = tls
        self.role = tls.role
        self.host = host
        self.peers = None if peers is None else frozenset(check_role(p) for p in peers)
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self._requested_port = port
        self._port: int | None = None
        self._cond = threading.Condition()
        self._active: dict[tuple[str, str], GrpcChannel] = {}
        self._pending: dict[tuple[str, str], GrpcChannel] = {}
        self._stopped = False
        # each live stream holds one worker for its sender; leave room for Ready calls
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_sessions + 4, thread_name_prefix=f"grpc-{self.role}"),
            options=keepalive.options(server=True) + _message_options(),
            maximum_concurrent_rpcs=max_sessions + 4,
        )
        rpc.add_PartyLinkServicer_to_server(_Servicer(self), self._server)

    @property
    def port(self) -> int:
        if self._port is None:
            raise TransportError(f"{self.role}: server not started")
        return self._port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> PartyServer:
        """Bind and serve; :attr:`port` is valid afterwards (announce it to peers)."""
        ca, cert, key = self.tls.read()
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        port = self._server.add_secure_port(f"{self.host}:{self._requested_port}", creds)
        if port == 0:
            raise TransportError(f"{self.role}: cannot bind {self.host}:{self._requested_port}")
        self._port = port
        self._server.start()
        return self

    def _register(self, session: str, role: str) -> GrpcChannel | None:
        key = (session, role)
        with self._cond:
            if self._stopped or key in self._active or key in self._pending:
                return None
            channel = GrpcChannel(self.role, role, session, chunk_bytes=self.chunk_bytes,
                                  max_message_bytes=self.max_message_bytes)
            self._active[key] = channel
            self._pending[key] = channel
            self._cond.notify_all()
            return channel

    def _taken(self, session: str, role: str) -> bool:
        with self._cond:
            return (session, role) in self._active or (session, role) in self._pending

    def _unregister(self, session: str, role: str, channel: GrpcChannel) -> None:
        with self._cond:
            if self._active.get((session, role)) is channel:
                del self._active[(session, role)]

    def accept(self, session: str, peer_role: str, timeout: float = 30.0, ledger: Ledger | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> GrpcChannel:
        """The channel ``peer_role`` opened for ``session``, waiting up to ``timeout`` seconds."""
        key = (check_session(session), check_role(peer_role))
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._pending or self._stopped, timeout):
                raise PeerLost(f"{self.role}: {peer_role} did not open session {session!r} within {timeout:.0f} s")
            if self._stopped:
                raise TransportError(f"{self.role}: server stopped")
            channel = self._pending.pop(key)
        channel.ledger = ledger
        channel.timeout_s = timeout_s
        return channel

    def accept_any(self, peer_role: str, timeout: float = 30.0, ledger: Ledger | None = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> GrpcChannel | None:
        """The next channel ``peer_role`` opened for a session nobody has accepted yet, or None
        after ``timeout`` seconds (a front door's accept loop)."""
        role = check_role(peer_role)

        def ready() -> bool:
            return self._stopped or any(key[1] == role for key in self._pending)

        with self._cond:
            found = self._cond.wait_for(ready, timeout)
            if self._stopped:
                raise TransportError(f"{self.role}: server stopped")
            if not found:
                return None
            key = next(key for key in self._pending if key[1] == role)
            channel = self._pending.pop(key)
        channel.ledger = ledger
        channel.timeout_s = timeout_s
        return channel

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving: open streams get ``grace`` seconds, then are cancelled."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._server.stop(grace).wait()

    def __enter__(self) -> PartyServer:
        return self.start() if self._port is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----- dialing ------------------------------------------------------------------------------
_REFUSAL_HINTS = ("verification", "handshake", "certificate", "ssl")


def connect(address: str, tls: TlsConfig, peer_role: str, session: str, ledger: Ledger | None = None,
            timeout: float = 30.0, *, timeout_s: float = DEFAULT_TIMEOUT_S,
            keepalive: Keepalive = Keepalive(), chunk_bytes: int = CHUNK_BYTES,
            max_message_bytes: int = MAX_MESSAGE_BYTES, close_timeout_s: float = 10.0,
            session_deadline_s: float | None = None) -> GrpcChannel:
    """Open session ``session`` to the ``peer_role`` party serving at ``address`` ("host:port").

    Checks both certificates first (a unary ``Ready`` call bounded by ``timeout``); raises
    :class:`PeerRefused` when TLS or a role check fails and :class:`PeerLost` when the peer
    cannot be reached. ``session_deadline_s`` bounds the whole stream (None: no bound).
    """
    check_role(peer_role)
    check_session(session)
    ca, cert, key = tls.read()
    hostname = role_hostname(peer_role)
    options = [("grpc.ssl_target_name_override", hostname), ("grpc.default_authority", hostname)]
    grpc_channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert),
                                       options=options + keepalive.options(server=False) + _message_options())
    stub = rpc.PartyLinkStub(grpc_channel)
    try:
        reply = stub.Ready(pb.ReadyRequest(session=session, role=tls.role), timeout=timeout)
    except grpc.RpcError as exc:
        grpc_channel.close()
        code, details = exc.code(), exc.details() or ""
        where = f"{tls.role} -> {peer_role} at {address}"
        refusals = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS)
        if code in refusals or any(
                hint in details.lower() for hint in _REFUSAL_HINTS):
            raise PeerRefused(f"{where} refused: {code.name}: {details}") from None
        raise PeerLost(f"{where} unreachable: {code.name}: {details}") from None
    if reply.role != peer_role:
        grpc_channel.close()
        raise PeerRefused(f"{tls.role}: server at {address} is {reply.role!r}, expected {peer_role!r}")

    channel = GrpcChannel(tls.role, peer_role, session, ledger, timeout_s, chunk_bytes, max_message_bytes)
    call = stub.Link(channel.outgoing(), metadata=((_META_SESSION, session), (_META_ROLE, tls.role)),
                     timeout=session_deadline_s)

    def release(orderly: bool) -> None:
        # Cancelling at once could drop chunks still queued in gRPC: an orderly close waits
        # (bounded) for the peer to end the stream, which it does when it closes its side.
        if orderly:
            channel.wait_peer_closed(close_timeout_s)
        call.cancel()
        grpc_channel.close()

    channel._release = release
    channel.start_reader(call)
    return channel
