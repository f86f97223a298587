"""What a loaded model is: a :class:`ModelBundle` (module, input encoding, output decoding) and the
small builders shared by the registry and the bench layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig
from models.variants import VariantSpec


class UnknownModelError(ValueError):
    """No model is registered under the requested name."""


class InputError(ValueError):
    """A model input is empty, too long or of the wrong shape."""


@dataclass
class ModelBundle:
    """A model ready to run, with what it takes to turn user input into tensors and back."""

    name: str
    config: ModelConfig
    model: nn.Module
    input_kind: str
    encode: Callable[[Any], torch.Tensor]
    decode: Callable[[torch.Tensor], Any]
    variant: VariantSpec


Factory = Callable[[VariantSpec], ModelBundle]


def text_encoder(tokenize: Callable[[str], list[int]], limit: int) -> Callable[[Any], torch.Tensor]:
    """An input encoder for text: token ids [1, n], refusing empty text and more than ``limit`` tokens."""
    def encode(text: Any) -> torch.Tensor:
        if not isinstance(text, str) or not text.strip():
            raise InputError("input text is empty")
        ids = tokenize(text)
        if len(ids) > limit:
            raise InputError(f"input is {len(ids)} tokens; the limit is {limit}")
        return torch.tensor([ids], dtype=torch.long)

    return encode


def decoder_decode(token_text: Callable[[list[int]], str]) -> Callable[[torch.Tensor], Any]:
    """An output decoder for decoders: generated ids as text, or the next token of logits."""
    def decode(output: torch.Tensor) -> dict[str, Any]:
        if not torch.is_floating_point(output):
            ids = [int(i) for i in output.reshape(-1)]
            return {"token_ids": ids, "text": token_text(ids)}
        token = int(output.reshape(-1, output.shape[-1])[-1].argmax())
        return {"next_token_id": token, "next_token": token_text([token])}

    return decode


def seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build with torch's global RNG at ``seed`` (restored afterwards). The RNG is process-wide:
    :meth:`models.registry.Registry.load` holds its build lock so no other build draws from it meanwhile."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()
