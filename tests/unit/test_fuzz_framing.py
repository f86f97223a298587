"""Property-based fuzzing of the wire format: chunking and reassembly (FrameAssembler), array
encoding, and what a channel makes of arbitrary frames. Whatever a peer sends, a party either
gets back exactly what was sent or a ProtocolError (never another exception), and never holds
more than the link's limits allow."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocols.net.channels import (
    ARRAY_DTYPES,
    Frame,
    FrameKind,
    MemoryChannel,
    ProtocolError,
    decode_array,
    encode_array,
)
from protocols.net.framing import (
    CHUNK_BYTES,
    HELLO_LIMITS,
    PART_OVERHEAD_BYTES,
    FrameAssembler,
    LimitExceeded,
    LinkLimits,
    encode_chunks,
)
from protocols.net.wire import pb

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
DTYPES = sorted(ARRAY_DTYPES)
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    """A well-formed frame: an array of an allowed dtype, raw bytes or JSON."""
    kind = draw(st.sampled_from(["array", "bytes", "json"]))
    if kind == "array":
        array = draw(hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, max_side=9)))
        dtype, shape, payload = encode_array(array)
    elif kind == "bytes":
        payload = draw(st.binary(max_size=300))
        dtype, shape = "bytes", (len(payload),)
    else:
        payload = json.dumps(draw(st.recursive(st.none() | st.integers() | text, lambda c: st.lists(c, max_size=3),
                                               max_leaves=8))).encode()
        dtype, shape = "json", (len(payload),)
    return Frame(draw(text), draw(st.integers(0, 2**63)), draw(text), draw(st.sampled_from(list(FrameKind))),
                 dtype, shape, payload)


@FUZZ
@given(frame=frames(), chunk=st.integers(1, 64))
def test_chunks_reassemble_to_the_same_frame(frame: Frame, chunk: int) -> None:
    chunks, wire = encode_chunks(frame, chunk)
    assembler = FrameAssembler("peer")
    got = [assembler.feed(msg) for msg in chunks]
    assert got[:-1] == [None] * (len(chunks) - 1)
    whole = got[-1]
    assert (whole.session, whole.seq, whole.tag, whole.kind, whole.dtype, whole.shape, whole.payload) == (
        frame.session, frame.seq, frame.tag, frame.kind, frame.dtype, frame.shape, frame.payload)
    assert whole.wire == wire and assembler.pending() is None and assembler.buffered_bytes == 0


def _mutate(chunks: list[pb.Frame], data: st.DataObject) -> list[pb.Frame]:
    """Drop, repeat, swap or rewrite one header field of one chunk."""
    chunks = [pb.Frame.FromString(msg.SerializeToString()) for msg in chunks]
    index = data.draw(st.integers(0, len(chunks) - 1))
    action = data.draw(st.sampled_from(["drop", "repeat", "swap", "field", "payload"]))
    if action == "drop":
        del chunks[index]
    elif action == "repeat":
        chunks.insert(index, chunks[index])
    elif action == "swap" and len(chunks) > 1:
        other = data.draw(st.integers(0, len(chunks) - 1))
        chunks[index], chunks[other] = chunks[other], chunks[index]
    elif action == "field":
        name = data.draw(st.sampled_from(["seq", "chunk_index", "chunk_count", "total_bytes", "kind"]))
        top = 2**31 - 1 if name == "kind" else 2**32 - 1  # kind is an enum: int32 on the wire
        setattr(chunks[index], name, data.draw(st.integers(0, top)))
    else:
        chunks[index].payload = data.draw(st.binary(max_size=80))
    return chunks


@FUZZ
@given(frame=frames(), chunk=st.integers(1, 64), data=st.data())
def test_corrupted_chunks_give_the_frame_or_a_protocol_error(frame: Frame, chunk: int, data: st.DataObject) -> None:
    chunks = _mutate(encode_chunks(frame, chunk)[0], data)
    assembler = FrameAssembler("peer")
    try:
        out = [f for f in (assembler.feed(msg) for msg in chunks) if f is not None]
    except ProtocolError:
        return
    for whole in out:  # whatever got through is self-consistent
        assert len(whole.payload) == whole.shape[0] if whole.dtype in ("bytes", "json") else True
        if whole.dtype in ARRAY_DTYPES:
            assert decode_array(whole.dtype, whole.shape, whole.payload).nbytes == len(whole.payload)


chunk_messages = st.builds(
    pb.Frame, session=text, seq=st.integers(0, 2**64 - 1), tag=text, kind=st.integers(0, 5),
    dtype=st.sampled_from([*DTYPES, "bytes", "json", "object", ""]),
    shape=st.lists(st.integers(0, 2**64 - 1), max_size=4), chunk_index=st.integers(0, 2**32 - 1),
    chunk_count=st.integers(0, 2**32 - 1), total_bytes=st.integers(0, 2**64 - 1), payload=st.binary(max_size=2048))


@FUZZ
@given(messages=st.lists(chunk_messages, max_size=12), small=st.booleans())
def test_arbitrary_chunks_never_break_the_assembler_or_its_bound(messages: list[pb.Frame], small: bool) -> None:
    limits = HELLO_LIMITS if small else LinkLimits(4096)
    assembler = FrameAssembler("peer", limits=limits)
    for msg in messages:
        try:
            whole = assembler.feed(msg)
        except LimitExceeded:
            assert msg.total_bytes > limits.max_message_bytes
            return
        except ProtocolError:
            return
        held = assembler.buffered_bytes
        assert held <= limits.max_message_bytes * (1 + PART_OVERHEAD_BYTES)  # one byte per chunk at worst
        assert held - PART_OVERHEAD_BYTES * (msg.chunk_count or 1) <= limits.max_message_bytes
        if whole is not None:
            assert len(whole.payload) <= limits.max_message_bytes


@FUZZ
@given(array=hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=4, max_side=6)))
def test_arrays_round_trip(array: np.ndarray) -> None:
    dtype, shape, payload = encode_array(array)
    back = decode_array(dtype, shape, payload)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


@FUZZ
@given(dtype=st.sampled_from([*DTYPES, "object", "U4", "bytes"]), shape=st.lists(st.integers(0, 2**40), max_size=4),
       payload=st.binary(max_size=256))
def test_decoding_arbitrary_headers_is_an_array_or_a_protocol_error(dtype: str, shape: list[int],
                                                                   payload: bytes) -> None:
    try:
        array = decode_array(dtype, tuple(shape), payload)
    except ProtocolError:
        return
    assert array.nbytes == len(payload) and list(array.shape) == shape


@FUZZ
@given(payload=st.binary(max_size=4096) | st.just(b"[" * 5000 + b"]" * 5000) | st.just(b'{"a":' * 3000 + b"1"))
def test_channel_json_is_a_value_or_a_protocol_error(payload: bytes) -> None:
    inbox: queue.Queue[Frame] = queue.Queue()
    channel = MemoryChannel("me", "peer", "s", inbox, queue.Queue(), timeout_s=1)
    inbox.put(Frame("s", 0, "hello", FrameKind.DATA, "json", (len(payload),), payload))
    try:
        channel.recv_json("hello")
    except ProtocolError:
        pass


def test_fuzz_knows_the_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk size"):
        encode_chunks(Frame("s", 0, "t", FrameKind.DATA, "bytes", (0,), b""), CHUNK_BYTES + 1)
