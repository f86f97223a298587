"""Bit-output comparison keys: a DCF with outputs in Z_2 that stops its tree early, and the sign
gate built on it, whose XOR-shared result a dealer-assisted B2A turns into arithmetic shares.

**The DCF** (Boyle, Chandran, Gilboa, Gupta, Ishai, Kumaresan and Wu, Eurocrypt 2021, Fig. 1,
over the group Z_2; the early termination as in SIGMA, PETS 2024): ``f(x) = [x < alpha]`` on
n-bit inputs, each party holding an XOR share of the bit. In Z_2 the signs of the arithmetic DCF
vanish and a value correction is one bit, so a level costs a 128-bit seed correction and three
bits (the left and right control-bit corrections and the value correction) instead of 25 bytes.
The PRG is :mod:`protocols.mpc.fss_prg`'s: one AES block per child, ``G_side(s)``, whose bit 0 is
the child's control bit, bit 1 its value bit and the rest (126 bits) its seed; the evaluator
expands only the side its input bit takes (one AES block per level, the arithmetic DCF's two).
The tree has ``n - nu`` levels (``nu = min(7, n)``): the ``nu`` low bits of ``x`` index the
``2^nu <= 128`` bits of the leaf's ``G_values(s)``, corrected by one 128-bit leaf word
``CW = G(s_0) xor G(s_1) xor V xor T`` (``T`` the truth table ``[j < alpha_low]``, ``V`` the
parties' accumulated difference on alpha's path). Off alpha's path both parties hold the same
seed and control bit, so their leaves cancel and the levels' values carry the answer; on it the
leaf gives ``T``. Key: ``16 + 16.375 (n - nu) + 16`` bytes per element and party.

**The sign gate** (:class:`BitSignKey`): as :class:`protocols.mpc.fss.SignKey`, ``msb(x) = y_top
xor r_top xor [y_low < r_low]`` for the opened ``y = x + r mod 2^w`` (uniform: ``r`` is uniform
and known to the dealer only). The dealer also draws a uniform bit ``m`` and hands each party an
XOR share of ``r_top xor m`` (one bit, packed), so a party's evaluated bit is its XOR share of
``msb(x) xor m``, and an arithmetic share of ``m`` (an int64). The parties open ``d = msb(x) xor
m`` (one bit each, packed; one round) and take ``b = d + m - 2 d m`` locally: arithmetic shares
of the bit at scale 1, what CrypTen's ``_ltz`` returns. Key: the ``(w - 1)``-bit DCF's plus 16
bytes and one bit per element and party.

**Security** (semi-honest parties, a dealer that colludes with neither): a party's view is its
key, its shares of ``r`` and ``m``, its XOR share of ``r_top xor m``, the opened ``y`` and the
opened ``d``. The key alone is pseudorandom whatever ``alpha`` (DCF security: every correction
word is masked by a PRG output of a seed the party never sees); the shares are uniform (the
other party's share masks each); ``y`` is uniform because ``r`` is; ``d`` is uniform and
independent of the rest because ``m`` is a fresh uniform bit that enters the view only through
``d`` and through shares that are each uniform on their own. So the opened values reveal nothing
about ``x``. Both gates compute the same function of the shares, so choosing one or the other
(:func:`protocols.mpc.kernel_choice.comparison_keys`, from public shapes) changes no result.

Keys are flat int64 arrays, level-major (:class:`BitDcfKey`), nothing pickled. Generation and
evaluation run in the compiled kernel (:mod:`protocols.mpc.fss_native`, threaded) when it is
usable, else in the numpy code below in the calling thread (the key-generation worker processes
of :mod:`protocols.mpc.keygen_workers` serve the arithmetic keys only); both give the same keys
and bits (tests/unit/test_fss_bit.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocols.mpc import fss_native
from protocols.mpc.fss import EVAL_CHUNK, GEN_CHUNK, FssError, _bit, _bit_words, _key_array, _low_mask, _pack_bits
from protocols.mpc.fss_prg import ONE, PRG, RIGHT_DELTA, SEED_LEFT, TWEAKS, VALUES

LEAF_BITS = 7  # the leaf's 128-bit PRG output holds the outputs of 2^7 inputs
_SEED = ~np.uint64(3)  # bit 0: control bit, bit 1: value bit, the rest: the child's seed
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def leaf_bits(bits: int) -> int:
    """Input bits decided at the leaf of an early-terminated ``bits``-bit DCF: ``min(7, bits)``."""
    return min(LEAF_BITS, bits)


def levels(bits: int) -> int:
    """Tree levels of an early-terminated ``bits``-bit DCF (0 for ``bits <= 7``)."""
    return bits - leaf_bits(bits)


def bit_key_words(bits: int, n: int) -> int:
    """int64 words of one party's bit-output DCF keys for ``n`` elements on ``bits``-bit inputs."""
    depth = levels(bits)
    return n * (4 + 2 * depth) + 3 * depth * _bit_words(n)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 64:
        raise FssError(f"DCF input width must be 1..64 bits, got {bits}")


@dataclass
class BitDcfKey:
    """One party's bit-output DCF keys for N elements (all but the seeds are common to both keys).

    Wire layout (one flat int64 array, level-major): seeds [N, 2], seed corrections [L, N, 2],
    leaf corrections [N, 2], then the bit corrections packed [3 L, ceil(N / 64)]: bit j of row 3i
    (3i + 1, 3i + 2) is element j's left control-bit (right control-bit, value) correction of
    level i; ``L = levels(bits)``.
    """

    party: int
    bits: int
    seed: np.ndarray     # uint64 [N, 2]
    cw_seed: np.ndarray  # uint64 [L, N, 2]
    cw_leaf: np.ndarray  # uint64 [N, 2]
    cw_bits: np.ndarray  # uint64 [3 L, ceil(N / 64)]

    def __repr__(self) -> str:  # never shows key material
        return f"BitDcfKey(party={self.party}, bits={self.bits}, n={self.seed.shape[0]})"

    def row(self, row: int, lo: int, hi: int) -> np.ndarray:
        """Packed bit row ``row`` of elements [lo, hi) (``lo`` a multiple of 64) as uint64 0/1."""
        packed = self.cw_bits[row, lo // 64:lo // 64 + _bit_words(hi - lo)].view(np.uint8)
        return np.unpackbits(packed, bitorder="little")[:hi - lo].astype(np.uint64)

    def to_array(self) -> np.ndarray:
        parts = [self.seed, self.cw_seed, self.cw_leaf, self.cw_bits]
        return np.concatenate([np.ascontiguousarray(p).view(np.int64).ravel() for p in parts])

    @classmethod
    def from_array(cls, party: int, bits: int, n: int, array: np.ndarray) -> BitDcfKey:
        _check_bits(bits)
        array = _key_array(array, bit_key_words(bits, n), f"{n} {bits}-bit bit-output DCF keys")
        depth = levels(bits)
        u = array.view(np.uint64)
        sizes = [2 * n, 2 * depth * n, 2 * n, 3 * depth * _bit_words(n)]
        ends = np.cumsum(sizes)
        seed, cw_seed, cw_leaf, cw_bits = (u[e - k:e] for e, k in zip(ends, sizes))
        return cls(party, bits, seed.reshape(n, 2), cw_seed.reshape(depth, n, 2), cw_leaf.reshape(n, 2),
                   cw_bits.reshape(3 * depth, _bit_words(n)))


def bit_dcf_gen(alpha: np.ndarray, bits: int, random_bytes: Callable[[int], bytes]) -> tuple[BitDcfKey, BitDcfKey]:
    """Keys for ``f(x) = [x < alpha]`` (XOR-shared) per element, ``alpha`` uint64 < 2^bits;
    ``random_bytes(k)`` supplies the two parties' initial seeds."""
    n = np.asarray(alpha).size
    arrays = _gen_into(alpha, bits, random_bytes, 0)
    return BitDcfKey.from_array(0, bits, n, arrays[0]), BitDcfKey.from_array(1, bits, n, arrays[1])


def _gen_into(alpha: np.ndarray, bits: int, random_bytes: Callable[[int], bytes],
              extra: int) -> tuple[np.ndarray, np.ndarray]:
    """Both parties' keys written into their wire arrays, ``extra`` words left free at the end."""
    _check_bits(bits)
    alpha = np.ascontiguousarray(alpha, dtype=np.uint64).ravel()
    n = alpha.shape[0]
    if bits < 64 and np.any(alpha >> np.uint64(bits)):
        raise FssError(f"alpha does not fit in {bits} bits")
    words = bit_key_words(bits, n)
    out = (np.empty(words + extra, dtype=np.int64), np.empty(words + extra, dtype=np.int64))
    views = [BitDcfKey.from_array(p, bits, n, out[p][:words]) for p in (0, 1)]
    seeds = np.frombuffer(random_bytes(32 * n), dtype=np.uint64).reshape(2, n, 2).copy()
    seeds[:, :, 0] &= _SEED
    views[0].seed[:], views[1].seed[:] = seeds[0], seeds[1]
    key = views[0]
    if fss_native.active():
        fss_native.bit_dcf_gen(bits, alpha, seeds, (key.cw_seed, key.cw_leaf, key.cw_bits))
    else:
        for lo in range(0, n, GEN_CHUNK):
            hi = min(n, lo + GEN_CHUNK)
            _gen_levels(key, lo, hi, alpha[lo:hi], seeds[:, lo:hi])
    out[1][2 * n:words] = out[0][2 * n:words]
    return out


def _below_table(low: np.ndarray) -> np.ndarray:
    """The leaf truth tables ``[j < low]`` for j < 128 as uint64 [n, 2] (``low`` < 128)."""
    one = np.uint64(1)
    first = np.where(low >= 64, _ALL, (one << np.minimum(low, np.uint64(63))) - one)
    second = np.where(low > 64, (one << (np.maximum(low, np.uint64(64)) - np.uint64(64))) - one, np.uint64(0))
    return np.stack([first, second], axis=1).astype(np.uint64)


def _gen_levels(key: BitDcfKey, lo: int, hi: int, alpha: np.ndarray, seeds: np.ndarray) -> None:
    """Correction words of elements [lo, hi) into ``key`` (party 0's view) from both parties'
    initial seeds [2, hi - lo, 2]: both walks down alpha's path, two AES blocks per party and level."""
    bits, depth, n = key.bits, levels(key.bits), hi - lo
    s, t = seeds.copy(), np.zeros((2, n), dtype=np.uint64)
    t[1] = 1
    v_alpha = np.zeros(n, dtype=np.uint64)
    rows = np.zeros((3 * depth, n), dtype=np.uint8)
    for i in range(depth):
        a = _bit(alpha, bits, i)
        take = 0 - a  # all ones where alpha's bit is 1: keep right, lose left
        out = PRG.encrypt(s[:, None] ^ TWEAKS[None, :2, None, :])  # [party, side, n, 2]
        control, value = out[:, :, :, 0] & ONE, (out[:, :, :, 0] >> ONE) & ONE  # [party, side, n]
        out[:, :, :, 0] &= _SEED
        diff = (out[:, 0] ^ out[:, 1]) & take[None, :, None]
        keep, lose = out[:, 0] ^ diff, out[:, 1] ^ diff
        cw_seed = lose[0] ^ lose[1]
        key.cw_seed[i, lo:hi] = cw_seed
        v_diff = (value[:, 0] ^ value[:, 1]) & take
        v_keep, v_lose = value[:, 0] ^ v_diff, value[:, 1] ^ v_diff
        cw_value = v_lose[0] ^ v_lose[1] ^ v_alpha ^ a
        v_alpha ^= v_keep[0] ^ v_keep[1] ^ cw_value
        cw_left = control[0, 0] ^ control[1, 0] ^ a ^ ONE
        cw_right = control[0, 1] ^ control[1, 1] ^ a
        t_keep = control[:, 0] ^ ((control[:, 0] ^ control[:, 1]) & take)
        cw_keep = cw_left ^ ((cw_left ^ cw_right) & take)
        s = keep ^ (cw_seed[None] & (0 - t)[:, :, None])
        t = t_keep ^ (t & cw_keep)
        rows[3 * i], rows[3 * i + 1], rows[3 * i + 2] = cw_left, cw_right, cw_value
    leaf = PRG.encrypt(s ^ TWEAKS[VALUES])
    table = _below_table(alpha & _low_mask(leaf_bits(bits)))
    key.cw_leaf[lo:hi] = leaf[0] ^ leaf[1] ^ table ^ (0 - v_alpha)[:, None]
    if depth:
        key.cw_bits[:, lo // 64:lo // 64 + _bit_words(n)] = _pack_bits(rows)


def bit_dcf_eval(key: BitDcfKey, x: np.ndarray) -> np.ndarray:
    """This party's XOR share (uint8 0/1) of ``[x < alpha]`` for uint64 inputs ``x`` (< 2^bits), one per key."""
    x = np.ascontiguousarray(x, dtype=np.uint64).ravel()
    n = key.seed.shape[0]
    if x.shape[0] != n:
        raise FssError(f"{x.shape[0]} inputs for {n} bit-output DCF keys")
    if fss_native.active():
        return fss_native.bit_dcf_eval(key.party, key.bits, (key.seed, key.cw_seed, key.cw_leaf, key.cw_bits), x)
    out = np.empty(n, dtype=np.uint8)
    for lo in range(0, n, EVAL_CHUNK):
        hi = min(n, lo + EVAL_CHUNK)
        out[lo:hi] = _eval_levels(key, lo, hi, x[lo:hi])
    return out


def _eval_levels(key: BitDcfKey, lo: int, hi: int, x: np.ndarray) -> np.ndarray:
    """Shares for the keys of elements [lo, hi): one AES block per level and one at the leaf."""
    s = key.seed[lo:hi].copy()
    t = np.full(hi - lo, key.party, dtype=np.uint64)
    value = np.zeros(hi - lo, dtype=np.uint64)
    for i in range(levels(key.bits)):
        right = _bit(x, key.bits, i)
        tweaked = s ^ TWEAKS[SEED_LEFT]
        tweaked[:, 1] ^= (0 - right) & RIGHT_DELTA
        block = PRG.encrypt(tweaked)
        t_next, v = block[:, 0] & ONE, (block[:, 0] >> ONE) & ONE
        block[:, 0] &= _SEED
        block ^= key.cw_seed[i, lo:hi] & (0 - t)[:, None]
        cw_left, cw_right = key.row(3 * i, lo, hi), key.row(3 * i + 1, lo, hi)
        value ^= v ^ (t & key.row(3 * i + 2, lo, hi))
        t_next ^= t & (cw_left ^ ((cw_left ^ cw_right) & right))
        s, t = block, t_next
    leaf = PRG.encrypt(s ^ TWEAKS[VALUES])
    leaf ^= key.cw_leaf[lo:hi] & (0 - t)[:, None]
    index = x & _low_mask(leaf_bits(key.bits))
    word = np.where(index >= np.uint64(64), leaf[:, 1], leaf[:, 0])
    value ^= (word >> (index & np.uint64(63))) & ONE
    return value.astype(np.uint8)


# ----- the sign gate with a dealer-assisted B2A ---------------------------------------------------
def bit_sign_key_words(bits: int, n: int) -> int:
    """int64 words of one party's bit sign-gate keys for ``n`` elements on ``bits``-bit values: the
    (bits-1)-bit bit-output DCF keys, the shares of the masks ``r`` and of the bits ``m``, and the
    packed XOR shares of ``r_top xor m``."""
    return bit_key_words(bits - 1, n) + 2 * n + _bit_words(n)


def bit_sign_key_bytes(bits: int, n: int) -> int:
    """Bytes of one party's bit sign-gate keys for ``n`` elements (what the dealer sends it)."""
    return 8 * bit_sign_key_words(bits, n)


def _check_gate_bits(bits: int) -> None:
    if not 2 <= bits <= 64:
        raise FssError(f"the sign gate needs 2..64 bits, got {bits}")


def bit_sign_gen(count: int, bits: int, random_bytes: Callable[[int], bytes],
                 share1: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Dealer: bit sign-gate keys for ``count`` elements on ``bits``-bit values, as int64 arrays
    ``[bit_sign_key_words(bits, count)]`` for party 0 and party 1.

    ``random_bytes`` gives the masks ``r``, the DCF seeds and the bits ``m`` and the XOR share of
    party 1; ``share1(k)`` gives party 1's k int64 shares (of ``r``, then of ``m``), party 0's
    are the differences.
    """
    _check_gate_bits(bits)
    words = _bit_words(count)
    mask = np.frombuffer(random_bytes(8 * count), dtype=np.uint64) & _low_mask(bits)
    top = mask >> np.uint64(bits - 1)
    out0, out1 = _gen_into(mask & _low_mask(bits - 1), bits - 1, random_bytes, 2 * count + words)
    coins = np.frombuffer(random_bytes(2 * count), dtype=np.uint8).reshape(2, count) & 1
    m, flip1 = coins[0], coins[1]
    flip0 = flip1 ^ top.astype(np.uint8) ^ m
    r1, m1 = share1(count), share1(count)
    tail = slice(-(2 * count + words), None)
    with np.errstate(over="ignore"):
        out0[tail] = np.concatenate([mask.view(np.int64) - r1, m.astype(np.int64) - m1, pack(flip0)])
    out1[tail] = np.concatenate([r1, m1, pack(flip1)])
    return out0, out1


def pack(bits01: np.ndarray) -> np.ndarray:
    """0/1 values [N] -> int64 words [ceil(N / 64)], bit j of word j // 64 at position j % 64."""
    return _pack_bits(np.asarray(bits01, dtype=np.uint8).reshape(1, -1))[0].view(np.int64)


def unpack(words: np.ndarray, n: int) -> np.ndarray:
    """int64 words -> ``n`` values 0/1 (uint8): the inverse of :func:`pack`."""
    return np.unpackbits(np.ascontiguousarray(words, dtype=np.int64).view(np.uint8), bitorder="little")[:n]


@dataclass
class BitSignKey:
    """One party's bit sign-gate keys: its bit-output DCF key, its shares of the masks ``r`` and of
    the bits ``m``, and its XOR shares of ``r_top xor m`` (packed)."""

    dcf: BitDcfKey
    mask_share: np.ndarray  # int64 [N]
    bit_share: np.ndarray   # int64 [N]: arithmetic share of m
    flip: np.ndarray        # int64 [ceil(N / 64)]: packed XOR shares of r_top xor m

    def __repr__(self) -> str:  # never shows key material
        return f"BitSignKey(party={self.dcf.party}, bits={self.bits}, n={self.mask_share.shape[0]})"

    @classmethod
    def from_array(cls, party: int, bits: int, n: int, array: np.ndarray) -> BitSignKey:
        _check_gate_bits(bits)
        array = _key_array(array, bit_sign_key_words(bits, n), f"{n} {bits}-bit bit sign keys")
        words = _bit_words(n)
        dcf_end = array.shape[0] - 2 * n - words
        return cls(BitDcfKey.from_array(party, bits - 1, n, array[:dcf_end]), array[dcf_end:dcf_end + n],
                   array[dcf_end + n:dcf_end + 2 * n], array[dcf_end + 2 * n:])

    @property
    def bits(self) -> int:
        return self.dcf.bits + 1

    @property
    def party(self) -> int:
        return self.dcf.party

    def masked(self, share: np.ndarray) -> np.ndarray:
        """This party's share of ``(x + r) mod 2^bits`` (int64 in [0, 2^bits)), to be opened
        (reduced before it is sent, as :meth:`protocols.mpc.fss.SignKey.masked`)."""
        with np.errstate(over="ignore"):
            total = np.asarray(share, dtype=np.int64).ravel() + self.mask_share
        return (total.view(np.uint64) & _low_mask(self.bits)).view(np.int64)

    def xor_share(self, opened: np.ndarray, offset: int = 0) -> np.ndarray:
        """This party's XOR share (uint8 0/1) of ``msb_bits(x - offset) xor m`` from the opened
        ``x + r``: the bit each party sends to open ``d`` (exact while ``|x - offset| < 2^(bits-1)``)."""
        low = _low_mask(self.bits)
        with np.errstate(over="ignore"):
            z = (np.asarray(opened, dtype=np.int64).ravel().view(np.uint64) - np.uint64(offset % 2 ** 64)) & low
        out = bit_dcf_eval(self.dcf, z & _low_mask(self.bits - 1))
        out ^= unpack(self.flip, out.shape[0])
        if self.party == 0:
            out ^= (z >> np.uint64(self.bits - 1)).astype(np.uint8)
        return out

    def arithmetic(self, opened_bits: np.ndarray) -> np.ndarray:
        """This party's int64 share of the bit ``b = d + m - 2 d m`` from the opened ``d`` (0/1)."""
        d = np.asarray(opened_bits, dtype=np.int64).ravel()
        with np.errstate(over="ignore"):
            out = (1 - 2 * d) * self.bit_share
            if self.party == 0:
                out += d
        return out
