"""Variant parsing, per-layer/per-head overrides, config validation."""

from __future__ import annotations

import json

import pytest

from models.config import ConfigError, ModelConfig
from models.variants import VariantError, list_variants, parse_variant


def test_presets_resolve_to_kinds() -> None:
    exact = parse_variant("exact").default
    assert (exact.attn.kind, exact.act, exact.norm) == ("softmax", None, None)
    mpcformer = parse_variant("mpcformer").default
    assert (mpcformer.attn.kind, mpcformer.act.kind) == ("2quad", "quad")
    assert mpcformer.attn.get("c") == 5.0


def test_free_form_and_preset_with_overrides() -> None:
    spec = parse_variant("attn=power:p=4:tau=2,act=quad,norm=layernorm").default
    assert (spec.attn.get("p"), spec.attn.get("tau"), spec.act.kind, spec.norm.kind) == (
        4, 2, "quad", "layernorm")
    mixed = parse_variant("mpcformer,norm=affine").default
    assert (mixed.attn.kind, mixed.act.kind, mixed.norm.kind) == ("2quad", "quad", "affine")


@pytest.mark.parametrize("text, fragment", [
    ("bogus", "unknown variant 'bogus'"),
    ("attn=power:p=3", "must be an even int"),
    ("attn=power:p=0", "must be an even int"),
    ("attn=power:q=2", "bad parameter 'q=2'"),
    ("attn=softmaxx", "unknown attn kind"),
    ("act=gelu:form=cubic", "form='cubic'"),
    ("depth=3", "unknown variant field 'depth'"),
    ("", "empty variant string"),
    ("attn=relu,exact", "unknown variant 'exact'"),
])
def test_bad_variant_strings(text: str, fragment: str) -> None:
    with pytest.raises(VariantError, match=fragment.replace("(", r"\(")):
        parse_variant(text)


def test_override_file_layers_and_heads(tmp_path) -> None:
    path = tmp_path / "hetero.json"
    path.write_text(json.dumps({"layers": {"0": "attn=relu,act=quad"},
                                "heads": {"1": ["softmax", "scale"]}}))
    spec = parse_variant("exact", path)
    assert spec.layer(0).attn.kind == "relu" and spec.layer(0).act.kind == "quad"
    assert [h.kind for h in spec.layer(1).head_kinds(2)] == ["softmax", "scale"]
    assert spec.layer(5) == spec.default
    spec.check_layers(2, 2)
    with pytest.raises(VariantError, match="2 kinds for 4 heads"):
        spec.check_layers(2, 4)
    with pytest.raises(VariantError, match="model has 1 layers"):
        spec.check_layers(1, 2)


@pytest.mark.parametrize("content, fragment", [
    ("{", "is not JSON"),
    ('{"layers": {"x": "exact"}}', "is not an int"),
    ('{"heads": {"0": []}}', "must be a list of kinds"),
    ('{"other": 1}', "expected keys"),
])
def test_bad_override_files(tmp_path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(VariantError, match=fragment):
        parse_variant("exact", path)


def test_missing_override_file(tmp_path) -> None:
    with pytest.raises(VariantError, match="cannot read"):
        parse_variant("exact", tmp_path / "nope.json")


def test_list_variants_covers_presets_and_kinds() -> None:
    names = [name for name, _ in list_variants()]
    for preset in ("exact", "mpcformer", "power", "relu", "scale", "linear"):
        assert preset in names
    assert any(name.startswith("attn=2quad") for name in names)
    assert all(desc and "\n" not in desc for _, desc in list_variants())


@pytest.mark.parametrize("changes, fragment", [
    ({"heads": 3}, "not divisible by heads"),
    ({"kv_heads": 3, "heads": 4, "hidden": 16}, "not a multiple of kv_heads"),
    ({"family": "rnn"}, "family='rnn'"),
    ({"vocab_size": 0}, "needs vocab_size"),
    ({"norm_eps": 0.0}, "norm_eps must be > 0"),
    ({"layers": 0}, "layers must be a positive int"),
    ({"position": "rope", "hidden": 18, "heads": 2}, "even head_dim"),
])
def test_config_validation(changes: dict, fragment: str) -> None:
    base = dict(family="decoder", hidden=16, layers=1, heads=2, ffn=8, vocab_size=10)
    base.update(changes)
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(**base)


def test_vit_config_validation() -> None:
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        ModelConfig(family="vit", hidden=8, layers=1, heads=2, ffn=8, image_size=10,
                    patch_size=4, num_classes=2, max_positions=20)
