"""Numerics on CrypTen shares (protocols/mpc/numerics.py), reached through models.ops with the
kernels installed, in-process (one party)."""

from __future__ import annotations

import pytest
import torch

from models import ops
from protocols.mpc import numerics
from protocols.mpc.numerics import share_kernels


@pytest.fixture(scope="module")
def crypten():
    from protocols.mpc.cryptenlib import crypten as lib

    lib.init()
    return lib


def reveal(x) -> torch.Tensor:
    return x.share.double().div(x.encoder.scale).float()


def test_every_method_implements_every_kernel_and_unknown_methods_are_refused() -> None:
    for method in numerics.NUMERICS:
        assert set(numerics.kernels(method)) == set(ops.KERNELS)
    with pytest.raises(ValueError, match="unknown numerics"):
        with share_kernels("magic"):
            pass


def test_reciprocal_and_inv_sqrt_scaling_extends_range(crypten) -> None:
    big = torch.tensor([400.0, 900.0])
    small = torch.tensor([0.004, 0.02])
    with share_kernels():
        unscaled = reveal(ops.reciprocal(crypten.cryptensor(big)))
        scaled = reveal(ops.reciprocal(crypten.cryptensor(big), scale=128.0))
        root = reveal(ops.inv_sqrt(crypten.cryptensor(small), scale=1 / 64))
    assert (unscaled * big - 1).abs().max() > 0.5
    assert (scaled - 1 / big).abs().max() < 2 * 2**-16  # within fixed-point resolution
    assert (root * small.sqrt() - 1).abs().max() < 1e-2


def test_range_reduced_newton_beats_crypten_seeded_one_outside_its_range(crypten) -> None:
    x = torch.tensor([0.01, 0.5, 3.0, 40.0, 300.0])
    with share_kernels():
        reduced = reveal(ops.reciprocal(crypten.cryptensor(x), positive=True))
        root = reveal(ops.inv_sqrt(crypten.cryptensor(x)))
    assert ((reduced - 1 / x).abs() * x).max() < 0.02  # x = 300: 1/x is 218 ulps
    assert ((root - x.rsqrt()).abs() / x.rsqrt()).max() < 2e-3
    with share_kernels("crypten"):  # CrypTen's exp-seeded Newton (the baseline's numerics)
        seeded = reveal(ops.reciprocal(crypten.cryptensor(x[:3]), positive=True))
        far = reveal(ops.reciprocal(crypten.cryptensor(x[4:]), positive=True))
    assert ((seeded - 1 / x[:3]).abs() * x[:3]).max() < 0.02
    assert not torch.isfinite(far).all() or (far * x[4:] - 1).abs().max() > 0.5


def test_wide_inverse_square_root_spans_seven_orders_of_magnitude(crypten) -> None:
    x = torch.tensor([2e-3, 0.7, 30.0, 900.0, 2e4])
    with share_kernels():
        root = reveal(ops.inv_sqrt_wide(crypten.cryptensor(x), 1e-3, 3e4))
    assert ((root - x.rsqrt()).abs() / x.rsqrt()).max() < 2e-2


def test_wide_inverse_square_root_with_a_factor_and_beyond_the_piecewise_range(crypten) -> None:
    energy = torch.tensor([[1.5], [900.0], [9.9e5]])  # SmolLM2's widest norm range: [1.42, 1.01e6]
    rows = torch.tensor([[1.0, -2.0], [30.0, 5.0], [-900.0, 400.0]])
    with share_kernels():
        scaled = reveal(ops.inv_sqrt_wide(crypten.cryptensor(energy), 1.42, 1.01e6, times=crypten.cryptensor(rows)))
        with pytest.raises(ValueError, match="must stay below"):  # reduced values past the root's 4^6
            ops.inv_sqrt_wide(crypten.cryptensor(torch.tensor([[3.0]])), 1.0, 4.0 ** 13.5)
    assert (scaled - rows * energy.rsqrt()).abs().max() < 2e-3


def test_gelu_on_shares_is_the_piecewise_polynomial_within_1e_3(crypten) -> None:
    x = torch.linspace(-30.0, 30.0, 1201)
    with share_kernels():
        got = reveal(ops.gelu(crypten.cryptensor(x)))
    assert (got - torch.nn.functional.gelu(x)).abs().max() < 1e-3
    with share_kernels("crypten"):  # the sigmoid form the CrypTen baseline computes
        sigmoid_form = reveal(ops.gelu(crypten.cryptensor(x[500:700])))
    assert 5e-3 < (sigmoid_form - torch.nn.functional.gelu(x[500:700])).abs().max() < 0.03


def test_gelu_on_shares_survives_large_inputs(crypten) -> None:
    x = torch.cat([torch.linspace(-3, 3, 13), torch.tensor([-40.0, -24.0, 17.0, 24.0, 60.0])])
    with share_kernels():
        got = reveal(ops.gelu(crypten.cryptensor(x)))
    assert (got - torch.nn.functional.gelu(x)).abs().max() < 1e-3


@pytest.mark.parametrize("length", [1, 2, 5, 8, 13])
def test_row_max_tree_on_shares_matches_torch(crypten, length: int) -> None:
    x = torch.randn(3, 4, length, generator=torch.Generator().manual_seed(length)) * 5
    with share_kernels():
        got = reveal(ops.row_max(crypten.cryptensor(x), dim=-1))
    assert got.shape == (3, 4, 1)
    assert (got - x.amax(-1, keepdim=True)).abs().max() < 1e-3


def test_comparison_bits_are_reencoded_at_the_operand_scale(crypten) -> None:
    x = crypten.cryptensor(torch.tensor([-1.0, 2.0, 0.5]))
    bits = x > 0
    assert int(bits.encoder.scale) == 1  # CrypTen's encoding of a comparison result
    scaled = numerics.as_fixed_point(bits, x)
    assert scaled.encoder.scale == x.encoder.scale
    assert torch.equal(reveal(scaled * 0.25), torch.tensor([0.0, 0.25, 0.25]))
    plain = numerics.as_fixed_point(torch.tensor([True, False]), torch.zeros(2))
    assert plain.dtype == torch.float32


@pytest.mark.parametrize(("elements", "profile", "pieces"), [
    (1536, "lan", True), (3072, "lan", False), (24576, "lan", False), (24576, "wan", True)])
def test_silu_takes_the_pieces_where_they_are_priced_cheaper(elements: int, profile: str, pieces: bool) -> None:
    from protocols.mpc.pieces import silu_by_pieces
    from protocols.mpc.simulate import SimTensor, simulation
    from protocols.protocol_config import ProtocolConfig

    with simulation(ProtocolConfig(kernel_profile=profile)):
        assert silu_by_pieces(SimTensor.new(torch.zeros(elements))) is pieces


@pytest.mark.parametrize(("elements", "profile", "pieces"), [
    (216, "lan", True), (2000, "lan", False), (12288, "wan", True), (40000, "wan", False)])
def test_softmax_exp_takes_the_pieces_where_they_are_priced_cheaper(elements: int, profile: str, pieces: bool) -> None:
    from protocols.mpc.pieces import exp_by_pieces
    from protocols.mpc.simulate import SimTensor, simulation
    from protocols.protocol_config import ProtocolConfig

    with simulation(ProtocolConfig(kernel_profile=profile)):
        assert exp_by_pieces(SimTensor.new(torch.zeros(elements))) is pieces
