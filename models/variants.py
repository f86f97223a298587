"""Which non-linearities a model runs: attention, activation and norm kinds, per layer and head.

A :class:`VariantSpec` is parsed from a short string (a preset name, a free form such as
``attn=power:p=4,act=quad,norm=layernorm``, or a preset followed by overrides such as
``mpcformer,norm=affine``) plus an optional JSON override file for heterogeneous attention
(MPCViT): ``{"layers": {"0": "attn=relu"}, "heads": {"1": ["softmax", "scale", ...]}}``.
``act``/``norm`` left unset mean *native*: the model's own GeLU/SiLU and LayerNorm/RMSNorm.
Formulas and provenance: docs/variants.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# kind -> (default parameters, one-line description)
ATTENTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "softmax": ({}, "exp(x - max) / sum exp(x - max): exact, MPC-expensive (max + exp)"),
    "power": ({"p": 2, "tau": 1.0, "eps": 1e-2},
              "Power-Softmax (x/tau)^p / (sum + n*eps), p even: polynomial, HE/MPC-friendly"),
    "2quad": ({"c": 5.0, "eps": 1e-6}, "MPCFormer 2Quad (x+c)^2 / sum (x+c)^2"),
    "relu": ({"eps": 1e-2}, "MPCViT ReLU-softmax ReLU(x) / (sum ReLU(x) + n*eps)"),
    "scale": ({}, "MPCViT scaling attention x / n, re-associated Q(K^T V), no normaliser"),
    "linear": ({"phi": "relu", "eps": 1e-2},
               "linear attention phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1), phi = ReLU + eps"),
}
ACTIVATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "gelu": ({"form": "erf"}, "GeLU; erf form in torch, tanh form on MPC shares"),
    "quad": ({}, "MPCFormer quad GeLU 0.125x^2 + 0.25x + 0.5"),
    "relu": ({}, "ReLU"),
    "silu": ({}, "SiLU x*sigmoid(x) (Llama MLP gate)"),
}
NORMS: dict[str, tuple[dict[str, Any], str]] = {
    "layernorm": ({}, "LayerNorm (x - mean) / sqrt(var + eps)"),
    "rmsnorm": ({}, "RMSNorm x / sqrt(mean(x^2) + eps)"),
    "affine": ({}, "centred, then scaled by a calibrated constant: no inverse square root"),
}
_KINDS = {"attn": ATTENTIONS, "act": ACTIVATIONS, "norm": NORMS}
_CHOICES = {"form": ("erf", "tanh"), "phi": ("relu", "square")}

PRESETS: dict[str, tuple[str, str]] = {
    "exact": ("attn=softmax", "native softmax + GeLU/SiLU + LayerNorm/RMSNorm"),
    "mpcformer": ("attn=2quad,act=quad", "MPCFormer: 2Quad attention + quad GeLU"),
    "power": ("attn=power:p=2", "Power-Softmax attention (p=2), native act and norm"),
    "relu": ("attn=relu", "ReLU-softmax attention, native act and norm"),
    "scale": ("attn=scale", "scaling attention x/n, native act and norm"),
    "linear": ("attn=linear", "linear attention (ReLU feature map), native act and norm"),
    "he": ("attn=power:p=2,act=quad,norm=affine",
           "HE-friendly: Power-Softmax p=2 + quad GeLU + affine norm (polynomial end to end)"),
}


class VariantError(ValueError):
    """A variant string, parameter or override file is invalid."""


@dataclass(frozen=True)
class OpSpec:
    """One non-linearity: a kind and its (public) parameters."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, name: str) -> Any:
        for key, value in self.params:
            if key == name:
                return value
        raise KeyError(f"{self.kind} has no parameter {name!r}")

    def __str__(self) -> str:
        return ":".join([self.kind] + [f"{k}={v}" for k, v in self.params])


@dataclass(frozen=True)
class LayerVariant:
    """What one layer runs: an attention kind per head, an activation and a norm (None=native)."""

    heads: tuple[OpSpec, ...] | None
    attn: OpSpec
    act: OpSpec | None
    norm: OpSpec | None

    def head_kinds(self, n_heads: int) -> tuple[OpSpec, ...]:
        if self.heads is None:
            return (self.attn,) * n_heads
        if len(self.heads) != n_heads:
            raise VariantError(f"head override lists {len(self.heads)} kinds for {n_heads} heads")
        return self.heads


@dataclass(frozen=True)
class VariantSpec:
    """The variant of a whole model: a default layer plus per-layer and per-head overrides."""

    name: str
    default: LayerVariant
    layers: tuple[tuple[int, LayerVariant], ...] = field(default=())

    def layer(self, index: int) -> LayerVariant:
        for i, spec in self.layers:
            if i == index:
                return spec
        return self.default

    def check_layers(self, n_layers: int, n_heads: int) -> None:
        """Raise if an override names a layer or head count the model does not have."""
        for i, spec in self.layers:
            if not 0 <= i < n_layers:
                raise VariantError(f"variant override for layer {i}; model has {n_layers} layers")
            spec.head_kinds(n_heads)
        self.default.head_kinds(n_heads)

    def __str__(self) -> str:
        return self.name


def polynomial_problem(variant: VariantSpec) -> str | None:
    """Why ``variant`` cannot run under HE (polynomial end to end), or None if it can.

    The HE route evaluates power attention, the quad activation and the affine norm only.
    """
    for index, layer in ((None, variant.default), *variant.layers):
        where = "" if index is None else f" (layer {index})"
        kinds = {op.kind for op in (layer.heads or (layer.attn,))}
        if kinds != {"power"}:
            return f"attention {', '.join(sorted(kinds))}{where} is not polynomial: use attn=power"
        if layer.act is None or layer.act.kind != "quad":
            return f"activation {layer.act.kind if layer.act else 'native'}{where} is not polynomial: use act=quad"
        if layer.norm is None or layer.norm.kind != "affine":
            return f"norm {layer.norm.kind if layer.norm else 'native'}{where} is not polynomial: use norm=affine"
    return None


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_op(field_name: str, text: str) -> OpSpec:
    """Parse ``kind[:k=v[:k=v]]`` for field ``attn``, ``act`` or ``norm``."""
    table = _KINDS[field_name]
    kind, *raw = text.strip().split(":")
    if kind not in table:
        raise VariantError(f"unknown {field_name} kind {kind!r}; known: {', '.join(table)}")
    params = dict(table[kind][0])
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            raise VariantError(f"bad parameter {item!r} for {kind}; known: {', '.join(params)}")
        params[key] = _parse_value(value)
    _check_params(field_name, kind, params)
    return OpSpec(kind, tuple(sorted(params.items())))


def _check_params(field_name: str, kind: str, params: dict[str, Any]) -> None:
    for key, value in params.items():
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise VariantError(f"{kind}: {key}={value!r}; expected one of {_CHOICES[key]}")
        elif not isinstance(value, (int, float)):
            raise VariantError(f"{kind}: {key}={value!r} is not a number")
    if field_name != "attn":
        return
    if kind == "power":
        p = params["p"]
        if not isinstance(p, int) or p < 2 or p % 2:
            raise VariantError(f"power: p={p!r} must be an even int >= 2 (odd p is not positive)")
        if params["tau"] <= 0:
            raise VariantError(f"power: tau={params['tau']!r} must be > 0")
    if kind in ("power", "relu", "linear", "2quad") and params["eps"] < 0:
        raise VariantError(f"{kind}: eps={params['eps']!r} must be >= 0")


def _parse_fields(text: str) -> dict[str, OpSpec]:
    """``preset`` / ``attn=..,act=..,norm=..`` / ``preset,act=..`` -> field overrides."""
    out: dict[str, OpSpec] = {}
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise VariantError("empty variant string")
    for position, item in enumerate(items):
        key, sep, value = item.partition("=")
        if not sep:
            if position or key not in PRESETS:
                raise VariantError(f"unknown variant {key!r}; known presets: {', '.join(PRESETS)}")
            out.update(_parse_fields(PRESETS[key][0]))
            continue
        if key not in _KINDS:
            raise VariantError(f"unknown variant field {key!r}; expected attn, act or norm")
        out[key] = parse_op(key, value)
    return out


def _layer_from(fields: dict[str, OpSpec], base: LayerVariant | None) -> LayerVariant:
    attn = fields.get("attn", base.attn if base else OpSpec("softmax"))
    return LayerVariant(
        heads=None if "attn" in fields or base is None else base.heads,
        attn=attn,
        act=fields.get("act", base.act if base else None),
        norm=fields.get("norm", base.norm if base else None),
    )


def parse_variant(text: str, overrides_path: str | Path | None = None) -> VariantSpec:
    """Parse a variant string and an optional JSON per-layer / per-head override file."""
    if not isinstance(text, str):
        raise VariantError(f"variant must be a string, got {type(text).__name__}")
    default = _layer_from(_parse_fields(text), None)
    layers: dict[int, LayerVariant] = {}
    name = text.strip()
    if overrides_path is not None:
        layers = _load_overrides(Path(overrides_path), default)
        name = f"{name}+{Path(overrides_path).name}"
    return VariantSpec(name, default, tuple(sorted(layers.items())))


def _load_overrides(path: Path, default: LayerVariant) -> dict[int, LayerVariant]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise VariantError(f"cannot read variant overrides {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise VariantError(f"variant overrides {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise VariantError(f"variant overrides {path} is not JSON: {exc.msg}") from None
    if not isinstance(data, dict) or set(data) - {"layers", "heads"}:
        raise VariantError(f"variant overrides {path}: expected keys 'layers' and/or 'heads' in one JSON object")
    layers: dict[int, LayerVariant] = {}
    for key, value in _table(data, "layers", path).items():
        if not isinstance(value, str):
            raise VariantError(f"variant overrides {path}: layer {key} must map to a variant string, "
                               f"got {type(value).__name__}")
        layers[_layer_index(key)] = _layer_from(_parse_fields(value), default)
    for key, kinds in _table(data, "heads", path).items():
        if not isinstance(kinds, list) or not kinds or not all(isinstance(kind, str) for kind in kinds):
            raise VariantError(f"variant overrides {path}: heads of layer {key} must be a list of kinds "
                               "(one attention kind string per head, such as \"softmax\")")
        index = _layer_index(key)
        base = layers.get(index, default)
        heads = tuple(parse_op("attn", kind) for kind in kinds)
        layers[index] = LayerVariant(heads, heads[0], base.act, base.norm)
    return layers


def _table(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    """``data[key]`` as a JSON object keyed by layer index ({} when absent); refuses other types."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        example = '{"0": "attn=relu"}' if key == "layers" else '{"0": ["softmax", "scale"]}'
        raise VariantError(f"variant overrides {path}: {key!r} must be an object keyed by layer index "
                           f"such as {example}, got {type(value).__name__}")
    return value


def _layer_index(key: str) -> int:
    try:
        index = int(key)
    except ValueError:
        raise VariantError(f"variant overrides: layer key {key!r} is not an int") from None
    if index < 0:
        raise VariantError(f"variant overrides: layer {index} is negative")
    return index


def as_variant(variant: VariantSpec | str) -> VariantSpec:
    """Accept a parsed spec or a variant string."""
    return variant if isinstance(variant, VariantSpec) else parse_variant(variant)


def list_variants() -> list[tuple[str, str]]:
    """Presets and single kinds usable in the free form, each with a one-line description."""
    out = [(name, desc) for name, (_, desc) in PRESETS.items()]
    for field_name, table in _KINDS.items():
        for kind, (params, desc) in table.items():
            shown = ":".join([kind] + [f"{k}={v}" for k, v in params.items()])
            out.append((f"{field_name}={shown}", desc))
    return out
