"""Simulated MPC (protocols.mpc.simulate, protocols.routes.simulate) against the real two-party run.

The real run's 2-party truncation adds about +-1 ulp (2^-16) of random noise per truncation,
which the layers amplify; the simulation computes the expectation. Measured differences between
the two on these models (4 runs each): spam-encoder exact 26-55 ulps, he 11-16, tiny MiniLM 3-5;
between two real runs (different dealer seeds) the same order. The tolerance, 2^-8 (256 ulps),
leaves room for that noise while catching a biased truncation (1,000+ ulps on the trained
spam-encoder), a wrong encoding, approximation or comparison width (far more)."""

from __future__ import annotations

import pytest
import torch

from models import ops
from models.bundle import ModelBundle, seeded
from models.hf_import import from_hf
from models.layers import calibrate
from models.registry import model_names, register_model
from models.training import load_trained
from models.variants import VariantSpec
from protocols.mpc import compare
from protocols.mpc.simulate import SimTensor, SimulationError, simulation
from protocols.protocol_config import ProtocolConfig
from protocols.routes import simulate as route

TOLERANCE = 2.0 ** -8
SPAM = "sim-test-spam-encoder"
TINY = "sim-test-tiny-minilm"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[torch.Tensor]]:
    """A briefly trained spam-encoder (its real architecture, 40 steps) and a random tiny MiniLM-shaped
    encoder, registered for the in-process MPC run; their sample inputs."""
    cache = tmp_path_factory.mktemp("sim-cache")
    if SPAM not in model_names():
        register_model(SPAM, lambda variant: _spam(variant, cache))
        register_model(TINY, _tiny_minilm)
    spam_inputs = route.test_examples("spam-encoder").inputs[:3]
    tiny_inputs = [seeded(5 + i, lambda n=n: torch.randint(0, 96, (1, n))) for i, n in enumerate((7, 12))]
    return {SPAM: spam_inputs, TINY: tiny_inputs}


def _spam(variant: VariantSpec, cache: object) -> ModelBundle:
    model, _ = load_trained("spam-encoder", variant, steps=40, cache_dir=cache, progress=False)
    return ModelBundle(SPAM, model.config, model, "ids", lambda x: x, lambda y: y, variant)


def _tiny_minilm(variant: VariantSpec) -> ModelBundle:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_act="gelu")
    model = from_hf(seeded(0, lambda: BertModel(config)), variant)
    calib = seeded(1, lambda: torch.randint(0, 96, (4, 16)))
    calibrate(model, lambda: model(calib))
    return ModelBundle(TINY, model.config, model, "ids", lambda x: x, lambda y: y, variant)


@pytest.mark.parametrize(("name", "variant"), [(SPAM, "exact"), (SPAM, "he"), (TINY, "exact"),
                                               (TINY, "attn=relu,act=quad"), (SPAM, "norm=affine")])
def test_simulation_equals_the_two_party_run(models, name, variant):
    inputs = models[name]
    real = route.mpc_outputs(name, variant, inputs)
    from models.registry import load_model

    simulated = route.simulate_outputs(load_model(name, variant), inputs)
    assert real.shape == simulated.shape
    assert float((real - simulated).abs().max()) < TOLERANCE
    if real.shape[-1] > 1 and name == SPAM:
        assert torch.equal(real.argmax(-1), simulated.argmax(-1))


def test_polynomial_variant_is_close_to_float(models):
    from models.registry import load_model

    bundle = load_model(SPAM, "attn=scale,act=quad,norm=affine")  # no approximation: only fixed point
    inputs = route.test_examples("spam-encoder").inputs[:64]
    simulated = route.simulate_outputs(bundle, inputs)
    plain = route.plain_outputs(bundle, inputs)
    assert float((simulated - plain).abs().max()) < 2e-3
    assert float((simulated - plain).abs().max()) > 0  # fixed point is not float


def test_comparisons_wrap_at_the_session_width():
    """The FSS gate reads x mod 2^bits: 2^23 at 16 fractional bits sets bit 39 and compares as
    negative on 40 bits, correctly on CrypTen's 64-bit circuit; a bound narrows the ring."""
    value = torch.tensor([2.0 ** 23, -1.0, 3.0])
    with simulation(ProtocolConfig(comparison_bits=40)):
        assert (SimTensor.new(value) < 0).share.tolist() == [1, 1, 0]
        with ops.compare_bound(2.0 ** 10):  # 10 + 16 + 2 = 28 bits: 2^11 sets bit 27
            assert (SimTensor.new(torch.tensor([2.0 ** 10, 2.0 ** 11])) < 0).share.tolist() == [0, 1]
        with ops.compare_bound(2.0 ** 10, 2.0 ** -5):  # may err only within 1/32 above a threshold
            x = SimTensor.new(torch.tensor([-1.0, 0.5 - 2.0 ** -16, 0.5 + 2.0 ** -5, 3.0]))
            assert compare.below(x, [0.5, 2.0]).share.tolist() == [[1, 1], [1, 1], [0, 1], [0, 0]]
    with simulation(ProtocolConfig(comparisons="circuit")):
        assert (SimTensor.new(value) < 0).share.tolist() == [0, 1, 0]


def test_fixed_point_semantics_follow_crypten():
    with simulation(ProtocolConfig(fixed_point_bits=12)):
        x = SimTensor.new(torch.tensor([1.5, -0.7]))
        assert x.encoder.scale == 4096 and x.share.tolist() == [6144, -2867]  # encoding truncates
        assert (x * 2).share.tolist() == [12288, -5734]                       # an int: no truncation
        assert (x * x).share.tolist() == [9216, 2007]                        # rounded truncation
        bit = x > 0
        assert bit.encoder.scale == 1 and (x * bit).share.tolist() == [6144, 0]
    with pytest.raises(SimulationError):
        _ = SimTensor.new(torch.tensor([1.0])) < 0  # comparisons need a session's configuration


def test_the_norm_takes_the_parties_form_for_the_simulations_config():
    """A norm's secret gain: fused then multiplied where rounds are free, folded into the squares'
    product where bytes are; the simulation computes exactly that form's truncated products."""
    from models.layers import LayerNorm
    from protocols.mpc import numerics

    norm = LayerNorm(32, 1e-5)
    x_plain = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(16)) * 3
    gain = torch.linspace(0.5, 1.5, 32)
    outputs = {}
    for name, profile in (("fused", "free-rounds:bw=1Gbps,rtt=0s"), ("folded", "slow-rounds:bw=1Tbps,rtt=1s")):
        with simulation(ProtocolConfig(kernel_profile=profile)):
            x, weight = SimTensor.new(x_plain), SimTensor.new(gain)
            got = numerics.scaled_rows(x, norm._inv_from_squares, weight).share
            if name == "fused":
                want = (x * norm._inv_from_squares(x.square()) * weight).share
            else:
                both = ops.cat([x, x], dim=-1) * ops.cat([x, weight.expand(x.shape)], dim=-1)
                want = norm._inv_from_squares(both[..., :32], both[..., 32:]).share
        assert torch.equal(got, want), name
        outputs[name] = got
    assert not torch.equal(outputs["fused"], outputs["folded"])  # the forms round differently


def test_simulation_equals_the_two_party_run_with_fused_norms_and_binary_tournaments(models):
    config = ProtocolConfig(kernel_profile="free-rounds:bw=1Gbps,rtt=0s")  # bytes decide every shape
    from models.registry import load_model

    real = route.mpc_outputs(TINY, "exact", models[TINY], config)
    simulated = route.simulate_outputs(load_model(TINY, "exact"), models[TINY], config)
    assert float((real - simulated).abs().max()) < TOLERANCE
