"""Function secret sharing for comparisons: a distributed comparison function (DCF) and the
sign gate built on it, vectorised over numpy arrays.

A comparison on CrypTen's boolean circuits (A2B, a 64-bit adder) costs each party ~230 bytes and
~9 rounds per element online. With FSS the dealer does the work offline: it hands each party a
*key*, and online the parties open one masked value ``y = x + r`` (ceil(n / 8) bytes each, one
round) and evaluate their keys locally to get additive shares of the bit. The price is key size (about
``25 * bits`` bytes per element per party, sent by the dealer offline) and local AES work (two
AES blocks per level and element to evaluate, six to generate).

Construction: the DCF of Boyle, Chandran, Gilboa, Gupta, Ishai, Kumaresan and Wu, "Function
Secret Sharing for Mixed-Mode and Fixed-Point Secure Computation" (Eurocrypt 2021), Fig. 1:
``f(x) = beta if x < alpha else 0`` on n-bit inputs with outputs in Z_2^64 (int64 wrap-around).
The length-doubling PRG is fixed-key AES-128 in Matyas-Meyer-Oseas mode with three public
tweaks (``G_j(s) = AES_k(s xor c_j) xor s xor c_j``), 128-bit seeds whose lowest bit carries
the control bit.

Sign gate (the MSB of ``x`` in Z_2^n, i.e. ``x < 0`` when ``|x| < 2^(n-1)``): with
``y = (x + r) mod 2^n`` opened and ``r`` known to the dealer only,
``msb(x) = y_top xor r_top xor [y_low < r_low]``; the DCF gives shares of ``[y_low < r_low]``
with ``beta = 1 - 2 r_top`` so that adding shares of ``r_top`` yields ``r_top xor [..]``, and
the public ``y_top`` is folded in locally. The same key and opening also give ``msb(x - c)``
for any public ``c`` (evaluate at ``y - c``: :meth:`SignKey.evaluate_points`), so comparisons of
one secret against many thresholds cost one key.

Keys travel as flat int64 arrays (nothing pickled), laid out level-major so that a party reads
them without copying: see :class:`DcfKey` and :func:`sign_key_words`. A gate with a single
threshold may use the bit-output, early-terminated keys of :mod:`protocols.mpc.fss_bit` instead
(~16.4 bytes per level, one more round; :func:`protocols.mpc.kernel_choice.comparison_keys`).

Generation and evaluation run in the compiled kernel (:mod:`protocols.mpc.fss_native`: C with
AES-NI, threaded, built by ``make``) when it is built and the CPU has AES-NI, else in the numpy
code below; both give the same keys and shares bit for bit (tests/unit/test_fss_native.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from protocols.mpc import fss_native
from protocols.mpc.fss_prg import ONE as _ONE
from protocols.mpc.fss_prg import PRG as _PRG
from protocols.mpc.fss_prg import RIGHT_DELTA as _RIGHT_DELTA
from protocols.mpc.fss_prg import SEED_LEFT as _SEED_LEFT
from protocols.mpc.fss_prg import TWEAKS as _TWEAKS
from protocols.mpc.fss_prg import VALUES as _VALUES

GEN_CHUNK = 8192   # elements per pass (multiples of 64: the control bits are packed by 64)
PARALLEL_MIN = 8192  # elements of a part handed to one key-generation worker, at least
EVAL_CHUNK = 65536


class FssError(ValueError):
    """Malformed FSS keys or arguments (bit width, shapes)."""


# Key generation in this context may split a request into up to ``parts`` ranges handed to
# ``runner(bits, [(alpha, beta, seeds, destinations), ...])``, which fills each range's
# destinations (contiguous views of party 0's key, in the order of :func:`dcf_corrections`'
# words) (worker processes: protocols/mpc/keygen_workers.py); the randomness is always drawn
# here, by the caller.
Part = tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]
CorrectionRunner = Callable[[int, list[Part]], None]
_RUNNER: ContextVar[tuple[CorrectionRunner, int] | None] = ContextVar("fss_correction_runner", default=None)


@contextmanager
def generating_with(runner: CorrectionRunner, parts: int) -> Iterator[None]:
    """Key generation in this thread's context splits large requests into ``parts`` ranges run by ``runner``."""
    token = _RUNNER.set((runner, parts))
    try:
        yield
    finally:
        _RUNNER.reset(token)




def key_words(bits: int, n: int) -> int:
    """int64 words of one party's DCF keys for ``n`` elements on ``bits``-bit inputs."""
    return n * (3 + 3 * bits) + 2 * bits * _bit_words(n)


def _bit_words(n: int) -> int:
    return (n + 63) // 64


@dataclass
class DcfKey:
    """One party's DCF keys for N elements (the correction words are the same in both keys).

    Wire layout (one flat int64 array, level-major so that evaluation reads contiguous slices
    without copying): seeds [N, 2], correction seeds [bits, N, 2], value corrections [bits, N],
    final corrections [N], control-bit corrections packed [2 bits, ceil(N / 64)] (left, right
    per level).
    """

    party: int
    bits: int
    seed: np.ndarray      # uint64 [N, 2]
    cw_seed: np.ndarray   # uint64 [bits, N, 2]
    cw_value: np.ndarray  # int64 [bits, N]
    cw_final: np.ndarray  # int64 [N]
    cw_t: np.ndarray      # uint64 [2 bits, ceil(N / 64)]: bit j of row 2i (2i + 1) = left (right) of element j

    def __repr__(self) -> str:  # never shows key material
        return f"DcfKey(party={self.party}, bits={self.bits}, n={self.seed.shape[0]})"

    def control(self, level: int, right: bool, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Control-bit corrections of ``level`` on one side as uint64 0/1, elements [lo, hi)
        (``lo`` a multiple of 64)."""
        hi = self.seed.shape[0] if hi is None else hi
        packed = self.cw_t[2 * level + int(right), lo // 64:lo // 64 + _bit_words(hi - lo)].view(np.uint8)
        return np.unpackbits(packed, bitorder="little")[:hi - lo].astype(np.uint64)

    def to_array(self) -> np.ndarray:
        parts = [self.seed, self.cw_seed, self.cw_value, self.cw_final, self.cw_t]
        return np.concatenate([np.ascontiguousarray(p).view(np.int64).ravel() for p in parts])

    @classmethod
    def from_array(cls, party: int, bits: int, n: int, array: np.ndarray) -> DcfKey:
        _check_bits(bits)
        array = _key_array(array, key_words(bits, n), f"{n} {bits}-bit DCF keys")
        u = array.view(np.uint64)
        sizes = [2 * n, 2 * bits * n, bits * n, n, 2 * bits * _bit_words(n)]
        ends = np.cumsum(sizes)
        seed, cw_seed, cw_value, cw_final, cw_t = (u[e - k:e] for e, k in zip(ends, sizes))
        return cls(party, bits, seed.reshape(n, 2), cw_seed.reshape(bits, n, 2),
                   cw_value.view(np.int64).reshape(bits, n), cw_final.view(np.int64),
                   cw_t.reshape(2 * bits, _bit_words(n)))


def _pack_bits(bits01: np.ndarray) -> np.ndarray:
    """0/1 [rows, N] -> uint64 [rows, ceil(N / 64)], little-endian bit order."""
    rows, n = bits01.shape
    padded = np.zeros((rows, 64 * _bit_words(n)), dtype=np.uint8)
    padded[:, :n] = bits01
    return np.packbits(padded, axis=1, bitorder="little").view(np.uint64)


def _key_array(array: np.ndarray, words: int, what: str) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.int64)
    if array.ndim != 1 or array.shape[0] != words:
        raise FssError(f"{what} take {words} int64 words, got shape {list(array.shape)}")
    return array


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 64:
        raise FssError(f"DCF input width must be 1..64 bits, got {bits}")


def _bit(values: np.ndarray, bits: int, i: int) -> np.ndarray:
    """Bit ``i`` (0 = most significant of ``bits``) of uint64 ``values`` as uint64 0/1."""
    return (values >> np.uint64(bits - 1 - i)) & _ONE


def _sign(t: np.ndarray) -> np.ndarray:
    """(-1)^t as int64 for uint64 0/1."""
    return 1 - 2 * t.astype(np.int64)


def dcf_gen(alpha: np.ndarray, beta: np.ndarray, bits: int,
            random_bytes: Callable[[int], bytes]) -> tuple[DcfKey, DcfKey]:
    """Keys for ``f(x) = beta if x < alpha else 0`` per element (``alpha`` uint64 < 2^bits,
    ``beta`` int64); ``random_bytes(n)`` supplies the two parties' initial seeds."""
    n = np.asarray(alpha).size
    arrays = _dcf_gen_into(alpha, beta, bits, random_bytes, 0)
    return DcfKey.from_array(0, bits, n, arrays[0]), DcfKey.from_array(1, bits, n, arrays[1])


def _dcf_gen_into(alpha: np.ndarray, beta: np.ndarray, bits: int, random_bytes: Callable[[int], bytes],
                  extra: int) -> tuple[np.ndarray, np.ndarray]:
    """Both parties' keys written straight into their wire arrays (``extra`` words left free
    at the end), so the dealer copies the large correction words once, not three times."""
    _check_bits(bits)
    alpha = np.asarray(alpha, dtype=np.uint64).ravel()
    beta = np.asarray(beta, dtype=np.int64).ravel()
    n = alpha.shape[0]
    if beta.shape[0] != n:
        raise FssError(f"alpha has {n} elements, beta {beta.shape[0]}")
    if bits < 64 and np.any(alpha >> np.uint64(bits)):
        raise FssError(f"alpha does not fit in {bits} bits")
    words = key_words(bits, n)
    out = (np.empty(words + extra, dtype=np.int64), np.empty(words + extra, dtype=np.int64))
    views = [DcfKey.from_array(p, bits, n, out[p][:words]) for p in (0, 1)]
    seeds = np.frombuffer(random_bytes(32 * n), dtype=np.uint64).reshape(2, n, 2).copy()
    seeds[:, :, 0] &= ~_ONE
    views[0].seed[:], views[1].seed[:] = seeds[0], seeds[1]
    parallel = _RUNNER.get()
    if parallel is not None and n >= PARALLEL_MIN and not fss_native.active():
        # worker processes write straight into party 0's key (the compiled kernel uses threads instead)
        parallel[0](bits, [(alpha[lo:hi], beta[lo:hi], seeds[:, lo:hi], correction_slices(views[0], lo, hi))
                           for lo, hi in _part_bounds(n, parallel[1])])
    else:
        _gen_chunks(views[0], alpha, beta, seeds)
    shared = slice(2 * n, words)  # everything after the seeds is common to both keys
    out[1][shared] = out[0][shared]
    return out


def _gen_chunks(key: DcfKey, alpha: np.ndarray, beta: np.ndarray, seeds: np.ndarray) -> None:
    """All correction words of ``key`` (party 0's view): the compiled kernel's, or numpy's chunk
    by chunk in this thread."""
    if fss_native.active():
        fss_native.dcf_gen(key.bits, 0, alpha, beta, seeds, _corrections(key))
        return
    for lo in range(0, alpha.shape[0], GEN_CHUNK):  # chunks that stay in cache: about 2x faster than one pass
        hi = min(alpha.shape[0], lo + GEN_CHUNK)
        _gen_levels(key, lo, hi, alpha[lo:hi], beta[lo:hi], seeds[:, lo:hi])


def _corrections(key: DcfKey) -> tuple[np.ndarray, ...]:
    return key.cw_seed, key.cw_value, key.cw_final, key.cw_t


def _part_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` ranges of at least PARALLEL_MIN elements (starts multiples of 64) covering n."""
    parts = max(1, min(parts, n // PARALLEL_MIN))
    size = -(-n // parts // 64) * 64 if parts > 1 else n
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


def dcf_corrections(alpha: np.ndarray, beta: np.ndarray, seeds: np.ndarray, bits: int,
                    scratch: np.ndarray | None = None) -> np.ndarray:
    """The correction words (both keys' words after their seeds) of ``m`` elements from both
    parties' initial seeds ``seeds`` uint64 [2, m, 2] (control bits cleared): int64
    ``[key_words(bits, m) - 2 m]``, in ``scratch`` (int64, reused by a worker) if it is long
    enough. Deterministic in its inputs: what a key-generation worker runs."""
    _check_bits(bits)
    m = alpha.shape[0]
    if beta.shape[0] != m or seeds.shape != (2, m, 2):
        raise FssError(f"alpha has {m} elements, beta {beta.shape[0]}, seeds shape {list(seeds.shape)}")
    words = key_words(bits, m)
    out = scratch[:words] if scratch is not None and scratch.shape[0] >= words else np.empty(words, dtype=np.int64)
    _gen_chunks(DcfKey.from_array(0, bits, m, out), alpha, beta, seeds)
    return out[2 * m:]


def correction_slices(key: DcfKey, lo: int, hi: int) -> list[np.ndarray]:
    """Contiguous int64 views of ``key``'s correction words of elements [lo, hi) (``lo`` a
    multiple of 64), in the order of :func:`dcf_corrections`' words: filled in turn, they hold them."""
    words = _bit_words(hi - lo)
    return ([key.cw_seed[i, lo:hi].view(np.int64).reshape(-1) for i in range(key.bits)]
            + [key.cw_value[i, lo:hi] for i in range(key.bits)] + [key.cw_final[lo:hi]]
            + [key.cw_t[r, lo // 64:lo // 64 + words].view(np.int64) for r in range(2 * key.bits)])


def _gen_levels(key: DcfKey, lo: int, hi: int, alpha: np.ndarray, beta: np.ndarray, seeds: np.ndarray) -> None:
    """Correction words of elements [lo, hi) written into ``key`` (party 0's view), from both
    parties' initial seeds ``seeds`` [2, hi - lo, 2] (control bits cleared)."""
    bits, n = key.bits, hi - lo
    cw_seed, cw_value = key.cw_seed[:, lo:hi], key.cw_value[:, lo:hi]
    cw_t = np.empty((2 * bits, n), dtype=np.uint64)
    state = _GenState(seeds)
    with np.errstate(over="ignore"):
        for i in range(bits):
            state.level(_bit(alpha, bits, i), beta, cw_seed[i], cw_value[i], cw_t[2 * i:2 * i + 2])
        s1, s0 = state.seeds[1, :, 1].view(np.int64), state.seeds[0, :, 1].view(np.int64)
        key.cw_final[lo:hi] = _sign(state.t[1]) * (s1 - s0 - state.v_alpha)
    key.cw_t[:, lo // 64:lo // 64 + _bit_words(n)] = _pack_bits(cw_t.astype(np.uint8))


class _GenState:
    """Both parties' walk down the path of ``alpha`` for a chunk of elements, in preallocated
    buffers: one AES call per level expands both parties' seeds into all three outputs."""

    def __init__(self, seeds: np.ndarray) -> None:
        n = seeds.shape[1]
        self.seeds = seeds                                   # uint64 [2 parties, n, 2]
        self.t = np.zeros((2, n), dtype=np.uint64)
        self.t[1] = 1
        self.v_alpha = np.zeros(n, dtype=np.int64)
        self._tweaked = np.empty((2, 3, n, 2), dtype=np.uint64)  # party, output (left, right, values)
        self._aes = np.empty(self._tweaked.size + 2, dtype=np.uint64)  # update_into wants a block of slack
        self._diff = np.empty((2, n, 2), dtype=np.uint64)
        self._tmp = np.empty((2, n), dtype=np.uint64)

    def expand(self) -> np.ndarray:
        """``G_j(s)`` for both parties and the three outputs j: uint64 [2, 3, n, 2]."""
        np.bitwise_xor(self.seeds[:, None], _TWEAKS[None, :, None, :], out=self._tweaked)
        _PRG.cipher_into(self._tweaked, self._aes)
        out = self._aes[:self._tweaked.size].reshape(self._tweaked.shape)
        out ^= self._tweaked
        return out

    def level(self, a: np.ndarray, beta: np.ndarray, cw_seed: np.ndarray, cw_value: np.ndarray,
              cw_t: np.ndarray) -> None:
        """One level: write its corrections (seed, value, both control bits) and step to the kept child."""
        take_right = 0 - a  # all ones where alpha_i = 1 (keep right, lose left)
        out = self.expand()
        left, right, values = out[:, 0], out[:, 1], out[:, 2]
        t_left, t_right = left[:, :, 0] & _ONE, right[:, :, 0] & _ONE  # [2, n]
        left[:, :, 0] &= ~_ONE
        right[:, :, 0] &= ~_ONE
        diff = np.bitwise_xor(left, right, out=self._diff)
        diff &= take_right[None, :, None]
        keep, lose = left, right  # in place: keep = left ^ diff, lose = right ^ diff
        keep ^= diff
        lose ^= diff
        np.bitwise_xor(lose[0], lose[1], out=cw_seed)
        v_left, v_right = values[:, :, 0].view(np.int64), values[:, :, 1].view(np.int64)
        v_diff = (v_left ^ v_right) & take_right.view(np.int64)
        keep_v, lose_v = v_left ^ v_diff, v_right ^ v_diff
        sign1 = _sign(self.t[1])
        np.multiply(sign1, lose_v[1] - lose_v[0] - self.v_alpha + (beta & take_right.view(np.int64)), out=cw_value)
        self.v_alpha += keep_v[0] - keep_v[1] + sign1 * cw_value
        np.bitwise_xor(t_left[0], t_left[1], out=cw_t[0])
        cw_t[0] ^= a
        cw_t[0] ^= _ONE
        np.bitwise_xor(t_right[0], t_right[1], out=cw_t[1])
        cw_t[1] ^= a
        t_diff = np.bitwise_xor(t_left, t_right, out=self._tmp)
        t_diff &= take_right
        t_keep = t_left ^ t_diff                       # [2, n]: each party's kept control bit
        t_cw_keep = t_keep[0] ^ t_keep[1] ^ _ONE
        on = 0 - self.t                                # all ones where a party's control bit is set
        keep ^= cw_seed[None] & on[:, :, None]
        self.seeds = keep  # a view of the AES buffer: the next expand() reads it before overwriting
        self.t = t_keep ^ (self.t & t_cw_keep)


def dcf_eval(key: DcfKey, x: np.ndarray, repeat: int = 1) -> np.ndarray:
    """This party's int64 share of ``f(x)`` for uint64 inputs ``x`` (< 2^bits): ``repeat`` inputs
    per key, element-major (input ``e`` is evaluated on key ``e // repeat``).

    Evaluating one key at several public points is as safe as at one: each key alone is
    pseudorandom whatever the points (FSS security), and the points are public."""
    x = np.asarray(x, dtype=np.uint64).ravel()
    n = key.seed.shape[0]
    if repeat < 1 or x.shape[0] != n * repeat:
        raise FssError(f"{x.shape[0]} inputs for {n} DCF keys x {repeat} points")
    if fss_native.active():
        return fss_native.dcf_eval(key.party, key.bits, (key.seed, *_corrections(key)), x, repeat)
    value = np.empty(n * repeat, dtype=np.int64)
    step = EVAL_CHUNK if repeat == 1 else max(64, EVAL_CHUNK // repeat // 64 * 64)
    for lo in range(0, n, step):  # cache-sized chunks: about 1.5x faster than one pass
        hi = min(n, lo + step)
        value[lo * repeat:hi * repeat] = _eval_levels(key, lo, hi, x[lo * repeat:hi * repeat], repeat)
    return value


def _eval_levels(key: DcfKey, lo: int, hi: int, x: np.ndarray, repeat: int) -> np.ndarray:
    """Shares for the keys of elements [lo, hi), ``repeat`` inputs per key."""
    def rows(a: np.ndarray) -> np.ndarray:  # one row per input
        return a if repeat == 1 else np.repeat(a, repeat, axis=0)

    n = (hi - lo) * repeat
    s = rows(key.seed[lo:hi]).copy()
    t = np.full(n, key.party, dtype=np.uint64)
    value = np.zeros(n, dtype=np.int64)
    sign = 1 - 2 * key.party
    tweaked = np.empty((2, n, 2), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(key.bits):
            right = _bit(x, key.bits, i)
            take_right = 0 - right  # all ones where the input bit is 1
            np.bitwise_xor(s, _TWEAKS[_SEED_LEFT], out=tweaked[0])  # the chosen child's seed ...
            tweaked[0, :, 1] ^= take_right & _RIGHT_DELTA
            np.bitwise_xor(s, _TWEAKS[_VALUES], out=tweaked[1])  # ... and the values, one AES call
            block = _PRG.encrypt(tweaked)
            s_next, t_next = _PRG.split(block[0])
            values = block[1].view(np.int64)
            v = values[:, 0] ^ ((values[:, 0] ^ values[:, 1]) & take_right.view(np.int64))
            on = 0 - t  # all ones where the control bit is set
            s_next ^= rows(key.cw_seed[i, lo:hi]) & on[:, None]
            cw_t = rows(key.control(i, False, lo, hi))
            cw_t ^= (cw_t ^ rows(key.control(i, True, lo, hi))) & right
            t_next ^= t & cw_t
            value += sign * (v + (rows(key.cw_value[i, lo:hi]) & on.view(np.int64)))
            s, t = s_next, t_next
        value += sign * (s[:, 1].view(np.int64) + (rows(key.cw_final[lo:hi]) & (0 - t).view(np.int64)))
    return value


# ----- the sign gate --------------------------------------------------------------------------
def sign_key_words(bits: int, n: int) -> int:
    """int64 words of one party's sign-gate keys for ``n`` elements: the (bits-1)-bit DCF keys,
    then the shares of the masks and of their top bits."""
    return key_words(max(bits - 1, 1), n) + 2 * n


def _low_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)


def sign_gen(count: int, bits: int, random_bytes: Callable[[int], bytes],
             share1: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Dealer: sign-gate keys for ``count`` elements on ``bits``-bit values, as int64 arrays
    ``[sign_key_words(bits, count)]`` for party 0 and party 1.

    ``random_bytes`` gives the mask and DCF seeds; ``share1(k)`` gives party 1's k int64 shares
    (r's and r_top's), party 0's are the differences.
    """
    if not 2 <= bits <= 64:
        raise FssError(f"the sign gate needs 2..64 bits, got {bits}")
    mask = np.frombuffer(random_bytes(8 * count), dtype=np.uint64) & _low_mask(bits)
    top = mask >> np.uint64(bits - 1)
    low = mask & _low_mask(bits - 1)
    beta = 1 - 2 * top.astype(np.int64)
    out0, out1 = _dcf_gen_into(low, beta, bits - 1, random_bytes, 2 * count)
    r1, top1 = share1(count), share1(count)
    with np.errstate(over="ignore"):
        out0[-2 * count:-count] = mask.view(np.int64) - r1
        out0[-count:] = top.astype(np.int64) - top1
    out1[-2 * count:-count], out1[-count:] = r1, top1
    return out0, out1


@dataclass
class SignKey:
    """One party's sign-gate keys: its DCF key and its shares of the mask and of its top bit."""

    dcf: DcfKey
    mask_share: np.ndarray  # int64 [N]
    top_share: np.ndarray   # int64 [N]

    def __repr__(self) -> str:
        return f"SignKey(party={self.dcf.party}, bits={self.dcf.bits + 1}, n={self.mask_share.shape[0]})"

    @classmethod
    def from_array(cls, party: int, bits: int, n: int, array: np.ndarray) -> SignKey:
        if not 2 <= bits <= 64:
            raise FssError(f"the sign gate needs 2..64 bits, got {bits}")
        array = _key_array(array, sign_key_words(bits, n), f"{n} {bits}-bit sign keys")
        return cls(DcfKey.from_array(party, bits - 1, n, array[:-2 * n]), array[-2 * n:-n], array[-n:])

    @property
    def bits(self) -> int:
        return self.dcf.bits + 1

    def masked(self, share: np.ndarray) -> np.ndarray:
        """This party's share of ``(x + r) mod 2^bits`` (int64 in [0, 2^bits)), to be opened.

        Reduced before it is sent: the sum of the full 64-bit values would show whether
        ``x + r`` left [0, 2^bits), which depends on ``x``."""
        with np.errstate(over="ignore"):
            total = np.asarray(share, dtype=np.int64).ravel() + self.mask_share
        return (total.view(np.uint64) & _low_mask(self.bits)).view(np.int64)

    def evaluate(self, opened: np.ndarray) -> np.ndarray:
        """This party's int64 share of ``msb_bits(x)`` (0/1) from the opened ``x + r``."""
        return self.evaluate_points(opened, np.zeros(1, dtype=np.int64)).ravel()

    def evaluate_points(self, opened: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Shares of ``msb_bits(x - c_j)`` [N, J] for public offsets ``c_j`` [J] from one opened ``x + r``.

        ``y - c_j = (x - c_j) + r``, so the gate's identity holds at every point with the same
        mask and key: the opening and the key are those of one comparison, the evaluation is
        the DCF's at J public points (no more revealing than at one: :func:`dcf_eval`). Each
        result is exact while ``|x - c_j| < 2^(bits - 1)``.
        """
        low = _low_mask(self.bits)
        y = np.asarray(opened, dtype=np.int64).ravel().view(np.uint64) & low
        points = np.asarray(offsets, dtype=np.int64).ravel().view(np.uint64)
        with np.errstate(over="ignore"):
            z = (y[:, None] - points[None, :]) & low
        z_top = (z >> np.uint64(self.bits - 1)).astype(np.int64)
        less = dcf_eval(self.dcf, (z & _low_mask(self.bits - 1)).ravel(), repeat=points.shape[0])
        with np.errstate(over="ignore"):
            d = less.reshape(z.shape) + self.top_share[:, None]  # shares of r_top xor [z_low < r_low]
            out = (1 - 2 * z_top) * d
            if self.dcf.party == 0:
                out += z_top
        return out
