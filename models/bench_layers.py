"""Benchmark-sized models with random weights: one BERT-base encoder block, a GPT-2-small-shaped
decoder and MPCache's one-block GPT-2-shaped decoder.

``bert_base_layer(variant)`` is the layer ``bench/mpc_vs_crypten.py`` runs through CrypTen and
through privinf (registered as model ``bert-layer``): sequence up to 128, hidden 768, 12 heads,
FFN 3072, post-norm like BERT, weights drawn from a fixed seed so every process (client,
server, the CrypTen parties) builds the same layer. Its input is the hidden states entering the
block, a float tensor ``[1, T, 768]`` (or ``[T, 768]``), T <= 128; its output is the hidden
states leaving it. There is no embedding: the protocols share the input as a float tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from models.attention import AttnMask
from models.block import Block
from models.bundle import InputError, ModelBundle
from models.config import ModelConfig
from models.layers import Linear, calibrate
from models.variants import VariantSpec, as_variant

NAME = "bert-layer"
SEQ = 128
WEIGHT_SEED = 20240
CALIBRATION_SEED = 20241
WEIGHT_STD = 0.05  # BERT-base trained weights are ~0.04; HF's 0.02 init makes the block near-identity
BIAS_STD = 0.02
PREVIEW = 8

# vocab_size is BERT's (ModelConfig requires one for an encoder); the block itself has no embedding.
BERT_BASE = ModelConfig(family="encoder", hidden=768, layers=1, heads=12, ffn=3072, vocab_size=30522,
                        max_positions=SEQ, norm_eps=1e-12, act="gelu", norm_placement="post")


class BertLayer(Block):
    """One post-norm BERT block taking hidden states [B, T, hidden] (all keys visible)."""

    op_kind = "model"

    def __init__(self, config: ModelConfig, variant: VariantSpec) -> None:
        variant.check_layers(1, config.heads)
        super().__init__(config, variant.layer(0), 0)
        self.config, self.variant = config, variant

    def forward(self, x: Any) -> Any:  # type: ignore[override]
        if x.dim() != 3 or x.shape[-1] != self.config.hidden or not 0 < x.shape[1] <= self.config.max_positions:
            raise ValueError(f"{NAME} expects hidden states [B, T<={self.config.max_positions}, "
                             f"{self.config.hidden}], got {list(x.shape)}")
        positions = torch.arange(x.shape[1])
        return super().forward(x, AttnMask(positions, positions, causal=False))


def _randomise(layer: BertLayer, seed: int) -> None:
    """Linear weights N(0, WEIGHT_STD), biases N(0, BIAS_STD); norms keep gain 1 and bias 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * WEIGHT_STD)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * BIAS_STD)


def sample_input(seed: int = 0, seq: int = SEQ) -> torch.Tensor:
    """A reproducible layer input [1, seq, 768] ~ N(0, 1), like the output of a LayerNorm."""
    if not 0 < seq <= SEQ:
        raise InputError(f"{NAME}: sequence length must be in 1..{SEQ}, got {seq}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, seq, BERT_BASE.hidden, generator=gen)


def encode(value: Any) -> torch.Tensor:
    """Check a layer input (float tensor [1, T, 768] or [T, 768], finite) and return [1, T, 768]."""
    if not torch.is_tensor(value):
        raise InputError(f"{NAME} expects a float tensor [1, T, {BERT_BASE.hidden}], got {type(value).__name__}")
    if not torch.is_floating_point(value):
        raise InputError(f"{NAME} expects a floating-point tensor, got {value.dtype}")
    x = value.unsqueeze(0) if value.dim() == 2 else value
    if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != BERT_BASE.hidden or not 0 < x.shape[1] <= SEQ:
        raise InputError(f"{NAME} expects shape [1, T, {BERT_BASE.hidden}] with 1 <= T <= {SEQ}, "
                         f"got {list(value.shape)}")
    if not torch.isfinite(x).all():
        raise InputError(f"{NAME} input contains NaN or infinite values")
    return x.float()


def decode(output: torch.Tensor) -> dict[str, Any]:
    """Summary of the output hidden states plus the values themselves (flat, row-major).

    ``values`` is the whole tensor (the client is entitled to it; the bench checks it against
    the plaintext layer); :func:`output_tensor` turns a decoded dict back into a tensor.
    """
    out = output.detach().float()
    flat = out.reshape(-1)
    return {"shape": list(out.shape), "norm": float(flat.norm()), "mean": float(flat.mean()),
            "first": flat[:PREVIEW].tolist(), "values": flat.tolist()}


def output_tensor(decoded: dict[str, Any]) -> torch.Tensor:
    """The output tensor held in a :func:`decode` result."""
    try:
        shape, values = [int(d) for d in decoded["shape"]], decoded["values"]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"not a decoded {NAME} output (needs 'shape' and 'values')") from None
    if len(values) != math.prod(shape):
        raise InputError(f"decoded {NAME} output has {len(values)} values for shape {shape}")
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def build_layer(variant: VariantSpec | str = "exact") -> BertLayer:
    """The seeded BERT-base block running ``variant``, calibrated, in eval mode."""
    layer = BertLayer(BERT_BASE, as_variant(variant))
    _randomise(layer, WEIGHT_SEED)
    layer.eval()
    calib = torch.randn(4, SEQ, BERT_BASE.hidden, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    calibrate(layer, lambda: layer(calib))
    return layer


def bert_base_layer(variant: VariantSpec | str = "exact") -> ModelBundle:
    """Model ``bert-layer``: one BERT-base-shaped block (random seeded weights) as a bundle."""
    variant = as_variant(variant)
    return ModelBundle(NAME, BERT_BASE, build_layer(variant), "image", encode, decode, variant)


GPT2_SMALL = "gpt2-small-random"


def gpt2_small_random(variant: Any) -> ModelBundle:
    """GPT-2-small shape (12 layers, hidden 768, 12 heads, vocab 50257, 1024 positions) with
    random weights from a fixed seed, UTF-8 bytes as token ids: for decoding cost benchmarks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.bundle import decoder_decode, seeded, text_encoder
    from models.hf_import import from_hf

    hf = GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    model = from_hf(seeded(0, lambda: GPT2LMHeadModel(hf)), variant)
    encode = text_encoder(lambda t: list(t.encode("utf-8")), model.config.max_positions)
    decode = decoder_decode(lambda ids: repr(ids))
    return ModelBundle(GPT2_SMALL, model.config, model, "text", encode, decode, as_variant(variant))


MPCACHE_BLOCK = "mpcache-block"
MPCACHE_POSITIONS = 4096 + 64  # prompts up to 4096 tokens plus decoded ones


def mpcache_block(variant: Any) -> ModelBundle:
    """MPCache's efficiency shape: one GPT-2 block, hidden 1024 = 32 heads x 32 dims, FFN 4096,
    GPT-2's vocabulary (50257) and LM head, 4160 positions, random weights from a fixed seed,
    UTF-8 bytes as token ids: for decoding cost benchmarks at 512-4096 cached tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.bundle import decoder_decode, seeded, text_encoder
    from models.hf_import import from_hf

    hf = GPT2Config(vocab_size=50257, n_embd=1024, n_layer=1, n_head=32, n_inner=4096,
                    n_positions=MPCACHE_POSITIONS)
    model = from_hf(seeded(0, lambda: GPT2LMHeadModel(hf)), variant)
    encode = text_encoder(lambda t: list(t.encode("utf-8")), model.config.max_positions)
    decode = decoder_decode(lambda ids: repr(ids))
    return ModelBundle(MPCACHE_BLOCK, model.config, model, "text", encode, decode, as_variant(variant))
