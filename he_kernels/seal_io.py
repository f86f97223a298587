"""Bytes in and out of SEAL objects, and the protobuf messages that carry them (``seal.proto``).

TenSEAL's raw SEAL bindings (``tenseal.sealapi``) only save to and load from a file path. We
give them an anonymous in-memory file (``memfd_create``) and read the bytes back, so nothing
touches the disk and nothing is pickled. Several SEAL objects travel together as one typed
protobuf message (a context, an encrypted matrix, a list of ciphertexts): :func:`parse` reads one
and refuses input that is oversized, not that message, or carries fields the schema lacks.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from tenseal import sealapi as sa

from he_kernels._generated import seal_pb2 as pb

# protobuf's own ceiling for one message is 2 GiB; a public context with Galois keys for many
# steps at N=32768 stays well below.
MAX_MESSAGE_BYTES = (1 << 31) - 1
# One ciphertext per packed slot vector; far above any layout the kernels make.
MAX_CIPHERTEXTS = 1 << 16

M = TypeVar("M", bound=Message)

__all__ = ["MAX_CIPHERTEXTS", "MAX_MESSAGE_BYTES", "SerializationError", "ciphertexts_from_bytes",
           "ciphertexts_to_bytes", "load_bytes", "load_ciphertexts", "parse", "pb", "save_bytes"]


class SerializationError(ValueError):
    """Bytes that are not a valid privinf HE message or SEAL object."""


def _memfd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def save_bytes(obj: Any) -> bytes:
    """Serialize a SEAL object (ciphertext, key, parameters) to bytes via an in-memory file."""
    fd = os.memfd_create("seal-save")
    try:
        obj.save(_memfd_path(fd))
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def load_bytes(obj: Any, data: bytes, context: sa.SEALContext | None = None) -> Any:
    """Fill ``obj`` (a fresh SEAL object) from bytes; ``context`` validates it when given."""
    if not data:
        raise SerializationError(f"empty bytes for a SEAL {type(obj).__name__}")
    fd = os.memfd_create("seal-load")
    try:
        os.write(fd, data)
        try:
            if context is None:
                obj.load(_memfd_path(fd))
            else:
                obj.load(context, _memfd_path(fd))
        except (RuntimeError, ValueError) as exc:
            raise SerializationError(f"SEAL rejected {type(obj).__name__} bytes: {exc}") from None
    finally:
        os.close(fd)
    return obj


def parse(message_type: type[M], data: bytes) -> M:
    """Read one ``message_type`` from ``data``, refusing oversized, corrupt or foreign input.

    Fields unknown to the schema (another message, junk around a valid one) and encodings that
    are not the canonical one our writer produces are refused, not skipped.
    """
    name = message_type.DESCRIPTOR.name
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SerializationError(f"HE {name} must be bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise SerializationError(f"HE {name} of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    message = message_type()
    try:
        message.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise SerializationError(f"malformed HE {name}: {exc}") from None
    message.DiscardUnknownFields()
    if message.ByteSize() != len(data):
        raise SerializationError(f"malformed HE {name}: {len(data) - message.ByteSize()} bytes of unknown or "
                                 f"repeated fields")
    return message


def ciphertexts_to_bytes(cts: list[sa.Ciphertext]) -> bytes:
    """A list of ciphertexts as one :class:`pb.Ciphertexts` message."""
    return pb.Ciphertexts(ciphertexts=[save_bytes(ct) for ct in cts]).SerializeToString()


def ciphertexts_from_bytes(seal_context: sa.SEALContext, data: bytes, expected: int) -> list[sa.Ciphertext]:
    """Inverse of :func:`ciphertexts_to_bytes`; refuses a count other than ``expected``."""
    message = parse(pb.Ciphertexts, data)
    if len(message.ciphertexts) != expected:
        raise SerializationError(f"expected {expected} ciphertexts, got {len(message.ciphertexts)}")
    return load_ciphertexts(seal_context, message.ciphertexts)


def load_ciphertexts(seal_context: sa.SEALContext, blobs: Any) -> list[sa.Ciphertext]:
    """SEAL ciphertexts from their bytes, each validated against ``seal_context``."""
    if len(blobs) > MAX_CIPHERTEXTS:
        raise SerializationError(f"{len(blobs)} ciphertexts exceed the limit of {MAX_CIPHERTEXTS}")
    return [load_bytes(sa.Ciphertext(), blob, seal_context) for blob in blobs]
