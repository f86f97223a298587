"""load_model bundles: encode/decode, variants on shared weights, errors, open registry."""

from __future__ import annotations

import pytest
import torch

from models.registry import (
    InputError,
    ModelBundle,
    Registry,
    UnknownModelError,
    load_model,
    model_names,
    register_model,
)


def test_builtin_names() -> None:
    assert {"minilm", "smollm2", "gpt2-tiny", "vit-tiny"} <= set(model_names())


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'bert-huge'; known: .*minilm"):
        load_model("bert-huge")


def test_gpt2_tiny_text_roundtrip_and_variants_share_weights() -> None:
    exact = load_model("gpt2-tiny")
    quad = load_model("gpt2-tiny", "mpcformer")
    assert exact.input_kind == "text" and not exact.model.training
    ids = exact.encode("hello")
    assert ids.tolist() == [list(b"hello")]
    torch.testing.assert_close(exact.model.layer[0].attn.q.weight, quad.model.layer[0].attn.q.weight)
    with torch.no_grad():
        logits = exact.model(ids)
    out = exact.decode(logits)
    assert set(out) == {"next_token_id", "next_token"} and 0 <= out["next_token_id"] < 256
    tokens = exact.model.generate_greedy(ids[0], 3)
    assert exact.decode(torch.tensor(tokens))["token_ids"] == tokens


@pytest.mark.parametrize("text, fragment", [("", "empty"), ("   ", "empty"), (None, "empty"),
                                            ("x" * 65, "limit is 64")])
def test_text_input_errors(text, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        load_model("gpt2-tiny").encode(text)


def test_vit_tiny_image_in_class_out() -> None:
    bundle = load_model("vit-tiny", "relu")
    image = torch.randn(3, 16, 16)
    with torch.no_grad():
        logits = bundle.model(bundle.encode(image))
    out = bundle.decode(logits)
    assert bundle.input_kind == "image" and 0 <= out["class"] < 10 and len(out["logits"]) == 10
    with pytest.raises(InputError, match=r"shape \[3, 16, 16\], got \[1, 16, 16\]"):
        bundle.encode(torch.zeros(1, 16, 16))
    with pytest.raises(InputError, match="got list"):
        bundle.encode([1, 2])


def test_minilm_embedding_is_unit_normalised_and_affine_variant_runs() -> None:
    bundle = load_model("minilm", "exact")
    with torch.no_grad():
        emb = bundle.decode(bundle.model(bundle.encode("Secret shares hide the sentence.")))
    assert len(emb["embedding"]) == 384
    assert abs(sum(v * v for v in emb["normalized"]) - 1.0) < 1e-5
    affine = load_model("minilm", "exact,norm=affine")
    with torch.no_grad():
        other = affine.model(affine.encode("Secret shares hide the sentence."))
    assert torch.isfinite(other).all()


def test_open_registry() -> None:
    registry = Registry()
    seen = []

    def factory(variant):
        seen.append(variant.name)
        base = load_model("vit-tiny", variant)
        return ModelBundle("mine", base.config, base.model, "image", base.encode, base.decode,
                           variant)

    registry.register("mine", factory)
    assert registry.load("mine", "scale").name == "mine" and seen == ["scale"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("mine", factory)
    with pytest.raises(ValueError, match="already registered"):
        register_model("minilm", factory)
