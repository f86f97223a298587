"""The KV cache a pruning policy drives: :class:`PrunedCache` keeps the stored entries and asks
its :class:`~models.kv_pruning.KVPolicy` what each attention call reads (the policies themselves
are in :mod:`models.kv_pruning`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models import ops
from models.kv_cache import KVCache
from models.kv_pruning import KVPolicy, PolicyError, prefill_scores


class PrunedCache(KVCache):
    """A :class:`KVCache` whose policy picks what each attention call reads (see module doc)."""

    def __init__(self, layers: int, policy: KVPolicy) -> None:
        super().__init__(layers)
        self.policy = policy
        self.stored_keys: list[Any] = [None] * layers
        self.stored_values: list[Any] = [None] * layers
        self.stored_positions: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * layers
        self._attn: list[nn.Module | None] = [None] * layers
        self._query: list[Any] = [None] * layers
        self._handles: list[Any] = []
        self._recorded: list[tuple[Any, Any, Any, torch.Tensor]] | None = None

    @classmethod
    def for_model(cls, model: nn.Module, policy: KVPolicy) -> PrunedCache:
        """Attach to a Decoder: hooks on each ``attn.q`` capture the query for the policy.

        Attach after any swap of the model's linear modules (the hooks sit on ``attn.q``).
        """
        blocks = list(getattr(model, "layer", []))
        if not blocks or not all(hasattr(b, "attn") for b in blocks):
            raise PolicyError("PrunedCache.for_model needs a Decoder with attention blocks")
        cache = cls(len(blocks), policy)
        for i, block in enumerate(blocks):
            cache._attn[i] = block.attn

            def capture(_mod: Any, _args: Any, out: Any, i: int = i) -> None:
                cache._query[i] = out

            cache._handles.append(block.attn.q.register_forward_hook(capture))
        return cache

    def record_prefill(self) -> list[tuple[Any, Any, Any, torch.Tensor]]:
        """Record what the next prefill hands each layer (raw query, K, V, positions), so the
        same prefill can be given to other policies with :meth:`replay_prefill` instead of
        running the model again (the prefill attends the full cache whatever the policy)."""
        self._recorded = []
        return self._recorded

    def replay_prefill(self, records: list[tuple[Any, Any, Any, torch.Tensor]]) -> None:
        """Store a prefill recorded by :meth:`record_prefill` (on another cache of the same model)
        as if the model had run it: every layer's policy evicts as after its own prefill."""
        if len(records) != self.layers or self.stored_keys[0] is not None:
            raise PolicyError(f"replay_prefill needs an empty cache and {self.layers} layers, got {len(records)}")
        for layer, (query, k, v, positions) in enumerate(records):
            self._query[layer] = query
            self.update(layer, k, v, positions)

    def close(self) -> None:
        """Remove the query hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def evict_after_prefill(self, layer: int, query: Any, k: Any, positions: torch.Tensor) -> None:
        """Let the policy evict after the prefill, from accumulated attention scores if it needs them."""
        scores, bound = None, 0.0
        if self.policy.needs_scores:
            window = getattr(self.policy, "window", None)
            scores = prefill_scores(query, k, positions, positions, window)
            voters = len(positions) if window is None else min(window, len(positions))
            bound = float(voters * query.shape[1] // k.shape[1])
        self.policy.after_prefill(layer, self, scores, bound)

    def _begin_update(self, layer: int, positions: torch.Tensor) -> Any:
        """The query captured for this call; after the last layer, the positions seen so far."""
        query = self._current_query(layer, positions)
        if layer == self.layers - 1:
            self.seen = int(positions[-1]) + 1
        return query

    def _current_query(self, layer: int, positions: torch.Tensor) -> Any:
        attn, raw = self._attn[layer], self._query[layer]
        if attn is None or raw is None:
            raise PolicyError(f"no query captured for layer {layer}: build the cache with "
                              "PrunedCache.for_model(model, policy)")
        self._query[layer] = None
        q = attn._split(raw, attn.heads)
        return attn.rope(q, positions) if attn.rope is not None else q

    def stored_entries(self, layer: int) -> int:
        return int(self.stored_positions[layer].numel())

    def entries(self, layer: int) -> int:
        """Entries held in the cache (not what the last step attended)."""
        return self.stored_entries(layer)

    def replace(self, layer: int, k: Any, v: Any, positions: torch.Tensor) -> None:
        """Set the stored cache of ``layer`` (used by policies after a secret selection)."""
        if k.shape[2] != len(positions) or v.shape[2] != len(positions):
            raise PolicyError(f"replace: {len(positions)} positions for {k.shape[2]} entries")
        self.stored_keys[layer], self.stored_values[layer] = k, v
        self.stored_positions[layer] = positions

    def select(self, layer: int, keep: torch.Tensor) -> None:
        """Keep stored entries ``keep`` (public, ascending)."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        if keep.numel() and (keep.diff() <= 0).any():
            raise PolicyError("PrunedCache.select needs strictly ascending indices")
        self.replace(layer, ops.index(self.stored_keys[layer], 2, keep),
                     ops.index(self.stored_values[layer], 2, keep),
                     self.stored_positions[layer][keep])

    def update(self, layer: int, k: Any, v: Any, positions: torch.Tensor) -> tuple[Any, Any]:
        """Store this call's K/V, let the policy prune/select, return what attention reads."""
        if self._recorded is not None and self.stored_keys[layer] is None:
            self._recorded.append((self._query[layer], k, v, positions))
        query = self._begin_update(layer, positions)
        if self.stored_keys[layer] is None:
            self.replace(layer, k, v, positions)
            view = (k, v, positions)
            self.evict_after_prefill(layer, query, k, positions)
        else:
            self.replace(layer, ops.cat([self.stored_keys[layer], k], dim=2),
                         ops.cat([self.stored_values[layer], v], dim=2),
                         torch.cat([self.stored_positions[layer], positions]))
            view = self.policy.select(layer, query, self)
        self.keys[layer], self.values[layer], self.positions[layer] = view
        for hook in self._hooks:
            hook(self, layer)
        return view[0], view[1]
