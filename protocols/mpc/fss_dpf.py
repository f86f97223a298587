"""Distributed point functions (DPF) with full-domain evaluation, and the lookup tables built on them.

**DPF.** Keys ``k_0, k_1`` for the point function ``f(x) = beta if x == alpha else 0`` on m-bit
inputs, outputs ``beta`` a vector of P elements of Z_2^64 (int64 wrap-around): party b's
full-domain evaluation ``y_b[x]`` over all ``2^m`` points satisfies ``y_0[x] + y_1[x] = f(x)``.
Construction: Boyle, Gilboa and Ishai, "Function Secret Sharing: Improvements and Extensions"
(CCS 2016), Fig. 1, with early termination by one level: the tree has depth ``m - 1``; a leaf
seed is converted into the outputs of its two points (2P words, P AES blocks) and one leaf
correction of 2P words fixes the pair that holds ``alpha``. The length-doubling PRG is the DCF's
(:mod:`protocols.mpc.fss_prg`: fixed-key AES-128 in Matyas-Meyer-Oseas mode with public tweaks,
seeds of 127 bits plus the control bit in the lowest bit); the leaf conversion uses tweaks of its
own (:data:`LEAF_TWEAKS`).

Key of one party for N elements (:class:`DpfKey`, one flat int64 array, nothing pickled): its
root seeds [N, 2] (16 bytes each), then the words both keys share: seed corrections [m - 1, N,
2], leaf corrections [N, 2P] and the control-bit corrections packed [2 (m - 1), ceil(N / 64)].
Per element and party: ``16 (m - 1) + 16 P`` bytes of corrections, ``2 (m - 1)`` bits, and the
16-byte root seed (which the dealer may derive from the party's stream and not send:
:func:`shared_words`).

**Security** (semi-honest, BGI16 Thm. 3.3): each key alone is computationally indistinguishable
from a key of any other ``(alpha, beta)``. The root seed of party b is uniform and unknown to the
other party; at every level the correction word is the XOR of the two parties' seeds on the side
off the path, which to one party is a PRG output of a seed it does not hold (pseudorandom), and
the control-bit corrections are masked by the other party's unknown control bits. The leaf
correction is ``beta`` plus the difference of two leaf conversions, one of them from a seed the
party does not hold: pseudorandom. So a party learns nothing about ``alpha`` or ``beta`` from its
key, and its full-domain output is an additive share of ``f``. Evaluating at every point is as
safe as at one (the points are public, the key is the same). Early termination changes only how
the last level's two children are formed (from one PRG call of their parent), not the argument.

**Lookup** (:func:`lookup`): shares of ``T[v]`` for public tables ``T`` [K, 2^m] and a secret ``v``
in ``[0, 2^m)``: the dealer gives a DPF key at a uniform ``rho`` (and shares of ``rho``), the
parties open ``s = v - rho mod 2^m`` (one round, ``ceil(m / 8)`` bytes each; uniform whatever
``v``), evaluate the whole domain and rotate: ``e_v[t] = e_rho[(t - s) mod 2^m]``, so ``sum_t T[t]
e_v[t] = sum_u T[(u + s) mod 2^m] y[u]``, a local inner product per table (several tables from one
evaluation). A payload vector ``beta`` gives ``T[v] * beta_j`` for every payload word at once
(e.g. ``beta = (1, r)`` with ``r`` a Beaver mask: ``T[v]`` and ``T[v] r`` from one key).

Evaluation runs in the compiled kernel (:mod:`protocols.mpc.dpf_native`: C with AES-NI, built by
``make``) where it is built, else in numpy here; both give the same outputs bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocols.mpc import dpf_native
from protocols.mpc.fss_prg import ONE, PRG, SEED_LEFT, SEED_RIGHT, TWEAKS

MAX_BITS = 20        # domain 2^m: full-domain evaluation costs 2^m outputs per element
MAX_REQUEST_BITS = 16  # the widest domain a party may ask the dealer for
EVAL_NS_PER_POINT = 4.0  # full-domain evaluation, payload 1, compiled kernel: 3.5-4 ns per point on the 2-core
#                          dev host under load (numpy: 45-85; bench/dpf_lookup.py). The cost rules use this one
#                          figure on every host (both parties must choose alike); without the kernel it is optimistic
MAX_PAYLOAD = 4      # payload words per point
EVAL_POINTS = 1 << 18  # outputs per evaluation chunk (elements x 2^m): about 2 MiB of int64 per payload word
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def _leaf_tweaks() -> np.ndarray:
    words = [np.frombuffer(hashlib.sha256(f"privinf/fss/dpf/leaf/{j}".encode()).digest()[:16], dtype=np.uint64)
             for j in range(MAX_PAYLOAD)]
    return np.stack(words).copy()


LEAF_TWEAKS = _leaf_tweaks()  # public tweak of leaf block j: words 2j, 2j + 1 of a leaf's outputs
dpf_native.load(LEAF_TWEAKS)


class DpfError(ValueError):
    """Malformed DPF keys or arguments (domain bits, payload, shapes)."""


def _check(bits: int, payload: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise DpfError(f"a DPF domain has 1..{MAX_BITS} bits, got {bits}")
    if not 1 <= payload <= MAX_PAYLOAD:
        raise DpfError(f"a DPF payload has 1..{MAX_PAYLOAD} words, got {payload}")


def _bit_words(n: int) -> int:
    return (n + 63) // 64


def shared_words(bits: int, n: int, payload: int = 1) -> int:
    """int64 words both parties' keys share for ``n`` elements (correction words and control bits)."""
    _check(bits, payload)
    return 2 * (bits - 1) * n + 2 * payload * n + 2 * (bits - 1) * _bit_words(n)


def key_words(bits: int, n: int, payload: int = 1) -> int:
    """int64 words of one party's DPF keys for ``n`` elements: root seeds, then the shared words."""
    return 2 * n + shared_words(bits, n, payload)


def key_bytes(bits: int, payload: int = 1, with_seed: bool = True) -> float:
    """Bytes of one party's key per element: ``16 (m - 1) + 16 P`` of corrections, ``2 (m - 1)``
    control bits, and the 16-byte root seed ``with_seed``."""
    _check(bits, payload)
    return 16 * (bits - 1) + 16 * payload + 2 * (bits - 1) / 8 + (16 if with_seed else 0)


@dataclass
class DpfKey:
    """One party's DPF keys for N elements on ``bits``-bit inputs with ``payload`` words per point."""

    party: int
    bits: int
    payload: int
    seed: np.ndarray      # uint64 [N, 2], control bit (lowest) cleared
    cw_seed: np.ndarray   # uint64 [bits - 1, N, 2]
    cw_leaf: np.ndarray   # int64 [N, 2 payload]: even point's words, then the odd point's
    cw_t: np.ndarray      # uint64 [2 (bits - 1), ceil(N / 64)]: bit j of row 2i (2i + 1) = left (right)

    def __repr__(self) -> str:  # never shows key material
        return f"DpfKey(party={self.party}, bits={self.bits}, payload={self.payload}, n={self.seed.shape[0]})"

    @property
    def count(self) -> int:
        return self.seed.shape[0]

    def to_array(self) -> np.ndarray:
        parts = [self.seed, self.cw_seed, self.cw_leaf, self.cw_t]
        return np.concatenate([np.ascontiguousarray(p).view(np.int64).ravel() for p in parts])

    @classmethod
    def from_array(cls, party: int, bits: int, n: int, array: np.ndarray, payload: int = 1) -> DpfKey:
        """Views of a flat int64 key array (:func:`key_words` long; no copy when contiguous int64)."""
        _check(bits, payload)
        array = np.ascontiguousarray(array, dtype=np.int64)
        if array.ndim != 1 or array.shape[0] != key_words(bits, n, payload):
            raise DpfError(f"{n} {bits}-bit DPF keys take {key_words(bits, n, payload)} int64 words, "
                           f"got shape {list(array.shape)}")
        u = array.view(np.uint64)
        depth = bits - 1
        sizes = [2 * n, 2 * depth * n, 2 * payload * n, 2 * depth * _bit_words(n)]
        ends = np.cumsum(sizes)
        seed, cw_seed, cw_leaf, cw_t = (u[e - k:e] for e, k in zip(ends, sizes))
        return cls(party, bits, payload, seed.reshape(n, 2), cw_seed.reshape(depth, n, 2),
                   cw_leaf.view(np.int64).reshape(n, 2 * payload), cw_t.reshape(2 * depth, _bit_words(n)))

    @classmethod
    def from_parts(cls, party: int, bits: int, n: int, seed: np.ndarray, shared: np.ndarray,
                   payload: int = 1) -> DpfKey:
        """A key from its root seeds [N, 2] and the words both keys share (:func:`shared_words`)."""
        return cls.from_array(party, bits, n, np.concatenate([np.ascontiguousarray(seed).view(np.int64).ravel(),
                                                              np.asarray(shared, dtype=np.int64).ravel()]), payload)


def _pack_bits(bits01: np.ndarray) -> np.ndarray:
    """uint64 0/1 [rows, N] -> uint64 [rows, ceil(N / 64)], little-endian bit order."""
    rows, n = bits01.shape
    padded = np.zeros((rows, 64 * _bit_words(n)), dtype=np.uint8)
    padded[:, :n] = bits01
    return np.packbits(padded, axis=1, bitorder="little").view(np.uint64).reshape(rows, _bit_words(n))


def _unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    """uint64 [rows, ceil(N / 64)] -> uint64 0/1 [rows, N]."""
    rows, words = packed.shape
    raw = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8).reshape(rows, 8 * words), axis=1,
                        bitorder="little")
    return raw[:, :n].astype(np.uint64)


def root_seeds(raw: bytes | np.ndarray, n: int) -> np.ndarray:
    """uint64 [n, 2] root seeds from ``16 n`` random bytes, control bits cleared."""
    seeds = np.frombuffer(raw, dtype=np.uint64).reshape(n, 2).copy() if isinstance(raw, bytes) \
        else np.array(raw, dtype=np.uint64).reshape(n, 2)
    seeds[:, 0] &= ~ONE
    return seeds


def _children(seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both children of seeds [..., 2]: (child seeds [..., 2 sides, 2] with control bits cleared,
    control bits [..., 2 sides])."""
    tweaked = seeds[..., None, :] ^ TWEAKS[[SEED_LEFT, SEED_RIGHT]]
    block = PRG.encrypt(tweaked)
    t = block[..., 0] & ONE
    block[..., 0] &= ~ONE
    return block, t


def _convert(seeds: np.ndarray, payload: int) -> np.ndarray:
    """Leaf outputs of seeds [..., 2]: int64 [..., 2 payload] (P AES blocks per seed)."""
    tweaked = seeds[..., None, :] ^ LEAF_TWEAKS[:payload]
    return PRG.encrypt(tweaked).view(np.int64).reshape(*seeds.shape[:-1], 2 * payload)


def dpf_gen(alpha: np.ndarray, beta: np.ndarray, bits: int, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The words both keys share (:func:`shared_words`, int64) for ``f(x) = beta if x == alpha`` per
    element, from ``alpha`` uint64 [N] (< 2^bits), ``beta`` int64 [N, P] and both parties' root
    seeds ``seeds`` uint64 [2, N, 2] (control bits cleared); each party's key is its root seeds
    followed by these words (:meth:`DpfKey.from_parts`). Also returns the parties' control bits at
    the leaf on alpha's path [2, N] (they differ: a check for tests)."""
    alpha = np.asarray(alpha, dtype=np.uint64).ravel()
    beta = np.asarray(beta, dtype=np.int64)
    n = alpha.shape[0]
    beta = beta.reshape(n, -1)
    payload = beta.shape[1]
    _check(bits, payload)
    if seeds.shape != (2, n, 2):
        raise DpfError(f"root seeds of shape {list(seeds.shape)}, expected {[2, n, 2]}")
    if np.any(alpha >> np.uint64(bits)):
        raise DpfError(f"alpha does not fit in {bits} bits")
    depth = bits - 1
    cw_seed = np.empty((depth, n, 2), dtype=np.uint64)
    cw_t = np.empty((2 * depth, n), dtype=np.uint64)
    s = np.array(seeds, dtype=np.uint64)
    t = np.zeros((2, n), dtype=np.uint64)
    t[1] = 1
    for i in range(depth):
        a = (alpha >> np.uint64(bits - 1 - i)) & ONE  # path bit i, most significant first
        child, t_child = _children(s)                 # [2, n, 2 sides, 2], [2, n, 2 sides]
        keep, lose = a.astype(np.intp), (1 - a).astype(np.intp)
        rows = np.arange(n)
        s_keep, s_lose = child[:, rows, keep], child[:, rows, lose]   # [2, n, 2]
        t_keep = t_child[:, rows, keep]                               # [2, n]
        cw_seed[i] = s_lose[0] ^ s_lose[1]
        cw_t[2 * i] = t_child[0, :, 0] ^ t_child[1, :, 0] ^ a ^ ONE
        cw_t[2 * i + 1] = t_child[0, :, 1] ^ t_child[1, :, 1] ^ a
        t_cw_keep = np.where(a == 1, cw_t[2 * i + 1], cw_t[2 * i])
        s = s_keep ^ (cw_seed[i][None] & (0 - t)[:, :, None])
        t = t_keep ^ (t & t_cw_keep[None])
    target = np.zeros((n, 2, payload), dtype=np.int64)
    target[np.arange(n), (alpha & ONE).astype(np.intp)] = beta
    with np.errstate(over="ignore"):
        sign1 = 1 - 2 * t[1].astype(np.int64)
        cw_leaf = sign1[:, None] * (target.reshape(n, 2 * payload) - _convert(s[0], payload) + _convert(s[1], payload))
    shared = np.concatenate([cw_seed.view(np.int64).ravel(), cw_leaf.ravel(),
                             _pack_bits(cw_t).view(np.int64).ravel()])
    return shared, t


def dpf_keys(alpha: np.ndarray, beta: np.ndarray, bits: int,
             random_bytes: Callable[[int], bytes]) -> tuple[DpfKey, DpfKey]:
    """Both parties' keys for ``f(x) = beta if x == alpha`` per element (root seeds from ``random_bytes``)."""
    n = np.asarray(alpha).size
    seeds = np.stack([root_seeds(random_bytes(16 * n), n), root_seeds(random_bytes(16 * n), n)])
    shared, _ = dpf_gen(alpha, beta, bits, seeds)
    payload = np.asarray(beta).reshape(n, -1).shape[1]
    return (DpfKey.from_parts(0, bits, n, seeds[0], shared, payload),
            DpfKey.from_parts(1, bits, n, seeds[1], shared, payload))


def full_domain(key: DpfKey, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """This party's int64 shares of ``f`` at every point, for elements [lo, hi): [hi - lo, 2^bits, P]."""
    hi = key.count if hi is None else hi
    if dpf_native.active():
        return dpf_native.evaluate(key, lo, hi)
    out = np.empty((hi - lo, 1 << key.bits, key.payload), dtype=np.int64)
    step = max(1, EVAL_POINTS >> key.bits)
    for start in range(lo, hi, step):
        stop = min(hi, start + step)
        out[start - lo:stop - lo] = _full_domain_chunk(key, start, stop)
    return out


def _full_domain_chunk(key: DpfKey, lo: int, hi: int) -> np.ndarray:
    n = hi - lo
    s = key.seed[lo:hi, None, :].copy()                      # [n, nodes, 2]
    t = np.full((n, 1), key.party, dtype=np.uint64)          # [n, nodes]
    first = lo // 64
    control = _unpack_bits(key.cw_t[:, first:_bit_words(hi)], hi - 64 * first)[:, lo - 64 * first:]
    for i in range(key.bits - 1):
        child, t_child = _children(s)                         # [n, nodes, 2 sides, 2], [n, nodes, 2 sides]
        on = 0 - t                                            # all ones where a node's control bit is set
        child ^= key.cw_seed[i, lo:hi, None, None, :] & on[:, :, None, None]
        t_child ^= t[:, :, None] & control[2 * i:2 * i + 2].T[:, None, :]
        s = child.reshape(n, -1, 2)
        t = t_child.reshape(n, -1)
    with np.errstate(over="ignore"):
        leaves = _convert(s, key.payload)                     # [n, nodes, 2 payload]
        leaves += key.cw_leaf[lo:hi, None, :] & (0 - t).view(np.int64)[:, :, None]
        if key.party == 1:
            np.negative(leaves, out=leaves)
    return leaves.reshape(n, 1 << key.bits, key.payload)


def record(ledger: object, key: DpfKey) -> None:
    """Count ``key``'s elements and evaluated points in a party's ledger (``dpf_keys_<m>b_p<P>``,
    ``dpf_points_<m>b``; the dealer's bytes follow from :func:`shared_words`); no-op without one."""
    if ledger is not None:
        ledger.record_extra(f"dpf_keys_{key.bits}b_p{key.payload}", key.count)  # type: ignore[attr-defined]
        ledger.record_extra(f"dpf_points_{key.bits}b", key.count << key.bits)  # type: ignore[attr-defined]


def rotate_tables(tables: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``T[(u + s) mod 2^m]`` per element: int64 [N, K, 2^m] for tables [K, 2^m] and shifts [N]."""
    size = tables.shape[-1]
    index = (np.arange(size, dtype=np.int64)[None, :] + np.asarray(shift, dtype=np.int64)[:, None]) & (size - 1)
    return np.ascontiguousarray(np.moveaxis(tables[:, index], 0, 1))


def lookup(key: DpfKey, shift: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """This party's int64 shares of ``T_k[v] * beta_j`` [N, K, P] for public int64 tables [K, 2^m],
    from its key at ``rho`` and the opened ``s = v - rho mod 2^m`` [N] (see the module docstring)."""
    tables = np.asarray(tables, dtype=np.int64)
    if tables.ndim != 2 or tables.shape[1] != 1 << key.bits:
        raise DpfError(f"tables of shape {list(tables.shape)}, expected [K, {1 << key.bits}]")
    shift = np.asarray(shift, dtype=np.int64).ravel()
    if shift.shape[0] != key.count:
        raise DpfError(f"{shift.shape[0]} openings for {key.count} DPF keys")
    if dpf_native.active():
        return dpf_native.evaluate(key, 0, key.count, shift, tables)
    out = np.empty((key.count, tables.shape[0], key.payload), dtype=np.int64)
    step = max(1, EVAL_POINTS >> key.bits)
    with np.errstate(over="ignore"):
        for lo in range(0, key.count, step):
            hi = min(key.count, lo + step)
            shares = full_domain(key, lo, hi)                   # [n, D, P]
            out[lo:hi] = np.matmul(rotate_tables(tables, shift[lo:hi]), shares)
    return out


def unit_vectors(key: DpfKey, shift: np.ndarray) -> np.ndarray:
    """This party's int64 shares of ``beta e_v`` [N, 2^m] (payload 1) from the opened ``s = v - rho``:
    the full-domain outputs rotated, ``e_v[t] = e_rho[(t - s) mod 2^m]``."""
    if key.payload != 1:
        raise DpfError(f"unit vectors take a 1-word payload, got {key.payload}")
    size = 1 << key.bits
    shift = np.asarray(shift, dtype=np.int64).ravel()
    shares = full_domain(key)[:, :, 0]
    index = (np.arange(size, dtype=np.int64)[None, :] - shift[:, None]) & (size - 1)
    return np.take_along_axis(shares, index, axis=1)
