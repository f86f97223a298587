"""Packing layouts and the encrypted tensor type that kernels pass to each other.

Column-block layout (the activations' layout) for a matrix [n tokens, d features]: slots are cut
into blocks of ``block`` slots (a power of two >= n); each block holds one feature column for all
tokens, so one ciphertext holds ``slots // block`` columns and [n, d] needs
``ceil(d / (slots // block))`` ciphertexts. Token-wise ops are slot-wise, x @ W rotates whole
blocks (see :mod:`he_kernels.linear`), and a row reduction (LayerNorm) sums blocks by rotations.
With ``duplicated`` the rows n..2n-1 of every block repeat rows 0..n-1, so a slot rotation by
r < n reads token (i + r) mod n: attention uses this to pair every query with every key.

Diagonal layout (attention scores/weights [n, n]): ciphertext r holds S[i, (i + r) mod n] at row
i of every block. Row sums over keys are plain additions of the n ciphertexts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tenseal import sealapi as sa

from he_kernels import seal_io
from he_kernels.context import HEContext


class LayoutError(ValueError):
    """Shapes or layouts that a kernel cannot combine."""


class OutOfRangeError(ValueError):
    """Input outside the range an approximation is valid on (refused before encryption)."""


@dataclass(frozen=True)
class Domain:
    """The interval an approximation is stated (and tested) on."""

    lo: float
    hi: float
    name: str = "approximation"

    def __post_init__(self) -> None:
        if not self.lo < self.hi:
            raise ValueError(f"empty domain [{self.lo}, {self.hi}] for {self.name}")

    def check(self, values: torch.Tensor | np.ndarray) -> None:
        """Raise :class:`OutOfRangeError` if any value lies outside [lo, hi]."""
        arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        if arr.size == 0:
            return
        low, high = float(arr.min()), float(arr.max())
        if not np.isfinite(low) or not np.isfinite(high) or low < self.lo or high > self.hi:
            raise OutOfRangeError(
                f"{self.name}: input range [{low:.4g}, {high:.4g}] outside [{self.lo}, {self.hi}]"
            )


@dataclass(frozen=True)
class ColumnLayout:
    """[rows, cols] packed column per block; see the module docstring."""

    rows: int
    cols: int
    block: int
    slots: int
    duplicated: bool = False

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise LayoutError(f"empty matrix shape [{self.rows}, {self.cols}]")
        if self.block & (self.block - 1) or self.slots % self.block:
            raise LayoutError(f"block {self.block} must be a power of two dividing {self.slots}")
        if self.valid_rows > self.block:
            raise LayoutError(f"{self.valid_rows} rows do not fit a block of {self.block} slots")

    @classmethod
    def for_shape(cls, rows: int, cols: int, slots: int, duplicated: bool = False) -> ColumnLayout:
        """Smallest power-of-two block that fits the (possibly duplicated) rows."""
        need = rows * (2 if duplicated else 1)
        block = 1 << max(0, (need - 1).bit_length())
        if block > slots:
            raise LayoutError(f"{rows} rows (duplicated={duplicated}) exceed {slots} slots")
        return cls(rows, cols, block, slots, duplicated)

    @property
    def valid_rows(self) -> int:
        """Rows holding data (2n when duplicated); the rest of each block is zero."""
        return self.rows * (2 if self.duplicated else 1)

    @property
    def cols_per_ct(self) -> int:
        return self.slots // self.block

    @property
    def n_cts(self) -> int:
        return -(-self.cols // self.cols_per_ct)

    def with_cols(self, cols: int, duplicated: bool | None = None) -> ColumnLayout:
        dup = self.duplicated if duplicated is None else duplicated
        return ColumnLayout(self.rows, cols, self.block, self.slots, dup)

    def row_mask(self) -> np.ndarray:
        """1 on the valid rows of one block, 0 elsewhere."""
        mask = np.zeros(self.block)
        mask[: self.valid_rows] = 1.0
        return mask

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """Slot vectors for a [rows, cols] array."""
        if x.shape != (self.rows, self.cols):
            raise LayoutError(f"expected shape {(self.rows, self.cols)}, got {tuple(x.shape)}")
        padded = np.zeros((self.n_cts * self.cols_per_ct, self.block))
        padded[: self.cols, : self.rows] = x.T
        if self.duplicated:
            padded[: self.cols, self.rows : 2 * self.rows] = x.T
        return [padded[g * self.cols_per_ct : (g + 1) * self.cols_per_ct].ravel() for g in range(self.n_cts)]

    def unpack(self, vectors: list[np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`pack` (reads rows 0..n-1)."""
        blocks = np.concatenate([v[: self.slots].reshape(self.cols_per_ct, self.block) for v in vectors])
        return blocks[: self.cols, : self.rows].T.copy()


@dataclass(frozen=True)
class DiagonalLayout:
    """[n, n] scores: ciphertext r holds S[i, (i + r) % n] at row i of every block."""

    rows: int
    block: int
    slots: int

    @property
    def cols(self) -> int:
        return self.rows

    @property
    def n_cts(self) -> int:
        return self.rows

    def pack(self, s: np.ndarray) -> list[np.ndarray]:
        n = self.rows
        if s.shape != (n, n):
            raise LayoutError(f"expected shape {(n, n)}, got {tuple(s.shape)}")
        out = []
        for r in range(n):
            block = np.zeros(self.block)
            block[:n] = s[np.arange(n), (np.arange(n) + r) % n]
            out.append(np.tile(block, self.slots // self.block))
        return out

    def unpack(self, vectors: list[np.ndarray]) -> np.ndarray:
        n = self.rows
        s = np.zeros((n, n))
        for r, vec in enumerate(vectors):
            s[np.arange(n), (np.arange(n) + r) % n] = vec[:n]
        return s


Layout = ColumnLayout | DiagonalLayout


@dataclass
class EncTensor:
    """Ciphertexts plus the layout that says which slot holds which matrix entry."""

    cts: list[sa.Ciphertext]
    layout: Layout

    def __post_init__(self) -> None:
        if len(self.cts) != self.layout.n_cts:
            raise LayoutError(f"{len(self.cts)} ciphertexts for a layout needing {self.layout.n_cts}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.layout.rows, self.layout.cols)

    def level(self, ctx: HEContext) -> int:
        """Levels consumed so far (the deepest ciphertext)."""
        return max(ctx.level_used(ct) for ct in self.cts)

    def to_bytes(self) -> bytes:
        """Layout plus the SEAL ciphertexts as an ``EncTensor`` protobuf message (what goes on the wire)."""
        message = seal_io.pb.EncTensor(ciphertexts=[seal_io.save_bytes(ct) for ct in self.cts])
        lay = self.layout
        if isinstance(lay, ColumnLayout):
            message.column.CopyFrom(seal_io.pb.ColumnLayout(rows=lay.rows, cols=lay.cols, block=lay.block,
                                                            slots=lay.slots, duplicated=lay.duplicated))
        else:
            message.diagonal.CopyFrom(seal_io.pb.DiagonalLayout(rows=lay.rows, block=lay.block, slots=lay.slots))
        return message.SerializeToString()

    @classmethod
    def from_bytes(cls, ctx: HEContext, data: bytes) -> EncTensor:
        """Inverse of :meth:`to_bytes`; the layout is checked before any ciphertext is loaded."""
        message = seal_io.parse(seal_io.pb.EncTensor, data)
        kind = message.WhichOneof("layout")
        if kind == "column":
            c = message.column
            layout: Layout = ColumnLayout(c.rows, c.cols, c.block, c.slots, c.duplicated)
        elif kind == "diagonal":
            d = message.diagonal
            layout = DiagonalLayout(d.rows, d.block, d.slots)
        else:
            raise seal_io.SerializationError("encrypted tensor carries no layout")
        if layout.slots != ctx.slots:
            raise LayoutError(f"layout for {layout.slots} slots, the context has {ctx.slots}")
        if len(message.ciphertexts) != layout.n_cts:
            raise LayoutError(f"{len(message.ciphertexts)} ciphertexts for a layout needing {layout.n_cts}")
        return cls(seal_io.load_ciphertexts(ctx.seal, message.ciphertexts), layout)


def encrypt_matrix(
    ctx: HEContext,
    x: torch.Tensor,
    duplicated: bool = False,
    domain: Domain | None = None,
    block: int | None = None,
) -> EncTensor:
    """Client side: check ``x`` against ``domain`` (if any), pack by columns and encrypt."""
    if x.dim() != 2:
        raise LayoutError(f"encrypt_matrix needs a 2-D tensor, got shape {tuple(x.shape)}")
    if domain is not None:
        domain.check(x)
    rows, cols = x.shape
    layout = (ColumnLayout(rows, cols, block, ctx.slots, duplicated) if block
              else ColumnLayout.for_shape(rows, cols, ctx.slots, duplicated))
    vectors = layout.pack(x.detach().double().cpu().numpy())
    return EncTensor([ctx.encrypt(v) for v in vectors], layout)


def decrypt_matrix(ctx: HEContext, enc: EncTensor) -> torch.Tensor:
    """Client side: decrypt and unpack to a float64 tensor."""
    return torch.from_numpy(enc.layout.unpack([ctx.decrypt(ct) for ct in enc.cts]))
