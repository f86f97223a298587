"""Every variant on every family: torch, CrypTen shares (in-process), causality, KV cache."""

from __future__ import annotations

import json

import pytest
import torch

from models.ops import replace_parameters
from models.toy import FAMILIES, make_input, make_model
from models.variants import parse_variant
from protocols.mpc.numerics import share_kernels

VARIANTS = [
    "exact", "mpcformer", "power", "relu", "scale", "linear", "attn=power:p=4:tau=2",
    "attn=linear:phi=square", "mpcformer,norm=affine", "attn=relu,act=relu,norm=rmsnorm",
    "attn=2quad,act=gelu:form=tanh,norm=layernorm",
]
DECODERS = [name for name, cfg in FAMILIES.items() if cfg.family == "decoder"]


@pytest.fixture(scope="module")
def crypten():
    torch.set_num_threads(1)
    from protocols.mpc.cryptenlib import crypten as lib

    lib.init()
    return lib


def reveal(x) -> torch.Tensor:
    """Decode a single-party share directly (get_plain_text can be off by 1.0, see DESIGN)."""
    return x.share.double().div(x.encoder.scale).float()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_shares_match_torch(crypten, family: str, variant: str) -> None:
    model = make_model(family, variant)
    x = make_input(family)
    with torch.no_grad():
        ref = model(x)
    assert torch.isfinite(ref).all()
    replace_parameters(model, crypten.cryptensor)
    enc_x = crypten.cryptensor(x) if FAMILIES[family].family == "vit" else x
    with share_kernels():
        out = reveal(model(enc_x))
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.05 * max(1.0, float(ref.abs().max()))


def test_one_hot_input_on_shares_matches_ids(crypten) -> None:
    model = make_model("llama", "mpcformer")
    ids = make_input("llama", length=4)
    with torch.no_grad():
        ref = model(ids)
    replace_parameters(model, crypten.cryptensor)
    one_hot = torch.nn.functional.one_hot(ids, FAMILIES["llama"].vocab_size).float()
    with share_kernels():
        out = reveal(model(crypten.cryptensor(one_hot)))
    assert (out - ref).abs().max() < 0.05 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", DECODERS)
def test_future_tokens_do_not_change_past(family: str, variant: str) -> None:
    model = make_model(family, variant)
    ids = make_input(family, length=8)
    other = ids.clone()
    other[0, 5:] = (other[0, 5:] + 7) % FAMILIES[family].vocab_size
    with torch.no_grad():
        a, b = model(ids), model(other)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-5, rtol=1e-5)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_decode_equals_full_recompute(family: str, variant: str) -> None:
    model = make_model(family, variant)
    ids = make_input(family, length=7)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :4], cache)] + [model(ids[:, i:i + 1], cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.entries(0) == 7 and cache.next_position == 7


def test_kv_cache_on_shares(crypten) -> None:
    model = make_model("gpt2", "mpcformer")
    ids = make_input("gpt2", length=5)
    with torch.no_grad():
        full = model(ids)
    replace_parameters(model, crypten.cryptensor)
    cache = model.new_cache()
    with share_kernels():
        prefill = reveal(model(ids[:, :4], cache))
        step = reveal(model(ids[:, 4:], cache))
    out = torch.cat([prefill, step], dim=1)
    assert (out - full).abs().max() < 0.05 * max(1.0, float(full.abs().max()))


def test_kv_cache_pruning_hook_and_select() -> None:
    model = make_model("llama", "exact")
    ids = make_input("llama", length=6)
    cache = model.new_cache()
    cache.add_hook(lambda c, layer: c.select(layer, torch.arange(max(0, c.entries(layer) - 3),
                                                                 c.entries(layer))))
    with torch.no_grad():
        model(ids[:, :4], cache)
        logits = model(ids[:, 4:5], cache)
    assert cache.positions[0].tolist() == [2, 3, 4] and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="strictly ascending"):
        cache.select(0, torch.tensor([1, 0]))


def test_heterogeneous_heads_equal_per_head_models(tmp_path) -> None:
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"heads": {"0": ["softmax", "scale"], "1": ["relu", "relu"]}}))
    model = make_model("bert", parse_variant("exact", path))
    names = {n for n, _ in model.named_modules()}
    assert {"layer.0.attn.softmax", "layer.0.attn.scale", "layer.1.attn.relu"} <= names
    attn = model.layer[0].attn
    x = torch.randn(1, 5, 16)
    mask_args = make_mask(5)
    q = attn._split(attn.q(x), 2)
    k, v = attn._split(attn.k(x), 2), attn._split(attn.v(x), 2)
    with torch.no_grad():
        mixed = attn(x, mask_args)
        head0 = attn.softmax(q[:, :1], k[:, :1], v[:, :1], mask_args)
        head1 = attn.scale(q[:, 1:], k[:, 1:], v[:, 1:], mask_args)
        manual = attn.o(torch.cat([head0, head1], 1).transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(mixed, manual)


def make_mask(n: int):
    from models.attention import AttnMask

    pos = torch.arange(n)
    return AttnMask(pos, pos, causal=False)


def test_op_kinds_and_module_paths() -> None:
    model = make_model("llama", "mpcformer")
    kinds = {n: getattr(m, "op_kind", None) for n, m in model.named_modules()}
    assert kinds["layer.1.attn.2quad"] == "2quad"
    assert kinds["layer.1.mlp.act"] == "quad"
    assert kinds["layer.1.attn.q"] == "matmul" and kinds["layer.1.attn_norm"] == "rmsnorm"
    assert kinds["embed"] == "embedding" and kinds[""] == "model"
    assert all(kind is not None for n, kind in kinds.items() if n != "layer")


def test_affine_norm_requires_calibration() -> None:
    from models.hf_import import build
    from models.layers import NotCalibratedError

    model = build(FAMILIES["bert"], "exact,norm=affine")
    with pytest.raises(NotCalibratedError, match="not calibrated"):
        model(make_input("bert"))


def test_bad_inputs() -> None:
    model = make_model("gpt2")
    with pytest.raises(IndexError, match="out of range"):
        model(torch.tensor([[0, 99]]))
    with pytest.raises(ValueError, match="exceeds max_positions"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty prompt"):
        model.generate_greedy([], 3)
    vit = make_model("vit")
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 8, 8\]"):
        vit(torch.zeros(1, 3, 9, 9))
