"""KV-cache selection on secret shares: top-k by comparisons, one-hot gathering, cost model.

:class:`ObliviousSelector` implements :class:`models.kv_pruning.Selector` so the pruning
policies run unchanged on CrypTen ``MPCTensor`` shares (the functions are duck-typed and run
on torch tensors too, which the tests use as a reference). Nothing is opened: the selection is
a secret 0/1 matrix ``S`` [..., k, n] and gathering is the matmul ``S @ X``. The parties learn
only public sizes (n, k, the number of threshold iterations); which entries were kept is secret.

Top-k, two ways:

* **rank** (exact, for small n such as cluster scores): ``rank_i = #{j : s_j beats s_i}`` from
  one batch of n (n - 1) / 2 comparisons, one per pair (ties broken by index: the earlier entry
  wins; the other order of a pair is one minus its bit), then
  ``keep_i = [rank_i < k]``.
* **threshold** (for long prompts): a secret bisection on a public range ``[-bound, bound]``;
  each iteration counts ``#{s_i > mid}`` (n comparisons) and moves ``lo`` or ``hi`` by a secret
  bit (one comparison, one product). At the end ``s > hi`` holds at most k entries and
  ``s > lo`` more than k; the missing ones are filled from ``(lo, hi]`` latest first, so exactly
  k are kept. Bisection stops at a width of 2^-12 and both ends are widened by the truncation
  drift (2 ulp per step), so scores within ~1e-3 of the k-th are ties, broken latest first.

One-hot rows: ``S[t, i] = [z_i == t]`` for ``t < k`` with ``z`` the rank (unordered top-k) or,
for an order-preserving compaction of a 0/1 mask, ``z = slot + k (1 - keep)`` where ``slot_i =
#kept before i`` (a local prefix sum). On shares with a dealer (a bound party context) each
``z_i`` becomes its unit vector with one opening (:mod:`protocols.mpc.onehot`: the dealer's random
rotated unit vector, n x D offline ring elements); without one, (k+1) n comparisons
``[z_i > t - 1/2]`` in one batch, differenced.

Fixed point: scores are encoded at 2^-16, so ties below that resolution are broken by index;
counts and slots are exact small integers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from models import ops
from models.config import ModelConfig
from models.kv_pruning import KVPolicy, Plan
from protocols.mpc import fixed_point, numerics, tournament
from protocols.mpc.cryptenlib import provider as crypten_provider
from protocols.mpc.onehot import domain_for, one_hot

_BIG = 1.0e4
RESOLUTION = 2.0**-12  # bisection bracket width; closer scores are ties (latest first)


class SelectError(ValueError):
    """Bad selection size, method or score bound."""


def greater_than_zero(x: Any) -> Any:
    """``[x > 0]`` as 0/1 in the operand's own type (a secret bit on shares).

    CrypTen returns comparison bits with a scale-1 encoder, so a later ``0.5 - bit`` would
    round the public constant; the bit is rescaled (a local multiply of the share by the
    operand's scale) to the operand's fixed-point encoding.
    """
    if ops.is_plain(x):
        return (x > 0).to(x.dtype)
    return numerics.as_fixed_point(x > 0, x)


def _check(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise SelectError(f"top-k needs 1 <= k <= n, got k={k}, n={n}")


@functools.lru_cache(maxsize=16)
def _pair_layout(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs ``a < c`` of ``n`` entries and, per entry ``i``, where its ``n - 1`` "does j beat
    i" bits sit in ``cat([b, 1 - b])`` (``b[p] = [a_p beats c_p]``): ``j < i`` reads ``b``,
    ``j > i`` reads ``1 - b`` of the pair ``(i, j)``."""
    a, c = torch.triu_indices(n, n, offset=1)
    pair = torch.full((n, n), -1, dtype=torch.long)
    pair[a, c] = torch.arange(a.numel())
    j = torch.arange(n).unsqueeze(0).expand(n, n)  # [i, j]
    i = torch.arange(n).unsqueeze(1).expand(n, n)
    where = torch.where(j < i, pair.T, pair + a.numel())  # pair.T[i, j] = pair[j, i]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    return a, c, where[off_diagonal].reshape(n, n - 1)


def _ulp() -> float:
    """The session's fixed-point resolution (plaintext runs use it too, so ties break alike)."""
    return 2.0 ** -fixed_point.precision_bits()


def ranks(scores: Any) -> Any:
    """Descending rank of each entry of ``scores`` [..., n] (0 = largest), ties by index.

    One batch of ``n (n - 1) / 2`` comparisons: ``[s_a - s_c + ulp > 0]`` for each pair ``a < c``
    says whether the earlier entry wins (ties included); the later one wins exactly when it
    does not, so ``1 - bit`` (local) covers the other half of the ``n^2`` table.
    """
    n = scores.shape[-1]
    if n == 1:
        return scores * 0.0
    a, c, where = _pair_layout(n)
    last = scores.dim() - 1
    earlier_wins = greater_than_zero(ops.index(scores, last, a) - ops.index(scores, last, c) + _ulp())
    table = ops.cat([earlier_wins, 1.0 - earlier_wins], dim=last)
    beaten_by = ops.index(table, last, where.reshape(-1))
    return beaten_by.reshape(*scores.shape[:-1], n, n - 1).sum(-1)


def rank_topk_mask(scores: Any, k: int) -> Any:
    """0/1 mask [..., n] of the k largest entries (exact; n (n - 1) / 2 + n comparisons)."""
    _check(scores.shape[-1], k)
    return greater_than_zero((k - 0.5) - ranks(scores))


def _suffix_count(bits: Any) -> Any:
    """``sum_{j >= i} bits_j`` along the last dim (local on shares)."""
    return bits.sum(-1, keepdim=True) - bits.cumsum(-1) + bits


def bisection_steps(bound: float) -> int:
    """Iterations that narrow ``[-bound, bound]`` to :data:`RESOLUTION`."""
    return max(1, math.ceil(math.log2(2.0 * bound / RESOLUTION)))


def threshold_topk_mask(scores: Any, k: int, bound: float, iterations: int | None = None) -> Any:
    """0/1 mask [..., n] of k entries found by secret bisection on ``[-bound, bound]``."""
    n = scores.shape[-1]
    _check(n, k)
    if not bound > 0 or not math.isfinite(bound):
        raise SelectError(f"threshold top-k needs a public bound > 0 on |scores|, got {bound!r}")
    if iterations is None:
        iterations = bisection_steps(bound)
    lead = scores.shape[:-1] + (1,)
    lo: Any = torch.full(lead, -bound * (1.0 + 1e-3))
    hi: Any = torch.full(lead, bound * (1.0 + 1e-3))
    for _ in range(iterations):
        half = (hi - lo) * 0.5
        mid = half + lo
        above = greater_than_zero(scores - mid).sum(-1, keepdim=True)
        step = greater_than_zero(above - (k + 0.5)) * half  # too many above mid: move up
        lo, hi = step + lo, step + mid
    margin = 2.0 * iterations * _ulp()  # covers the truncation drift of lo and hi
    keep = greater_than_zero(scores - (hi + margin))
    candidate = greater_than_zero(scores - (lo - margin)) - keep
    missing = k - keep.sum(-1, keepdim=True)
    z = _suffix_count(candidate) + (1.0 - candidate) * _BIG
    return keep + greater_than_zero(missing + 0.5 - z)


def _unit_rows(values: Any, k: int, count: int) -> Any:
    """``S[..., t, i] = [values_i == t]`` for ``t < k`` ([..., k, n]) from exact small integers
    ``values`` [..., n] in ``[0, count)``.

    On shares with a bound dealer: one opening per value (:func:`protocols.mpc.onehot.one_hot`);
    otherwise ``(k + 1) n`` comparisons ``[values_i > t - 1/2]``, differenced.
    """
    if ops.is_plain(values):
        return (values.unsqueeze(-2) == torch.arange(k, dtype=values.dtype).unsqueeze(-1)).to(values.dtype)
    context = crypten_provider.bound()
    if context is not None:
        units = one_hot(values, domain_for(count), context.provider)  # [..., n, D]
        return ops.index(units.transpose(-2, -1), values.dim() - 1, torch.arange(k))
    thresholds = (torch.arange(k + 1, dtype=torch.float32) - 0.5).unsqueeze(-1)
    with ops.compare_bound(2.0 * count + 1.0):
        above = greater_than_zero(values.unsqueeze(-2) - thresholds)  # [..., k+1, n]
    top = ops.index(above, above.dim() - 2, torch.arange(k))
    bottom = ops.index(above, above.dim() - 2, torch.arange(1, k + 1))
    return top - bottom


def compact(keep: Any, k: int) -> Any:
    """Order-preserving one-hot [..., k, n] of a 0/1 mask [..., n] with exactly k ones.

    ``slot_i`` = kept entries before ``i`` (local); kept entries sit at ``slot`` in ``[0, k)``,
    the others are moved to ``slot + k`` in ``[k, 2k]``, past the rows kept.
    """
    slot = keep.cumsum(-1) - keep
    return _unit_rows(slot + (1.0 - keep) * k, k, 2 * k + 1)


def rank_onehot(scores: Any, k: int) -> Any:
    """One-hot [..., k, n] of the k largest entries in descending score order."""
    n = scores.shape[-1]
    _check(n, k)
    return _unit_rows(ranks(scores), k, n)


class ObliviousSelector:
    """:class:`models.kv_pruning.Selector` on shares: secret one-hot selections, nothing opened.

    ``exact_limit``: up to this many candidates use the exact rank method, above it the
    threshold bisection (which needs the caller's public ``bound``).
    """

    oblivious = True

    def __init__(self, exact_limit: int = 64, iterations: int | None = None) -> None:
        if exact_limit < 1:
            raise SelectError(f"exact_limit must be >= 1, got {exact_limit}")
        self.exact_limit, self.iterations = exact_limit, iterations

    def method(self, n: int, bound: float) -> str:
        return "rank" if n <= self.exact_limit or not bound > 0 else "threshold"

    def top_k(self, scores: Any, k: int, ordered: bool, bound: float = 0.0) -> Any:
        n = scores.shape[-1]
        if self.method(n, bound) == "threshold":
            return compact(threshold_topk_mask(scores, k, bound, self.iterations), k)
        if ordered:
            return compact(rank_topk_mask(scores, k), k)
        return rank_onehot(scores, k)

    def gather(self, selection: Any, x: Any) -> Any:
        return ops.matmul(selection, x)


def indices_of(onehot: torch.Tensor) -> torch.Tensor:
    """Revealed one-hot [..., k, n] -> indices [..., k] (for tests and debugging only)."""
    return onehot.round().argmax(-1)


# ----- cost model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpCount:
    """``elements`` of one MPC op kind in one decode step, summed over layers.

    Kinds: ``open`` (ring elements each party sends to open Beaver-masked operands of secret x
    secret products), ``compare`` (secret comparisons), ``exp`` and ``reciprocal`` (CrypTen's
    iterative approximations), ``rounds`` (sequential rounds of the op on the critical path).
    """

    what: str
    kind: str
    elements: int
    rounds: int


# Online per-element costs per party of privinf's protocol (2 parties, dealer, FSS comparisons):
# an open is one 8-byte ring element in one round; an FSS comparison opens one masked element in
# ceil(bits / 8) bytes: 5 at the default 40 bits and at the softmax max's exact 33 bits
# (``compare``), 3 at up to 24 bits (``compare_narrow``: the max's truncated binary levels, the
# win counts of its groups); exp is CrypTen's 8 squarings; the range-reduced reciprocal
# (protocols.mpc.numerics) is one comparison at 40 bits (all 383 public thresholds on one key and
# one opening) plus 8 opens in 4 rounds. Offline material is not priced here: an FSS key is
# ~0.5-1 KB per comparison and party (573 B at 23 bits, 816 B at 33, 986 B at 40), a one-hot
# D ring elements per value, a Beaver correction one ring element per product element.
BYTES_PER = {"open": 8, "compare": 5, "compare_narrow": 3, "exp": 64, "reciprocal": 5 + 8 * 8}
ROUNDS_PER = {"open": 1, "compare": 1, "compare_narrow": 1, "exp": 8, "reciprocal": 4}


def _max_ops(rows: int, n: int) -> list[OpCount]:
    """The softmax max's tournament over ``rows`` rows of ``n`` entries as
    :func:`protocols.mpc.tournament._tournament` runs it: binary levels (a truncated comparison and
    a product per pair) while :func:`protocols.mpc.tournament.all_pairs` says so, then groups compared
    all-pairs (exact), their win counts tested, and one product keeping each group's winner."""
    out: list[OpCount] = []
    while n > 1:
        if not tournament.all_pairs(rows, n):
            pairs = n // 2
            out += [OpCount("softmax.max", "compare_narrow", rows * pairs, 1),
                    OpCount("softmax.max.select", "open", 2 * rows * pairs, 1)]
            n -= pairs
            continue
        g = min(n, tournament.SINGLE_GROUP)
        groups = -(-n // g)
        out += [OpCount("softmax.max", "compare", rows * groups * g * (g - 1) // 2, 1),
                OpCount("softmax.max.wins", "compare_narrow", rows * groups * g, 1),
                OpCount("softmax.max.select", "open", 2 * rows * groups * g, 1)]
        n = groups
    merged: dict[tuple[str, str], tuple[int, int]] = {}
    for o in out:
        elements, rounds = merged.get((o.what, o.kind), (0, 0))
        merged[(o.what, o.kind)] = (elements + o.elements, rounds + o.rounds)
    return [OpCount(what, kind, elements, rounds) for (what, kind), (elements, rounds) in merged.items()]


def _attention_ops(config: ModelConfig, attended: int, stored: int) -> list[OpCount]:
    """One layer's softmax attention for one query on a KV-stationary cache of ``stored``
    entries of which ``attended`` are read: ``q K^T`` opens ``q - A`` only, ``w V`` ``w - A``
    only (over the whole cache when a selection scatters the weights back)."""
    h, d = config.heads, config.head_dim
    return [
        OpCount("qk", "open", h * d, 1),
        *_max_ops(h, attended),
        OpCount("softmax.exp", "exp", h * attended, 1),
        OpCount("softmax.recip", "reciprocal", h, 1),
        OpCount("softmax.norm", "open", h * attended + h, 1),
        OpCount("pv", "open", h * stored, 1),
    ]


def _selection_ops(config: ModelConfig, plan: Plan) -> list[OpCount]:
    """One selecting layer's choice: rank top-k of the cluster scores, the one-hot rows, and
    ``S`` opened once (masked) for the layers that share it."""
    kvh, c, r = config.kv_heads, plan.clusters, plan.chosen
    return [
        OpCount("select.rank", "compare", kvh * c * (c - 1) // 2, 1),
        OpCount("select.onehot", "open", kvh * c, 1),
        OpCount("select.open_s", "open", kvh * c * r, 1),
    ]


def _gather_ops(config: ModelConfig, plan: Plan) -> list[OpCount]:
    """Every layer with a selection: ``S @ scores`` and ``S^T @ w`` open scores and weights only."""
    h, c, r, m = config.heads, plan.clusters, plan.chosen, plan.cluster_size
    return [OpCount("select.gather", "open", h * c * m, 1),
            OpCount("select.scatter", "open", h * r * m, 1)]


def decode_step_cost(policy: KVPolicy, config: ModelConfig, prompt: int,
                     context: int) -> list[OpCount]:
    """Attention and selection ops of one decode step at ``context`` tokens, all layers.

    The rest of the layer (projections, MLP, norms) is the same for every policy and left out.
    """
    plan = policy.plan(prompt, context, config.layers)
    per_layer = _attention_ops(config, plan.attended, plan.stored if plan.clusters else plan.attended)
    if plan.clusters:
        per_layer += _gather_ops(config, plan)
    out = [OpCount(o.what, o.kind, o.elements * config.layers, o.rounds * config.layers) for o in per_layer]
    if plan.clusters:
        for o in _selection_ops(config, plan):
            out.append(OpCount(o.what, o.kind, o.elements * plan.selecting_layers,
                               o.rounds * plan.selecting_layers))
    return out


def eviction_cost(policy: KVPolicy, config: ModelConfig, prompt: int,
                  selector: ObliviousSelector | None = None) -> list[OpCount]:
    """One-time ops of the static eviction after prefill (score, top-k, compaction, gather)."""
    split = getattr(policy, "split", None)
    if split is None:
        return []
    sink, chosen, recent = split(prompt)
    n = prompt - sink - recent
    if chosen >= n:
        return []
    selector = selector or ObliviousSelector()
    kvh, d, layers = config.kv_heads, config.head_dim, config.layers
    w = prompt if policy.window is None else min(policy.window, prompt)
    voters = w * config.heads
    bound = float(w * config.heads // kvh)
    if selector.method(n, bound) == "rank":
        top = [OpCount("evict.rank", "compare", kvh * (n * (n - 1) // 2 + n) * layers, 2 * layers)]
    else:
        it = selector.iterations or bisection_steps(bound)
        top = [OpCount("evict.bisect", "compare", kvh * it * (n + 1) * layers, 2 * it * layers),
               OpCount("evict.bisect.step", "open", kvh * it * 2 * layers, it * layers),
               OpCount("evict.fill", "compare", kvh * 3 * n * layers, 2 * layers)]
    return [
        OpCount("evict.scores", "open", (voters * d + config.heads * prompt * d) * layers, layers),
        *[OpCount(f"evict.{o.what}", o.kind, o.elements * layers, o.rounds * layers) for o in _max_ops(voters, prompt)],
        OpCount("evict.softmax.exp", "exp", voters * prompt * layers, layers),
        *top,
        OpCount("evict.compact", "open", kvh * n * layers, layers),
        OpCount("evict.gather", "open", 2 * kvh * (chosen * n + n * d) * layers, layers),
    ]


def estimate(counts: list[OpCount]) -> dict[str, float]:
    """Bytes each party sends and rounds, from :data:`BYTES_PER` / :data:`ROUNDS_PER`."""
    sent = sum(o.elements * BYTES_PER[o.kind] for o in counts)
    rounds = sum(o.rounds * ROUNDS_PER[o.kind] for o in counts)
    return {"bytes": float(sent), "rounds": float(rounds)}
