"""Tiny random models of every family (fixed seeds) for tests and quick experiments.

Weights are drawn with std 0.3 so activations are O(1) (HF's 0.02 init makes every layer
near-identity and hides numerical problems), then norms and attention normalisers are
calibrated like a real model's.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.hf_import import build
from models.layers import calibrate

FAMILIES = {
    "bert": ModelConfig(family="encoder", hidden=16, layers=2, heads=2, ffn=32, vocab_size=40,
                        max_positions=16, type_vocab=2, pooler="mean"),
    "gpt2": ModelConfig(family="decoder", hidden=16, layers=2, heads=2, ffn=32, vocab_size=40,
                        max_positions=16, norm_eps=1e-5, act="gelu_tanh", norm_placement="pre",
                        tie_embeddings=True),
    "llama": ModelConfig(family="decoder", hidden=16, layers=2, heads=4, kv_heads=2, ffn=32,
                         vocab_size=40, max_positions=16, norm_eps=1e-5, position="rope",
                         mlp="gated", norm="rmsnorm", act="silu", norm_placement="pre",
                         qkv_bias=False, out_bias=False, mlp_bias=False),
    "vit": ModelConfig(family="vit", hidden=16, layers=2, heads=2, ffn=32, image_size=8,
                       patch_size=4, channels=3, num_classes=5, max_positions=5, pooler="cls",
                       norm_placement="pre"),
}


def make_input(family: str, seed: int = 0, length: int = 6) -> torch.Tensor:
    """Random token ids [1, length] or an image [1, 3, 8, 8] for a family of :data:`FAMILIES`."""
    gen = torch.Generator().manual_seed(seed)
    config = FAMILIES[family]
    if config.family == "vit":
        return torch.randn(1, 3, 8, 8, generator=gen)
    return torch.randint(0, config.vocab_size, (1, length), generator=gen)


def make_model(family: str, variant: str = "exact", std: float = 0.3) -> nn.Module:
    """A model with O(1) activations (std 0.3 weights) and calibrated norms."""
    model = build(FAMILIES[family], variant).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("inv_std"):
                continue
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            param.copy_(base + std * torch.randn(param.shape, generator=gen))
    calibrate(model, lambda: [model(make_input(family, seed=s)) for s in (10, 11)])
    return model
