"""Per-shape kernel choices, priced on the session's kernel profile.

Two share kernels come in a round-cheap and a byte-cheap form, and which one costs less depends
on the shape: a decoding step's few rows are bound by rounds, a prefill's many rows by bytes.

* A norm with a secret gain (``numerics.scaled_rows``): **folded** forms ``x * weight`` in the
  product that forms the squares and multiplies it into the root's last product (4 rounds, about
  9 ring elements sent per element of ``x``), or **fused** opens ``x`` once for ``x^2`` and
  ``x * s`` and multiplies the gain after (6 rounds, about 2 per element): :func:`norm_costs`.
* A max / arg-max tournament level (``tournament._tournament``): **all-pairs** groups (3 rounds
  divide the row by up to 16, every pair of a group compared exactly; a round more where the
  pairs take bit keys, below) or **binary** levels (2 rounds per halving, one truncated comparison
  per pair on bit keys, the product with its bit opened in the same rounds:
  ``compare.below_zero_times``): :func:`level_costs`.

Each form's online rounds and bytes sent per party are priced as the ledger prices a cell
(:func:`privinf.ledger.pricing.price`: ``rounds * rtt + bytes * 8 / bandwidth``) on
``ProtocolConfig.kernel_profile`` (LAN by default: 0.8 ms and 3 Gbit/s, a round worth 300,000
bytes), and the cheaper form runs (:func:`cheaper`). The choice depends only on public shapes
and the shared configuration, so both parties and the simulation make the same one. Comparisons
are priced as the dealer's FSS gate opens them (``ceil(width / 8)`` bytes, one round; with bit
keys a second round and the masked bits) also when the session runs CrypTen's circuit, where
both forms pay more per comparison.

* A single-threshold FSS comparison (:mod:`protocols.mpc.compare`): **value** keys (arithmetic
  output: one opening, one round) or **bit** keys (:mod:`protocols.mpc.fss_bit`: ~40% fewer key
  bytes, a second round to open one masked bit): :func:`comparison_keys`. Here the whole cost
  counts: the dealer's key bytes are priced with the online bytes on the same profile, at
  :data:`DEALER_BYTE_WEIGHT` of an online byte. The dealer pool makes keys ahead while the parties
  compute, so a key byte delays no inference until the dealer link is the bottleneck, while the
  bit keys' extra round is paid on every one; at 1/8 the break-even is ~5,800 comparisons at 40
  bits (~8,600 at 23) on LAN: a BERT-base prefill's big max-tree levels (98k-12k comparisons)
  take bit keys, a decode step's or a short MiniLM input's (~6k and fewer) keep value keys and
  their rounds (GPT-2-small at 1024: 638 -> 571 rounds per step; issue 14's budget is 600).

A tournament level's forms are priced the same whole way (:func:`level_costs`): an all-pairs
level multiplies the comparison keys (an exact pair at the softmax max's 33 bits is a key of
~0.46 KB per party with bit keys, ~0.8 KB with value keys, each read once by a local evaluation),
so at MPCache's setting (32 rows of 123-129 entries down to groups of 16: ~31,000-34,600 pairs,
~14-16 MB of keys per party and step) binary levels go one or two halvings further first (two
to four rounds more, a quarter to a third of the pairs), while GPT-2-small's 12 rows and every
level of a few rows or short groups keep their all-pairs level (tests/unit/test_kernel_choice.py).
``tournament.all_pairs`` also caps a level's pairs at ``ProtocolConfig.all_pairs_budget``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from models import ops
from privinf.ledger.pricing import CriticalPath, NetworkProfile, price
from protocols.mpc import fss, fss_bit
from protocols.mpc.compare_widths import bits_for, shift_for
from protocols.mpc.cryptenlib.binding import bound
from protocols.protocol_config import ProtocolConfig

RING_BYTES = 8  # an opened arithmetic share element (CrypTen's int64 ring)
DEALER_BYTE_WEIGHT = 1 / 8  # a dealer key byte against an online byte in comparison_keys (see above)
Cost = tuple[int, int]  # (online rounds, bytes sent per party)


def session_config(x: Any) -> ProtocolConfig:
    """The protocol configuration the shares ``x`` are computed under: the simulation's for a
    simulated value, the bound party's in a session, else the defaults (a bare CrypTen run)."""
    simulated = getattr(x, "session_config", None)  # protocols.mpc.simulate.SimTensor
    if simulated is not None:
        return simulated()
    context = bound()
    return context.config if context is not None else ProtocolConfig()


@functools.lru_cache(maxsize=8)
def _network(config: ProtocolConfig) -> NetworkProfile:
    return config.kernel_network()


def priced_s(cost: Cost, config: ProtocolConfig, compute_s: float = 0.0) -> float:
    """Seconds of ``cost`` (online rounds, bytes sent per party) and ``compute_s`` of local work on
    the configuration's kernel profile, priced as the ledger prices a cell."""
    rounds, sent = cost
    return price(CriticalPath(compute_s=compute_s, rounds=rounds, critical_bytes=sent), _network(config)).latency_s


def cheaper(first: Cost, second: Cost, config: ProtocolConfig) -> bool:
    """Whether ``first`` costs less than ``second`` on the configuration's kernel profile (a tie
    goes to ``second``)."""
    return priced_s(first, config) < priced_s(second, config)


def norm_costs(rows: int, width: int) -> dict[str, Cost]:
    """Online (rounds, bytes sent per party) of a norm with a secret gain over ``rows`` rows of
    ``width`` entries (n = rows, d = width), finished as ``models.layers``' norms finish it (the
    piecewise inverse square root of the rows' mean square; its comparison is left out, the same
    one in both forms):

    * ``folded`` (``numerics.scaled_rows``): ``[x, x] * [x, w]`` opens 4 nd elements; the root's
      batched product ``[ms, t, t] * [f, d0, d1]`` 2 (n + 2 nd); the last product ``t d1 * u``
      nd + n: 4 rounds with the comparison;
    * ``fused`` (``fused_norm._fused`` then the gain): ``x - a`` nd; the root's two products on
      the row factor 4 n; ``s - b`` n; the gain's product nd + d: 6 rounds with the comparison.
    """
    n, d = rows, width
    return {"folded": (4, RING_BYTES * (9 * n * d + 3 * n)),
            "fused": (6, RING_BYTES * (2 * n * d + 5 * n + d))}


def fold_gain(rows: int, width: int, config: ProtocolConfig) -> bool:
    """Whether a norm over ``rows`` rows of ``width`` folds its secret gain into the squares'
    product (fewer rounds) rather than multiplying it after the fused kernel (fewer bytes)."""
    costs = norm_costs(rows, width)
    return cheaper(costs["folded"], costs["fused"], config)


def level_costs(rows: int, n: int, group: int, carried: int, config: ProtocolConfig) -> dict[str, Cost]:
    """Whole cost (rounds, bytes per party: sent online, plus :data:`DEALER_BYTE_WEIGHT` of the
    comparison keys' bytes as :func:`comparison_key_costs` prices them) of dividing ``rows`` rows
    of ``n`` entries into groups of ``group`` by one all-pairs level (``pairs``) or by binary levels
    down to the same length (``binary``), under the innermost ``models.ops.compare_bound`` as the
    tournament runs.

    ``carried``: the secret values each kept entry carries (1: the value; 2: value and secret
    position). ``pairs``: all pairs of each group compared exactly, the win counts tested (not
    for pairs of two), one product of the one-hot with the carried values (``carried + 1``
    elements opened per entry). ``binary``: per level, one truncated comparison and one product
    (``carried + 1`` elements) per eliminated entry. The pairs are priced with the keys
    :func:`comparison_keys` gives them (bit keys: a second round and the masked bits); a
    comparison followed by a product with its bit (the win tests, a binary level) on bit keys with
    the product's openings in its two rounds (:func:`_selections`). The products' triples (one
    ring element per product element from the dealer, in either form) are left out.
    """
    return dict(_level_costs(rows, n, group, carried, config, ops.comparison_bound(), ops.comparison_resolution()))


@functools.lru_cache(maxsize=1024)
def _level_costs(rows: int, n: int, group: int, carried: int, config: ProtocolConfig,
                 limit: float | None, resolution: float) -> dict[str, Cost]:
    """:func:`level_costs` with the bound's limit and resolution passed in: a pure function of public
    shapes and configuration, cached (a decoding step prices the same levels every step)."""
    groups = -(-n // group)
    kept = rows * groups * group
    product = (carried + 1) * RING_BYTES
    pair_rounds, pair_bytes = _comparisons(rows * groups * group * (group - 1) // 2, limit, 0.0, config)
    win_rounds, win_bytes = _selections(kept if group > 2 else 0, 2.0 * group, 0.0, config)
    binary_rounds = binary_bytes = 0
    length = n
    while length > groups:
        eliminated = rows * (length // 2)
        level_rounds, level_bytes = _selections(eliminated, limit, resolution, config)
        binary_rounds += level_rounds
        binary_bytes += level_bytes + eliminated * product
        length = -(-length // 2)
    return {"pairs": (pair_rounds + win_rounds, pair_bytes + win_bytes + kept * product),
            "binary": (binary_rounds, binary_bytes)}


def _selections(count: int, limit: float | None, resolution: float, config: ProtocolConfig) -> Cost:
    """Whole cost of ``count`` comparisons each followed by a product with its bit, as
    :func:`protocols.mpc.compare.below_zero_times` runs them: on bit keys with the product's
    openings in the comparison's two rounds, or (value keys forced) a comparison and a round more
    (the product's bytes are the caller's)."""
    if count == 0:
        return 0, 0
    if config.comparison_keys == "value":
        rounds, sent = _comparisons(count, limit, resolution, config)
        return rounds + 1, sent
    return comparison_key_costs(count, _gate_width(limit, resolution, config))["bit"]


def _comparisons(count: int, limit: float | None, resolution: float, config: ProtocolConfig) -> Cost:
    """Whole cost (:func:`comparison_key_costs`) of ``count`` single-threshold FSS comparisons of
    values below ``limit`` with ``resolution``, with the keys :func:`comparison_keys` picks."""
    if count == 0:
        return 0, 0
    width = _gate_width(limit, resolution, config)
    return comparison_key_costs(count, width)[comparison_keys(count, width, 1, config)]


def _gate_width(limit: float | None, resolution: float, config: ProtocolConfig) -> int:
    """The bits a sign gate evaluates for values below ``limit`` with ``resolution``, as compare.py sets it."""
    bits = bits_for(limit, config.comparison_bits, config.fixed_point_bits)
    return bits - shift_for([0.0], resolution * config.scale, bits)


def _online_comparisons(elements: int, width: int) -> dict[str, Cost]:
    """Online (rounds, bytes sent per party) of ``elements`` comparisons on a ``width``-bit gate
    with value keys (open ``x + r``) and with bit keys (then the masked bits, 64 to a word)."""
    opened = elements * math.ceil(width / 8)
    return {"value": (1, opened), "bit": (2, opened + RING_BYTES * -(-elements // 64))}


def comparison_key_costs(elements: int, width: int) -> dict[str, Cost]:
    """Whole cost (rounds, bytes per party: sent online plus :data:`DEALER_BYTE_WEIGHT` of those
    received from the dealer) of one single-threshold comparison of ``elements`` values on a
    ``width``-bit gate:

    * ``value``: open ``x + r`` (``ceil(width / 8)`` bytes per element), one round; keys of
      :func:`protocols.mpc.fss.sign_key_words` words;
    * ``bit``: the same opening, then ``d`` packed 64 bits to a word, two rounds; keys of
      :func:`protocols.mpc.fss_bit.bit_sign_key_words` words.
    """
    keys = {"value": fss.sign_key_words(width, elements), "bit": fss_bit.bit_sign_key_words(width, elements)}
    return {kind: (rounds, sent + round(DEALER_BYTE_WEIGHT * RING_BYTES * keys[kind]))
            for kind, (rounds, sent) in _online_comparisons(elements, width).items()}


@functools.lru_cache(maxsize=4096)
def comparison_keys(elements: int, width: int, points: int, config: ProtocolConfig) -> str:
    """``"bit"`` or ``"value"``: the sign keys of a comparison of ``elements`` values on ``width``
    bits against ``points`` public thresholds. Several thresholds keep value keys (one key for all
    points; bit keys would need a mask bit and a conversion per point); ``comparison_keys`` =
    ``value`` or ``bit`` in the configuration forces the choice, ``auto`` takes the cheaper whole
    cost on the kernel profile (:func:`comparison_key_costs`; a tie keeps value keys). Public
    shapes and configuration only, so both parties choose alike."""
    if points != 1 or config.comparison_keys == "value":
        return "value"
    if config.comparison_keys == "bit":
        return "bit"
    costs = comparison_key_costs(elements, width)
    return "bit" if cheaper(costs["bit"], costs["value"], config) else "value"
