"""Frames on the wire: a :class:`~protocols.net.channels.Frame` cut into gRPC chunk messages, and
put back together under limits that depend on the phase of the link.

A link starts in the *hello* phase: until the receiving party has accepted the session, a peer
may send only small frames (:data:`HELLO_LIMITS`) and only a little of them may wait unread. The
party then lifts the limits to what the session needs: limits derived from the agreed session's
shapes (``mpc_parties.session_limits``), under the :data:`SESSION_LIMITS` ceiling of 2 GiB.
The announced size of a frame is checked against the limit
in force when its first chunk arrives, before any payload is kept, so an unauthenticated peer
never makes a party assemble a large frame.

Party links serialize their chunks themselves (:func:`wire_chunks`, :func:`decode_wire`; the
wire format is still privinf.proto's ``Frame``): a payload is copied once on each side (into the
serialized chunk; out of the received chunks into the frame's buffer, which the array decoder
then uses as it is) instead of three times through protobuf's message objects. Dealer material,
hundreds of MiB per inference, is what this is for (bench/dealer_link.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from protocols.net.channels import ARRAY_DTYPES, Frame, FrameKind, ProtocolError, array_bytes
from protocols.net.wire import pb

CHUNK_BYTES = 1 << 20
GRPC_PREFIX_BYTES = 5  # gRPC's length-prefixed message header: flag byte + 4-byte length
MAX_MESSAGE_BYTES = 1 << 31  # largest logical message a session link accepts (2 GiB)
HELLO_MESSAGE_BYTES = 16 << 10  # largest frame before the session is accepted
HELLO_BUFFER_BYTES = 64 << 10  # received but unread bytes allowed before the session is accepted
PART_OVERHEAD_BYTES = 64  # what one kept chunk costs beyond its payload (bytes object, list slot)
_TEXT_DTYPES = {"bytes", "json"}
KIND_TO_WIRE = {FrameKind.DATA: pb.FRAME_KIND_DATA, FrameKind.ABORT: pb.FRAME_KIND_ABORT,
                FrameKind.CLOSE: pb.FRAME_KIND_CLOSE}
WIRE_TO_KIND = {v: k for k, v in KIND_TO_WIRE.items()}
_PAYLOAD_FIELD = 10  # Frame.payload in privinf.proto
_PAYLOAD_KEY = bytes([_PAYLOAD_FIELD << 3 | 2])  # its tag: field 10, length-delimited
_FIXED_BYTES = {1: 8, 5: 4}  # protobuf wire types of fixed size: 64-bit, 32-bit
VIEW_SLACK_SHIFT = 4  # a received payload stays a view of its message if the rest is <= payload / 2^4


class TransportConfigError(ValueError):
    """Bad transport argument (session id, role, sizes)."""


class LimitExceeded(ProtocolError):
    """The peer sent more than the link's limits allow (frame size or unread bytes)."""


@dataclass(frozen=True)
class LinkLimits:
    """What a link takes from its peer: the largest frame, and how many received bytes may wait
    unread by the party (``None``: no bound)."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_buffered_bytes: int | None = None
    phase: str = "session"  # named in errors: "hello" (before the session is accepted) or "session"

    def __post_init__(self) -> None:
        if not 0 <= self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise TransportConfigError(f"max_message_bytes must be 0..{MAX_MESSAGE_BYTES}, "
                                       f"got {self.max_message_bytes}")
        if self.max_buffered_bytes is not None and self.max_buffered_bytes < self.max_message_bytes:
            raise TransportConfigError("max_buffered_bytes must hold at least one whole message")


HELLO_LIMITS = LinkLimits(HELLO_MESSAGE_BYTES, HELLO_BUFFER_BYTES, "hello")
SESSION_LIMITS = LinkLimits()


def _varint_bytes(value: int) -> int:
    """Bytes protobuf's varint encoding of ``value`` (>= 0) takes."""
    return max(1, (value.bit_length() + 6) // 7)


def header_bytes(msg: pb.Frame) -> int:
    """Serialized bytes of ``msg``'s header fields: all but ``chunk_index`` and ``payload``,
    which :func:`chunk_wire_bytes` adds per chunk (protobuf's own ``ByteSize`` of a 1 MiB chunk
    serializes it: about as much CPU as sending it)."""
    return pb.Frame(session=msg.session, seq=msg.seq, tag=msg.tag, kind=msg.kind, dtype=msg.dtype,
                    shape=msg.shape, chunk_count=msg.chunk_count, total_bytes=msg.total_bytes).ByteSize()


def chunk_wire_bytes(header: int, index: int, payload: int) -> int:
    """Bytes one chunk takes on the link: ``header`` (:func:`header_bytes`), its chunk index and
    payload fields (fields 7 and 10: one tag byte each, left out when zero / empty) and gRPC's prefix."""
    size = header + GRPC_PREFIX_BYTES
    if index:
        size += 1 + _varint_bytes(index)
    if payload:
        size += 1 + _varint_bytes(payload) + payload
    return size


def _chunking(frame: Frame, chunk_bytes: int) -> tuple[memoryview, int, dict[str, Any]]:
    """``frame``'s payload, its chunk count and the header fields every chunk repeats."""
    if not 1 <= chunk_bytes <= CHUNK_BYTES:
        raise TransportConfigError(f"chunk size must be 1..{CHUNK_BYTES} bytes, got {chunk_bytes}")
    data = memoryview(frame.payload)
    count = max(1, math.ceil(len(data) / chunk_bytes))
    fields = {"session": frame.session, "seq": frame.seq, "tag": frame.tag, "kind": KIND_TO_WIRE[frame.kind],
              "dtype": frame.dtype, "shape": frame.shape, "chunk_count": count, "total_bytes": len(data)}
    return data, count, fields


def encode_chunks(frame: Frame, chunk_bytes: int = CHUNK_BYTES) -> tuple[list[pb.Frame], int]:
    """Wire chunks of ``frame`` and the bytes they take on the link (messages + gRPC prefixes).
    Each chunk holds a copy of its slice of the payload (the frame's may be a view of an array)."""
    data, count, fields = _chunking(frame, chunk_bytes)
    header = header_bytes(pb.Frame(**fields))
    chunks = []
    wire = 0
    for index in range(count):
        piece = bytes(data[index * chunk_bytes:(index + 1) * chunk_bytes])
        chunks.append(pb.Frame(chunk_index=index, payload=piece, **fields))
        wire += chunk_wire_bytes(header, index, len(piece))
    return chunks, wire


def _varint(value: int) -> bytes:
    """Protobuf's varint encoding of ``value`` (>= 0)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def wire_chunks(frame: Frame, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The serialized chunk messages of ``frame``, one at a time (the bytes protobuf makes of
    :func:`encode_chunks`' messages: fields in number order, the payload last). The payload is
    copied once, straight into the serialized chunk; a sender can queue each chunk as it is made."""
    data, count, fields = _chunking(frame, chunk_bytes)
    for index in range(count):
        head = pb.Frame(chunk_index=index, **fields).SerializeToString()
        piece = data[index * chunk_bytes:(index + 1) * chunk_bytes]
        yield b"".join((head, _PAYLOAD_KEY, _varint(len(piece)), piece)) if len(piece) else head


def encode_wire(frame: Frame, chunk_bytes: int = CHUNK_BYTES) -> tuple[list[bytes], int]:
    """All of :func:`wire_chunks` and the bytes they take on the link (with gRPC's prefixes)."""
    chunks = list(wire_chunks(frame, chunk_bytes))
    return chunks, sum(len(chunk) for chunk in chunks) + GRPC_PREFIX_BYTES * len(chunks)


class WireChunk:
    """A received chunk message: its header fields, parsed by protobuf, copied into slots once
    (the assembler reads each several times; a protobuf field read costs about as much as a
    Python call), its payload a view of the received bytes (no copy)."""

    __slots__ = ("session", "seq", "tag", "kind", "dtype", "shape", "chunk_index", "chunk_count",
                 "total_bytes", "payload")

    def __init__(self, header: pb.Frame, payload: memoryview) -> None:
        self.session, self.seq, self.tag, self.kind = header.session, header.seq, header.tag, header.kind
        self.dtype, self.shape, self.chunk_index = header.dtype, tuple(header.shape), header.chunk_index
        self.chunk_count, self.total_bytes = header.chunk_count, header.total_bytes
        self.payload = payload


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``raw[pos:]`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise ProtocolError("bad chunk message: truncated or overlong varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


_WHOLE_PARSE_BYTES = 4096  # messages up to this size are parsed whole by protobuf (see decode_wire)


def decode_wire(raw: bytes) -> WireChunk:
    """Parse one received chunk message (gRPC's deserializer for party links): the payload field
    (the last one if repeated, as protobuf takes it) is kept as a view of ``raw`` when the rest of
    ``raw`` is at most 1/16 of it (a 1 MiB chunk and its header; else it is copied, so what a kept
    chunk holds stays within 1/16 of the payload the limits count); every other field goes to
    protobuf's parser, which checks them as it would the whole message. A message of at most
    4 KiB (most of a session's rounds) goes to protobuf's parser whole: the same fields, parsed in
    C instead of field by field in Python, its payload copied (at most 4 KiB)."""
    if len(raw) <= _WHOLE_PARSE_BYTES:
        try:
            whole = pb.Frame.FromString(raw)
        except DecodeError as exc:
            raise ProtocolError(f"bad chunk message: {exc}") from None
        return WireChunk(whole, memoryview(whole.payload))
    view = memoryview(raw)
    header: list[memoryview] = []
    payload = view[0:0]
    pos = 0
    while pos < len(raw):
        start = pos
        key, pos = _read_varint(raw, pos)
        wire_type = key & 7
        if wire_type == 0:
            pos = _read_varint(raw, pos)[1]
        elif wire_type in _FIXED_BYTES:
            pos += _FIXED_BYTES[wire_type]
        elif wire_type == 2:
            size, pos = _read_varint(raw, pos)
            if key >> 3 == _PAYLOAD_FIELD and pos + size <= len(raw):
                payload, pos = view[pos:pos + size], pos + size
                continue
            pos += size
        else:
            raise ProtocolError(f"bad chunk message: wire type {wire_type}")
        if pos > len(raw):
            raise ProtocolError("bad chunk message: a field runs past its end")
        header.append(view[start:pos])
    if len(raw) - len(payload) > len(payload) >> VIEW_SLACK_SHIFT:
        payload = memoryview(bytes(payload))  # a view would keep the rest of ``raw`` alive, uncounted
    return WireChunk(pb.Frame.FromString(b"".join(header)), payload)


def wire_bytes(message: bytes | pb.Frame) -> bytes:
    """gRPC's serializer for party links: chunks come serialized (:func:`encode_wire`)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class FrameAssembler:
    """Rebuilds whole frames from wire chunks, checking that the chunks of a frame agree.

    ``limits`` may be replaced between frames (the link's phase changed); the frame being
    assembled keeps the check made at its first chunk. Order, session and tag of whole frames are
    checked by :class:`~protocols.net.channels.Channel` on receive.
    """

    _HEADER_FIELDS = ("session", "seq", "tag", "kind", "dtype", "chunk_count", "total_bytes")

    def __init__(self, peer: str, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 limits: LinkLimits | None = None) -> None:
        self.peer = peer
        self.limits = limits if limits is not None else LinkLimits(max_message_bytes)
        self._head: pb.Frame | WireChunk | None = None
        self._header = 0  # header_bytes of the frame being assembled
        self._parts: list[bytes | memoryview] = []
        self._size = 0
        self._wire = 0

    @property
    def buffered_bytes(self) -> int:
        """Memory held by the frame being assembled: payload kept so far plus per-chunk overhead."""
        return self._size + PART_OVERHEAD_BYTES * len(self._parts)

    def pending(self) -> str | None:
        """Describe a frame whose chunks are not all in, or None."""
        if self._head is None:
            return None
        return f"frame {self._head.seq} ({self._head.tag!r}) has {len(self._parts)} of {self._head.chunk_count} chunks"

    def clear(self) -> None:
        """Drop a partly assembled frame (the link ended)."""
        self._head, self._header, self._parts, self._size, self._wire = None, 0, [], 0, 0

    def _fail(self, what: str) -> ProtocolError:
        return ProtocolError(f"bad frame from {self.peer}: {what}")

    def _check_head(self, msg: pb.Frame | WireChunk) -> None:
        if msg.kind not in WIRE_TO_KIND:
            raise self._fail(f"frame {msg.seq} has unknown kind {msg.kind}")
        if msg.chunk_index != 0:
            raise self._fail(f"frame {msg.seq} starts at chunk {msg.chunk_index}: earlier chunks missing")
        limit = self.limits.max_message_bytes
        if msg.total_bytes > limit:
            raise LimitExceeded(f"bad frame from {self.peer}: frame {msg.seq} announces {msg.total_bytes} "
                                f"bytes, above the {limit}-byte limit of the {self.limits.phase} phase")
        if msg.chunk_count < max(1, math.ceil(msg.total_bytes / CHUNK_BYTES)):
            raise self._fail(f"frame {msg.seq}: {msg.chunk_count} chunks cannot hold {msg.total_bytes} bytes")
        if msg.chunk_count > max(1, msg.total_bytes):
            raise self._fail(f"frame {msg.seq}: {msg.chunk_count} chunks for {msg.total_bytes} bytes")
        if msg.dtype in _TEXT_DTYPES:
            if list(msg.shape) != [msg.total_bytes]:
                raise self._fail(f"frame {msg.seq}: {msg.dtype} shape {list(msg.shape)} != [{msg.total_bytes}]")
        elif msg.dtype in ARRAY_DTYPES:
            try:
                expected = array_bytes(msg.dtype, tuple(msg.shape))
            except ProtocolError as exc:
                raise self._fail(f"frame {msg.seq}: {exc}") from None
            if expected != msg.total_bytes:
                raise self._fail(f"frame {msg.seq}: dtype {msg.dtype} shape {list(msg.shape)} needs "
                                 f"{expected} bytes, header says {msg.total_bytes}")
        else:
            raise self._fail(f"frame {msg.seq} has unknown dtype {msg.dtype!r}")

    def _check_next(self, head: pb.Frame | WireChunk, msg: pb.Frame | WireChunk) -> None:
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

    def feed(self, msg: pb.Frame | WireChunk) -> Frame | None:
        """Take one chunk; return the whole frame when its last chunk arrives. An array's chunks
        are joined into a ``bytearray`` its decoder uses without copying again."""
        payload = msg.payload  # each read of a bytes field copies it out of the message
        if len(payload) > CHUNK_BYTES:
            raise self._fail(f"chunk of {len(payload)} bytes exceeds {CHUNK_BYTES}")
        head = self._head
        if head is None:
            self._check_head(msg)
            head = self._head = msg
            self._header = header_bytes(msg)
        else:
            self._check_next(head, msg)
        if not payload and head.total_bytes:
            raise self._fail(f"chunk {msg.chunk_index} of frame {head.seq} is empty")
        if self._size + len(payload) > head.total_bytes:
            raise self._fail(f"frame {head.seq} carries more than its {head.total_bytes} bytes")
        self._parts.append(payload)
        self._size += len(payload)
        self._wire += chunk_wire_bytes(self._header, msg.chunk_index, len(payload))
        if len(self._parts) < head.chunk_count:
            return None
        if self._size != head.total_bytes:
            raise self._fail(f"frame {head.seq} has {self._size} bytes, header says {head.total_bytes}")
        whole = (b"" if head.dtype in _TEXT_DTYPES else bytearray()).join(self._parts)
        frame = Frame(head.session, head.seq, head.tag, WIRE_TO_KIND[head.kind], head.dtype,
                      tuple(int(d) for d in head.shape), whole, self._wire)
        self.clear()
        return frame
