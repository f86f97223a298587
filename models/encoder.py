"""BERT/MiniLM-shaped encoder: word + position (+ token type) embeddings, post-norm blocks,
mean or CLS pooling. Input is Long ids [B, T] or a one-hot float tensor [B, T, vocab]."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.attention import AttnMask
from models.block import Block
from models.config import ModelConfig
from models.layers import Embedding, make_norm
from models.variants import VariantSpec, as_variant


class Encoder(nn.Module):
    op_kind = "model"

    def __init__(self, config: ModelConfig, variant: VariantSpec | str = "exact") -> None:
        super().__init__()
        if config.family != "encoder":
            raise ValueError(f"Encoder needs family 'encoder', got {config.family!r}")
        variant = as_variant(variant)
        variant.check_layers(config.layers, config.heads)
        self.config, self.variant = config, variant
        self.embed = Embedding(config.vocab_size, config.hidden)
        self.pos = Embedding(config.max_positions, config.hidden)
        self.token_type = Embedding(config.type_vocab, config.hidden) if config.type_vocab else None
        self.embed_norm = make_norm(variant.default.norm, config)
        self.layer = nn.ModuleList(
            Block(config, variant.layer(i), i) for i in range(config.layers)
        )

    def hidden_states(
        self, x: Any, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        """Last hidden states [B, T, hidden]."""
        batch, length = x.shape[0], x.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"input of {length} tokens exceeds {self.config.max_positions}")
        positions = torch.arange(length)
        h = self.embed(x) + self.pos(positions)
        if self.token_type is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros(
                batch, length, dtype=torch.long)
            h = h + self.token_type(types)
        h = self.embed_norm(h)
        mask = AttnMask(positions, positions, causal=False, key_mask=attention_mask)
        for block in self.layer:
            h = block(h, mask)
        return h

    def forward(
        self, x: Any, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        """Pooled sentence embedding [B, hidden] (or hidden states when pooler is None)."""
        h = self.hidden_states(x, attention_mask, token_type_ids)
        if self.config.pooler is None:
            return h
        if self.config.pooler == "cls":
            return h[:, 0]
        if attention_mask is None:
            return h.mean(1)
        weights = attention_mask.float()
        counts = weights.sum(1, keepdim=True).clamp(min=1.0)
        return (h * weights[..., None]).sum(1) * (1.0 / counts)
