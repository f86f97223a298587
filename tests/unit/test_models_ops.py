"""The torch/encrypted adapter: plain paths in torch, generic ops on CrypTen shares (in-process),
and the kernel table a protocol installs for encrypted values."""

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


class Sealed:
    """A stand-in encrypted value: not a torch tensor, so the adapter dispatches to kernels."""


def test_pow_even_matches_torch_and_rejects_odd(crypten) -> None:
    x = torch.tensor([-1.5, -0.5, 0.3, 1.2])
    for p in (2, 4, 6):
        torch.testing.assert_close(ops.pow_even(x, p), x**p)
        assert (reveal(ops.pow_even(crypten.cryptensor(x), p)) - x**p).abs().max() < 1e-2
    with pytest.raises(ValueError, match="even p"):
        ops.pow_even(x, 3)


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


def test_kernels_compute_in_torch_on_plain_values_with_nothing_installed() -> None:
    x = torch.tensor([[0.5, 3.0, -1.0, 3.0], [2.0, -4.0, 0.25, 1.5]])
    pos = x.abs() + 0.1
    torch.testing.assert_close(ops.reciprocal(pos, scale=64.0, positive=True), 1 / pos)
    torch.testing.assert_close(ops.inv_sqrt(pos, 16.0), pos.rsqrt())
    torch.testing.assert_close(ops.inv_sqrt_wide(pos, 1e-3, 1e4), pos.rsqrt())
    torch.testing.assert_close(ops.gelu(x), torch.nn.functional.gelu(x))
    torch.testing.assert_close(ops.gelu(x, "tanh"), torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(ops.row_max(x, 0), x.amax(0, keepdim=True))
    values, index = ops.argmax_last(x)
    assert torch.equal(values, torch.tensor([3.0, 2.0])) and torch.equal(index, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(ops.scaled_rows(x, lambda sq: sq.sum(-1, keepdim=True)),
                               x * (x * x).sum(-1, keepdim=True))


@pytest.mark.parametrize("name, call", [
    ("reciprocal", lambda v: ops.reciprocal(v, positive=True)),
    ("inv_sqrt", lambda v: ops.inv_sqrt(v)),
    ("inv_sqrt_wide", lambda v: ops.inv_sqrt_wide(v, 1.0, 2.0)),
    ("gelu", lambda v: ops.gelu(v)),
    ("scaled_rows", lambda v: ops.scaled_rows(v, lambda sq: sq)),
    ("row_max", lambda v: ops.row_max(v)),
    ("argmax_last", lambda v: ops.argmax_last(v)),
])
def test_an_encrypted_value_without_its_kernel_names_the_missing_kernel(name: str, call) -> None:
    assert name in ops.KERNELS
    with pytest.raises(ops.MissingKernelError, match=f"encrypted implementation of '{name}'.*share_kernels"):
        call(Sealed())


def test_installed_kernels_get_the_arguments_and_nested_blocks_override_by_name() -> None:
    value = Sealed()
    with ops.encrypted_kernels(reciprocal=lambda x, scale, positive: ("outer", x, scale, positive),
                               gelu=lambda x, form: ("outer gelu", form)):
        assert ops.reciprocal(value, 8.0, positive=True) == ("outer", value, 8.0, True)
        with ops.encrypted_kernels(gelu=lambda x, form: ("inner gelu", form)):
            assert ops.gelu(value, "tanh") == ("inner gelu", "tanh")
            assert ops.reciprocal(value)[0] == "outer"  # kept from the enclosing block
        assert ops.gelu(value) == ("outer gelu", "erf")
    with pytest.raises(ops.MissingKernelError):
        ops.gelu(value)


def test_encrypted_kernels_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown encrypted kernel.*softmax"):
        with ops.encrypted_kernels(softmax=lambda x: x):
            pass


def test_compare_bound_is_scoped_and_positive() -> None:
    assert ops.comparison_bound() is None
    with ops.compare_bound(2.0 ** 14):
        with ops.compare_bound(8):
            assert ops.comparison_bound() == 8.0
        assert ops.comparison_bound() == 2.0 ** 14
    assert ops.comparison_bound() is None
    with pytest.raises(ValueError, match="positive limit"):
        with ops.compare_bound(0):
            pass


def test_folding_an_affine_norms_gain_keeps_its_output_and_leaves_old_tensors_alone() -> None:
    """The protocols share ``weight * inv_std`` as one gain (one product per call on shares)."""
    from models.layers import AffineNorm, NotCalibratedError, calibrate, fold_norm_gains

    torch.manual_seed(0)
    norm = AffineNorm(8, 1e-12, center=True, bias=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(4, 8) * 3
    with pytest.raises(NotCalibratedError):
        norm.fold_gain()
    calibrate(norm, lambda: norm(x))
    before, old_weight = norm(x), norm.weight.detach().clone()
    kept = norm.weight
    fold_norm_gains(norm)
    fold_norm_gains(norm)  # once only
    assert norm.gain_folded and float(norm.inv_std) == 1.0
    assert torch.allclose(norm(x), before, atol=1e-6)
    assert torch.equal(kept, old_weight) and not torch.equal(norm.weight, old_weight)
