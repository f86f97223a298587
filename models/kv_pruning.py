"""KV-cache pruning policies for decoding: ``none``, ``window``, ``static`` and ``mpcache``.

A policy decides which cached keys/values each decode step attends to. The same code runs on
torch tensors and on secret shares: arithmetic goes through :mod:`models.ops`, and every
data-dependent choice (top-k, cluster choice, gathering) goes through a *selector*. The
:class:`PlainSelector` here uses ``torch.topk`` and public indices (plaintext simulation);
``protocols.kv.select.ObliviousSelector`` does the same on shares with comparisons and one-hot
matrices, so nobody learns which tokens were chosen. Models never import crypto, hence the
injection.

What each policy reveals (beyond the public model shape, prompt length and step count):

* ``none``: nothing.
* ``window``: nothing secret-dependent; the kept positions (sinks + most recent) are public.
* ``static``: the number kept (the budget) is public; which tokens survived is secret on shares.
* ``mpcache``: the static budget, the cluster size, the number of clusters and how many are
  picked per step are public; the chosen clusters are secret on shares.

Wiring: :meth:`PrunedCache.for_model` attaches a policy to a :class:`models.decoder.Decoder`
without changing it: a forward hook on each ``attn.q`` captures the query (the policy needs
it for scores), and :meth:`PrunedCache.update` returns the K/V the policy selected. In a
``PrunedCache`` ``stored_keys``/``stored_values``/``stored_positions`` hold the cache itself;
``keys``/``values``/``positions`` hold what the last attention call read (the decoder builds
its mask from ``positions``). After a secret selection the stored positions are slot numbers,
not token positions: RoPE was applied before caching, and every cached entry precedes the
current query, so only that order matters for the causal mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from models import ops
from models.attention import MASK_OFFSET, ROW_MAX_BOUND

if TYPE_CHECKING:
    from models.pruned_cache import PrunedCache

POLICIES = ("none", "window", "static", "mpcache")


class PolicyError(ValueError):
    """Unknown policy, bad budget or a policy used in a state it does not support."""


def resolve_budget(budget: float | int, total: int) -> int:
    """Entries to keep out of ``total``: an int is a count, a float in (0, 1] a fraction."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise PolicyError(f"budget must be a count or a fraction, got {budget!r}")
    if not budget > 0 or (isinstance(budget, float) and not math.isfinite(budget)):
        raise PolicyError(f"budget must be > 0, got {budget!r}")
    if isinstance(budget, float):
        if budget > 1.0:
            raise PolicyError(f"a fractional budget must be in (0, 1], got {budget!r}")
        return max(1, min(total, round(budget * total)))
    return min(total, budget)


@dataclass(frozen=True)
class Plan:
    """Public per-layer quantities of one decode step (for cost models).

    ``stored``: cached entries per kv head; ``attended``: entries the attention reads;
    ``clusters``/``chosen``/``cluster_size``: the dynamic selection (0 when there is none);
    ``selecting_layers``: layers that compute a selection (the rest reuse one).
    """

    stored: int
    attended: int
    clusters: int = 0
    chosen: int = 0
    cluster_size: int = 0
    selecting_layers: int = 0


class Selector(Protocol):
    """Makes data-dependent choices; plaintext (public indices) or on shares (one-hot)."""

    oblivious: bool

    def top_k(self, scores: Any, k: int, ordered: bool, bound: float = 0.0) -> Any:
        """Choose the ``k`` largest of ``scores`` [..., n]; ``ordered`` keeps index order.

        ``bound`` is a public bound on ``|scores|`` (0: unknown); threshold search uses it.
        """

    def gather(self, selection: Any, x: Any) -> Any:
        """Apply a selection to ``x`` [..., n, d] -> [..., k, d]."""


class PlainSelector:
    """Plaintext selection by ``torch.topk``; the selection is a public index tensor."""

    oblivious = False

    def top_k(self, scores: Any, k: int, ordered: bool, bound: float = 0.0) -> torch.Tensor:
        if not ops.is_plain(scores):
            raise PolicyError("PlainSelector needs plaintext scores; on shares use "
                              "protocols.kv.select.ObliviousSelector")
        idx = scores.topk(k, dim=-1).indices
        return idx.sort(dim=-1).values if ordered else idx

    def gather(self, selection: torch.Tensor, x: Any) -> Any:
        if not ops.is_plain(x):
            raise PolicyError("PlainSelector cannot gather shares")
        index = selection.unsqueeze(-1).expand(*selection.shape, x.shape[-1])
        return x.gather(-2, index)


def _slice(x: Any, start: int, stop: int) -> Any:
    """Entries [start, stop) along dim 2 of a [B, kv_heads, n, d] tensor (plain or shares)."""
    return ops.index(x, 2, torch.arange(start, stop))


def _group_queries(q: Any, kv_heads: int) -> Any:
    """[B, H, T, d] -> [B, kv_heads, H // kv_heads * T, d] (the queries sharing each kv head)."""
    b, h, t, d = q.shape
    return q.reshape(b, kv_heads, (h // kv_heads) * t, d)


def cluster_score_bound(head_dim: int, rows: int) -> float:
    """A public bound on the difference of two cluster scores (the mean of a cluster's raw ``q . k``,
    summed over ``rows`` query rows), from the softmax's own promise on each scaled score
    (``|q . k / sqrt(head_dim)| < MASK_OFFSET``, :data:`models.attention.ROW_MAX_BOUND` for a difference):
    the width the selection's comparisons need, no wider (40-bit default gates: 35 bits at MPCache's
    32-dim heads)."""
    return ROW_MAX_BOUND * math.sqrt(head_dim) * rows


def prefill_scores(q: Any, k: Any, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   window: int | None = None) -> Any:
    """Accumulated softmax attention each key got from the last ``window`` prefill queries.

    ``q`` [B, H, T, d], ``k`` [B, kv_heads, n, d] -> [B, kv_heads, n], summed over the query
    heads that share a kv head. Masking is multiplicative (as in the attention kernels), the
    normaliser is divided by a public count first so CrypTen's reciprocal stays accurate.
    """
    t = q.shape[2]
    w = t if window is None else max(1, min(window, t))
    if w < t:
        q, q_pos = ops.index(q, 2, torch.arange(t - w, t)), q_pos[t - w:]
    qg = _group_queries(q, k.shape[1])
    scores = ops.matmul(qg, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    groups = qg.shape[2] // w
    dense = (k_pos[None, :] <= q_pos[:, None]).float().repeat(groups, 1)[None, None]
    shifted = scores * dense + (dense - 1.0) * MASK_OFFSET
    num = ops.exp_nonpositive(shifted - ops.row_max(shifted, bound=ROW_MAX_BOUND, slack=ops.STABILISING_SLACK)) * dense
    scale = (dense.sum(-1, keepdim=True) / 8.0).clamp(min=1.0)
    probs = num * ops.reciprocal(num.sum(-1, keepdim=True), scale)
    return probs.sum(2)


class KVPolicy:
    """Base policy ``none``: the full cache, nothing selected, nothing revealed."""

    name = "none"
    reveals = "nothing beyond the public shape (prompt length, step count)"

    def __init__(self, budget: float | int | None = None, selector: Selector | None = None,
                 sink: int = 4) -> None:
        if budget is not None:
            resolve_budget(budget, 1)
        if sink < 0:
            raise PolicyError(f"sink must be >= 0, got {sink}")
        self.budget, self.sink = budget, sink
        self.selector: Selector = selector or PlainSelector()
        self.prompt = 0

    needs_scores = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget!r})"

    def kept(self, prompt: int) -> int:
        """Entries kept out of a prompt of ``prompt`` tokens."""
        return prompt if self.budget is None else resolve_budget(self.budget, prompt)

    def after_prefill(self, layer: int, cache: PrunedCache, scores: Any,
                      bound: float = 0.0) -> None:
        """Called once per layer after the prefill attention; may evict stored entries.

        ``scores`` [B, kv_heads, prompt] (when :attr:`needs_scores`), ``bound`` a public bound
        on them (the number of query rows that voted).
        """
        self.prompt = cache.stored_entries(layer)

    def select(self, layer: int, query: Any, cache: PrunedCache) -> tuple[Any, Any, torch.Tensor]:
        """K, V and public positions this step's attention reads for ``layer``."""
        return (cache.stored_keys[layer], cache.stored_values[layer],
                cache.stored_positions[layer])

    def plan(self, prompt: int, context: int, layers: int) -> Plan:
        """Public sizes of a decode step at ``context`` cached tokens after a ``prompt``."""
        stored = self._stored(prompt, context)
        return Plan(stored=stored, attended=stored)

    def _stored(self, prompt: int, context: int) -> int:
        if context < prompt:
            raise PolicyError(f"context {context} is shorter than the prompt {prompt}")
        return context


class WindowPolicy(KVPolicy):
    """Attention sinks (the first ``sink`` tokens) plus the most recent prompt tokens, ``budget``
    of the prompt in all; decoded tokens are appended (like every policy here, so all of them
    attend ``budget + decoded`` entries per step)."""

    name = "window"
    reveals = "nothing secret-dependent: kept positions (sinks + recent) are public"

    def after_prefill(self, layer: int, cache: PrunedCache, scores: Any,
                      bound: float = 0.0) -> None:
        super().after_prefill(layer, cache, scores, bound)
        limit, n = self.kept(self.prompt), self.prompt
        if limit < n:
            sink = min(self.sink, limit // 2)
            cache.select(layer, torch.cat([torch.arange(sink), torch.arange(n - limit + sink, n)]))

    def _stored(self, prompt: int, context: int) -> int:
        return super()._stored(prompt, context) - prompt + self.kept(prompt)


class StaticPolicy(KVPolicy):
    """Look-once eviction after prefill: sinks + recent + the top keys by accumulated attention.

    ``window`` is how many of the last prefill queries vote (None: all). Decoded tokens are
    appended, never evicted.
    """

    name = "static"
    reveals = "the number kept (budget) is public; which tokens were kept is secret on shares"
    needs_scores = True

    def __init__(self, budget: float | int, selector: Selector | None = None, sink: int = 4,
                 recent: float = 0.25, window: int | None = 32) -> None:
        super().__init__(budget, selector, sink)
        if not 0.0 <= recent < 1.0:
            raise PolicyError(f"recent must be a fraction in [0, 1), got {recent!r}")
        if window is not None and window < 1:
            raise PolicyError(f"window must be >= 1 or None, got {window!r}")
        self.recent, self.window = recent, window

    def static_keep(self, prompt: int) -> int:
        return self.kept(prompt)

    def split(self, prompt: int) -> tuple[int, int, int]:
        """(sink, chosen by score, recent) entry counts of the kept prompt."""
        keep = self.static_keep(prompt)
        sink = min(self.sink, keep // 2)
        recent = min(int(self.recent * keep), keep - sink)
        return sink, keep - sink - recent, recent

    def after_prefill(self, layer: int, cache: PrunedCache, scores: Any,
                      bound: float = 0.0) -> None:
        super().after_prefill(layer, cache, scores, bound)
        n = self.prompt
        sink, chosen, recent = self.split(n)
        if sink + chosen + recent >= n:
            return
        k, v = cache.stored_keys[layer], cache.stored_values[layer]
        middle = torch.arange(sink, n - recent)
        sel = self.selector.top_k(ops.index(scores, 2, middle), chosen, ordered=True, bound=bound)
        parts_k = [_slice(k, 0, sink), self.selector.gather(sel, _slice(k, sink, n - recent)),
                   _slice(k, n - recent, n)]
        parts_v = [_slice(v, 0, sink), self.selector.gather(sel, _slice(v, sink, n - recent)),
                   _slice(v, n - recent, n)]
        cache.replace(layer, ops.cat(parts_k, dim=2), ops.cat(parts_v, dim=2),
                      torch.arange(sink + chosen + recent))

    def _stored(self, prompt: int, context: int) -> int:
        return super()._stored(prompt, context) - prompt + min(prompt, self.static_keep(prompt))


class MPCachePolicy(StaticPolicy):
    """MPCache-style: static eviction to ``static`` entries, then per step a query-aware choice
    of clusters of ``cluster`` consecutive entries, scored by the query against each cluster's
    mean key (a linear, MPC-cheap similarity; ``similarity="relu"`` clips negative heads first).
    ``budget`` (plus decoded tokens) bounds the entries attended per step (sinks + chosen
    clusters + the tail); a
    selection is computed on every ``share``-th layer and reused by the next ``share - 1``.
    """

    name = "mpcache"
    reveals = ("the static budget, cluster size, cluster count and clusters chosen per step are "
               "public; which clusters (tokens) were chosen is secret on shares")

    def __init__(self, budget: float | int, selector: Selector | None = None, sink: int = 4,
                 recent: float = 0.25, window: int | None = 32, static: float | int = 2.0,
                 cluster: int = 16, share: int = 2, similarity: str = "dot") -> None:
        super().__init__(budget, selector, sink, recent, window)
        if isinstance(static, bool) or not static > 0:
            raise PolicyError(
                f"static must be > 0 (a multiple of the budget or a count), got {static!r}")
        if cluster < 1 or share < 1:
            raise PolicyError(f"cluster and share must be >= 1, got {cluster}, {share}")
        if similarity not in ("dot", "relu"):
            raise PolicyError(f"similarity must be 'dot' or 'relu', got {similarity!r}")
        self.static, self.cluster, self.share, self.similarity = static, cluster, share, similarity
        self._shared: dict[int, Any] = {}

    def static_keep(self, prompt: int) -> int:
        """``static`` is a count (int) or a multiple of the attended budget (float)."""
        if isinstance(self.static, int):
            return max(self.kept(prompt), min(prompt, self.static))
        return min(prompt, max(self.kept(prompt), round(self.static * self.kept(prompt))))

    def layout(self, prompt: int, stored: int) -> tuple[int, int, int, int]:
        """(sink, clusters, chosen clusters, tail) of a stored cache of ``stored`` entries.

        The per-step budget is the prompt budget plus every token decoded since the prefill.
        """
        budget = self.kept(prompt) + stored - self.static_keep(prompt)
        sink = min(self.sink, budget // 2)
        recent = int(self.recent * budget)
        clusters = max(0, (stored - sink - recent) // self.cluster)
        tail = stored - sink - clusters * self.cluster
        chosen = max(1, (budget - sink - tail) // self.cluster)
        if chosen >= clusters:
            return sink, 0, 0, stored - sink
        return sink, clusters, chosen, tail

    def cluster_scores(self, query: Any, keys: Any, clusters: int) -> Any:
        """[B, kv_heads, clusters]: query . mean key of each cluster, summed over grouped heads."""
        b, kvh, _, d = keys.shape
        means = keys.reshape(b, kvh, clusters, self.cluster, d).sum(3) * (1.0 / self.cluster)
        sim = ops.matmul(_group_queries(query, kvh), means.transpose(-2, -1))
        if self.similarity == "relu":
            sim = ops.relu(sim)
        return sim.sum(2)

    def select(self, layer: int, query: Any, cache: PrunedCache) -> tuple[Any, Any, torch.Tensor]:
        k, v = cache.stored_keys[layer], cache.stored_values[layer]
        pos = cache.stored_positions[layer]
        n = cache.stored_entries(layer)
        sink, clusters, chosen, tail = self.layout(self.prompt, n)
        if clusters == 0:
            return k, v, pos
        stop = sink + clusters * self.cluster
        ck, cv = _slice(k, sink, stop), _slice(v, sink, stop)
        anchor = layer - layer % self.share
        shared = self._shared.get(anchor) if layer != anchor else None
        if shared is None or shared[0] != clusters:
            scores = self.cluster_scores(query, ck, clusters)
            rows = query.shape[1] // k.shape[1] * query.shape[2]
            with ops.compare_bound(cluster_score_bound(query.shape[-1], rows)):
                sel = self.selector.top_k(scores, chosen, ordered=True)
            self._shared[layer] = (clusters, sel)
        else:
            sel = shared[1]
        b, kvh, _, d = ck.shape
        width = self.cluster * d
        gk = self.selector.gather(sel, ck.reshape(b, kvh, clusters, width))
        gv = self.selector.gather(sel, cv.reshape(b, kvh, clusters, width))
        chosen_k = gk.reshape(b, kvh, chosen * self.cluster, d)
        chosen_v = gv.reshape(b, kvh, chosen * self.cluster, d)
        out_k = ops.cat([_slice(k, 0, sink), chosen_k, _slice(k, stop, n)], dim=2)
        out_v = ops.cat([_slice(v, 0, sink), chosen_v, _slice(v, stop, n)], dim=2)
        out_pos = torch.cat([pos[: sink + chosen * self.cluster], pos[stop:]])
        return out_k, out_v, out_pos

    def plan(self, prompt: int, context: int, layers: int) -> Plan:
        stored = self._stored(prompt, context)
        sink, clusters, chosen, tail = self.layout(prompt, stored)
        attended = sink + chosen * self.cluster + tail
        return Plan(stored=stored, attended=attended, clusters=clusters, chosen=chosen,
                    cluster_size=self.cluster if clusters else 0,
                    selecting_layers=math.ceil(layers / self.share) if clusters else 0)


def mpcache_split(static_share: float, dynamic_ratio: float) -> tuple[float, dict[str, float]]:
    """MPCache's static + dynamic split as an ``mpcache`` budget and options: static eviction keeps
    ``static_share`` of the prompt, each step attends ``dynamic_ratio`` of what was kept, so the
    budget is ``static_share * dynamic_ratio`` of the prompt and ``static`` is ``1 / dynamic_ratio``
    budgets (e.g. 0.3 and 0.2: budget 6%, static 5x = 30% of the prompt)."""
    for name, value in (("static_share", static_share), ("dynamic_ratio", dynamic_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise PolicyError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return round(static_share * dynamic_ratio, 9), {"static": 1.0 / dynamic_ratio}


_CLASSES: dict[str, type[KVPolicy]] = {
    "none": KVPolicy, "window": WindowPolicy, "static": StaticPolicy, "mpcache": MPCachePolicy,
}


def make_policy(name: str, budget: float | int | None = None, selector: Selector | None = None,
                **options: Any) -> KVPolicy:
    """A policy by name; every policy but ``none`` needs a budget (count or fraction)."""
    if name not in _CLASSES:
        raise PolicyError(f"unknown KV policy {name!r}; known: {', '.join(POLICIES)}")
    if name == "none":
        if options:
            raise PolicyError(f"policy 'none' takes no options, got {sorted(options)}")
        return KVPolicy(budget, selector)
    if budget is None:
        raise PolicyError(f"policy {name!r} needs a budget (a count or a fraction in (0, 1])")
    return _CLASSES[name](budget, selector, **options)
