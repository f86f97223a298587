"""Cryptographically secure randomness for shares, masks and triples: AES-128-CTR keystreams.

Every random ring element privinf puts into a share, a mask or a Beaver triple comes from here,
never from ``torch.Generator`` (Mersenne Twister, whose state is recoverable from its output).

A *seed* is 16 bytes from ``os.urandom``. A *stream* is the AES-128-CTR keystream (counter from
zero) under a key derived from ``(seed, label)`` by HKDF-SHA256, so one seed yields any number
of independent streams named by labels (``"tuple/17"``, ``"ws/encoder.0.q/3/A"``); two parties
holding the same seed and label expand the identical sequence, and different labels give
computationally independent sequences. Streams are read sequentially: successive calls continue
the keystream, so parties that issue the same calls in the same order stay in step.

Ring elements are uniform in Z_2^64 represented as torch.int64 (two's complement), which is
CrypTen's share representation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 16
_KDF_CONTEXT = b"privinf/csprng/v1|"
_ZERO_IV = bytes(16)
_CHUNK = 1 << 22  # keystream produced per AES call
_ZEROS = bytes(_CHUNK)  # the plaintext: the keystream is the AES-CTR encryption of zeros
_SLACK = 15  # cryptography's update_into wants room for a block beyond the input


class CsprngError(ValueError):
    """Bad seed, label, shape or bit length given to the CSPRNG."""


def new_seed() -> bytes:
    """A fresh 128-bit seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


def check_seed(seed: bytes) -> bytes:
    """Return ``seed`` as bytes after checking it is exactly 16 bytes."""
    if not isinstance(seed, (bytes, bytearray)):
        raise CsprngError(f"seed must be bytes, got {type(seed).__name__}")
    if len(seed) != SEED_BYTES:
        raise CsprngError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return bytes(seed)


def hkdf_sha256(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF (extract, then expand) with SHA-256, as ``cryptography`` implements it."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def derive_key(seed: bytes, label: str) -> bytes:
    """128-bit AES key for stream ``label`` of ``seed``: HKDF-SHA256 with ``info`` = context + label.

    No salt (RFC 5869's default, HashLen zero bytes): the seed is already a uniform 128-bit key,
    so extraction needs no salt to be sound, and both parties derive the same key from the seed
    alone. Domain separation lives in ``info`` (``privinf/csprng/v1|`` + the UTF-8 label).
    """
    if not isinstance(label, str):
        raise CsprngError(f"stream label must be str, got {type(label).__name__}")
    return hkdf_sha256(check_seed(seed), None, _KDF_CONTEXT + label.encode(), SEED_BYTES)


def _shape(shape: int | Iterable[int]) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    out = tuple(int(d) for d in shape)
    if any(d < 0 for d in out):
        raise CsprngError(f"shape has a negative dimension: {list(out)}")
    return out


class Stream:
    """One AES-128-CTR keystream, read sequentially as bytes, ring elements or k-bit values.

    Not thread-safe: one stream belongs to one party's computation thread.
    """

    def __init__(self, seed: bytes, label: str = "") -> None:
        self._seed = check_seed(seed)
        self.label = label
        self._enc = Cipher(algorithms.AES(derive_key(self._seed, label)), modes.CTR(_ZERO_IV)).encryptor()
        self.bytes_used = 0

    def __repr__(self) -> str:  # never shows the seed
        return f"Stream(label={self.label!r}, bytes_used={self.bytes_used})"

    def child(self, label: str) -> Stream:
        """An independent stream for ``label`` below this one (same seed, label path joined by '/')."""
        return Stream(self._seed, f"{self.label}/{label}" if self.label else label)

    def read_into(self, out: bytearray | memoryview) -> None:
        """Fill ``out`` with the next ``len(out)`` keystream bytes."""
        view = memoryview(out).cast("B")
        self._fill(view, len(view))

    def _fill(self, view: memoryview, n: int) -> None:
        """Write the next ``n`` keystream bytes into ``view[:n]``, straight into it (no copy)
        wherever ``view`` has room for the cipher's slack, through a small buffer otherwise."""
        done = 0
        while done < n:
            step = min(_CHUNK, n - done)
            zeros = memoryview(_ZEROS)[:step]
            if len(view) - done >= step + _SLACK:
                self._enc.update_into(zeros, view[done:])
            else:
                tail = bytearray(step + _SLACK)
                self._enc.update_into(zeros, tail)
                view[done:done + step] = memoryview(tail)[:step]
            done += step
        self.bytes_used += n

    def read(self, n: int) -> bytes:
        """The next ``n`` keystream bytes."""
        if n < 0:
            raise CsprngError(f"cannot read {n} bytes")
        buf = bytearray(n)
        self.read_into(buf)
        return bytes(buf)

    def _words(self, count: int, itemsize: int) -> bytearray:
        nbytes = count * itemsize
        buf = bytearray(nbytes + _SLACK)
        self._fill(memoryview(buf), nbytes)
        return buf

    def ring(self, shape: int | Iterable[int]) -> torch.Tensor:
        """Uniform elements of Z_2^64 as an int64 tensor of ``shape``."""
        dims = _shape(shape)
        count = math.prod(dims)
        if count == 0:
            return torch.empty(dims, dtype=torch.int64)
        out = torch.empty(count + 2, dtype=torch.int64)  # 16 bytes of room for the cipher's slack
        self._fill(memoryview(out.numpy()).cast("B"), count * 8)
        return out[:count].reshape(dims)

    def bits(self, shape: int | Iterable[int], bitlength: int = 1) -> torch.Tensor:
        """Uniform integers in [0, 2**bitlength) as int64; ``bitlength`` 64 means the full ring."""
        if not isinstance(bitlength, int) or not 1 <= bitlength <= 64:
            raise CsprngError(f"bitlength must be an int in 1..64, got {bitlength!r}")
        if bitlength == 64:
            return self.ring(shape)
        dims = _shape(shape)
        count = math.prod(dims)
        if count == 0:
            return torch.empty(dims, dtype=torch.int64)
        # Masking a uniform w-bit word to its low k bits (k <= w) is exactly uniform.
        widths = ((8, torch.uint8), (16, torch.int16), (32, torch.int32), (64, torch.int64))
        width, dtype = next((w, d) for w, d in widths if bitlength <= w)
        buf = self._words(count, width // 8)
        words = torch.frombuffer(buf, dtype=dtype, count=count).to(torch.int64)
        return words.bitwise_and_((1 << bitlength) - 1).reshape(dims)
