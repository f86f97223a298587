"""The channel over one gRPC bidi stream, shared by the serving and the dialing end of a link.

Sending never waits for the peer to read: frames are cut into 1 MiB chunks and queued for the
link's writer, and each link has a reader that drains the stream into an inbox; both run on the
process's gRPC event loop (:mod:`protocols.net.aio_loop`), the party's thread only queues and
takes whole frames. Both parties send at once in CrypTen's ``all_reduce``; blocking sends would
deadlock.

What a peer may make this end hold is bounded by the link's :class:`~protocols.net.framing.LinkLimits`:
the largest frame, checked on a frame's first chunk before its payload is kept, and (before the
session is accepted) the bytes received but not yet read. A peer that breaks them loses the link
at once; closing, aborting or dropping a channel lets go of whatever it still held.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from privinf.ledger.counting import Ledger
from protocols.net import aio_loop
from protocols.net.channels import (
    DEFAULT_TIMEOUT_S,
    Channel,
    Frame,
    FrameKind,
    PeerAborted,
    PeerLost,
    ProtocolError,
    TransportError,
)
from protocols.net.framing import (
    CHUNK_BYTES,
    GRPC_PREFIX_BYTES,
    MAX_MESSAGE_BYTES,
    SESSION_LIMITS,
    FrameAssembler,
    LimitExceeded,
    LinkLimits,
    TransportConfigError,
    WireChunk,
    decode_wire,
    wire_bytes,
    wire_chunks,
)
from protocols.net.names import SESSION_ID_RULE, is_session_id
from protocols.net.wire import pb

GRPC_MAX_CHUNK_MESSAGE = CHUNK_BYTES + (64 << 10)  # a chunk plus generous header room
LINK_SERVICE = "privinf.wire.v1.PartyLink"  # privinf.proto's service
LINK_METHOD = f"/{LINK_SERVICE}/Link"
META_SESSION = "privinf-session"
META_ROLE = "privinf-role"
ABORT_FLUSH_S = 1.0  # an aborting dialer gives its ABORT frame this long to reach the peer


_CUT = b""  # an empty chunk never leaves a sender (every chunk carries a header): "cut the stream now"


class LinkCut(Exception):
    """The serving end cut its stream (limits broken, nobody accepted it, dropped)."""


class PeerRefused(TransportError):
    """A link was refused: TLS handshake, certificate role, or a session already open."""


class PeerBusy(PeerRefused):
    """The peer is full for now; ``retry_after_s`` says when trying again makes sense."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def check_session(session: str) -> str:
    """Return ``session`` if it is a valid session id (:data:`protocols.net.names.SESSION_ID_RULE`)."""
    if not is_link_session(session):
        raise TransportConfigError(f"invalid session id {session!r}: {SESSION_ID_RULE}")
    return session


def is_link_session(session: object) -> bool:
    """Whether ``session`` may name a link: the one session-id rule of :mod:`protocols.net.names`."""
    return is_session_id(session)


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive: ping every ``interval_s``; a peer silent ``timeout_s`` longer is dead."""

    interval_s: float = 1.0
    timeout_s: float = 4.0

    def options(self, server: bool) -> list[tuple[str, int]]:
        """gRPC channel or server options for this keepalive."""
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


DEFAULT_KEEPALIVE = Keepalive()


def message_options(max_receive: int = GRPC_MAX_CHUNK_MESSAGE) -> list[tuple[str, int]]:
    """gRPC's own per-message bounds: one chunk plus header room."""
    return [("grpc.max_receive_message_length", max_receive),
            ("grpc.max_send_message_length", GRPC_MAX_CHUNK_MESSAGE)]


def open_link(grpc_channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    """The dialing side's ``Link`` call, with the party links' own (de)serializers (the wire
    format is privinf.proto's ``Frame``; payloads are copied once each way, not three times)."""
    return grpc_channel.stream_stream(LINK_METHOD, request_serializer=wire_bytes,
                                      response_deserializer=decode_wire, _registered_method=True)


def link_handler(link: Callable[..., Coroutine[Any, Any, None]]) -> grpc.RpcMethodHandler:
    """The serving side's ``Link`` handler, with the same (de)serializers as :func:`open_link`."""
    return grpc.stream_stream_rpc_method_handler(link, request_deserializer=decode_wire,
                                                 response_serializer=wire_bytes)


class GrpcChannel(Channel):
    """A :class:`Channel` over one gRPC bidi stream. Made by :func:`protocols.net.grpc_link.connect`
    or :meth:`protocols.net.grpc_server.PartyServer.accept`, not directly.

    Closing: the serving end's ``close()`` returns at once (its server's ``stop()`` flushes);
    the dialing end's ``close()`` waits, up to ``close_timeout_s``, for the serving end to close
    too, so that nothing still queued is lost when the process exits. Close the serving end
    first when one thread holds both ends.
    """

    def __init__(self, local: str, peer: str, session: str, ledger: Ledger | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, chunk_bytes: int = CHUNK_BYTES,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, limits: LinkLimits | None = None) -> None:
        super().__init__(local, peer, session, ledger, timeout_s)
        if not 1 <= chunk_bytes <= CHUNK_BYTES:
            raise TransportConfigError(f"chunk size must be 1..{CHUNK_BYTES} bytes, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.peer_name = peer  # who holds the peer's certificate (its client name; the role if none)
        self._assembler = FrameAssembler(peer, limits=limits if limits is not None else (
            SESSION_LIMITS if max_message_bytes == MAX_MESSAGE_BYTES else LinkLimits(max_message_bytes)))
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()  # serialized chunks, read on the link loop
        self._inbox: queue.SimpleQueue[Frame | TransportError] = queue.SimpleQueue()
        self._unread = 0  # payload bytes in the inbox
        self._unread_lock = threading.Lock()
        self._link_error: TransportError | None = None
        self._reader_started = False
        self._reader_done = threading.Event()
        self._cut = False  # set before _CUT is queued: the writer stops before what is still queued
        self._release: Callable[[bool], None] | None = None
        self._failure_hooks: list[Callable[[TransportError], None]] = []
        self.close_wait_s = 0.0  # how long an orderly close waits for the peer to close too (dialing end)

    def on_failure(self, hook: Callable[[TransportError], None]) -> None:
        """Call ``hook(error)`` once, on the link loop (so it must not block), when the link breaks or
        the peer aborts."""
        self._failure_hooks.append(hook)

    def _failed(self, error: TransportError) -> None:
        hooks, self._failure_hooks = self._failure_hooks, []
        for hook in hooks:
            hook(error)

    def _wake(self, error: TransportError) -> None:
        self._inbox.put(error)

    @property
    def limits(self) -> LinkLimits:
        """The limits the peer's frames are held to now."""
        return self._assembler.limits

    def set_limits(self, limits: LinkLimits) -> None:
        """Change what the peer may send from its next frame on (the session was accepted)."""
        self._assembler.limits = limits

    @property
    def max_message_bytes(self) -> int:
        """The largest frame the peer may send now."""
        return self._assembler.limits.max_message_bytes

    async def outgoing(self) -> AsyncIterator[bytes]:
        """The serialized chunks this end sends, in order; ends when the channel closes (on the link loop)."""
        while True:
            msg = await self._outbox.get()
            if self._cut:
                raise LinkCut(f"{self.local}: link to {self.peer} cut")
            if msg is None:
                return
            yield msg

    def cut_sending(self) -> None:
        """Make :meth:`outgoing` raise :class:`LinkCut` at once (from any thread)."""
        self._cut = True
        aio_loop.post(self._outbox.put_nowait, _CUT)

    def end_sending(self) -> None:
        """End :meth:`outgoing` after what is queued (from any thread)."""
        aio_loop.post(self._outbox.put_nowait, None)

    def start_reader(self, stream: AsyncIterable[pb.Frame | WireChunk]) -> None:
        """Drain the peer's stream into the inbox on the link loop (once)."""
        if self._reader_started:
            return
        self._reader_started = True
        aio_loop.spawn(self._read(stream))

    def _check_buffer(self) -> None:
        bound = self.limits.max_buffered_bytes
        held = self._unread + self._assembler.buffered_bytes
        if bound is not None and held > bound:
            raise LimitExceeded(f"{self.local}: {self.peer} sent {held} bytes ahead of the party, above the "
                                f"{bound}-byte limit of the {self.limits.phase} phase")

    async def _read(self, stream: AsyncIterable[pb.Frame | WireChunk]) -> None:
        ended = False  # the peer sent CLOSE or ABORT: what follows does not matter
        error: TransportError | None = None
        try:
            async for msg in stream:
                if self._closed:
                    break
                frame = self._assembler.feed(msg)
                if frame is not None:
                    with self._unread_lock:
                        self._unread += len(frame.payload)
                    self._inbox.put(frame)
                    ended = ended or frame.kind != FrameKind.DATA
                    if frame.kind == FrameKind.ABORT:
                        self._failed(PeerAborted(f"{self.peer} aborted: {frame.payload.decode(errors='replace')}"))
                self._check_buffer()
            pending = self._assembler.pending()
            if pending is not None and not self._closed:
                error = ProtocolError(f"{self.local}: stream from {self.peer} ended inside a frame: {pending}")
            elif not ended and not self._closed:
                error = PeerLost(f"{self.local}: {self.peer} ended session {self.session!r} without closing it")
        except ProtocolError as exc:
            error = exc
        except grpc.RpcError as exc:
            if not ended:
                error = _lost(self, exc)
        except asyncio.CancelledError:  # the call was cancelled here (drop, close) or the loop stops
            if not ended and not self._closed:
                error = PeerLost(f"{self.local}: link to {self.peer} in session {self.session!r} was cut")
        except Exception as exc:
            error = PeerLost(f"{self.local}: link to {self.peer} failed: {type(exc).__name__}: {exc}")
        finally:
            self._assembler.clear()
            if error is not None:
                self._link_error = error
                self._inbox.put(error)
                self._failed(error)
            self._reader_done.set()
        if isinstance(error, LimitExceeded) and self._release is not None:
            self._release(False)  # cut at once: nothing more from this peer is kept

    def _send_frame(self, frame: Frame) -> int:
        if isinstance(self._link_error, PeerLost):
            raise PeerLost(f"{self.local}: cannot send {frame.tag!r}: {self._link_error}")
        wire = 0
        for chunk in wire_chunks(frame, self.chunk_bytes):  # the writer takes each as it is made
            aio_loop.post(self._outbox.put_nowait, chunk)
            wire += len(chunk) + GRPC_PREFIX_BYTES
        return wire

    def _recv_frame(self, timeout: float) -> Frame:
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if isinstance(item, TransportError):
            self._inbox.put(item)  # sticky: every later receive fails the same way
            raise item
        with self._unread_lock:
            self._unread -= len(item.payload)
        return item

    def wait_peer_closed(self, timeout: float) -> bool:
        """Wait until the peer's stream has ended; True if it did within ``timeout``."""
        return self._reader_done.wait(timeout)

    def _forget_unread(self) -> None:
        """Let go of frames nobody will read (the channel is closed)."""
        try:
            while True:
                item = self._inbox.get_nowait()
                if isinstance(item, TransportError):
                    self._link_error = self._link_error or item
        except queue.Empty:
            pass
        with self._unread_lock:
            self._unread = 0
        if self._link_error is not None:
            self._inbox.put(self._link_error)

    def abort(self, reason: str) -> None:
        """Tell the peer this party failed, then close without waiting long for the peer: a
        failing session must not hang on a peer that may be what failed."""
        self.close_wait_s = min(self.close_wait_s, ABORT_FLUSH_S)
        super().abort(reason)

    def _shutdown(self) -> None:
        self.end_sending()
        if self._release is not None:
            self._release(True)
        self._forget_unread()

    def drop(self) -> None:
        """Cut the link without a CLOSE frame, as a crash would (the peer sees PeerLost)."""
        self._closed = True
        if self._release is not None:
            self._release(False)  # cancel first: ending the sender first would end the RPC with OK
        self.end_sending()
        self._forget_unread()


def _lost(channel: GrpcChannel, exc: grpc.RpcError) -> PeerLost:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    details = details or "connection reset or keepalive timeout"
    return PeerLost(f"{channel.local}: lost link to {channel.peer} in session {channel.session!r} ({code}: {details})")


def fail_together(*channels: Channel | None) -> None:
    """Links of one session end together: when one breaks or its peer aborts, a receive waiting
    on any of the others raises at once (naming the failed link) instead of waiting out its timeout."""
    links = [channel for channel in channels if isinstance(channel, GrpcChannel)]
    for link in links:
        others = [other for other in links if other is not link]

        def spread(error: TransportError, others: list[GrpcChannel] = others) -> None:
            for other in others:
                other.interrupt(PeerLost(f"{other.local}: session {other.session!r} ended: {error}"))

        link.on_failure(spread)
