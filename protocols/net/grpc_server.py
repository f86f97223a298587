"""The serving end of party links: a gRPC server with mutual TLS that hands out one
:class:`~protocols.net.grpc_channel.GrpcChannel` per (session, peer role) stream.

What an unauthenticated session can cost the party is bounded:
- a stream nobody has accepted yet is not read at all (gRPC's flow control holds the peer back)
  and is cut after ``accept_deadline_s``, or at once when its peer cancels it;
- an accepted stream is held to the limits the accepting party states (the hello phase's few KiB
  until the party accepts the session and lifts them);
- each client identity (its certificate's role and name) may hold ``max_streams_per_client``
  links at once, and the server ``max_sessions`` in all: beyond that a new link is refused with
  ``RESOURCE_EXHAUSTED`` and a "busy, retry after N s" message the dialer turns into :class:`PeerBusy`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass

import grpc

from privinf.ledger.counting import Ledger
from protocols.net import aio_loop
from protocols.net.certs import PeerIdentity, TlsConfig, check_role, identity_from_auth_context
from protocols.net.channels import DEFAULT_TIMEOUT_S, PeerLost, TransportError
from protocols.net.framing import (
    CHUNK_BYTES,
    HELLO_LIMITS,
    MAX_MESSAGE_BYTES,
    LinkLimits,
    TransportConfigError,
    WireChunk,
)
from protocols.net.grpc_channel import (
    DEFAULT_KEEPALIVE,
    GRPC_MAX_CHUNK_MESSAGE,
    LINK_SERVICE,
    META_ROLE,
    META_SESSION,
    GrpcChannel,
    Keepalive,
    LinkCut,
    check_session,
    is_link_session,
    link_handler,
    message_options,
)
from protocols.net.wire import pb, rpc

ACCEPT_DEADLINE_S = 10.0  # a stream no session accepts within this is cut
BUSY_DETAIL = "busy"  # first word of a refusal for lack of room; the dialer maps it to PeerBusy


@dataclass
class _Pending:
    channel: GrpcChannel
    stream: AsyncIterable[WireChunk]
    since: float


def busy_message(what: str, retry_after_s: float) -> str:
    """The details of a RESOURCE_EXHAUSTED refusal: ``busy: <what>; retry after <N> s``."""
    return f"{BUSY_DETAIL}: {what}; retry after {retry_after_s:.0f} s"


class _Servicer(rpc.PartyLinkServicer):
    def __init__(self, server: PartyServer) -> None:
        self._server = server

    async def _authenticate(self, context: grpc.aio.ServicerContext, claimed: str) -> PeerIdentity:
        identity = identity_from_auth_context(context.auth_context())
        if identity is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "client certificate carries no privinf role")
        if claimed != identity.role:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"certificate is for role {identity.role!r} but the caller claims {claimed!r}")
        allowed = self._server.peers
        if allowed is not None and identity.role not in allowed:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"role {identity.role!r} may not connect to {self._server.role}")
        return identity

    async def Ready(self, request: pb.ReadyRequest, context: grpc.aio.ServicerContext) -> pb.ReadyReply:  # noqa: N802
        identity = await self._authenticate(context, request.role)
        refusal = self._server._refusal(request.session, identity)
        if refusal is not None:
            await context.abort(*refusal)
        return pb.ReadyReply(role=self._server.role)

    async def Link(self, request_iterator: AsyncIterable[WireChunk],  # noqa: N802
                   context: grpc.aio.ServicerContext) -> None:
        meta = dict(context.invocation_metadata() or ())
        identity = await self._authenticate(context, meta.get(META_ROLE, ""))
        session = meta.get(META_SESSION, "")
        if not is_link_session(session):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid session id {session!r}")
        channel, refusal = self._server._register(session, identity, request_iterator)
        if channel is None:
            await context.abort(*refusal)
        context.add_done_callback(lambda _: channel.end_sending())  # RPC over: stop our sender
        channel._release = lambda orderly: None if orderly else channel.cut_sending()
        try:
            async for chunk in channel.outgoing():  # explicit writes: gRPC drains a generator more slowly
                await context.write(chunk)
        except LinkCut:
            await context.abort(grpc.StatusCode.CANCELLED, f"{self._server.role} cut the link")
        finally:
            self._server._unregister(session, identity.role, channel)


class PartyServer:
    """gRPC server of one party: mTLS on ``host:port`` (port 0 picks a free one), one bidi
    stream per (session, peer role), up to ``max_sessions`` streams at once.

    ``sessions`` (if given) are the only session ids served: other streams are refused at once.
    ``max_message_bytes`` is the frame limit of accepted links unless :meth:`accept` names others.
    """

    def __init__(self, tls: TlsConfig, host: str = "127.0.0.1", port: int = 0, *,
                 peers: Iterable[str] | None = None, max_sessions: int = 16,
                 keepalive: Keepalive = DEFAULT_KEEPALIVE, chunk_bytes: int = CHUNK_BYTES,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, sessions: Iterable[str] | None = None,
                 max_streams_per_client: int | None = None, accept_deadline_s: float = ACCEPT_DEADLINE_S,
                 max_receive_bytes: int | None = None) -> None:
        if max_sessions < 1:
            raise TransportConfigError(f"max_sessions must be >= 1, got {max_sessions}")
        if max_streams_per_client is not None and max_streams_per_client < 1:
            raise TransportConfigError(f"max_streams_per_client must be >= 1, got {max_streams_per_client}")
        self.tls = tls
        self.role = tls.role
        self.host = host
        self.peers = None if peers is None else frozenset(check_role(p) for p in peers)
        self.sessions = None if sessions is None else frozenset(check_session(s) for s in sessions)
        self.max_sessions = max_sessions
        self.max_streams_per_client = max_streams_per_client
        self.accept_deadline_s = accept_deadline_s
        self.chunk_bytes = chunk_bytes
        self.session_limits = LinkLimits(max_message_bytes)
        self._requested_port = port
        self._port: int | None = None
        self._cond = threading.Condition()
        self._active: dict[tuple[str, str], GrpcChannel] = {}
        self._identities: dict[int, PeerIdentity] = {}  # id(channel) -> who opened it
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._stopped = False
        self._closing_reason: str | None = None
        # leave room for Ready calls, and let our own refusal (which names the retry time) come
        # before gRPC's bare one
        options = keepalive.options(server=True) + message_options(max_receive_bytes or GRPC_MAX_CHUNK_MESSAGE)
        self._server = aio_loop.make(grpc.aio.server, options=options, maximum_concurrent_rpcs=max_sessions + 8)
        servicer = _Servicer(self)
        handlers = {"Link": link_handler(servicer.Link),
                    "Ready": grpc.unary_unary_rpc_method_handler(
                        servicer.Ready, request_deserializer=pb.ReadyRequest.FromString,
                        response_serializer=pb.ReadyReply.SerializeToString)}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(LINK_SERVICE, handlers),))
        self._server.add_registered_method_handlers(LINK_SERVICE, handlers)

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise TransportError(f"{self.role}: server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to announce to peers."""
        return f"{self.host}:{self.port}"

    def start(self) -> PartyServer:
        """Bind and serve; :attr:`port` is valid afterwards (announce it to peers)."""
        ca, cert, key = self.tls.read()
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        try:
            port = aio_loop.call(_bind(self._server, f"{self.host}:{self._requested_port}", creds))
        except RuntimeError as exc:  # gRPC's asyncio server raises where the synchronous one returned 0
            raise TransportError(f"{self.role}: cannot bind {self.host}:{self._requested_port}: {exc}") from None
        if port == 0:
            raise TransportError(f"{self.role}: cannot bind {self.host}:{self._requested_port}")
        self._port = port
        threading.Thread(target=self._expire_pending, daemon=True, name=f"grpc-{self.role}-expiry").start()
        return self

    # ----- admission ------------------------------------------------------------------------
    def _refusal(self, session: str, identity: PeerIdentity) -> tuple[grpc.StatusCode, str] | None:
        """Why a new stream from ``identity`` for ``session`` cannot be taken now (call under or
        outside the lock; it only reads)."""
        key = (session, identity.role)
        if self._closing_reason is not None or self._stopped:
            return grpc.StatusCode.UNAVAILABLE, f"{self.role} is shutting down"
        if self.sessions is not None and session not in self.sessions:
            return grpc.StatusCode.NOT_FOUND, f"session {session!r} is not served here"
        if key in self._active:
            return grpc.StatusCode.ALREADY_EXISTS, f"{identity.role} already has a link for session {session!r}"
        retry = self.accept_deadline_s
        if len(self._active) >= self.max_sessions:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, busy_message(
                f"{self.role} has {len(self._active)} links open", retry)
        if self.max_streams_per_client is not None and identity.role == "client":
            held = sum(1 for ident in self._identities.values() if ident == identity)
            if held >= self.max_streams_per_client:
                return grpc.StatusCode.RESOURCE_EXHAUSTED, busy_message(
                    f"{identity.label} already holds {held} links to {self.role}", retry)
        return None

    def _register(self, session: str, identity: PeerIdentity, stream: AsyncIterable[WireChunk]
                  ) -> tuple[GrpcChannel | None, tuple[grpc.StatusCode, str] | None]:
        with self._cond:
            refusal = self._refusal(session, identity)
            if refusal is not None:
                return None, refusal
            channel = GrpcChannel(self.role, identity.role, session, chunk_bytes=self.chunk_bytes,
                                  limits=HELLO_LIMITS)
            channel.peer_name = identity.label
            key = (session, identity.role)
            self._active[key] = channel
            self._identities[id(channel)] = identity
            self._pending[key] = _Pending(channel, stream, time.monotonic())
            self._cond.notify_all()
            return channel, None

    def _unregister(self, session: str, role: str, channel: GrpcChannel) -> None:
        with self._cond:
            key = (session, role)
            if self._active.get(key) is channel:
                del self._active[key]
            self._identities.pop(id(channel), None)
            pending = self._pending.get(key)
            if pending is not None and pending.channel is channel:
                del self._pending[key]  # cancelled before anyone accepted it
            self._cond.notify_all()

    def _expire_pending(self) -> None:
        """Cut streams that no session accepted within ``accept_deadline_s``."""
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                stale = [key for key, item in self._pending.items() if now - item.since >= self.accept_deadline_s]
                dropped = [self._pending.pop(key).channel for key in stale]
                if dropped:
                    self._cond.notify_all()
                else:
                    soonest = min((item.since for item in self._pending.values()), default=now)
                    self._cond.wait(max(0.05, soonest + self.accept_deadline_s - now))
            for channel in dropped:
                channel.drop()

    def pending_count(self) -> int:
        """Streams opened but not accepted yet."""
        with self._cond:
            return len(self._pending)

    def active_count(self) -> int:
        """Streams open now (accepted or not)."""
        with self._cond:
            return len(self._active)

    def wait_until(self, condition: Callable[[int, int], bool], timeout: float) -> bool:
        """Wait until ``condition(open_streams, unaccepted_streams)`` holds; True if it did within
        ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: condition(len(self._active), len(self._pending)), timeout)

    # ----- accepting ------------------------------------------------------------------------
    def _take(self, key: tuple[str, str], ledger: Ledger | None, timeout_s: float,
              limits: LinkLimits | None) -> GrpcChannel:
        item = self._pending.pop(key)
        self._cond.notify_all()
        channel = item.channel
        channel.ledger = ledger
        channel.timeout_s = timeout_s
        channel.set_limits(self.session_limits if limits is None else limits)
        channel.start_reader(item.stream)
        return channel

    def accept(self, session: str, peer_role: str, timeout: float = 30.0, ledger: Ledger | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S, limits: LinkLimits | None = None) -> GrpcChannel:
        """The channel ``peer_role`` opened for ``session``, waiting up to ``timeout`` seconds.
        Its peer is held to ``limits`` (the server's session limits if None)."""
        key = (check_session(session), check_role(peer_role))
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._pending or self._stopped, timeout):
                raise PeerLost(f"{self.role}: {peer_role} did not open session {session!r} within {timeout:.0f} s")
            if self._stopped:
                raise TransportError(self._closing_reason or f"{self.role} stopped serving")
            return self._take(key, ledger, timeout_s, limits)

    def accept_any(self, peer_role: str, timeout: float = 30.0, ledger: Ledger | None = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S, limits: LinkLimits | None = None) -> GrpcChannel | None:
        """The next channel ``peer_role`` opened for a session nobody has accepted yet, or None
        after ``timeout`` seconds (a front door's accept loop, which passes the hello limits)."""
        role = check_role(peer_role)

        def ready() -> bool:
            return self._stopped or any(key[1] == role for key in self._pending)

        with self._cond:
            found = self._cond.wait_for(ready, timeout)
            if self._stopped:
                raise TransportError(self._closing_reason or f"{self.role} stopped serving")
            if not found:
                return None
            key = next(key for key in self._pending if key[1] == role)
            return self._take(key, ledger, timeout_s, limits)

    # ----- stopping -------------------------------------------------------------------------
    def shutdown(self, reason: str, drain_s: float) -> int:
        """Refuse new streams, let open ones finish for up to ``drain_s`` seconds, then abort the
        rest with ``reason`` (the peers read it) and stop. Returns how many were aborted."""
        with self._cond:
            self._closing_reason = reason
            dropped = [self._pending.pop(key).channel for key in list(self._pending)]
        for channel in dropped:
            channel.drop()
        with self._cond:
            self._cond.wait_for(lambda: not self._active, drain_s)
            left = list(self._active.values())
        for channel in left:
            channel.abort(reason)
        self.stop(grace=2.0)
        return len(left)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving: open streams get ``grace`` seconds, then are cancelled."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        aio_loop.call(self._server.stop(grace))

    def __enter__(self) -> PartyServer:
        return self.start() if self._port is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials) -> int:
    """Bind ``address`` (port 0: a free one) and start serving; the bound port."""
    port = server.add_secure_port(address, credentials)
    if port:
        await server.start()
    return port
