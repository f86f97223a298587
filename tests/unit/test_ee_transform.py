"""EE model transformation: equal to plaintext for every family and variant, keys from the CSPRNG,
and the constraints that make it equal (a RoPE pair moved elsewhere breaks it)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from models.hf_import import build
from models.registry import load_model
from models.toy import FAMILIES, make_input, make_model
from models.variants import parse_variant
from models.vit import patchify
from protocols.ee.keys import EeKey, KeySource, inverse, unpatchify
from protocols.ee.transform import draw_key, transform

SEED = bytes(range(16))


def _run_transformed(model: torch.nn.Module, key: EeKey, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return key.decode_output(transform(model, key)(key.encode_input(x)))


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want).abs().max() <= 1e-5 * (1.0 + want.abs().max()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("variant", ["exact", "mpcformer", "linear", "scale", "he"])
def test_transformed_toy_models_equal_plaintext(family: str, variant: str) -> None:
    model = make_model(family, variant)
    x = make_input(family)
    key = draw_key(model, KeySource(SEED))
    with torch.no_grad():
        want = model(x)
    assert _close(_run_transformed(model, key, x), want)


def test_every_axis_is_permuted_and_the_original_is_untouched() -> None:
    model = make_model("gpt2")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    key = draw_key(model, KeySource(SEED))
    shipped = transform(model, key)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, value in shipped.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} was shipped unchanged"
        assert value.data_ptr() != model.state_dict()[name].data_ptr()
    identity = torch.arange(len(key.hidden))
    assert not torch.equal(key.hidden, identity) and not torch.equal(key.vocab, torch.arange(len(key.vocab)))


def test_heads_move_within_their_kernel_and_gqa_group(tmp_path: Path) -> None:
    overrides = tmp_path / "heads.json"
    overrides.write_text(json.dumps({"heads": {"0": ["softmax", "linear", "softmax", "scale"]}}))
    config = FAMILIES["llama"].with_changes(kv_heads=4)
    model = _random(build(config, parse_variant("exact", overrides)))
    key = draw_key(model, KeySource(SEED))
    kinds = ["softmax", "linear", "softmax", "scale"]
    assert [kinds[h] for h in key.attention[0].q_heads.tolist()] == kinds
    assert torch.all(key.attention[0].qk_angles == 0)  # a linear-kernel head: no q/k rotation in layer 0
    assert torch.any(key.attention[1].qk_angles != 0)
    x = make_input("llama")
    with torch.no_grad():
        want = model(x)
    assert _close(_run_transformed(model, key, x), want)
    gqa = draw_key(make_model("llama"), KeySource(SEED)).attention[0]
    group = 4 // 2
    assert torch.equal(gqa.q_heads // group, gqa.kv_heads.repeat_interleave(group))


def _random(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


def test_moving_a_rope_pair_breaks_equality_rotating_it_does_not() -> None:
    model = make_model("llama")
    x = make_input("llama")
    with torch.no_grad():
        want = model(x)
    key = draw_key(model, KeySource(SEED))
    d = model.config.head_dim
    pairs = torch.arange(d // 2).roll(1)  # move every RoPE pair to the next slot, in both halves
    moved = torch.cat([pairs, pairs + d // 2]).repeat(model.config.kv_heads, 1)
    attention = [dataclasses.replace(a, qk_dims=moved, qk_angles=torch.zeros_like(a.qk_angles))
                 for a in key.attention]
    broken = dataclasses.replace(key, attention=tuple(attention))
    assert not _close(_run_transformed(model, broken, x), want)
    assert _close(_run_transformed(model, key, x), want)


def test_keys_come_from_the_seeded_aes_stream_not_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_args, **_kwargs):
        raise AssertionError("torch RNG used for an EE key")

    model = make_model("bert")
    for name in ("randperm", "rand", "randn", "randint", "manual_seed"):
        monkeypatch.setattr(torch, name, forbidden)
    first, again = draw_key(model, KeySource(SEED)), draw_key(model, KeySource(SEED))
    other = draw_key(model, KeySource(bytes(16)))
    assert all(torch.equal(a, b) for a, b in zip(first.tensors(), again.tensors()))
    assert not torch.equal(first.vocab, other.vocab)
    assert torch.equal(first.vocab.sort().values, torch.arange(model.config.vocab_size))
    assert first.nbytes == sum(t.numel() * t.element_size() for t in first.tensors())
    with pytest.raises(ValueError, match="16 bytes"):
        KeySource(b"short")


def test_image_shuffle_round_trips_and_ids_map_back() -> None:
    key = draw_key(make_model("vit"), KeySource(SEED))
    images = make_input("vit")
    shuffled = key.encode_input(images)
    assert shuffled.shape == images.shape and not torch.equal(shuffled, images)
    back = patchify(shuffled, key.patch_size)[:, inverse(key.patches)][:, :, inverse(key.pixels)]
    assert torch.equal(unpatchify(back, 3, 8, key.patch_size), images)
    text_key = draw_key(make_model("gpt2"), KeySource(SEED))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(text_key.decode_tokens(text_key.encode_input(ids)), ids)
    with pytest.raises(ValueError, match="token ids"):
        text_key.encode_input(ids.float())


@pytest.mark.parametrize("name", ["gpt2-tiny", "vit-tiny", "minilm"])
def test_registry_models_equal_plaintext(name: str) -> None:
    bundle = load_model(name)
    x = bundle.encode(torch.rand(3, 16, 16) if bundle.input_kind == "image" else "Secret sharing splits values.")
    key = draw_key(bundle.model, KeySource(SEED))
    with torch.no_grad():
        want = bundle.model(x)
    assert _close(_run_transformed(bundle.model, key, x), want)
