"""Model shape configuration shared by the encoder, decoder and ViT builders.

One frozen dataclass describes every family; the importers (:mod:`models.hf_import`) fill it
from a ``transformers`` config and the builders read it. Validation happens once, here, so a bad
shape fails with one clear message instead of a shape error deep inside a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

FAMILIES = ("encoder", "decoder", "vit")
POSITIONS = ("learned", "rope")
MLPS = ("plain", "gated")
NORMS = ("layernorm", "rmsnorm")
ACTS = ("gelu", "gelu_tanh", "silu", "relu")
POOLERS = ("mean", "cls")
PLACEMENTS = ("pre", "post")


class ConfigError(ValueError):
    """A model configuration field is missing, out of range or inconsistent."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one transformer (public in the threat model).

    ``norm`` and ``act`` are the model's native non-linearities: the ``exact`` variant uses them,
    other variants swap them. ``norm_placement`` is ``post`` for BERT, ``pre`` for GPT-2, Llama
    and ViT. ``kv_heads`` below ``heads`` gives grouped-query attention (Llama/SmolLM2).
    """

    family: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_size: int = 0
    kv_heads: int = 0
    max_positions: int = 512
    norm_eps: float = 1e-12
    position: str = "learned"
    rope_theta: float = 10000.0
    mlp: str = "plain"
    norm: str = "layernorm"
    act: str = "gelu"
    norm_placement: str = "post"
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    lm_head_bias: bool = False
    type_vocab: int = 0
    pad_token_id: int = 0
    image_size: int = 0
    patch_size: int = 0
    channels: int = 3
    num_classes: int = 0
    pooler: str | None = None
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)
        _check_choice("family", self.family, FAMILIES)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("act", self.act, ACTS)
        _check_choice("norm_placement", self.norm_placement, PLACEMENTS)
        if self.pooler is not None:
            _check_choice("pooler", self.pooler, POOLERS)
        for name in ("hidden", "layers", "heads", "ffn", "kv_heads", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if self.position == "rope" and (self.head_dim % 2 or self.rope_theta <= 0):
            raise ConfigError("rope needs an even head_dim and rope_theta > 0")
        if self.family in ("encoder", "decoder") and self.vocab_size <= 0:
            raise ConfigError(f"family {self.family!r} needs vocab_size > 0")
        if self.family == "vit":
            self._check_vit()
        if self.family == "decoder" and self.pooler is not None:
            raise ConfigError("a decoder has no pooler; set pooler=None")

    def _check_vit(self) -> None:
        for name in ("image_size", "patch_size", "channels", "num_classes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"family 'vit' needs {name} > 0")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.max_positions < self.num_patches + 1:
            raise ConfigError(
                f"max_positions={self.max_positions} < patches+1={self.num_patches + 1}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.family == "vit" else 0

    @property
    def causal(self) -> bool:
        return self.family == "decoder"

    def with_changes(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"ModelConfig.{name}={value!r}; expected one of {', '.join(allowed)}")
