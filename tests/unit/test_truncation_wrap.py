"""The two-party local truncation's wrap (issue 12) at the 2Quad attention and quad GeLU sites.

A two-party truncation goes wrong by ``2^64 / divisor`` when the two signed shares of ``x`` sum
to ``x +- 2^64``; with one share uniform that happens with probability ``|x| / 2^64`` per element.
These tests fix one share at ``-2^63 + 2^32 * LIMIT`` instead of drawing it, so that exactly the
truncations of double-scale values at or above ``LIMIT`` wrap, and run the kernels on simulated
shares (:mod:`protocols.mpc.simulate`, whose ``_trunc`` stands where a party truncates) with every
truncation done by both parties' :func:`protocols.mpc.fixed_point.local_truncation` on that split.
The kernels must keep their double-scale values below ``LIMIT`` on inputs where ``(s + c)^2``
times V reaches thousands (it did before the fix: 2Quad's product with V held the largest values
of a MiniLM inference).
"""

from __future__ import annotations

import pytest
import torch

from models.attention import AttnMask, TwoQuadAttention
from models.layers import Quad, calibrate
from models.variants import parse_op
from protocols.mpc import fixed_point, simulate
from protocols.mpc.simulate import SimTensor, simulation
from protocols.protocol_config import ProtocolConfig

LIMIT = 1024  # double-scale values (in units of 1.0) from which the fixed split wraps
FIXED_SHARE = -(1 << 63) + (LIMIT << 32)


def _split_truncation(values: torch.Tensor, divisor: int | torch.Tensor) -> torch.Tensor:
    """Both parties' local truncations of ``values`` shared as (FIXED_SHARE, values - FIXED_SHARE)."""
    first = torch.full_like(values, FIXED_SHARE)
    second = values - first  # int64 arithmetic wraps around, as the ring does
    return fixed_point.local_truncation(first, divisor) + fixed_point.local_truncation(second, divisor)


def test_the_fixed_split_wraps_exactly_from_the_limit() -> None:
    """The split used below: values under LIMIT * 2^32 truncate within a unit, LIMIT * 2^32 is off by 2^48."""
    values = torch.tensor([0, 5 << 32, (LIMIT << 32) - 1, -(LIMIT << 40), LIMIT << 32])
    out = _split_truncation(values, 1 << 16)
    expected = values.div(1 << 16, rounding_mode="floor")
    assert (out[:4] - expected[:4]).abs().max() <= 1
    assert abs(abs(int(out[4] - expected[4])) - (1 << 48)) <= 1


def _two_quad_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttnMask]:
    generator = torch.Generator().manual_seed(12)
    q, k = (2.0 * torch.randn(1, 2, 32, 32, generator=generator) for _ in range(2))
    v = 3.0 * torch.randn(1, 2, 32, 32, generator=generator)
    mask = AttnMask(torch.arange(32), torch.arange(32), causal=False)
    return q, k, v, mask


@pytest.fixture
def split_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every simulated truncation done by both parties on the fixed split."""
    monkeypatch.setattr(simulate, "_trunc", _split_truncation)


def test_two_quad_attention_stays_below_the_wrapping_split(split_truncation: None) -> None:
    """2Quad on scores up to ~15 (``(s + c)^2`` up to ~400, its product with V in the thousands)
    matches float under the fixed split: no double-scale value reaches LIMIT."""
    q, k, v, mask = _two_quad_inputs()
    kernel = TwoQuadAttention(parse_op("attn", "2quad"))
    calibrate(kernel, lambda: kernel(q, k, v, mask))
    expected = kernel(q, k, v, mask)
    big = torch.matmul(torch.square(q @ k.transpose(-2, -1) / 32 ** 0.5 + kernel.c), v)
    assert float(big.max()) > 2 * LIMIT  # (s + c)^2 V computed as such would wrap here
    with simulation(ProtocolConfig()):
        out = kernel(*(SimTensor.new(t) for t in (q, k, v)), mask).get_plain_text()
    error = float((out - expected).abs().max())
    assert error < 1e-2, f"2Quad off by {error:.3g} under the wrapping split"


def test_quad_gelu_stays_below_the_wrapping_split(split_truncation: None) -> None:
    """Quad GeLU on |x| up to 100 (x^2 up to 10^4: above LIMIT) matches float under the fixed split."""
    x = torch.linspace(-100.0, 100.0, 401)
    with simulation(ProtocolConfig()):
        out = Quad()(SimTensor.new(x)).get_plain_text()
    error = float((out - Quad()(x)).abs().max())
    assert error < 1e-2, f"quad GeLU off by {error:.3g} under the wrapping split"
