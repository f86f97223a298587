"""DPF keys with full-domain evaluation (protocols/mpc/fss_dpf.py), the dealer's dpf requests and
the one-hot vectors that take DPF keys instead of the dealer's unit vector (protocols/mpc/onehot.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from privinf.ledger.counting import Ledger
from protocols.mpc import dpf_native, fss_dpf
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.csprng import Stream, new_seed
from protocols.mpc.dealer import Dealer, compute_correction, expand_shares, receive_seed
from protocols.mpc.dealer_pool import PoolLimits
from protocols.mpc.onehot import material_bytes, one_hot, uses_dpf
from protocols.mpc.vocabulary import DealerError, TupleRequest
from protocols.net.channels import memory_pair, run_parties
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_crypten_parties
from tests.unit.test_kv_select import reveal


def _random(label: str) -> Stream:
    return Stream(b"\x07" * 16, label)


def _keys(alpha: np.ndarray, beta: np.ndarray, bits: int) -> tuple[fss_dpf.DpfKey, fss_dpf.DpfKey]:
    return fss_dpf.dpf_keys(alpha, beta, bits, _random(f"dpf/{bits}/{beta.shape}").read)


@pytest.mark.parametrize(("bits", "payload"), [(1, 1), (2, 1), (2, 2), (3, 2), (8, 1), (8, 2), (16, 1)])
def test_full_domain_outputs_sum_to_the_point_function_everywhere(bits: int, payload: int) -> None:
    n = 3 if bits == 16 else 70  # more than 64 elements: the packed control bits span two words
    rng = np.random.default_rng(bits * 10 + payload)
    alpha = rng.integers(0, 1 << bits, n, dtype=np.uint64)
    alpha[:2] = [0, (1 << bits) - 1]  # the domain's ends
    beta = rng.integers(-2**63, 2**63 - 1, (n, payload), dtype=np.int64, endpoint=True)
    k0, k1 = _keys(alpha, beta, bits)
    total = fss_dpf.full_domain(k0) + fss_dpf.full_domain(k1)
    want = np.zeros((n, 1 << bits, payload), dtype=np.int64)
    want[np.arange(n), alpha.astype(np.intp)] = beta
    assert np.array_equal(total, want)
    assert np.array_equal(fss_dpf.full_domain(k0, 1, n - 1), fss_dpf.full_domain(k0)[1:n - 1])
    assert not np.array_equal(fss_dpf.full_domain(k0), -want)  # one key alone is not the function


@pytest.mark.parametrize("bits", [1, 2, 5, 8, 12, 16])
def test_key_size_is_16_bytes_per_level_below_the_leaves_plus_the_leaf_correction(bits: int) -> None:
    n = 128
    k0, k1 = _keys(np.zeros(n, dtype=np.uint64), np.ones((n, 2), dtype=np.int64), bits)
    array = k0.to_array()
    assert array.shape == (fss_dpf.key_words(bits, n, 2),)
    shared = array.size - 2 * n
    assert 8 * shared == n * (16 * (bits - 1) + 32) + 2 * (bits - 1) * n // 8
    assert fss_dpf.key_bytes(bits, 2, with_seed=False) == 8 * shared / n
    assert np.array_equal(array[2 * n:], k1.to_array()[2 * n:])  # the correction words are common
    again = fss_dpf.DpfKey.from_array(1, bits, n, k1.to_array(), 2)
    assert np.array_equal(fss_dpf.full_domain(again), fss_dpf.full_domain(k1))
    assert "seed" not in repr(k0) and str(int(array[0])) not in repr(k0)
    with pytest.raises(fss_dpf.DpfError, match="int64 words"):
        fss_dpf.DpfKey.from_array(0, bits, n, array[:-1], 2)
    with pytest.raises(fss_dpf.DpfError, match="domain"):
        fss_dpf.key_words(0, n)


def test_lookup_gives_shares_of_table_entries_times_each_payload_word() -> None:
    bits, n = 6, 50
    rng = np.random.default_rng(5)
    rho = rng.integers(0, 1 << bits, n, dtype=np.uint64)
    beta = np.stack([np.ones(n, dtype=np.int64), rng.integers(-2**40, 2**40, n)], axis=1)
    k0, k1 = _keys(rho, beta, bits)
    tables = rng.integers(-2**20, 2**20, (3, 1 << bits))
    v = rng.integers(0, 1 << bits, n)
    v[:2] = [0, (1 << bits) - 1]
    opened = (v - rho.astype(np.int64)) & ((1 << bits) - 1)
    total = fss_dpf.lookup(k0, opened, tables) + fss_dpf.lookup(k1, opened, tables)
    assert np.array_equal(total, tables[:, v].T[:, :, None] * beta[:, None, :])
    units = fss_dpf.unit_vectors(*_keys(rho, beta[:, :1], bits)[:1], opened) \
        + fss_dpf.unit_vectors(*_keys(rho, beta[:, :1], bits)[1:], opened)
    assert np.array_equal(units, np.eye(1 << bits, dtype=np.int64)[v])


def test_dealer_dpf_request_keys_sit_at_the_shifted_mask() -> None:
    seeds = {0: new_seed(), 1: new_seed()}
    request = TupleRequest.dpf((3, 4), 8, 2, 11)
    assert TupleRequest.from_json(request.to_json()) == request
    p0, p1 = (expand_shares(seeds[r], r, 9, request) for r in (0, 1))
    words = compute_correction(seeds, 9, request)
    assert tuple(words.shape) == request.output_shape()
    material = Dealer(seeds=seeds).generate(9, request)
    assert torch.equal(material[0], words) and torch.equal(material[1], words)  # both parties, same words
    keys = [fss_dpf.DpfKey.from_parts(r, 8, 12, p["seeds"].numpy(), words.numpy(), 2) for r, p in enumerate((p0, p1))]
    mask = (p0["mask"] + p1["mask"]).reshape(-1).numpy()
    alpha = (mask.view(np.uint64) >> np.uint64(11)).astype(np.intp) & 255
    total = fss_dpf.full_domain(keys[0]) + fss_dpf.full_domain(keys[1])
    want = np.zeros_like(total)
    want[np.arange(12), alpha, 0], want[np.arange(12), alpha, 1] = 1, mask
    assert np.array_equal(total, want)
    for bad in ({"bits": 17, "payload": 1, "shift": 0}, {"bits": 4, "payload": 3, "shift": 0},
                {"bits": 4, "payload": 1}, {"bits": 4, "payload": 1, "shift": 64}):
        with pytest.raises(DealerError, match="dpf request"):
            TupleRequest.from_json({"kind": "dpf", "size0": [2], **bad})


def test_one_hot_takes_dpf_keys_where_they_are_smaller_and_their_evaluation_pays() -> None:
    assert material_bytes(4) == {"unit": 32.0, "dpf": 32.25}
    assert material_bytes(8) == {"unit": 64.0, "dpf": 48.5}
    for profile in ("lan", "wan"):
        config = ProtocolConfig(kernel_profile=profile)
        assert [uses_dpf(1 << m, config) for m in (1, 2, 3, 8, 16)] == [False, False, True, True, True]
    slow = ProtocolConfig(kernel_profile="fast:bw=100Gbps,rtt=1ms")  # bytes cheaper than the evaluation
    assert not any(uses_dpf(1 << m, slow) for m in range(1, 17))


@pytest.mark.skipif(not dpf_native.active(), reason=f"compiled DPF kernel: {dpf_native.REASON}")
@pytest.mark.parametrize(("bits", "payload"), [(1, 1), (2, 2), (8, 2), (8, 3), (16, 1)])
def test_compiled_kernel_gives_the_numpy_outputs_bit_for_bit(bits: int, payload: int) -> None:
    n = 2 if bits == 16 else 130
    rng = np.random.default_rng(bits + payload)
    alpha = rng.integers(0, 1 << bits, n, dtype=np.uint64)
    beta = rng.integers(-2**63, 2**63 - 1, (n, payload), dtype=np.int64, endpoint=True)
    tables = rng.integers(-2**63, 2**63 - 1, (3, 1 << bits), dtype=np.int64, endpoint=True)
    opened = rng.integers(0, 1 << bits, n)
    for key in _keys(alpha, beta, bits):
        native = fss_dpf.full_domain(key, 1, n), fss_dpf.lookup(key, opened, tables)
        with dpf_native.disabled():
            assert not dpf_native.active()
            assert np.array_equal(native[0], fss_dpf.full_domain(key, 1, n))
            assert np.array_equal(native[1], fss_dpf.lookup(key, opened, tables))


def test_one_hot_with_dpf_keys_is_exact_one_opening_and_smaller_material() -> None:
    values = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(4)).float()
    values[0, :2] = torch.tensor([0.0, 63.0])
    mpc = {0: Ledger("p0"), 1: Ledger("p1")}
    links = {0: Ledger("d0"), 1: Ledger("d1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        context.config = ProtocolConfig(kernel_profile="wan")
        x = crypten.cryptensor(values, src=1)
        before, received = mpc[rank].totals(), links[rank].totals().bytes_recv
        units = one_hot(x, 64, context.provider)
        after = mpc[rank].totals()
        return {"units": reveal(units), "rounds": after.rounds - before.rounds,
                "dealer": links[rank].totals().bytes_recv - received}

    (r0, r1), _ = run_crypten_parties(party, ledgers=links, mpc_ledgers=mpc)
    want = torch.nn.functional.one_hot(values.long(), 64).float()
    assert torch.equal(r0["units"], want) and torch.equal(r1["units"], want)
    assert r0["rounds"] == 1
    n = values.numel()
    key = fss_dpf.shared_words(6, n) * 8
    assert key <= r0["dealer"] < key + 1000 and key <= r1["dealer"] < key + 1000
    assert r0["dealer"] < 8 * 64 * n / 2  # the unit vector would take 8 D bytes per value


def _dpf_session(dealer: Dealer, inferences: int) -> tuple[list[Any], list[Any]]:
    """Both parties: one recorded (online) inference asking for DPF keys, then preprocessed ones."""
    links = {r: memory_pair("dealer", f"p{r}") for r in (0, 1)}
    dealer.distribute_seeds({r: links[r][0] for r in (0, 1)})
    providers = {r: cp.DealerProvider(r, receive_seed(links[r][1]), links[r][1]) for r in (0, 1)}

    def party(rank: int) -> list[Any]:
        provider = providers[rank]
        with provider.recording() as schedule:
            runs = [provider.dpf_key((5,), 6, 2, 3)]
        provider.preprocess(schedule, inferences - 1)
        runs += [provider.dpf_key((5,), 6, 2, 3) for _ in range(inferences - 1)]
        provider.close()
        return runs

    out0, out1, *_ = run_parties(lambda: party(0), lambda: party(1), lambda: dealer.serve(links[0][0], 0),
                                 lambda: dealer.serve(links[1][0], 1), timeout_s=120)
    return out0, out1


@pytest.mark.parametrize("pool", [None, PoolLimits(ahead=2, workers=2)])
def test_both_parties_fetch_dpf_keys_online_and_preprocessed(pool: PoolLimits | None) -> None:
    seeds = {0: new_seed(), 1: new_seed()}
    out0, out1 = _dpf_session(Dealer(seeds=seeds, pool=pool), inferences=3)
    for (m0, k0), (m1, k1) in zip(out0, out1):
        mask = (m0 + m1).numpy()
        alpha = (mask.view(np.uint64) >> np.uint64(3)).astype(np.intp) & 63
        total = fss_dpf.full_domain(k0) + fss_dpf.full_domain(k1)
        want = np.zeros_like(total)
        want[np.arange(5), alpha, 0], want[np.arange(5), alpha, 1] = 1, mask
        assert np.array_equal(total, want)
    plain0, _ = _dpf_session(Dealer(seeds=seeds), inferences=3)
    assert all(np.array_equal(a.to_array(), b.to_array()) for (_, a), (_, b) in zip(out0, plain0))
