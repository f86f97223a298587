"""Vision transformer: patches flattened and projected by a Linear, a CLS token, learned
positions, pre-norm blocks, final norm and a classifier on the CLS token."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models import ops
from models.attention import AttnMask
from models.block import Block
from models.config import ModelConfig
from models.layers import Linear, make_norm
from models.variants import VariantSpec, as_variant


def patchify(images: Any, patch: int) -> Any:
    """[B, C, H, W] -> [B, patches, C*patch*patch] in the Conv2d weight's (C, P, P) order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


class ViT(nn.Module):
    op_kind = "model"

    def __init__(self, config: ModelConfig, variant: VariantSpec | str = "exact") -> None:
        super().__init__()
        if config.family != "vit":
            raise ValueError(f"ViT needs family 'vit', got {config.family!r}")
        variant = as_variant(variant)
        variant.check_layers(config.layers, config.heads)
        self.config, self.variant = config, variant
        patch_dim = config.channels * config.patch_size**2
        self.patch = Linear(patch_dim, config.hidden)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.hidden))
        self.pos = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden))
        nn.init.normal_(self.pos, std=0.02)
        self.layer = nn.ModuleList(
            Block(config, variant.layer(i), i) for i in range(config.layers)
        )
        self.final_norm = make_norm(variant.default.norm, config)
        self.head = Linear(config.hidden, config.num_classes)

    def check_images(self, images: Any) -> None:
        c, s = self.config.channels, self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(f"expected images [B, {c}, {s}, {s}], got {list(images.shape)}")

    def hidden_states(self, images: Any) -> Any:
        self.check_images(images)
        b = images.shape[0]
        tokens = self.patch(patchify(images, self.config.patch_size))
        h = ops.cat([self.cls.expand(b, 1, self.config.hidden), tokens], dim=1) + self.pos
        positions = torch.arange(h.shape[1])
        mask = AttnMask(positions, positions, causal=False)
        for block in self.layer:
            h = block(h, mask)
        return self.final_norm(h)

    def forward(self, images: Any) -> Any:
        """Class logits [B, num_classes] for images [B, C, H, W]."""
        return self.head(self.hidden_states(images)[:, 0])
