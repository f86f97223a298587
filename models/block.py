"""One transformer block: attention and MLP with their norms, pre- or post-norm placement."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.attention import Attention, AttnMask
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.layers import Linear, make_act, make_norm
from models.variants import LayerVariant


class MLP(nn.Module):
    """``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` (Llama)."""

    op_kind = "mlp"

    def __init__(self, config: ModelConfig, variant: LayerVariant) -> None:
        super().__init__()
        self.gated = config.mlp == "gated"
        if self.gated:
            self.gate = Linear(config.hidden, config.ffn, bias=config.mlp_bias)
        self.up = Linear(config.hidden, config.ffn, bias=config.mlp_bias)
        self.act = make_act(variant.act, config)
        self.down = Linear(config.ffn, config.hidden, bias=config.mlp_bias)

    def forward(self, x: Any) -> Any:
        if self.gated:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """BERT-style post-norm or GPT-2/Llama/ViT-style pre-norm residual block."""

    op_kind = "block"

    def __init__(self, config: ModelConfig, variant: LayerVariant, index: int) -> None:
        super().__init__()
        self.index = index
        self.pre_norm = config.norm_placement == "pre"
        self.attn_norm = make_norm(variant.norm, config)
        self.attn = Attention(config, variant)
        self.mlp_norm = make_norm(variant.norm, config)
        self.mlp = MLP(config, variant)

    def forward(self, x: Any, mask: AttnMask, cache: KVCache | None = None) -> Any:
        if self.pre_norm:
            h = x + self.attn(self.attn_norm(x), mask, cache, self.index)
            return h + self.mlp(self.mlp_norm(h))
        h = self.attn_norm(x + self.attn(x, mask, cache, self.index))
        return self.mlp_norm(h + self.mlp(h))
