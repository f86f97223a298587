"""Point-to-point channels between parties: the interface every protocol speaks.

A :class:`Channel` is an ordered, reliable, bidirectional link from one party to one peer within
one session. Payloads are numpy arrays (sent as dtype + shape + raw bytes), raw bytes, or JSON
control messages; nothing is pickled. Every frame carries the session id, a per-direction
sequence number and a tag naming what the receiver expects, so a truncated, reordered or
mistagged frame is detected and reported instead of being misread.

Two implementations share this framing: :class:`MemoryChannel` (in-process queues, for unit
tests) and the gRPC + mutual TLS channel in :mod:`protocols.net.grpc_link`. Both count every
frame in the party's :class:`~privinf.ledger.counting.Ledger` as it is sent or received.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import numpy as np

from privinf.ledger.counting import Ledger

DEFAULT_TIMEOUT_S = 120.0
HEADER_BYTES = 32  # counted per frame on top of the payload: ids, seq, tag, dtype, shape

_ALLOWED_DTYPES = {
    "int64", "int32", "int16", "int8", "uint8", "bool", "float64", "float32", "float16",
}
ARRAY_DTYPES = frozenset(_ALLOWED_DTYPES)  # array dtypes a frame may carry (besides bytes, json)
_LITTLE = {name: np.dtype(name).newbyteorder("<") for name in _ALLOWED_DTYPES}  # the wire's dtypes
_NATIVE_NAMES = {np.dtype(name): name for name in _ALLOWED_DTYPES}  # a native array's dtype -> its name
MAX_DIMS = 32  # numpy's own limit on dimensions
MAX_ARRAY_BYTES = 1 << 40  # no frame shape may describe more (with zero-sized dimensions counted as 1)


class TransportError(RuntimeError):
    """Base class for errors raised by channels."""


class ProtocolError(TransportError):
    """A frame arrived that this party did not expect (tag, order, session, dtype, size)."""


class PeerAborted(TransportError):
    """The peer reported a failure and stopped."""


class PeerLost(TransportError):
    """The link to the peer broke (process died, network gone) or it went silent too long."""


class IdleTimeout(PeerLost):
    """The peer sent nothing within the receive timeout (``timeout_s``): the session's idle limit."""

    def __init__(self, message: str, limit_s: float) -> None:
        super().__init__(message)
        self.limit_s = limit_s


class FrameKind(str, Enum):
    DATA = "data"
    ABORT = "abort"
    CLOSE = "close"


@dataclass(frozen=True)
class Frame:
    """One logical message, before chunking. ``payload`` is raw bytes: a writable ``bytearray``
    when the transport assembled an array's chunks into a buffer of its own (decoded without a
    copy), a read-only view of the array being sent on the sending side."""

    session: str
    seq: int
    tag: str
    kind: FrameKind
    dtype: str
    shape: tuple[int, ...]
    payload: bytes | bytearray | memoryview
    wire: int = 0  # bytes this frame took on the link, when the transport measured them

    @property
    def wire_bytes(self) -> int:
        """Measured link bytes if known, else payload plus a nominal header."""
        return self.wire or len(self.payload) + HEADER_BYTES + len(self.tag)


@dataclass
class LinkStats:
    """Per-channel totals of data frames: payload bytes alone and bytes on the link."""

    frames_sent: int = 0
    frames_recv: int = 0
    payload_sent: int = 0
    payload_recv: int = 0
    wire_sent: int = 0
    wire_recv: int = 0
    largest_recv: int = 0  # payload bytes of the largest frame received (what the link's limit must admit)


def array_payload(array: np.ndarray) -> tuple[str, tuple[int, ...], bytes | memoryview]:
    """dtype name, shape and a byte view of ``array`` in little-endian C order (no copy when it
    already is: the caller must not change the array while the view is in use)."""
    array = np.asarray(array, order="C")  # not ascontiguousarray: it turns 0-d arrays into 1-d
    name = _NATIVE_NAMES.get(array.dtype) or array.dtype.name  # numpy's name lookup is Python, per call
    if name not in _ALLOWED_DTYPES:
        raise TypeError(f"cannot send dtype {name}; allowed: {sorted(_ALLOWED_DTYPES)}")
    little = np.asarray(array, dtype=_LITTLE[name], order="C")  # no copy if already LE
    data = memoryview(little).cast("B") if little.size else b""  # a view of no bytes cannot be cast
    return name, tuple(int(d) for d in array.shape), data


def encode_array(array: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """dtype name, shape and little-endian C-order bytes of ``array``."""
    name, shape, data = array_payload(array)
    return name, shape, bytes(data)


def array_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes an array of ``dtype`` and ``shape`` holds; ProtocolError for a shape no array can
    have (negative, or so large that numpy cannot even describe it, zero-sized or not)."""
    if any(d < 0 for d in shape) or len(shape) > MAX_DIMS:
        raise ProtocolError(f"frame has an impossible shape {list(shape)}")
    itemsize = _LITTLE[dtype].itemsize if dtype in _LITTLE else np.dtype(dtype).itemsize
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_ARRAY_BYTES:
        raise ProtocolError(f"frame shape {list(shape)} of {dtype} is beyond any array this link carries")
    return math.prod(shape) * itemsize


def decode_array(dtype: str, shape: tuple[int, ...], payload: bytes) -> np.ndarray:
    """Inverse of :func:`encode_array`, checking the payload size against dtype and shape."""
    if dtype not in _ALLOWED_DTYPES:
        raise ProtocolError(f"frame has unknown dtype {dtype!r}")
    expected = array_bytes(dtype, shape)
    if expected != len(payload):
        raise ProtocolError(
            f"frame payload is {len(payload)} bytes but dtype {dtype} shape {list(shape)} "
            f"needs {expected} (truncated or corrupt frame)"
        )
    array = np.frombuffer(payload, dtype=_LITTLE[dtype])
    if array.dtype.isnative and array.flags.writeable:
        return array.reshape(shape)  # a bytearray the transport assembled for this frame alone: no copy
    # a writable copy; a plain copy when little-endian is native (about 4x faster than astype)
    return (array.copy() if array.dtype.isnative else array.astype(dtype)).reshape(shape)


class Channel(ABC):
    """Ordered link from ``local`` to ``peer`` for one session. Not shared between threads
    for sending; one thread may send while another receives."""

    def __init__(self, local: str, peer: str, session: str, ledger: Ledger | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.local = local
        self.peer = peer
        self.session = session
        self.ledger = ledger
        self.timeout_s = timeout_s
        self._send_seq = 0
        self._recv_seq = 0
        self._closed = False
        self._peer_error: TransportError | None = None
        self.stats = LinkStats()

    # ----- subclass hooks -----------------------------------------------------------------
    @abstractmethod
    def _send_frame(self, frame: Frame) -> int | None:
        """Put one frame on the link (may chunk it); return the bytes it took if measured. A payload
        that is not ``bytes`` is a view of the sender's array: copy what is kept past this call."""

    @abstractmethod
    def _recv_frame(self, timeout: float) -> Frame:
        """Next whole frame from the peer; raise PeerLost / TimeoutError."""

    def _shutdown(self) -> None:  # noqa: B027 - optional hook: links without resources keep it empty
        """Release link resources (called once by close)."""

    def _wake(self, error: TransportError) -> None:  # noqa: B027 - optional hook
        """Make a receive blocked on this link raise ``error`` (links that can block override it)."""

    def interrupt(self, error: TransportError) -> None:
        """End this link's session from outside: the next receive (or the one waiting now) raises
        ``error``. Used when another link of the same session failed."""
        if self._peer_error is None:
            self._peer_error = error
        self._wake(error)

    # ----- sending ------------------------------------------------------------------------
    def send(self, tag: str, payload: np.ndarray | bytes | Any) -> None:
        """Send an array (numpy or torch) or raw bytes under ``tag``."""
        if self._closed:
            raise TransportError(f"{self.local}: channel to {self.peer} is closed")
        if isinstance(payload, (bytes, bytearray, memoryview)):
            dtype, shape, data = "bytes", (len(payload),), bytes(payload)
        else:
            if hasattr(payload, "detach"):  # torch tensor: host copy, no torch on the wire
                payload = payload.detach().cpu().numpy()
            dtype, shape, data = array_payload(np.asarray(payload))  # a view: _send_frame copies what it keeps
        self._emit(FrameKind.DATA, tag, dtype, shape, data)

    def send_json(self, tag: str, obj: Any) -> None:
        """Send a small control message as UTF-8 JSON."""
        data = json.dumps(obj, sort_keys=True).encode()
        self._emit(FrameKind.DATA, tag, "json", (len(data),), data)

    def _emit(self, kind: FrameKind, tag: str, dtype: str, shape: tuple[int, ...], data: bytes | memoryview) -> None:
        frame = Frame(self.session, self._send_seq, tag, kind, dtype, shape, data)
        self._send_seq += 1
        measured = self._send_frame(frame)
        wire = frame.wire_bytes if measured is None else measured
        self.stats.frames_sent += 1
        self.stats.payload_sent += len(data)
        self.stats.wire_sent += wire
        if self.ledger is not None:
            self.ledger.record_send(wire)

    # ----- receiving ----------------------------------------------------------------------
    def _next(self, tag: str, timeout: float | None) -> Frame:
        if self._peer_error is not None:
            raise self._peer_error
        wait = self.timeout_s if timeout is None else timeout
        started = time.perf_counter()
        try:
            frame = self._recv_frame(wait)
        except TimeoutError:
            limit = " (timeout_s, the session's idle limit)" if timeout is None else ""
            raise IdleTimeout(
                f"{self.local}: no message {tag!r} from {self.peer} within {wait:g} s{limit}", wait
            ) from None
        finally:
            if self.ledger is not None:
                self.ledger.record_wait(time.perf_counter() - started)
        if frame.kind == FrameKind.ABORT:
            self._peer_error = PeerAborted(f"{self.peer} aborted: {frame.payload.decode(errors='replace')}")
            raise self._peer_error
        if frame.kind == FrameKind.CLOSE:
            self._peer_error = PeerLost(f"{self.peer} closed the session while {self.local} expected {tag!r}")
            raise self._peer_error
        self.stats.frames_recv += 1
        self.stats.payload_recv += len(frame.payload)
        self.stats.largest_recv = max(self.stats.largest_recv, len(frame.payload))
        self.stats.wire_recv += frame.wire_bytes
        if self.ledger is not None:
            self.ledger.record_recv(frame.wire_bytes)
        if frame.session != self.session:
            raise ProtocolError(f"{self.local}: frame for session {frame.session!r}, expected {self.session!r}")
        if frame.seq != self._recv_seq:
            raise ProtocolError(
                f"{self.local}: frame {frame.seq} from {self.peer} out of order (expected {self._recv_seq})"
            )
        self._recv_seq += 1
        if frame.tag != tag:
            raise ProtocolError(f"{self.local}: expected {tag!r} from {self.peer}, got {frame.tag!r}")
        return frame

    def recv(self, tag: str, timeout: float | None = None) -> np.ndarray | bytes:
        """Receive the next message, which must carry ``tag``."""
        frame = self._next(tag, timeout)
        if frame.dtype == "bytes":
            return frame.payload
        if frame.dtype == "json":
            raise ProtocolError(f"{self.local}: {tag!r} is a JSON message; use recv_json")
        return decode_array(frame.dtype, frame.shape, frame.payload)

    def recv_json(self, tag: str, timeout: float | None = None) -> Any:
        """Receive the next message, which must be JSON under ``tag`` (ProtocolError if it is not)."""
        frame = self._next(tag, timeout)
        if frame.dtype != "json":
            raise ProtocolError(f"{self.local}: expected JSON for {tag!r}, got dtype {frame.dtype}")
        try:
            return json.loads(frame.payload.decode())
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
            raise ProtocolError(f"{self.local}: {tag!r} is not valid JSON: {exc}") from None

    # ----- ending -------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        """Tell the peer this party failed (reason must hold no secrets), then close."""
        if self._closed:
            return
        data = reason.encode()[:4096]
        try:
            self._send_frame(Frame(self.session, self._send_seq, "abort", FrameKind.ABORT, "bytes",
                                   (len(data),), data))
        except Exception:
            pass
        self._close()

    def close(self) -> None:
        """Orderly end of the session on this link."""
        if self._closed:
            return
        try:
            self._send_frame(Frame(self.session, self._send_seq, "close", FrameKind.CLOSE, "bytes", (0,), b""))
        except Exception:
            pass
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._shutdown()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None:
            self.abort(f"{self.local} failed: {type(exc).__name__}")
        else:
            self.close()


class MemoryChannel(Channel):
    """In-process channel over queues: same framing and checks as the network channel."""

    def __init__(self, local: str, peer: str, session: str, inbox: queue.Queue[Frame],
                 outbox: queue.Queue[Frame], ledger: Ledger | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(local, peer, session, ledger, timeout_s)
        self._inbox = inbox
        self._outbox = outbox

    def _send_frame(self, frame: Frame) -> None:
        if not isinstance(frame.payload, bytes):  # the sender's array view: keep a copy, it may change
            frame = replace(frame, payload=bytes(frame.payload))
        self._outbox.put(frame)
        return None

    def _recv_frame(self, timeout: float) -> Frame:
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if isinstance(item, TransportError):
            raise item
        return item

    def _wake(self, error: TransportError) -> None:
        self._inbox.put(error)


def memory_pair(a: str, b: str, session: str = "local", ledger_a: Ledger | None = None,
                ledger_b: Ledger | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
                ) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected in-memory channels: ``a``'s end and ``b``'s end."""
    a_to_b: queue.Queue[Frame] = queue.Queue()
    b_to_a: queue.Queue[Frame] = queue.Queue()
    return (
        MemoryChannel(a, b, session, b_to_a, a_to_b, ledger_a, timeout_s),
        MemoryChannel(b, a, session, a_to_b, b_to_a, ledger_b, timeout_s),
    )


def run_parties(*targets: Any, timeout_s: float = 300.0) -> list[Any]:
    """Run callables in threads (one per party, in-memory tests); return results in order,
    re-raising the first failure."""
    results: list[Any] = [None] * len(targets)
    errors: list[BaseException | None] = [None] * len(targets)

    def wrap(i: int, fn: Any) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        if t.is_alive():
            raise TimeoutError(f"party thread did not finish within {timeout_s} s")
    for err in errors:
        if err is not None:
            raise err
    return results
