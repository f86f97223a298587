"""Causal decoder: GPT-2 shape (learned positions, LayerNorm, GeLU MLP) or Llama/SmolLM2 shape
(RoPE, RMSNorm, SiLU-gated MLP, GQA), with a KV cache for prefill and single-token decode."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.attention import AttnMask
from models.block import Block
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.layers import Embedding, Linear, make_norm
from models.variants import VariantSpec, as_variant


class Decoder(nn.Module):
    op_kind = "model"

    def __init__(self, config: ModelConfig, variant: VariantSpec | str = "exact") -> None:
        super().__init__()
        if config.family != "decoder":
            raise ValueError(f"Decoder needs family 'decoder', got {config.family!r}")
        variant = as_variant(variant)
        variant.check_layers(config.layers, config.heads)
        self.config, self.variant = config, variant
        self.embed = Embedding(config.vocab_size, config.hidden)
        self.pos = (
            Embedding(config.max_positions, config.hidden) if config.position == "learned" else None
        )
        self.layer = nn.ModuleList(
            Block(config, variant.layer(i), i) for i in range(config.layers)
        )
        self.final_norm = make_norm(variant.default.norm, config)
        self.lm_head = Linear(config.hidden, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self) -> KVCache:
        return KVCache(self.config.layers)

    def forward(self, x: Any, cache: KVCache | None = None) -> Any:
        """Logits [B, T, vocab] for ids [B, T] (or one-hot [B, T, vocab]).

        With a cache, ``x`` continues the sequence already in it (prefill, then one token at a
        time); without, it is the whole sequence.
        """
        length = x.shape[1]
        start = cache.next_position if cache is not None else 0
        if start + length > self.config.max_positions:
            raise ValueError(
                f"position {start + length} exceeds max_positions {self.config.max_positions}"
            )
        positions = torch.arange(start, start + length)
        h = self.embed(x)
        if self.pos is not None:
            h = h + self.pos(positions)
        mask = AttnMask(positions, positions, causal=True)
        for block in self.layer:
            h = block(h, mask, cache)
        return self.lm_head(self.final_norm(h))

    @torch.no_grad()
    def generate_greedy(self, ids: torch.Tensor | list[int], n: int) -> list[int]:
        """Plaintext greedy decoding: ``n`` new token ids after prompt ``ids``."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if ids.numel() == 0:
            raise ValueError("generate_greedy needs a non-empty prompt")
        if n < 0:
            raise ValueError(f"generate_greedy needs n >= 0, got {n}")
        cache = self.new_cache()
        logits = self(ids, cache)
        out: list[int] = []
        for _ in range(n):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if len(out) == n:
                break
            logits = self(torch.tensor([[token]]), cache)
        return out
