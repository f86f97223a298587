"""The torch/share adapter: each op on plain tensors and on CrypTen shares (in-process)."""

from __future__ import annotations

import pytest
import torch

from models import ops
from models.layers import Linear


@pytest.fixture(scope="module")
def crypten():
    from protocols.mpc.cryptenlib import crypten as lib

    lib.init()
    return lib


def reveal(x) -> torch.Tensor:
    return x.share.double().div(x.encoder.scale).float()


def test_pow_even_matches_torch_and_rejects_odd(crypten) -> None:
    x = torch.tensor([-1.5, -0.5, 0.3, 1.2])
    for p in (2, 4, 6):
        torch.testing.assert_close(ops.pow_even(x, p), x**p)
        assert (reveal(ops.pow_even(crypten.cryptensor(x), p)) - x**p).abs().max() < 1e-2
    with pytest.raises(ValueError, match="even p"):
        ops.pow_even(x, 3)


def test_reciprocal_and_inv_sqrt_scaling_extends_range(crypten) -> None:
    big = torch.tensor([400.0, 900.0])
    unscaled = reveal(ops.reciprocal(crypten.cryptensor(big)))
    scaled = reveal(ops.reciprocal(crypten.cryptensor(big), scale=128.0))
    assert (unscaled * big - 1).abs().max() > 0.5
    assert (scaled - 1 / big).abs().max() < 2 * 2**-16  # within fixed-point resolution
    small = torch.tensor([0.004, 0.02])
    root = reveal(ops.inv_sqrt(crypten.cryptensor(small), scale=1 / 64))
    assert (root * small.sqrt() - 1).abs().max() < 1e-2


def test_mixed_matmul_linear_and_cat(crypten) -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    enc_b = crypten.cryptensor(b)
    assert (reveal(ops.matmul(a, enc_b)) - a @ b).abs().max() < 1e-3
    w, bias = torch.randn(5, 4), torch.randn(5)
    x = torch.randn(2, 3, 4)
    expected = x @ w.t() + bias
    assert (reveal(ops.linear(x, crypten.cryptensor(w), bias)) - expected).abs().max() < 1e-3
    assert (reveal(ops.linear(crypten.cryptensor(x), w, bias)) - expected).abs().max() < 1e-3
    joined = ops.cat([crypten.cryptensor(a), torch.ones(1, 4)], dim=0)
    assert joined.shape == (4, 4) and (reveal(joined)[-1] - 1).abs().max() < 1e-4
    with pytest.raises(ValueError, match="empty list"):
        ops.cat([])


def test_gelu_on_shares_uses_sigmoid_form_and_survives_large_inputs(crypten) -> None:
    x = torch.cat([torch.linspace(-3, 3, 13), torch.tensor([-40.0, -24.0, 17.0, 24.0, 60.0])])
    sigmoid_form = x * torch.sigmoid(1.702 * x)
    assert (reveal(ops.gelu(crypten.cryptensor(x))) - sigmoid_form).abs().max() < 2e-2
    assert (sigmoid_form - torch.nn.functional.gelu(x)).abs().max() < 0.021
    torch.testing.assert_close(ops.gelu(x), torch.nn.functional.gelu(x))


def test_replace_parameters_converts_shared_weights_once() -> None:
    model = torch.nn.Sequential(Linear(4, 4), Linear(4, 4))
    model[1].weight = model[0].weight
    calls = []

    def convert(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return t.clone() * 2

    before = model[0].weight.detach().clone()
    replace_count = sum(1 for _ in model.parameters())
    ops.replace_parameters(model, convert)
    assert len(calls) == replace_count and list(model.parameters()) == []
    assert model[0].weight is model[1].weight
    torch.testing.assert_close(model[0].weight, before * 2)
    assert model(torch.randn(2, 4)).shape == (2, 4)


@pytest.mark.parametrize("length", [1, 2, 5, 8, 13])
def test_row_max_tree_on_shares_matches_torch(crypten, length: int) -> None:
    x = torch.randn(3, 4, length, generator=torch.Generator().manual_seed(length)) * 5
    got = reveal(ops.row_max(crypten.cryptensor(x), dim=-1))
    assert got.shape == (3, 4, 1)
    assert (got - x.amax(-1, keepdim=True)).abs().max() < 1e-3



def test_range_reduced_newton_beats_crypten_seeded_one_outside_its_range(crypten) -> None:
    x = torch.tensor([0.01, 0.5, 3.0, 40.0, 300.0])
    reduced = reveal(ops.reciprocal(crypten.cryptensor(x), positive=True))
    assert ((reduced - 1 / x).abs() * x).max() < 0.02  # x = 300: 1/x is 218 ulps
    root = reveal(ops.inv_sqrt(crypten.cryptensor(x)))
    assert ((root - x.rsqrt()).abs() / x.rsqrt()).max() < 2e-3
    with ops.numerics("crypten"):  # CrypTen's exp-seeded Newton (the baseline's numerics)
        seeded = reveal(ops.reciprocal(crypten.cryptensor(x[:3]), positive=True))
        assert ((seeded - 1 / x[:3]).abs() * x[:3]).max() < 0.02
        assert not torch.isfinite(reveal(ops.reciprocal(crypten.cryptensor(x[4:]), positive=True))).all() or \
            (reveal(ops.reciprocal(crypten.cryptensor(x[4:]), positive=True)) * x[4:] - 1).abs().max() > 0.5
    with pytest.raises(ValueError, match="unknown numerics"):
        with ops.numerics("magic"):
            pass


def test_gelu_on_shares_is_the_piecewise_polynomial_within_1e_3(crypten) -> None:
    x = torch.linspace(-30.0, 30.0, 1201)
    got = reveal(ops.gelu(crypten.cryptensor(x)))
    assert (got - torch.nn.functional.gelu(x)).abs().max() < 1e-3
    with ops.numerics("crypten"):  # the sigmoid form the CrypTen baseline computes
        sigmoid_form = reveal(ops.gelu(crypten.cryptensor(x[500:700])))
    assert 5e-3 < (sigmoid_form - torch.nn.functional.gelu(x[500:700])).abs().max() < 0.03
