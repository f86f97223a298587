"""KV-stationary Beaver triples: a secret-shared KV cache whose masks never change.

A cached key or value row never changes once appended, so, as the weight-stationary triples of
:mod:`protocols.mpc.secure_linear` do for weights, each appended block of K (or V) rows gets a fixed
Beaver mask ``B = B0 + B1`` and ``F = K - B`` is opened **once**, when the block is cached.
Every later product with the cache opens only the fresh operand:

* ``q K^T`` (scores): open ``E = q - A`` (heads x d elements per query), with ``C = A B^T``;
* ``w V`` (attention output): open ``E = w - A`` (heads x n elements), with ``C = A B``.

The same holds for any secret operand used several times: ``mpcache``'s one-hot selection
``S`` (kind ``s``, stored as ``S^T`` [clusters, chosen]) is opened once per step and selecting
layer, then gathers scores (``pv``: ``(S m)^T = m^T S^T``) and scatters weights back (``qk``:
``(S^T p)^T = p^T S``) in every layer that shares it, opening only the scores and weights.

Party ``i`` holds ``F`` (public to both), its mask share ``B_i`` and, after the product, the share
``z_i = E B_i' + A_i F' + C_i (+ E F' for party 0)`` where ``'`` is the transpose for ``q K^T``;
the shares sum to ``(E + A)(F + B)' = q K'``. Per decode step the cache costs O(heads (d + n))
ring elements instead of CrypTen's O(heads n d) (a fresh Beaver triple re-opens K and V).

Randomness: ``B_i``, ``A_i`` (and ``C_1``) are expanded by party ``i`` from the 128-bit seed it
shares with the dealer (``protocols.mpc.csprng.Stream``, one label per block / per product); the
dealer, which holds both seeds, sends party 0 the correction ``C_0 = A B' - C_1`` (offline
material: it depends only on public shapes, never on data).

Security (semi-honest, non-colluding dealer): ``F = K - B`` is opened once per block and ``B``
is uniform and unknown to either party (each holds one share), so ``F`` is a one-time pad of K.
A block's mask is never used with another K: block ids only grow within a session, and a cache
rewritten by an eviction (a new secret K) becomes a new block with a fresh mask. Each ``E`` is
masked by a fresh uniform ``A`` (the dealer refuses a product label twice). The difference of
two openings of the same data under different masks (``F - F' = B' - B``) involves masks only.
The dealer sees shapes and labels, no data. This is Beaver's protocol with one operand's
opening reused, the same argument as weight-stationary triples (DESIGN.md).

Fixed point: both operands at 2^16, products at 2^32, each party truncates its own share
(CrypTen's two-party local truncation; off by 1 ulp, or garbage with probability ~|y| 2^-32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from privinf.ledger.counting import Ledger, Phase
from protocols.mpc import fixed_point, ring_matmul
from protocols.mpc.cryptenlib import MPCTensor
from protocols.mpc.csprng import Stream, check_seed
from protocols.mpc.vocabulary import MSG_END, MSG_KV_TRIPLE, TAG_CORR, TAG_MSG
from protocols.net.channels import Channel

KINDS = ("k", "v", "s")  # keys, values, and mpcache's selection S^T (stationary for one step)
OPS = ("qk", "pv")
TAG_F = "kvs.F"
TAG_E = "kvs.E"


class StationaryError(ValueError):
    """Bad shape, reused label or malformed KV-stationary message."""


def block_mask(seed: bytes, layer: int, kind: str, block: int, shape: tuple[int, ...]) -> torch.Tensor:
    """This party's share of the fixed mask of one cached block [B, kv_heads, rows, d]."""
    return Stream(seed, f"kvs/{layer}/{kind}/blk/{block}").ring(tuple(shape))


def operand_masks(seed: bytes, rank: int, layer: int, kind: str, op: str, index: int,
                  a_shape: tuple[int, ...], c_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(A_i, C_i) of product ``index`` of ``op`` on ``(layer, kind)``; party 0's C comes from the dealer."""
    stream = Stream(seed, f"kvs/{layer}/{kind}/{op}/{index}")
    a = stream.ring(tuple(a_shape))
    return a, (stream.ring(tuple(c_shape)) if rank == 1 else None)


def _product(op: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right^T`` for ``qk``, ``left @ right`` for ``pv`` (int64, wraps mod 2^64), per batch
    entry and head with the ring kernel (:mod:`protocols.mpc.ring_matmul`; torch's batched int64
    matmul reads the cached rows ~4.5x slower): one call for all heads where the cache's heads sit
    one stride apart, else one per head; without the kernel torch's; the same ring elements."""
    if left.dim() != 4 or left.shape[:2] != right.shape[:2] or not ring_matmul.available():
        return torch.matmul(left, right.transpose(-2, -1) if op == "qk" else right)
    weight = right if op == "qk" else right.transpose(-2, -1)
    lead = tuple(left.shape[:2])
    if weight.shape[0] == 1 or weight.stride(0) == weight.shape[1] * weight.stride(1):  # heads one stride apart
        flat = left.reshape(-1, *left.shape[2:])
        out = ring_matmul.times_transposed_batched(flat, weight.flatten(0, 1))
        return out.reshape(*lead, *out.shape[1:])
    rows = [ring_matmul.times_transposed(left[b, h], weight[b, h]) for b in range(lead[0]) for h in range(lead[1])]
    return torch.stack(rows).reshape(*lead, *rows[0].shape)


def _c_shape(op: str, a_shape: tuple[int, ...], rows: int, dim: int) -> tuple[int, ...]:
    return a_shape[:-1] + ((rows,) if op == "qk" else (dim,))


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise StationaryError(f"{what} must be a list of non-negative ints, got {value!r}")
    return tuple(value)


# ----- the dealer side -----------------------------------------------------------------------
class StationaryDealer:
    """Computes party 0's correction ``C_0 = A B' - C_1`` for every KV-stationary product.

    Block masks are cached (they are re-used by every product on the block; recorded as the
    dealer's ``kv_masks`` storage). A product label is served once: a repeated label would
    re-use ``A`` and unmask the difference of two operands.
    """

    def __init__(self, seeds: dict[int, bytes], ledger: Ledger | None = None) -> None:
        if sorted(seeds) != [0, 1]:
            raise StationaryError(f"need seeds for ranks 0 and 1, got {sorted(seeds)}")
        self._seeds = {r: check_seed(s) for r, s in seeds.items()}
        self._ledger = ledger
        self._blocks: dict[tuple[int, str, int], torch.Tensor] = {}
        self._served: set[tuple[int, str, int]] = set()
        self._joined: dict[tuple[int, str], tuple[list[tuple[int, int]], _Rows, int]] = {}

    def __repr__(self) -> str:  # never shows the seeds
        return f"StationaryDealer(blocks={len(self._blocks)}, products={len(self._served)})"

    def _block(self, layer: int, kind: str, block: int, shape: tuple[int, ...]) -> torch.Tensor:
        key = (layer, kind, block)
        mask = self._blocks.get(key)
        if mask is None or tuple(mask.shape) != shape:
            if mask is not None:
                raise StationaryError(f"block {key} requested with shape {list(shape)}, "
                                      f"first seen as {list(mask.shape)}")
            mask = sum(block_mask(self._seeds[r], layer, kind, block, shape) for r in (0, 1))
            self._blocks[key] = mask
            if self._ledger is not None:
                with self._ledger.phase(Phase.OFFLINE):
                    self._ledger.record_storage("kv_masks", mask.numel() * 8)
        return mask

    def _joined_mask(self, layer: int, kind: str, blocks: list[tuple[int, int]], lead: tuple[int, ...],
                     dim: int) -> torch.Tensor:
        """The masks of ``blocks`` joined along the rows (a view); a request that extends the last
        one of ``(layer, kind)`` appends only its new blocks (a decode step: one row)."""
        key = (layer, kind)
        joined = self._joined.get(key)
        if joined is not None and blocks[:len(joined[0])] == joined[0]:
            done, rows, count = joined
            for b, n in blocks[len(done):]:
                rows = rows.extend(count, (self._block(layer, kind, b, lead + (n, dim)),))
                count += n
        else:
            rows = _Rows((torch.cat([self._block(layer, kind, b, lead + (n, dim)) for b, n in blocks], dim=2),),
                         64)
            count = rows.rows
        self._joined[key] = (list(blocks), rows, count)
        return rows.buffers[0][:, :, :count]

    def correction(self, msg: dict[str, Any]) -> torch.Tensor:
        """Party 0's C for one ``kvs_triple`` request (see :meth:`StationaryParty._product`)."""
        try:
            op, kind = msg["op"], msg["kind"]
            layer, index, dim = int(msg["layer"]), int(msg["index"]), int(msg["dim"])
            lead = _dims(msg["lead"], "lead")
            a_shape = _dims(msg["a_shape"], "a_shape")
            heads = torch.tensor(_dims(msg["heads"], "heads"), dtype=torch.long)
            blocks = [(int(b), int(n)) for b, n in msg["blocks"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StationaryError(f"malformed {MSG_KV_TRIPLE} request: {exc}") from None
        if op not in OPS or kind not in KINDS or not blocks or len(lead) != 2:
            raise StationaryError(f"bad {MSG_KV_TRIPLE} request: op={op!r} kind={kind!r} blocks={len(blocks)}")
        label = (layer, f"{kind}/{op}", index)
        if label in self._served:
            raise StationaryError(f"KV-stationary product {label} requested twice (mask reuse)")
        self._served.add(label)
        mask = self._joined_mask(layer, kind, blocks, lead, dim)
        if len(heads) != mask.shape[1] or not bool((heads == torch.arange(len(heads))).all()):
            mask = mask.index_select(1, heads)
        rows = mask.shape[2]
        c_shape = _c_shape(op, a_shape, rows, dim)
        a0, _ = operand_masks(self._seeds[0], 0, layer, kind, op, index, a_shape, c_shape)
        a1, c1 = operand_masks(self._seeds[1], 1, layer, kind, op, index, a_shape, c_shape)
        return _product(op, a0 + a1, mask) - c1

    def handles(self, msg: Any) -> bool:
        return isinstance(msg, dict) and msg.get("type") == MSG_KV_TRIPLE

    def reply(self, channel: Channel, msg: dict[str, Any]) -> None:
        """Answer one request on ``channel`` (offline material)."""
        corr = self.correction(msg)
        if self._ledger is None:
            channel.send(TAG_CORR, corr)
            return
        with self._ledger.phase(Phase.OFFLINE):
            channel.send(TAG_CORR, corr)

    def serve(self, channel: Channel) -> None:
        """Standalone loop (tests): answer requests until ``{"type": "end"}``."""
        while True:
            msg = channel.recv_json(TAG_MSG)
            if isinstance(msg, dict) and msg.get("type") == MSG_END:
                return
            if not self.handles(msg):
                raise StationaryError(f"unexpected dealer message {msg!r:.80}")
            self.reply(channel, msg)


class DealerLink:
    """Wraps the dealer's link to party 0 so :class:`protocols.mpc.dealer.Dealer` keeps serving it
    unchanged: ``kvs_triple`` requests are answered here, every other message passes through."""

    def __init__(self, channel: Channel, dealer: StationaryDealer) -> None:
        self._channel = channel
        self._dealer = dealer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def recv_json(self, tag: str, timeout: float | None = None) -> Any:
        while True:
            msg = self._channel.recv_json(tag, timeout)
            if tag != TAG_MSG or not self._dealer.handles(msg):
                return msg
            self._dealer.reply(self._channel, msg)


# ----- the computing parties -----------------------------------------------------------------
class _Rows:
    """Growable row buffers [B, H, capacity, d] shared by the successive snapshots of one layer's K
    (or V): appending to the latest snapshot writes the new rows in place (amortised O(rows
    appended), not a copy of the whole cache per decode step); appending to an older snapshot
    copies (its later rows belong to another snapshot)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], spare: int) -> None:
        rows = tensors[0].shape[2]
        self.buffers = tuple(_with_capacity(t, rows + spare) for t in tensors)
        self.rows = rows

    def extend(self, rows: int, tensors: tuple[torch.Tensor, ...]) -> _Rows:
        """Buffers holding the first ``rows`` rows then ``tensors`` (in place when possible)."""
        added = tensors[0].shape[2]
        if rows != self.rows or rows + added > self.buffers[0].shape[2]:
            head = tuple(b[:, :, :rows] for b in self.buffers)
            return _Rows(tuple(torch.cat([h, t], dim=2) for h, t in zip(head, tensors)), max(64, (rows + added) // 4))
        for buffer, tensor in zip(self.buffers, tensors):
            buffer[:, :, rows:rows + added] = tensor
        self.rows = rows + added
        return self


def _with_capacity(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    out = tensor.new_empty(tensor.shape[:2] + (capacity,) + tensor.shape[3:])
    out[:, :, :tensor.shape[2]] = tensor
    return out


@dataclass
class _Store:
    """One layer's K or V: the opened ``F`` and this party's share of the cache (party 0 ``F + B_0``,
    party 1 ``B_1``: what every product needs), in :class:`_Rows` buffers; the blocks composing it."""

    rows: _Rows
    count: int
    blocks: list[tuple[int, int]]

    @property
    def f(self) -> torch.Tensor:
        """The opened ``F = K - B`` [B, kv_heads, rows, d] (a view)."""
        return self.rows.buffers[0][:, :, :self.count]

    @property
    def own(self) -> torch.Tensor:
        """This party's additive share of the cache (a view)."""
        return self.rows.buffers[1][:, :, :self.count]

    def share(self, rank: int) -> torch.Tensor:
        """This party's additive share of the cache: party 0 ``F + B_0``, party 1 ``B_1``."""
        return self.own


@dataclass(frozen=True)
class StationaryView:
    """A snapshot of one layer's K or V as the attention reads it (per query head via ``heads``)."""

    party: StationaryParty
    layer: int
    kind: str
    store: _Store
    heads: torch.Tensor  # query head -> kv head

    @property
    def shape(self) -> tuple[int, ...]:
        b, _, n, d = self.store.f.shape
        return (b, len(self.heads), n, d)

    def dim(self) -> int:
        return 4

    def __getitem__(self, key: Any) -> StationaryView:
        """Head selection ``view[:, idx]`` (what ``models.ops.index(x, 1, idx)`` does)."""
        if (not isinstance(key, tuple) or len(key) != 2 or key[0] != slice(None)
                or not torch.is_tensor(key[1])):
            raise StationaryError("a KV-stationary view supports only head selection view[:, idx]")
        return StationaryView(self.party, self.layer, self.kind, self.store, self.heads[key[1]])

    def operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``F``, this party's share) per query head (views when every kv head is read in order)."""
        store = self.store
        if len(self.heads) == store.f.shape[1] and bool((self.heads == torch.arange(len(self.heads))).all()):
            return store.f, store.own
        return store.f.index_select(1, self.heads), store.own.index_select(1, self.heads)

    def materialize(self) -> MPCTensor:
        """The view as ordinary shares (for kernels without a stationary path; costs O(n d) later)."""
        share = self.store.share(self.party.rank).index_select(1, self.heads)
        return MPCTensor.from_shares(share, precision=fixed_point.precision_bits())


class StationaryParty:
    """One computing party's half of the KV-stationary protocol (rank 0: client, 1: server).

    ``dealer`` is party 0's link to the dealer (party 1 never asks it for anything). Block ids
    and product indices only grow for the party's lifetime (one per session).
    """

    def __init__(self, rank: int, seed: bytes, peer: Channel, dealer: Channel | None = None,
                 ledger: Ledger | None = None) -> None:
        if rank not in (0, 1):
            raise StationaryError(f"rank must be 0 or 1, got {rank}")
        if rank == 0 and dealer is None:
            raise StationaryError("party 0 needs its dealer link for the corrections")
        self.rank = rank
        self._seed = check_seed(seed)
        self._peer = peer
        self._dealer = dealer
        self._ledger = ledger
        self._next_block: dict[tuple[int, str], int] = {}
        self._next_index: dict[tuple[int, str], int] = {}
        self.opened_rows = 0  # rows of F opened so far (each exactly once)

    def __repr__(self) -> str:
        return f"StationaryParty(rank={self.rank})"

    # ----- cache blocks -------------------------------------------------------------------
    def new_store(self, layer: int, kind: str, x: MPCTensor) -> _Store:
        """Cache ``x`` [B, kv_heads, rows, d] as a fresh block: open ``F = x - B`` (one round)."""
        return self.append(None, layer, kind, x)

    def append(self, store: _Store | None, layer: int, kind: str, x: MPCTensor) -> _Store:
        """``store`` extended by ``x`` as a new block (``store`` None: a new store)."""
        return self.append_many([(store, layer, kind, x)])[0]

    def append_many(self, items: list[tuple[_Store | None, int, str, MPCTensor]]) -> list[_Store]:
        """Several :meth:`append` s (e.g. a layer's K and V) with their ``F`` opened in one round."""
        blocks = [self._new_block(*item) for item in items]
        mine = torch.cat([(share - mask).reshape(-1) for share, mask, _ in blocks])
        self._peer.send(TAG_F, mine)
        theirs = _tensor(self._peer.recv(TAG_F))
        if theirs.shape != mine.shape or theirs.dtype != torch.int64:
            raise StationaryError(f"peer opened {theirs.dtype} {list(theirs.shape)}, expected int64 "
                                  f"{list(mine.shape)}")
        if self._ledger is not None:
            self._ledger.record_rounds(1)
        out, offset = [], 0
        for (store, _, kind, _), (share, mask, block) in zip(items, blocks):
            size = share.numel()
            f = share - mask + theirs[offset:offset + size].reshape(share.shape)
            offset += size
            out.append(self._cached(store, kind, f, mask, block))
        return out

    def _new_block(self, store: _Store | None, layer: int, kind: str,
                   x: MPCTensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(this party's share of ``x``, its block mask share, the block id) of a block to append."""
        if kind not in KINDS:
            raise StationaryError(f"kind must be one of {KINDS}, got {kind!r}")
        share = _local_share(x, 4)
        if store is not None and (share.shape[:2] != store.f.shape[:2] or share.shape[3] != store.f.shape[3]):
            raise StationaryError(f"appending {list(share.shape)} to a cache of {list(store.f.shape)}")
        key = (layer, kind)
        block = self._next_block.get(key, 0)
        self._next_block[key] = block + 1
        return share, block_mask(self._seed, layer, kind, block, tuple(share.shape)), block

    def _cached(self, store: _Store | None, kind: str, f: torch.Tensor, mask: torch.Tensor, block: int) -> _Store:
        """``store`` with the opened block ``F`` appended (storage and row counts recorded)."""
        if self._ledger is not None and kind != "s":  # a selection lives for one step; K and V stay cached
            self._ledger.record_storage("kv_cache", 2 * f.numel() * 8)  # F and the mask share
        rows = int(f.shape[2])
        if kind != "s":
            self.opened_rows += rows
        own = f + mask if self.rank == 0 else mask
        if store is None:
            return _Store(_Rows((f, own), 0 if kind == "s" else max(64, rows // 4)), rows, [(block, rows)])
        grown = store.rows.extend(store.count, (f, own))
        return _Store(grown, store.count + rows, store.blocks + [(block, rows)])

    def view(self, store: _Store, layer: int, kind: str) -> StationaryView:
        return StationaryView(self, layer, kind, store, torch.arange(store.f.shape[1]))

    # ----- products -----------------------------------------------------------------------
    def scores(self, q: MPCTensor, keys: StationaryView) -> MPCTensor:
        """``q K^T``: q [B, H, t, d] against the cached keys -> [B, H, t, n] (opens q - A only)."""
        return self._product("qk", q, keys)

    def weighted(self, w: MPCTensor, values: StationaryView) -> MPCTensor:
        """``w V``: w [B, H, t, n] against the cached values -> [B, H, t, d] (opens w - A only)."""
        return self._product("pv", w, values)

    def _product(self, op: str, x: MPCTensor, view: StationaryView) -> MPCTensor:
        store = view.store
        lead, (n, d) = tuple(store.f.shape[:2]), tuple(store.f.shape[2:])
        share = _local_share(x, 4)
        inner = d if op == "qk" else n
        if share.shape[0] != lead[0] or share.shape[1] != len(view.heads) or share.shape[3] != inner:
            raise StationaryError(f"{op}: operand {list(share.shape)} does not fit a cache of "
                                  f"{list(view.shape)}")
        key = (view.layer, f"{view.kind}/{op}")
        index = self._next_index.get(key, 0)
        self._next_index[key] = index + 1
        a_shape = tuple(share.shape)
        c_shape = _c_shape(op, a_shape, n, d)
        a, c = operand_masks(self._seed, self.rank, view.layer, view.kind, op, index, a_shape, c_shape)
        if self.rank == 0:  # the dealer computes C_0 while the parties exchange E
            self._ask_correction(op, view, index, a_shape, lead, d)
        self._peer.send(TAG_E, share - a)
        theirs = _tensor(self._peer.recv(TAG_E))
        if theirs.shape != share.shape or theirs.dtype != torch.int64:
            raise StationaryError(f"{op}: peer sent {theirs.dtype} {list(theirs.shape)}, expected "
                                  f"int64 {list(share.shape)}")
        if self._ledger is not None:
            self._ledger.record_rounds(1)
        e = share - a + theirs
        f, own = view.operands()
        z = _product(op, e, own) + _product(op, a, f)  # party 0: E (F + B_0)' + A F', while the dealer computes C_0
        if self.rank == 0:
            c = self._receive_correction(c_shape)
        return fixed_point.truncated(z + c, fixed_point.precision_bits())

    def _ask_correction(self, op: str, view: StationaryView, index: int, a_shape: tuple[int, ...],
                        lead: tuple[int, ...], d: int) -> None:
        msg = {"type": MSG_KV_TRIPLE, "op": op, "kind": view.kind, "layer": view.layer, "index": index,
               "a_shape": list(a_shape), "lead": list(lead), "dim": d,
               "heads": [int(h) for h in view.heads], "blocks": [list(b) for b in view.store.blocks]}
        assert self._dealer is not None
        if self._ledger is not None:
            with self._ledger.phase(Phase.OFFLINE):
                self._dealer.send_json(TAG_MSG, msg)
        else:
            self._dealer.send_json(TAG_MSG, msg)

    def _receive_correction(self, c_shape: tuple[int, ...]) -> torch.Tensor:
        assert self._dealer is not None
        if self._ledger is not None:
            with self._ledger.phase(Phase.OFFLINE):
                corr = _tensor(self._dealer.recv(TAG_CORR))
        else:
            corr = _tensor(self._dealer.recv(TAG_CORR))
        if tuple(corr.shape) != c_shape or corr.dtype != torch.int64:
            raise StationaryError(f"dealer sent {corr.dtype} {list(corr.shape)}, expected int64 {list(c_shape)}")
        return corr


def _tensor(data: Any) -> torch.Tensor:
    return data if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data))


def _local_share(x: Any, dims: int) -> torch.Tensor:
    share = fixed_point.arithmetic_share(x, "a KV-stationary operand", StationaryError)
    if share.dim() != dims:
        raise StationaryError(f"expected a {dims}-D tensor, got shape {list(share.shape)}")
    return share
