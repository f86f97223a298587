"""Party links' own chunk (de)serializers and the copies they save: the same bytes as protobuf's,
the same counts, payloads as views where nothing can change them, copies where something can."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.net.channels import Frame, FrameKind, ProtocolError, array_payload, decode_array, memory_pair
from protocols.net.framing import (
    FrameAssembler,
    chunk_wire_bytes,
    decode_wire,
    encode_chunks,
    encode_wire,
    header_bytes,
)
from protocols.net.wire import pb


def _frame(payload: bytes | memoryview, dtype: str = "bytes", shape: tuple[int, ...] | None = None) -> Frame:
    shape = (len(payload),) if shape is None else shape
    return Frame("s1", 300, "dealer.corr", FrameKind.DATA, dtype, shape, payload)


@pytest.mark.parametrize("size,chunk", [(0, 1 << 20), (5, 1 << 20), (1000, 300), (70_000, 128), (1 << 20, 1 << 20)])
def test_encode_wire_matches_protobuf(size: int, chunk: int) -> None:
    frame = _frame(bytes(range(256)) * (size // 256) + bytes(size % 256))
    chunks, wire = encode_chunks(frame, chunk)
    blobs, blob_wire = encode_wire(frame, chunk)
    assert blobs == [m.SerializeToString() for m in chunks]
    assert wire == blob_wire == sum(m.ByteSize() + 5 for m in chunks)


def test_encode_wire_of_an_array_view() -> None:
    array = np.arange(-5000, 5000, dtype=np.int64).reshape(100, 100)
    dtype, shape, view = array_payload(array)
    assert isinstance(view, memoryview) and view.obj is not None  # no copy of the array
    blobs, _ = encode_wire(_frame(view, dtype, shape), 4096)
    assembler = FrameAssembler("dealer")
    frames = [assembler.feed(decode_wire(blob)) for blob in blobs]
    whole = frames[-1]
    assert frames[:-1] == [None] * (len(blobs) - 1) and whole is not None
    np.testing.assert_array_equal(decode_array(whole.dtype, whole.shape, whole.payload), array)


def test_decode_wire_keeps_payload_as_view() -> None:
    data = bytes(range(256)) * 16
    msg = pb.Frame(session="s1", seq=7, tag="t", dtype="bytes", shape=[4096], chunk_count=1, total_bytes=4096,
                   payload=data)
    raw = msg.SerializeToString()
    chunk = decode_wire(raw)
    assert isinstance(chunk.payload, memoryview) and chunk.payload.obj is raw
    assert bytes(chunk.payload) == data
    assert (chunk.session, chunk.seq, chunk.tag, list(chunk.shape), chunk.total_bytes) == ("s1", 7, "t", [4096], 4096)


def test_decode_wire_reads_as_protobuf_does() -> None:
    head = pb.Frame(session="s1", seq=2, tag="t", dtype="bytes", shape=[2], chunk_count=1, total_bytes=2)
    first = pb.Frame(payload=b"zzzz").SerializeToString()
    last = pb.Frame(payload=b"ok").SerializeToString()
    raw = first + head.SerializeToString() + last  # payload before the header, and repeated: the last wins
    chunk, reference = decode_wire(raw), pb.Frame.FromString(raw)
    assert bytes(chunk.payload) == reference.payload == b"ok"
    assert (chunk.session, chunk.seq, list(chunk.shape)) == (reference.session, reference.seq, list(reference.shape))


@pytest.mark.parametrize("raw", [
    b"\x52\x05ab",  # payload field running past the end
    b"\x0a\x09s1",  # session string running past the end
    b"\x10\xff\xff",  # truncated varint
    b"\x10" + b"\xff" * 11 + b"\x01",  # overlong varint
    b"\x0b",  # start group: not in privinf.proto
    b"\x11\x00\x00",  # fixed64 cut short
])
def test_decode_wire_refuses_broken_messages(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_wire(raw)


@pytest.mark.parametrize("index,payload", [(0, 0), (0, 1), (1, 1 << 20), (200, 127), (70_000, 128), (3, 0)])
def test_chunk_wire_bytes_is_bytesize(index: int, payload: int) -> None:
    msg = pb.Frame(session="abc", seq=1 << 40, tag="x" * 30, kind=pb.FRAME_KIND_DATA, dtype="int64",
                   shape=[4, 1 << 20], chunk_index=index, chunk_count=index + 1, total_bytes=1 << 30,
                   payload=bytes(payload))
    assert chunk_wire_bytes(header_bytes(msg), index, payload) == msg.ByteSize() + 5


def test_assembled_arrays_decode_without_copy() -> None:
    array = np.arange(3000, dtype=np.int64)
    blobs, _ = encode_wire(_frame(array.tobytes(), "int64", (3000,)), 1000)
    assembler = FrameAssembler("dealer")
    whole = [assembler.feed(decode_wire(blob)) for blob in blobs][-1]
    assert isinstance(whole.payload, bytearray)
    decoded = decode_array("int64", (3000,), whole.payload)
    assert decoded.flags.writeable and np.shares_memory(decoded, np.frombuffer(whole.payload, np.int64))
    frozen = decode_array("int64", (3000,), bytes(whole.payload))  # read-only bytes: a writable copy
    assert frozen.flags.writeable
    np.testing.assert_array_equal(frozen, array)


def test_text_frames_stay_bytes() -> None:
    blobs, _ = encode_wire(_frame(b"x" * 2500), 1000)
    assembler = FrameAssembler("dealer")
    whole = [assembler.feed(decode_wire(blob)) for blob in blobs][-1]
    assert type(whole.payload) is bytes and whole.payload == b"x" * 2500


def test_memory_channel_keeps_what_was_sent() -> None:
    sender, receiver = memory_pair("dealer", "client")
    array = np.arange(10, dtype=np.int64)
    sender.send("t", array)
    array[:] = -1  # the sender reuses its array: the message must not change
    np.testing.assert_array_equal(receiver.recv("t"), np.arange(10))


def test_small_payload_in_a_large_message_is_copied() -> None:
    # a peer padding tiny chunks with large header fields must not make kept chunks hold the padding
    padded = pb.Frame(session="s1", tag="t" * 100_000, dtype="bytes", shape=[1], chunk_count=1, total_bytes=1,
                      payload=b"x").SerializeToString()
    chunk = decode_wire(padded)
    assert bytes(chunk.payload) == b"x" and chunk.payload.obj is not padded
    big = pb.Frame(session="s1", tag="t", dtype="bytes", shape=[1 << 20], chunk_count=1, total_bytes=1 << 20,
                   payload=bytes(1 << 20)).SerializeToString()
    assert decode_wire(big).payload.obj is big
