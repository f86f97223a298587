"""The owner's secret: one permutation per transformed axis, drawn from an AES-CTR keystream.

Conventions. A *gather* permutation ``p`` of an axis means ``new[..., i] = old[..., p[i]]`` (hidden
units, FFN units, heads, head dims, ViT patches and pixels). The vocabulary and the ViT classes use
a *scatter* permutation ``s``: token ``t`` is sent as ``s[t]`` and logit ``s[t]`` of the compute
node's output is logit ``t`` of the model, so ``logits = transformed_logits[..., s]``.

Randomness: a 128-bit seed (``os.urandom`` unless given, for reproducible benches) keys AES-128-CTR
from ``cryptography``; a permutation of ``n`` items is the argsort of ``n`` keystream words of 64
bits (uniform up to ties, probability below n^2 / 2^65). torch's RNG is never used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from models.vit import patchify

SEED_BYTES = 16


class KeySource:
    """Secret permutations and angles from one AES-128-CTR keystream (read sequentially)."""

    def __init__(self, seed: bytes | None = None) -> None:
        seed = os.urandom(SEED_BYTES) if seed is None else bytes(seed)
        if len(seed) != SEED_BYTES:
            raise ValueError(f"an EE key seed is {SEED_BYTES} bytes, got {len(seed)}")
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()

    def __repr__(self) -> str:  # never shows the seed
        return "KeySource(<secret>)"

    def words(self, count: int) -> np.ndarray:
        """``count`` uniform 64-bit words."""
        return np.frombuffer(self._enc.update(bytes(8 * count)), dtype="<u8").copy()

    def permutation(self, n: int) -> torch.Tensor:
        """A uniformly random permutation of ``range(n)`` (int64)."""
        return torch.from_numpy(np.argsort(self.words(n), kind="stable").astype(np.int64))

    def angles(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform angles in [0, 2 pi) (float64), 53 random bits each."""
        count = math.prod(shape)
        fractions = (self.words(count) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        return torch.from_numpy(fractions * 2.0 * math.pi).reshape(shape)


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inverse(p)[p[i]] == i``."""
    return torch.argsort(perm)


@dataclass(frozen=True)
class AttentionKey:
    """One attention layer's permutations.

    ``q_heads`` (gather over query heads) and ``kv_heads`` (over key/value heads) agree on the GQA
    grouping: new query head j reads new kv head j // group, which is old kv head
    ``q_heads[j] // group``. ``qk_dims`` and ``v_dims`` [kv_heads, head_dim] gather the dims inside
    each new kv head (the query heads of a group follow their kv head). ``qk_angles``
    [kv_heads, head_dim / 2] rotate each RoPE pair (i, i + head_dim / 2) of q and k by a secret
    angle (RoPE models, where ``qk_dims`` is the identity); None elsewhere.
    """

    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    qk_dims: torch.Tensor
    v_dims: torch.Tensor
    qk_angles: torch.Tensor | None


@dataclass(frozen=True)
class EeKey:
    """Everything the owner keeps secret to run a transformed model (never sent)."""

    family: str
    hidden: torch.Tensor
    ffn: tuple[torch.Tensor, ...]
    attention: tuple[AttentionKey, ...]
    vocab: torch.Tensor | None = None
    classes: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    patch_size: int = 0

    def tensors(self) -> list[torch.Tensor]:
        """Every secret tensor of the key."""
        out = [self.hidden, *self.ffn]
        for att in self.attention:
            out += [att.q_heads, att.kv_heads, att.qk_dims, att.v_dims]
            out += [] if att.qk_angles is None else [att.qk_angles]
        return out + [t for t in (self.vocab, self.classes, self.patches, self.pixels) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes the owner stores for the key (int64 indices, float64 angles)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def encode_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the owner sends: permuted token ids, or an image with patches and pixels shuffled."""
        if self.family == "vit":
            return self._shuffle_image(x)
        if x.dtype != torch.long:
            raise ValueError(f"EE text input must be token ids (int64), got {x.dtype}")
        return self.vocab[x]

    def _shuffle_image(self, images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images.float(), self.patch_size)[:, self.patches][:, :, self.pixels]
        return unpatchify(patches, images.shape[1], images.shape[2], self.patch_size)

    @cached_property
    def _hidden_back(self) -> torch.Tensor:
        return inverse(self.hidden)

    @cached_property
    def _vocab_back(self) -> torch.Tensor:
        return inverse(self.vocab)

    def decode_output(self, y: torch.Tensor) -> torch.Tensor:
        """The model's output from the compute node's: logits, class logits or hidden states."""
        if self.family == "decoder":
            return y[..., self.vocab]
        if self.family == "vit":
            return y[..., self.classes]
        return y[..., self._hidden_back]

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids from the permuted ids a compute node generated."""
        return self._vocab_back[ids]


def unpatchify(patches: torch.Tensor, channels: int, size: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`models.vit.patchify` for square images: [B, N, C*p*p] -> [B, C, H, W]."""
    b, side = patches.shape[0], size // patch
    x = patches.reshape(b, side, side, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, size, size)
