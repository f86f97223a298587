"""GeLU from a DPF lookup table: a piecewise-linear even part picked by the top bits of ``x``.

``numerics.gelu`` (and its fused form, :mod:`protocols.mpc.fused_gelu`) computes ``x / 2 + inside *
g(x) + w * x / 2`` with ``g(x) = x (Phi(x) - 1/2)`` as a degree-6 polynomial in ``x^2``: five
rounds and 67 bytes per element online. Here ``g`` is a line per segment of width ``h = 2^-5``
(:func:`tables`), whose slope and intercept come from two public tables of ``2^8`` entries
indexed by ``v = floor(x / h) mod 2^8`` (the segments of [-4, 4)), read with one DPF key:

1. The dealer's ``dpf`` request (:meth:`~protocols.mpc.vocabulary.TupleRequest.dpf`) gives shares
   of a uniform ring mask ``r`` and DPF keys at ``rho = floor(r / 2^(f - 5)) mod 2^8`` (``f`` the
   fixed-point bits) with payload ``(1, r)``.
2. One round: the range tests' masked input (:func:`protocols.mpc.numerics.gelu_range_opening`, a
   21-bit key) and ``e = x - r`` (8 bytes) are opened together. ``floor(x / 2^(f-5)) = e_hi + r_hi +
   c`` with ``e_hi = floor(e / 2^(f-5))``, ``r_hi = rho`` and a carry ``c`` in {0, 1} of the low bits,
   so the rotation by the public ``e_hi`` reads the table at ``v - c``: the segment of ``x`` or the
   one below. Every line is fitted on its segment *and the next* (:func:`tables`), so either is
   accurate: the carry costs no exactness test (SIGMA's truncation to the top bits, with the
   off-by-one absorbed by the fit).
3. Locally: the full-domain evaluation and rotation give shares of ``a_v``, ``a_v r``, ``b_v`` and
   ``b_v r`` (:func:`protocols.mpc.fss_dpf.lookup`), so ``a_v x + b_v = e a_v + a_v r + b_v`` needs no
   product round (``e`` is public); one local truncation from the double scale.
4. One round: ``[inside, w] * [g, x / 2]`` (one Beaver product, as ``numerics.gelu``'s last step).

Two rounds and 43 bytes per element online (3 + 8, then 32), against five and 67; the dealer
sends each party a DPF key (``16 * 7 + 32`` bytes and 14 bits) instead of party 0's 64 bytes of
mask products (and 16 bytes of the product's triple), and each party evaluates 256 points per
element locally. Which form runs is :func:`chosen`: a public rule of the element count and the
session's configuration (kernel profile), so both parties and the simulation pick the same.

Accuracy: the lines' error on their two-segment windows is at most :data:`LINE_ERROR` (1.95e-4,
tests/unit/test_gelu_lut.py checks every ulp of [-4, 4) on both candidate lines), plus the
tables' rounding and one truncation (< 2e-5): inside [-T, T] well under the polynomial's 2.3e-4;
outside, ReLU's 8.1e-4 as before (the range tests' slop of 1/32 beyond +-T lands on lines fitted
there too). Outside [-4, 4) the index wraps and the line is meaningless but bounded (``|a_v x| <
2^46`` at scale 2^32 for ``|x| < 2^14``) and multiplied by ``inside = 0``.

Security: ``e = x - r`` is uniform in the ring (``r`` is), the range tests' opening is the gate's
(:mod:`protocols.mpc.compare`), the DPF keys hide ``rho`` and ``r`` (:mod:`protocols.mpc.fss_dpf`), and
the last product is Beaver's.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from protocols.mpc import fixed_point, fss_dpf, numerics
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as crypten_provider
from protocols.mpc.kernel_choice import session_config
from protocols.protocol_config import ProtocolConfig

LUT_BITS = 8           # table entries 2^8: the segments of [-4, 4)
SEGMENT_BITS = 5       # segment width 2^-5
LINE_ERROR = 1.95e-4   # max |line - g| of every line on its window of two segments (fit below; tested)
ONLINE = {"lut": (2, 3 + 8 + 32), "poly": (5, 67)}  # rounds, bytes sent per element and party
DEALER = {"lut": fss_dpf.key_bytes(LUT_BITS, 2, with_seed=False) + 16, "poly": 64.0}  # per element, larger party
LUT_EXTRA_NS = 3_500.0  # local time per element of the lookup form beyond the polynomial's: the kernel's lookup
#                          alone 1.0-2.3 us (numpy 23-32 us; bench/dpf_lookup.py), end to end 5-6.7 us with both
#                          parties and the dealer's key generation on the 2-core host; one figure on every host
_FIT_NODES = 33


def _even_part(x: np.ndarray) -> np.ndarray:
    """``g(x) = gelu(x) - x / 2 = x (Phi(x) - 1/2)`` (erf GeLU)."""
    return 0.5 * x * torch.erf(torch.from_numpy(x / math.sqrt(2.0))).numpy()


@functools.lru_cache(maxsize=4)
def tables(fraction_bits: int) -> np.ndarray:
    """int64 [2, 2^8]: slope and intercept of ``g`` at scale ``2^fraction_bits`` per index ``v``
    (segment ``j = v - 2^8 [v >= 2^7]`` covers ``[j h, (j + 1) h)``), each line fitted on ``[j h,
    (j + 2) h]`` (its segment and the next: the carry may read the one below) for the least
    maximum error (least squares at Chebyshev nodes, intercept moved to balance the error)."""
    h = 2.0 ** -SEGMENT_BITS
    size = 1 << LUT_BITS
    nodes = 0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, _FIT_NODES))
    out = np.empty((2, size), dtype=np.float64)
    for v in range(size):
        j = v - size if v >= size // 2 else v
        xs = (j + 2.0 * nodes) * h
        design = np.stack([xs, np.ones_like(xs)], axis=1)
        slope, intercept = np.linalg.lstsq(design, _even_part(xs), rcond=None)[0]
        error = _even_part(xs) - design @ np.array([slope, intercept])
        out[:, v] = slope, intercept + (error.max() + error.min()) / 2
    return np.round(out * (1 << fraction_bits)).astype(np.int64)


def shift_bits(fraction_bits: int) -> int:
    """Low bits of the ring value below the table index: ``v = floor(x / 2^shift) mod 2^8``."""
    return fraction_bits - SEGMENT_BITS


def costs(elements: int, config: ProtocolConfig) -> dict[str, float]:
    """Seconds per form for ``elements`` GeLUs: online rounds and bytes priced on the kernel profile,
    dealer bytes (the larger party's) at its bandwidth, and the lookup's extra local CPU."""
    network = config.kernel_network()
    out = {}
    for form, (rounds, sent) in ONLINE.items():
        seconds = rounds * network.rtt_s + elements * (sent + DEALER[form]) * 8 / network.bandwidth_bps
        out[form] = seconds + (elements * LUT_EXTRA_NS * 1e-9 if form == "lut" else 0.0)
    return out


def chosen(x: Any) -> bool:
    """Whether GeLU of ``x`` (shares or a simulated value) runs from the lookup table: as the
    session's ``gelu_form`` says, or with ``auto`` where it costs less (:func:`costs`) on the
    session's configuration; a public rule of the shape."""
    config = session_config(x)
    if config.gelu_form != "auto":
        return config.gelu_form == "lut"
    priced = costs(x.nelement(), config)
    return priced["lut"] < priced["poly"]


def _finish(x: Any, inside: Any, w: Any, even: Any) -> Any:
    """``x / 2 + inside * even + w * x / 2`` with one product (``numerics.gelu``'s last step)."""
    terms = type(x).stack([inside, w]) * type(x).stack([even, x * 0.5])
    return x * 0.5 + terms[0] + terms[1]


def gelu(x: Any, form: str = "erf") -> Any:
    """GeLU on a party's shares from the lookup table (two rounds; the module docstring)."""
    share = fixed_point.arithmetic_share(x, "GeLU's input")
    bits = fixed_point.bits_of(x)
    context = crypten_provider.current()
    mask, key = context.provider.dpf_key(share.shape, LUT_BITS, 2, shift_bits(bits))
    inside, w, opened = numerics.gelu_range_opening(x, share - mask)
    e = opened.reshape(-1).numpy()
    index = ((e.view(np.uint64) >> np.uint64(shift_bits(bits))) & np.uint64((1 << LUT_BITS) - 1)).view(np.int64)
    read = fss_dpf.lookup(key, index, tables(bits))  # [N, (a, b), (1, r)]
    fss_dpf.record(getattr(crypten.communicator.get(), "ledger", None), key)
    with np.errstate(over="ignore"):
        z = e * read[:, 0, 0] + read[:, 0, 1] + read[:, 1, 0] * (1 << bits)
    return _finish(x, inside, w, fixed_point.truncated(torch.from_numpy(z).reshape(share.shape), bits))


def simulated(x: Any) -> Any:
    """What :func:`gelu`'s shares sum to on a simulated value (``protocols.mpc.simulate.SimTensor``):
    the range tests as is, the table read at the likelier carry (``v - 1`` when the ring value's low
    bits are below half a segment, as the simulated comparison gate takes its carry; a real run may
    read the other neighbour, within :data:`LINE_ERROR` of the same ``g``), the line rounded once."""
    bits = fixed_point.bits_of(x)
    shift = shift_bits(bits)
    inside, w = numerics.gelu_range(x)
    index = ((x.share - (1 << (shift - 1))) >> shift) & ((1 << LUT_BITS) - 1)
    table = torch.from_numpy(tables(bits))
    z = table[0][index] * x.share + table[1][index] * (1 << bits)
    divisor = 1 << bits
    even = type(x)((z + divisor // 2).div(divisor, rounding_mode="floor"), x.encoder)
    return _finish(x, inside, w, even)
