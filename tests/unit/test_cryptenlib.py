"""The one CrypTen integration: install/uninstall put in place and take back everything privinf
changes in CrypTen, in any order and any number of times, and each party thread sees its own
choice of randomness."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from protocols.mpc.cryptenlib import crypten, install, uninstall
from protocols.mpc.cryptenlib.binding import ProviderError
from protocols.mpc.cryptenlib.communicator import ChannelCommunicator, CommunicatorError
from protocols.mpc.cryptenlib.patches import PROVIDER_NAME, SAMPLER_MODULES
from protocols.mpc.cryptenlib.randomness import (
    PartyGenerators,
    generate_kbit_random_tensor,
    generate_random_ring_element,
)
from protocols.net.channels import memory_pair

SAMPLERS = ("generate_random_ring_element", "generate_kbit_random_tensor")


def crypten_state() -> dict[str, Any]:
    """Every object of CrypTen's that privinf replaces, by identity."""
    state = {
        "generators": crypten.generators,
        "communicator": crypten.communicator.DistributedCommunicator,
        "context communicator": crypten.mpc.context.DistributedCommunicator,
        "ltz": crypten.mpc.MPCTensor._ltz,
        "setup_prng": crypten._setup_prng,
        "get_default_provider": crypten.mpc.get_default_provider,
        "cfg class": type(crypten.cfg),
        "cfg provider": crypten.cfg.mpc.provider,
        "getattribute": crypten.CrypTensor.__getattribute__,
        "class getattribute": type(crypten.CrypTensor).__getattribute__,
        **{name: crypten.mpc.MPCTensor.__dict__[name] for name in ("shallow_copy", "clone", "from_shares")},
        "autograd": crypten.CrypTensor.AUTOGRAD_ENABLED,
    }
    for module_name in SAMPLER_MODULES:
        module = importlib.import_module(module_name)
        for name in SAMPLERS:
            if hasattr(module, name):
                state[f"{module_name}.{name}"] = getattr(module, name)
    return state


def comparable(state: dict[str, Any]) -> dict[str, Any]:
    """The state with the generator table by type (each first install makes a fresh one)."""
    return {**state, "generators": type(state["generators"])}


@pytest.fixture
def other_thread() -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """Run calls one at a time in one other thread (its thread-local binding persists)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield lambda call: pool.submit(call).result(timeout=30)


def test_install_and_uninstall_twice_bring_crypten_back_each_time() -> None:
    original = crypten_state()
    a, _ = memory_pair("a", "b")
    for _ in range(2):
        install(a, 0)
        try:
            patched = crypten_state()
            assert all(patched[key] is not original[key] for key in original if key != "cfg provider")
            assert isinstance(crypten.generators, PartyGenerators)
            assert crypten.communicator.DistributedCommunicator is ChannelCommunicator
            assert crypten.mpc.get_default_provider().NAME == PROVIDER_NAME
            assert not hasattr(crypten.CrypTensor.__getattribute__, "__wrapped__")  # no validation hook
            assert crypten.CrypTensor.AUTOGRAD_ENABLED is False
        finally:
            uninstall()
        assert crypten_state() == original
        assert type(crypten.generators) is dict and set(crypten.generators) == {"prev", "next", "local", "global"}
        for where in (crypten.communicator, crypten.mpc.context):
            assert where.DistributedCommunicator.__module__ == "crypten.communicator.distributed_communicator"
        assert crypten.mpc.MPCTensor._ltz.__module__ == "crypten.mpc.mpc"
        assert crypten.common.rng.generate_random_ring_element.__module__ == "crypten.common.rng"
        assert type(crypten.cfg).__module__ == "crypten.config.config"
        assert crypten.CrypTensor.AUTOGRAD_ENABLED is True
        assert crypten.mpc.get_default_provider() is getattr(crypten.mpc, "__SUPPORTED_PROVIDERS")["TFP"]
    uninstall()  # nothing installed in this thread: no effect
    assert crypten_state() == original


def test_tensors_built_without_crypten_constructor_match_its_own() -> None:
    """from_shares, clone, shallow_copy and the static cat / stack build the same tensors with
    privinf installed, without secret-sharing an empty tensor first: no party context is bound
    here, so a draw of randomness (CrypTen's PRZS) would raise."""
    a, _ = memory_pair("a", "b")
    install(a, 0)
    try:
        share = torch.tensor([[5, -7], [1 << 40, 3]], dtype=torch.int64)
        x = crypten.mpc.MPCTensor.from_shares(share, precision=16)
        assert type(x) is crypten.mpc.MPCTensor and x.ptype == crypten.mpc.ptype.arithmetic
        assert torch.equal(x.share, share) and x.encoder.scale == 1 << 16 and not x.requires_grad
        copy = x.clone()
        copy.share[0, 0] = 9
        assert x.share[0, 0] == 5 and copy.encoder.scale == x.encoder.scale
        assert x.shallow_copy()._tensor is x._tensor
        bits = crypten.mpc.MPCTensor.from_shares(share[0], precision=0)
        assert bits.encoder.scale == 1
        assert torch.equal(crypten.mpc.MPCTensor.cat([x, copy]).share, torch.cat([x.share, copy.share]))
        assert torch.equal(crypten.mpc.MPCTensor.stack([x, x]).share, torch.stack([share, share]))
    finally:
        uninstall()


def test_nested_installs_in_either_order_leave_the_same_state(other_thread: Callable[..., Any]) -> None:
    original = crypten_state()
    ch0, ch1 = memory_pair("p0", "p1")
    privinf_party = (lambda: install(ch0, 0), uninstall)
    crypten_party = (lambda: install(ch1, 1, randomness="crypten"), uninstall)
    states = []
    for first, second in ((privinf_party, crypten_party), (crypten_party, privinf_party)):
        first[0]()  # in this thread
        other_thread(second[0])
        both = comparable(crypten_state())
        other_thread(second[1])
        assert comparable(crypten_state()) == both  # one party still installed: all still in place
        first[1]()
        assert crypten_state() == original
        states.append(both)
    assert states[0] == states[1]


def test_installing_the_same_party_again_nests(other_thread: Callable[..., Any]) -> None:
    original = crypten_state()
    a, b = memory_pair("a", "b")
    install(a, 0)
    once = crypten_state()
    install(a, 0)
    assert crypten_state() == once
    with pytest.raises(CommunicatorError, match="another party is already installed"):
        install(b, 1)
    uninstall()
    assert crypten_state() == once
    uninstall()
    assert crypten_state() == original


def test_each_thread_draws_the_randomness_it_installed(other_thread: Callable[..., Any]) -> None:
    ch0, ch1 = memory_pair("p0", "p1")
    install(ch0, 0)
    other_thread(lambda: install(ch1, 1, randomness="crypten"))
    try:
        # a privinf party: CSPRNG streams only, from its bound PartyContext
        with pytest.raises(ProviderError, match="Generator"):
            generate_random_ring_element((2,), generator=torch.Generator())
        with pytest.raises(ProviderError, match="no privinf PartyContext bound"):
            generate_kbit_random_tensor((2,), bitlength=1)
        with pytest.raises(ProviderError, match="Z_2\\^64"):
            generate_random_ring_element((2,), ring_size=2**32)
        with pytest.raises(ProviderError, match="no privinf PartyContext bound"):
            crypten.generators["prev"][torch.device("cpu")]
        with pytest.raises(ProviderError, match="tracing"):
            crypten.mpc.get_default_provider().trace()
        crypten._setup_prng()  # what crypten.init() calls: creates no torch generator here

        # a party with CrypTen's randomness: its own torch generators and CrypTen's provider
        def crypten_party() -> tuple[Any, Any, torch.Tensor]:
            generator = torch.Generator().manual_seed(7)
            crypten.generators["local"][torch.device("cpu")] = generator
            drawn = crypten.common.rng.generate_random_ring_element((3,))
            return crypten.generators["local"], crypten.mpc.get_default_provider(), drawn

        own, provider, drawn = other_thread(crypten_party)
        assert set(own) == {torch.device("cpu")} and type(own) is dict
        assert provider is getattr(crypten.mpc, "__SUPPORTED_PROVIDERS")["TFP"]
        same_seed = torch.Generator().manual_seed(7)
        expected = torch.randint(-(2**63), 2**63 - 1, (3,), generator=same_seed, dtype=torch.long)
        assert torch.equal(drawn, expected)
    finally:
        other_thread(uninstall)
        uninstall()


def test_install_refuses_bad_arguments() -> None:
    original = crypten_state()
    a, _ = memory_pair("a", "b")
    with pytest.raises(CommunicatorError, match="rank must be 0 or 1"):
        install(a, 2)
    with pytest.raises(CommunicatorError, match="needs a protocols.net.channels.Channel"):
        install(object(), 0)  # type: ignore[arg-type]
    with pytest.raises(CommunicatorError, match="randomness must be one of"):
        install(a, 0, randomness="mersenne")
    assert crypten_state() == original


@pytest.mark.parametrize("key, value", [("exp_iterations", 9), ("reciprocal_all_pos", True),
                                        ("sqrt_nr_iters", 5)])
def test_install_refuses_changed_function_settings_before_changing_anything(key: str, value: Any) -> None:
    original = crypten_state()
    a, _ = memory_pair("a", "b")
    with crypten.cfg.temp_override({f"functions.{key}": value}):
        with pytest.raises(CommunicatorError, match=rf"cfg\.functions\.{key} is {value!r}, not CrypTen's default"):
            install(a, 0)
        assert crypten_state() == original
    install(a, 0)  # the override is gone: CrypTen's shipped settings again
    uninstall()
    assert comparable(crypten_state()) == comparable(original)
