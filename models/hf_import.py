"""Import BERT/MiniLM, GPT-2, Llama (SmolLM2) and ViT models from ``transformers``.

Works from the HF config and state dict, so the HF model's Python classes are not touched at
inference time. With the ``exact`` variant the imported model matches ``transformers`` (eager
attention) to float precision; other variants reuse the same weights with swapped
non-linearities (weights of a norm the variant drops, e.g. a LayerNorm bias under RMSNorm, are
ignored; an affine norm's constant comes from :func:`models.layers.calibrate`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.config import ConfigError, ModelConfig
from models.decoder import Decoder
from models.encoder import Encoder
from models.variants import VariantSpec, as_variant
from models.vit import ViT

_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class HFImportError(ValueError):
    """The HF model is of an unsupported type or its weights do not fit the config."""


def _act(name: str) -> str:
    if name in _TANH_GELU:
        return "gelu_tanh"
    if name in ("gelu", "silu", "relu"):
        return name
    raise HFImportError(f"unsupported hidden activation {name!r}")


def config_from_hf(hf: Any) -> ModelConfig:
    """Translate a ``transformers`` config (bert, gpt2, llama, vit) into a :class:`ModelConfig`."""
    kind = getattr(hf, "model_type", None)
    if kind == "bert":
        return ModelConfig(
            family="encoder", hidden=hf.hidden_size, layers=hf.num_hidden_layers,
            heads=hf.num_attention_heads, ffn=hf.intermediate_size, vocab_size=hf.vocab_size,
            max_positions=hf.max_position_embeddings, norm_eps=hf.layer_norm_eps,
            act=_act(hf.hidden_act), norm_placement="post", type_vocab=hf.type_vocab_size,
            pad_token_id=hf.pad_token_id or 0, pooler="mean",
        )
    if kind == "gpt2":
        return ModelConfig(
            family="decoder", hidden=hf.n_embd, layers=hf.n_layer, heads=hf.n_head,
            ffn=hf.n_inner or 4 * hf.n_embd, vocab_size=hf.vocab_size,
            max_positions=hf.n_positions, norm_eps=hf.layer_norm_epsilon,
            act=_act(hf.activation_function), norm_placement="pre",
            tie_embeddings=bool(hf.tie_word_embeddings),
        )
    if kind == "llama":
        return _llama_config(hf)
    if kind == "vit":
        return ModelConfig(
            family="vit", hidden=hf.hidden_size, layers=hf.num_hidden_layers,
            heads=hf.num_attention_heads, ffn=hf.intermediate_size,
            norm_eps=hf.layer_norm_eps, act=_act(hf.hidden_act), norm_placement="pre",
            qkv_bias=bool(hf.qkv_bias), image_size=hf.image_size, patch_size=hf.patch_size,
            channels=hf.num_channels, num_classes=hf.num_labels,
            max_positions=(hf.image_size // hf.patch_size) ** 2 + 1, pooler="cls",
        )
    raise HFImportError(f"unsupported model_type {kind!r}; supported: bert, gpt2, llama, vit")


def _llama_config(hf: Any) -> ModelConfig:
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise HFImportError(f"unsupported rope_type {rope.get('rope_type')!r}")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise HFImportError(f"head_dim {head_dim} x heads != hidden {hf.hidden_size}")
    return ModelConfig(
        family="decoder", hidden=hf.hidden_size, layers=hf.num_hidden_layers,
        heads=hf.num_attention_heads, kv_heads=hf.num_key_value_heads,
        ffn=hf.intermediate_size, vocab_size=hf.vocab_size,
        max_positions=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
        position="rope", rope_theta=float(theta), mlp="gated", norm="rmsnorm",
        act=_act(hf.hidden_act), norm_placement="pre", qkv_bias=bool(hf.attention_bias),
        out_bias=bool(hf.attention_bias), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_embeddings=bool(hf.tie_word_embeddings),
    )


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if not any(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _norm(out: dict[str, torch.Tensor], ours: str, state: dict, theirs: str) -> None:
    out[f"{ours}.weight"] = state[f"{theirs}.weight"]
    if f"{theirs}.bias" in state:
        out[f"{ours}.bias"] = state[f"{theirs}.bias"]


def _linear(out: dict, ours: str, state: dict, theirs: str, transpose: bool = False) -> None:
    weight = state[f"{theirs}.weight"]
    out[f"{ours}.weight"] = weight.t() if transpose else weight
    if f"{theirs}.bias" in state:
        out[f"{ours}.bias"] = state[f"{theirs}.bias"]


def _bert_map(state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    s = _strip(state, "bert.")
    out = {
        "embed.weight": s["embeddings.word_embeddings.weight"],
        "pos.weight": s["embeddings.position_embeddings.weight"],
        "token_type.weight": s["embeddings.token_type_embeddings.weight"],
    }
    _norm(out, "embed_norm", s, "embeddings.LayerNorm")
    for i in range(config.layers):
        p, o = f"encoder.layer.{i}.", f"layer.{i}."
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            _linear(out, o + f"attn.{ours}", s, p + f"attention.self.{theirs}")
        _linear(out, o + "attn.o", s, p + "attention.output.dense")
        _norm(out, o + "attn_norm", s, p + "attention.output.LayerNorm")
        _linear(out, o + "mlp.up", s, p + "intermediate.dense")
        _linear(out, o + "mlp.down", s, p + "output.dense")
        _norm(out, o + "mlp_norm", s, p + "output.LayerNorm")
    return out


def _gpt2_map(state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    s = _strip(state, "transformer.")
    out = {"embed.weight": s["wte.weight"], "pos.weight": s["wpe.weight"]}
    out["lm_head.weight"] = s.get("lm_head.weight", s["wte.weight"])
    h = config.hidden
    for i in range(config.layers):
        p, o = f"h.{i}.", f"layer.{i}."
        qkv_w, qkv_b = s[p + "attn.c_attn.weight"].t(), s[p + "attn.c_attn.bias"]
        for j, name in enumerate("qkv"):
            out[o + f"attn.{name}.weight"] = qkv_w[j * h:(j + 1) * h]
            out[o + f"attn.{name}.bias"] = qkv_b[j * h:(j + 1) * h]
        _linear(out, o + "attn.o", s, p + "attn.c_proj", transpose=True)
        _norm(out, o + "attn_norm", s, p + "ln_1")
        _linear(out, o + "mlp.up", s, p + "mlp.c_fc", transpose=True)
        _linear(out, o + "mlp.down", s, p + "mlp.c_proj", transpose=True)
        _norm(out, o + "mlp_norm", s, p + "ln_2")
    _norm(out, "final_norm", s, "ln_f")
    return out


def _llama_map(state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    s = _strip(state, "model.")
    out = {"embed.weight": s["embed_tokens.weight"]}
    out["lm_head.weight"] = s.get("lm_head.weight", s["embed_tokens.weight"])
    for i in range(config.layers):
        p, o = f"layers.{i}.", f"layer.{i}."
        for name in "qkvo":
            _linear(out, o + f"attn.{name}", s, p + f"self_attn.{name}_proj")
        for name in ("gate", "up", "down"):
            _linear(out, o + f"mlp.{name}", s, p + f"mlp.{name}_proj")
        _norm(out, o + "attn_norm", s, p + "input_layernorm")
        _norm(out, o + "mlp_norm", s, p + "post_attention_layernorm")
    _norm(out, "final_norm", s, "norm")
    return out


def _vit_map(state: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    s = _strip(state, "vit.")
    weight = s["embeddings.patch_embeddings.projection.weight"]
    out = {
        "cls": s["embeddings.cls_token"],
        "pos": s["embeddings.position_embeddings"],
        "patch.weight": weight.reshape(weight.shape[0], -1),
        "patch.bias": s["embeddings.patch_embeddings.projection.bias"],
    }
    for i in range(config.layers):
        p, o = f"layers.{i}.", f"layer.{i}."
        for name in "qkvo":
            _linear(out, o + f"attn.{name}", s, p + f"attention.{name}_proj")
        _linear(out, o + "mlp.up", s, p + "mlp.fc1")
        _linear(out, o + "mlp.down", s, p + "mlp.fc2")
        _norm(out, o + "attn_norm", s, p + "layernorm_before")
        _norm(out, o + "mlp_norm", s, p + "layernorm_after")
    _norm(out, "final_norm", s, "layernorm")
    if "classifier.weight" not in s:
        raise HFImportError("ViT import needs a ViTForImageClassification (no classifier found)")
    _linear(out, "head", s, "classifier")
    return out


_MAPS = {"bert": _bert_map, "gpt2": _gpt2_map, "llama": _llama_map, "vit": _vit_map}


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy mapped weights in; only norm parts a swapped norm lacks or adds may differ."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in weights]
    extra = [k for k in weights if k not in ours]
    allowed_missing = [k for k in missing if k.endswith(("inv_std", "norm.bias"))]
    allowed_extra = [k for k in extra if k.endswith("norm.bias")]
    if len(allowed_missing) != len(missing) or len(allowed_extra) != len(extra):
        bad = sorted(set(missing) - set(allowed_missing)) + sorted(set(extra) - set(allowed_extra))
        raise HFImportError(f"weights do not fit the model: {bad[:5]}")
    with torch.no_grad():
        for key, value in weights.items():
            if key not in ours:
                continue
            if ours[key].shape != value.shape:
                raise HFImportError(
                    f"{key}: shape {tuple(value.shape)} != model {tuple(ours[key].shape)}"
                )
            ours[key].copy_(value.to(ours[key].dtype))


def build(config: ModelConfig, variant: VariantSpec | str = "exact") -> nn.Module:
    """An uninitialised model of ``config``'s family."""
    cls = {"encoder": Encoder, "decoder": Decoder, "vit": ViT}[config.family]
    return cls(config, variant)


def from_state_dict(
    model_type: str, config: ModelConfig, state: dict[str, torch.Tensor],
    variant: VariantSpec | str = "exact",
) -> nn.Module:
    """Build our model from an HF-named state dict (also used for on-disk caches)."""
    if model_type not in _MAPS:
        raise HFImportError(f"unsupported model_type {model_type!r}; supported: {', '.join(_MAPS)}")
    model = build(config, as_variant(variant))
    load_weights(model, _MAPS[model_type](state, config))
    return model.eval()


def from_hf(hf_model: nn.Module, variant: VariantSpec | str = "exact") -> nn.Module:
    """Our Encoder / Decoder / ViT with ``hf_model``'s weights, running ``variant``."""
    try:
        config = config_from_hf(hf_model.config)
    except ConfigError as exc:
        raise HFImportError(f"HF config does not fit: {exc}") from None
    state = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    return from_state_dict(hf_model.config.model_type, config, state, variant)
