"""Party links over gRPC bidirectional streams with mutual TLS.

One session between two parties is one ``PartyLink.Link`` stream (see ``wire/privinf.proto``).
The serving party runs a :class:`~protocols.net.grpc_server.PartyServer` (port 0, announced
after start) and takes the stream a given peer opened for a given session with ``accept``; the
dialing party calls :func:`connect`. Both ends get a :class:`~protocols.net.grpc_channel.GrpcChannel`,
the network twin of :class:`~protocols.net.channels.MemoryChannel`: same framing, same checks,
same counting. This module is the dialing side and the one import point of the transport:

- :mod:`protocols.net.framing`: chunking, frame assembly, limits by phase (hello / session);
- :mod:`protocols.net.grpc_channel`: the channel, its reader and its memory bound;
- :mod:`protocols.net.aio_loop`: the event loop that carries every link of the process;
- :mod:`protocols.net.grpc_server`: the serving side, admission and per-client limits.

Why it is built this way:
- Roles are authenticated both ways. The server reads the client's identity from its certificate
  (role: common name, and ``{role}.privinf`` in its SANs; a named client also carries
  ``{name}.client.privinf``) and refuses a stream that claims another role; the dialer verifies
  the server's certificate against ``{peer_role}.privinf``.
- HTTP/2 keepalive pings find a silent dead peer within seconds; a crashed process resets its
  TCP connection at once. Either way the next receive raises :class:`PeerLost` naming the peer.
- Counting: the ledger gets the bytes each frame took on the link, i.e. the serialized chunk
  messages plus gRPC's 5-byte message prefix (HTTP/2 and TLS framing are not counted).
"""

from __future__ import annotations

import asyncio
import re

import grpc

from privinf.ledger.counting import Ledger
from protocols.net import aio_loop
from protocols.net.certs import TlsConfig, check_role, role_hostname
from protocols.net.channels import DEFAULT_TIMEOUT_S, PeerLost
from protocols.net.framing import (
    CHUNK_BYTES,
    GRPC_PREFIX_BYTES,
    HELLO_LIMITS,
    MAX_MESSAGE_BYTES,
    SESSION_LIMITS,
    FrameAssembler,
    LimitExceeded,
    LinkLimits,
    TransportConfigError,
    encode_chunks,
)
from protocols.net.grpc_channel import (
    DEFAULT_KEEPALIVE,
    META_ROLE,
    META_SESSION,
    GrpcChannel,
    Keepalive,
    PeerBusy,
    PeerRefused,
    check_session,
    message_options,
    open_link,
)
from protocols.net.grpc_server import ACCEPT_DEADLINE_S, BUSY_DETAIL, PartyServer
from protocols.net.wire import pb, rpc

__all__ = ["ACCEPT_DEADLINE_S", "CHUNK_BYTES", "GRPC_PREFIX_BYTES", "HELLO_LIMITS", "MAX_MESSAGE_BYTES",
           "SESSION_LIMITS", "FrameAssembler", "GrpcChannel", "Keepalive", "LimitExceeded", "LinkLimits",
           "PartyServer", "PeerBusy", "PeerRefused", "TransportConfigError", "check_session", "connect",
           "encode_chunks"]

_REFUSAL_HINTS = ("verification", "handshake", "certificate", "ssl")
_REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS,
             grpc.StatusCode.NOT_FOUND)
_RETRY_RE = re.compile(r"retry after (\d+(?:\.\d+)?) s")


def _refused(where: str, exc: grpc.RpcError) -> Exception:
    """The transport error a failed ``Ready`` call stands for."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(BUSY_DETAIL):
        match = _RETRY_RE.search(details)
        return PeerBusy(f"{where}: {details}", float(match.group(1)) if match else ACCEPT_DEADLINE_S)
    if code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details:
        return PeerRefused(f"{where}: {details}")
    if code in _REFUSALS or any(hint in details.lower() for hint in _REFUSAL_HINTS):
        return PeerRefused(f"{where} refused: {code.name}: {details}")
    return PeerLost(f"{where} unreachable: {code.name}: {details}")


def connect(address: str, tls: TlsConfig, peer_role: str, session: str, ledger: Ledger | None = None,
            timeout: float = 30.0, *, timeout_s: float = DEFAULT_TIMEOUT_S,
            keepalive: Keepalive = DEFAULT_KEEPALIVE, chunk_bytes: int = CHUNK_BYTES,
            max_message_bytes: int = MAX_MESSAGE_BYTES, close_timeout_s: float = 10.0,
            session_deadline_s: float | None = None, limits: LinkLimits | None = None) -> GrpcChannel:
    """Open session ``session`` to the ``peer_role`` party serving at ``address`` ("host:port").

    Checks both certificates first (a unary ``Ready`` call bounded by ``timeout``); raises
    :class:`PeerRefused` when TLS or a role check fails, :class:`PeerBusy` when the peer has no
    room now, and :class:`PeerLost` when the peer cannot be reached. ``session_deadline_s``
    bounds the whole stream (None: no bound). The peer's frames are held to ``limits`` (None:
    ``max_message_bytes``, no bound on unread bytes).
    """
    check_role(peer_role)
    check_session(session)
    ca, cert, key = tls.read()
    hostname = role_hostname(peer_role)
    options = [("grpc.ssl_target_name_override", hostname), ("grpc.default_authority", hostname)]
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    options += keepalive.options(server=False) + message_options()
    grpc_channel = aio_loop.make(grpc.aio.secure_channel, address, credentials, options=options)
    try:
        reply = aio_loop.call(_ready(grpc_channel, pb.ReadyRequest(session=session, role=tls.role), timeout))
    except grpc.RpcError as exc:
        aio_loop.spawn(grpc_channel.close())
        raise _refused(f"{tls.role} -> {peer_role} at {address}", exc) from None
    if reply.role != peer_role:
        aio_loop.spawn(grpc_channel.close())
        raise PeerRefused(f"{tls.role}: server at {address} is {reply.role!r}, expected {peer_role!r}")

    channel = GrpcChannel(tls.role, peer_role, session, ledger, timeout_s, chunk_bytes, max_message_bytes, limits)
    metadata = ((META_SESSION, session), (META_ROLE, tls.role))
    call = aio_loop.call(_open(grpc_channel, channel, metadata, session_deadline_s))

    async def cut() -> None:
        call.cancel()
        await grpc_channel.close()

    def release(orderly: bool) -> None:
        # Cancelling at once could drop chunks still queued in gRPC: an orderly close waits
        # (bounded; shorter after an abort) for the peer to end the stream, which it does when it
        # closes its side. Called from the party's thread (orderly) or the link loop (not).
        if orderly:
            channel.wait_peer_closed(channel.close_wait_s)
        aio_loop.spawn(cut())

    channel.close_wait_s = close_timeout_s
    channel._release = release
    channel.start_reader(call)
    return channel


async def _ready(grpc_channel: grpc.aio.Channel, request: pb.ReadyRequest, timeout: float) -> pb.ReadyReply:
    """The ``Ready`` call: both certificates checked, the peer's role and room confirmed."""
    return await rpc.PartyLinkStub(grpc_channel).Ready(request, timeout=timeout)


async def _open(grpc_channel: grpc.aio.Channel, channel: GrpcChannel, metadata: tuple[tuple[str, str], ...],
                deadline_s: float | None) -> grpc.aio.StreamStreamCall:
    """The session's ``Link`` stream, fed by ``channel``'s queued chunks (a writer task: explicit
    writes, which gRPC takes sooner than it drains a request iterator)."""
    call = open_link(grpc_channel)(metadata=metadata, timeout=deadline_s)

    async def write() -> None:
        try:
            async for chunk in channel.outgoing():
                await call.write(chunk)
            await call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):  # the call ended: the reader reports why
            pass

    aio_loop.spawn(write())
    return call
