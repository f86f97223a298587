"""Private decoding pieces: the KV-stationary pruned cache, attention kernels that use it, and
the plaintext greedy reference with the same pruning policy.

:class:`StationaryCache` is a :class:`models.pruned_cache.PrunedCache` whose stored K/V live as
KV-stationary shares (:mod:`protocols.kv.stationary`): every appended block is opened once as
``F = K - B``; the attention reads :class:`~protocols.kv.stationary.StationaryView` objects and
the kernels installed by :func:`install_kernels` compute ``q K^T`` and ``w V`` opening only the
fresh operand. Policies run unchanged where they act once (``window``/``static`` eviction after
prefill: public indices, or a secret one-hot gather by ``ObliviousSelector`` whose result is
re-cached as a new block). ``mpcache``'s per-step selection is done on the scores instead of on
the cache: cluster scores are sums of the per-entry scores (``q . mean(k) = mean(q . k)``), the
secret one-hot ``S`` of chosen clusters is opened masked once per selection (KV-stationary
kind ``s``) and gathers the scores (``S @ scores``, opening only the scores), the softmax runs
on the attended entries only, the weights are scattered back (``S^T @ w``, opening only the
weights) and ``w V`` is a stationary product over the whole cache: the same attention as
gathering K and V, without re-opening them or ``S``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import ops
from models.attention import _Quadratic
from models.kv_pruning import (
    KVPolicy,
    MPCachePolicy,
    PlainSelector,
    PolicyError,
    cluster_score_bound,
    make_policy,
)
from models.pruned_cache import PrunedCache
from protocols.kv.stationary import StationaryError, StationaryParty, StationaryView, _Store
from protocols.mpc import fixed_point
from protocols.mpc.cryptenlib import MPCTensor


@dataclass(frozen=True)
class Selection:
    """mpcache's dynamic choice for one layer and step: public layout, secret one-hot ``S``."""

    sink: int
    clusters: int
    chosen: int
    cluster: int
    layer: int
    cache: StationaryCache


class StationaryCache(PrunedCache):
    """A pruned cache on KV-stationary shares (see module doc); one per generation. A layer's new
    K and V blocks are opened together (one round)."""

    def __init__(self, layers: int, policy: KVPolicy, party: StationaryParty | None = None) -> None:
        super().__init__(layers, policy)
        self.party = party
        self._stores: dict[tuple[int, str], _Store] = {}
        self._shared: dict[int, tuple[int, Any]] = {}
        self.selections: list[tuple[int, Any, Any]] = []  # (layer, cluster scores, S): shares, for tests

    @classmethod
    def attach(cls, model: nn.Module, policy: KVPolicy, party: StationaryParty) -> StationaryCache:
        """Hook onto a Decoder on shares (query capture) with ``party`` doing the products."""
        cache = cls.for_model(model, policy)
        cache.party = party
        return cache

    def _party(self) -> StationaryParty:
        if self.party is None:
            raise StationaryError("StationaryCache has no party; build it with StationaryCache.attach")
        return self.party

    def stored_bytes(self) -> int:
        """Bytes this party holds for the cache: ``F`` and its mask share, K and V, all layers."""
        return sum(2 * s.f.numel() * 8 for s in self._stores.values())

    def _view(self, layer: int, kind: str) -> StationaryView:
        return self._party().view(self._stores[(layer, kind)], layer, kind)

    def replace(self, layer: int, k: Any, v: Any, positions: torch.Tensor) -> None:
        """Cache new secret K/V for ``layer`` (fresh blocks, fresh masks: F opened once)."""
        if k.shape[2] != len(positions) or v.shape[2] != len(positions):
            raise PolicyError(f"replace: {len(positions)} positions for {k.shape[2]} entries")
        stores = self._party().append_many([(None, layer, "k", k), (None, layer, "v", v)])
        self._stores[(layer, "k")], self._stores[(layer, "v")] = stores
        self._sync(layer, positions)

    def _sync(self, layer: int, positions: torch.Tensor) -> None:
        rank, bits = self._party().rank, fixed_point.precision_bits()
        self.stored_keys[layer] = MPCTensor.from_shares(self._stores[(layer, "k")].share(rank), precision=bits)
        self.stored_values[layer] = MPCTensor.from_shares(self._stores[(layer, "v")].share(rank), precision=bits)
        self.stored_positions[layer] = positions

    def update(self, layer: int, k: Any, v: Any, positions: torch.Tensor) -> tuple[Any, Any]:
        query = self._begin_update(layer, positions)
        if self.stored_keys[layer] is None:
            self.replace(layer, k, v, positions)
            kv = (self._view(layer, "k"), self._view(layer, "v"))
            seen = positions
            self.evict_after_prefill(layer, query, k, positions)
        else:
            stores = self._party().append_many([(self._stores[(layer, "k")], layer, "k", k),
                                                (self._stores[(layer, "v")], layer, "v", v)])
            self._stores[(layer, "k")], self._stores[(layer, "v")] = stores
            self._sync(layer, torch.cat([self.stored_positions[layer], positions]))
            kv = (self._view(layer, "k"), self._view(layer, "v"))
            seen = self.stored_positions[layer]
            selection = self._selection(layer)
            if selection is not None:
                kv = (_Selected(kv[0], selection), kv[1])
                keep = selection.sink + selection.chosen * selection.cluster
                seen = torch.cat([seen[:keep], seen[selection.sink + selection.clusters * selection.cluster:]])
        self.keys[layer], self.values[layer], self.positions[layer] = kv[0], kv[1], seen
        for hook in self._hooks:
            hook(self, layer)
        return kv

    def _selection(self, layer: int) -> Selection | None:
        policy = self.policy
        if not isinstance(policy, MPCachePolicy):
            return None
        sink, clusters, chosen, _ = policy.layout(policy.prompt, self.stored_entries(layer))
        if clusters == 0:
            return None
        return Selection(sink, clusters, chosen, policy.cluster, layer, self)

    def choose(self, selection: Selection, scores: Any, kv_heads: int, head_dim: int) -> StationaryView:
        """Secret choice from per-entry raw scores [B, H, t, n] (``q . k`` of ``head_dim``-wide heads,
        compared under :func:`models.kv_pruning.cluster_score_bound`) as a KV-stationary view of ``S^T``
        [B, kv_heads, clusters, chosen] (``S`` the one-hot of chosen clusters, opened masked
        once); computed at every ``share``-th layer and reused by the next ones, as the policy
        does."""
        policy = self.policy
        assert isinstance(policy, MPCachePolicy)
        layer = selection.layer
        anchor = layer - layer % policy.share
        shared = self._shared.get(anchor) if layer != anchor else None
        if shared is not None and shared[0] == selection.clusters:
            return shared[1]
        b, h, t, _ = scores.shape
        stop = selection.sink + selection.clusters * selection.cluster
        mid = ops.index(scores, 3, torch.arange(selection.sink, stop))
        sim = mid.reshape(b, h, t, selection.clusters, selection.cluster).sum(-1) * (1.0 / selection.cluster)
        if policy.similarity == "relu":
            sim = ops.relu(sim)
        sim = sim.reshape(b, kv_heads, (h // kv_heads) * t, selection.clusters).sum(2)
        with ops.compare_bound(cluster_score_bound(head_dim, (h // kv_heads) * t)):
            onehot = policy.selector.top_k(sim, selection.chosen, ordered=False)  # order: irrelevant here
        party = self._party()
        view = party.view(party.new_store(layer, "s", onehot.transpose(-2, -1)), layer, "s")
        self._shared[layer] = (selection.clusters, view)
        self.selections.append((layer, sim, onehot))
        return view


@dataclass(frozen=True)
class _Selected:
    """Keys with an mpcache selection attached (the kernel takes the selecting path)."""

    view: StationaryView
    selection: Selection

    @property
    def shape(self) -> tuple[int, ...]:
        return self.view.shape

    def dim(self) -> int:
        return 4

    def __getitem__(self, key: Any) -> _Selected:
        return _Selected(self.view[key], self.selection)


def _to_rows(x: Any, groups: int, width: int) -> Any:
    """[B, H, t, groups * width] -> [B, H, groups, t * width] (clusters as rows)."""
    b, h, t, _ = x.shape
    return x.reshape(b, h, t, groups, width).permute(0, 1, 3, 2, 4).reshape(b, h, groups, t * width)


def _from_rows(x: Any, t: int, width: int) -> Any:
    """Inverse of :func:`_to_rows`."""
    b, h, groups, _ = x.shape
    return x.reshape(b, h, groups, t, width).permute(0, 1, 3, 2, 4).reshape(b, h, t, groups * width)


class StationaryKernel(nn.Module):
    """Wraps a softmax-family attention kernel: on KV-stationary views it runs the same formula
    with stationary products; on anything else it calls the wrapped kernel unchanged."""

    def __init__(self, inner: _Quadratic) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not a submodule: the scope name stays the same
        self.op_kind = inner.op_kind

    def forward(self, q: Any, k: Any, v: Any, mask: Any) -> Any:
        if not isinstance(k, (StationaryView, _Selected)):
            if isinstance(v, StationaryView):
                v = v.materialize()
            return self.inner(q, k, v, mask)
        inner = self.inner
        party = v.party
        dense = mask.dense()
        selection = k.selection if isinstance(k, _Selected) else None
        keys = k.view if selection is not None else k
        raw = party.scores(q, keys)
        if selection is not None:
            chooser, raw = self._gather(raw, selection, keys, q.shape[-1])
        scores = raw * (1.0 / math.sqrt(q.shape[-1]))
        num = inner.numerator(scores, dense) * dense
        inv_n = 1.0 / mask.counts()
        den = num.sum(-1, keepdim=True) * inv_n + inner.eps
        probs = num * ops.reciprocal(den, inner.mpc_scale, positive=True) * inv_n
        if selection is not None:
            probs = self._scatter(probs, selection, chooser, raw.shape[-1], keys.shape[2])
        return party.weighted(probs, v)

    @staticmethod
    def _gather(raw: Any, sel: Selection, keys: StationaryView, head_dim: int) -> tuple[StationaryView, Any]:
        """Scores of the attended entries (sinks, chosen clusters, tail) and ``S^T`` per query head."""
        b, h, t, n = raw.shape
        kv_heads = keys.store.f.shape[1]
        chooser = sel.cache.choose(sel, raw, kv_heads, head_dim)[:, keys.heads]
        stop = sel.sink + sel.clusters * sel.cluster
        mid = _to_rows(ops.index(raw, 3, torch.arange(sel.sink, stop)), sel.clusters, sel.cluster)
        picked = chooser.party.weighted(mid.transpose(-2, -1), chooser).transpose(-2, -1)  # S @ mid
        parts = [_from_rows(picked, t, sel.cluster), ops.index(raw, 3, torch.arange(stop, n))]
        if sel.sink:
            parts.insert(0, ops.index(raw, 3, torch.arange(sel.sink)))
        return chooser, ops.cat(parts, dim=3)

    @staticmethod
    def _scatter(probs: Any, sel: Selection, chooser: StationaryView, attended: int, n: int) -> Any:
        """Weights over the whole cache: zero outside the chosen clusters (``S^T @ w``)."""
        t = probs.shape[2]
        width = sel.chosen * sel.cluster
        picked = _to_rows(ops.index(probs, 3, torch.arange(sel.sink, sel.sink + width)), sel.chosen, sel.cluster)
        back = chooser.party.scores(picked.transpose(-2, -1), chooser).transpose(-2, -1)  # S^T @ picked
        parts = [_from_rows(back, t, sel.cluster), ops.index(probs, 3, torch.arange(sel.sink + width, attended))]
        if sel.sink:
            parts.insert(0, ops.index(probs, 3, torch.arange(sel.sink)))
        out = ops.cat(parts, dim=3)
        if out.shape[-1] != n:
            raise StationaryError(f"scattered weights cover {out.shape[-1]} entries, the cache {n}")
        return out


def install_kernels(model: nn.Module) -> int:
    """Wrap every softmax-family attention kernel of a decoder; returns how many were wrapped."""
    wrapped = 0
    for block in getattr(model, "layer", []):
        attn = getattr(block, "attn", None)
        if attn is None:
            continue
        for name, _ in attn.groups:
            kernel = getattr(attn, name)
            if isinstance(kernel, _Quadratic):
                setattr(attn, name, StationaryKernel(kernel))
                wrapped += 1
    return wrapped


class RecordingSelector(PlainSelector):
    """Plain selector that records the per-step (dynamic) choices, for comparing with shares."""

    def __init__(self) -> None:
        self.chosen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def top_k(self, scores: Any, k: int, ordered: bool, bound: float = 0.0) -> torch.Tensor:
        idx = super().top_k(scores, k, ordered, bound)
        if bound == 0.0:  # the static eviction passes its public bound; the dynamic choice none
            self.chosen.append((scores, idx))
        return idx


def plain_greedy(model: nn.Module, ids: torch.Tensor, n: int, policy: str = "none",
                 budget: float | int | None = None, options: dict[str, Any] | None = None,
                 ) -> tuple[list[int], list[float], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Plaintext greedy decoding with ``policy``: tokens, top-2 logit margin per token, and
    mpcache's dynamic choices per selecting layer and step: (cluster scores [B, kv_heads,
    clusters], chosen indices [B, kv_heads, chosen])."""
    selector = RecordingSelector()
    cache = PrunedCache.for_model(model, make_policy(policy, budget, selector, **(options or {})))
    tokens: list[int] = []
    margins: list[float] = []
    try:
        with torch.no_grad():
            logits = model(ids.reshape(1, -1), cache)
            for _ in range(n):
                last = logits[0, -1]
                top = last.topk(2).values
                tokens.append(int(last.argmax()))
                margins.append(float(top[0] - top[1]))
                if len(tokens) == n:
                    break
                logits = model(torch.tensor([[tokens[-1]]]), cache)
    finally:
        cache.close()
    return tokens, margins, selector.chosen
