"""A plain KV cache for decoders: per-layer K/V tensors (torch or shares) plus public positions.

The cache appends with :func:`models.ops.cat`, so it holds encrypted tensors as easily as torch
ones. Positions (which absolute token each entry came from) are public and drive causal masks,
so a pruning policy can drop entries with :meth:`KVCache.select` and attention stays correct.
Policies plug in through :meth:`KVCache.add_hook`, called after every layer's update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from models import ops

Hook = Callable[["KVCache", int], None]


class KVCache:
    """Keys and values of every layer, each [batch, kv_heads, entries, head_dim]."""

    def __init__(self, layers: int) -> None:
        if layers <= 0:
            raise ValueError(f"KVCache needs layers > 0, got {layers}")
        self.layers = layers
        self.keys: list[Any] = [None] * layers
        self.values: list[Any] = [None] * layers
        self.positions: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * layers
        self.seen = 0
        self._hooks: list[Hook] = []

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook(cache, layer)`` after each layer appends (eviction policies)."""
        self._hooks.append(hook)

    def update(self, layer: int, k: Any, v: Any, positions: torch.Tensor) -> tuple[Any, Any]:
        """Append this step's K/V for ``layer``; return the layer's full (possibly pruned) K/V."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = ops.cat([self.keys[layer], k], dim=2)
            self.values[layer] = ops.cat([self.values[layer], v], dim=2)
        self.positions[layer] = torch.cat([self.positions[layer], positions])
        if layer == self.layers - 1:
            self.seen = int(positions[-1]) + 1
        for hook in self._hooks:
            hook(self, layer)
        return self.keys[layer], self.values[layer]

    def select(self, layer: int, keep: torch.Tensor) -> None:
        """Keep only entries ``keep`` (public, ascending indices) of ``layer``."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        if keep.numel() and (keep.diff() <= 0).any():
            raise ValueError("KVCache.select needs strictly ascending indices")
        if self.keys[layer] is None:
            raise ValueError(f"KVCache layer {layer} is empty")
        self.keys[layer] = ops.index(self.keys[layer], 2, keep)
        self.values[layer] = ops.index(self.values[layer], 2, keep)
        self.positions[layer] = self.positions[layer][keep]

    def entries(self, layer: int) -> int:
        return int(self.positions[layer].numel())

    @property
    def next_position(self) -> int:
        """Absolute position of the next token to be fed."""
        return self.seen
