"""Bytes in and out of SEAL objects, and a small framed container for several blobs.

TenSEAL's raw SEAL bindings (``tenseal.sealapi``) only save to and load from a file path. We
give them an anonymous in-memory file (``memfd_create``) and read the bytes back, so nothing
touches the disk and nothing is pickled. The container format is: magic, a JSON header, then
length-prefixed blobs.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from tenseal import sealapi as sa

MAGIC = b"PIHE1"


class SerializationError(ValueError):
    """Bytes that are not a valid privinf HE container or SEAL object."""


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


def pack(header: dict[str, Any], blobs: list[bytes]) -> bytes:
    """Frame a JSON header and blobs into one byte string."""
    head = json.dumps(header, sort_keys=True).encode()
    parts = [MAGIC, struct.pack("<I", len(head)), head, struct.pack("<I", len(blobs))]
    for blob in blobs:
        parts.append(struct.pack("<Q", len(blob)))
        parts.append(blob)
    return b"".join(parts)


def unpack(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Inverse of :func:`pack`; raises :class:`SerializationError` on malformed input."""
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise SerializationError("not a privinf HE container (bad magic)")
    pos = len(MAGIC)
    try:
        (head_len,) = struct.unpack_from("<I", view, pos)
        pos += 4
        header = json.loads(bytes(view[pos : pos + head_len]))
        pos += head_len
        (count,) = struct.unpack_from("<I", view, pos)
        pos += 4
        blobs = []
        for _ in range(count):
            (size,) = struct.unpack_from("<Q", view, pos)
            pos += 8
            if pos + size > len(view):
                raise SerializationError("truncated HE container")
            blobs.append(bytes(view[pos : pos + size]))
            pos += size
    except (struct.error, json.JSONDecodeError) as exc:
        raise SerializationError(f"malformed HE container: {exc}") from None
    if pos != len(view):
        raise SerializationError("trailing bytes after HE container")
    return header, blobs
