"""Bit-output comparison keys (protocols/mpc/fss_bit.py): the early-terminated Z_2 DCF against the
arithmetic DCF it replaces (same predicate), numpy against the compiled kernel bit for bit, the
sign gate and its B2A on edge values for every width the layer's gates use, the key size
formula, the per-call choice (kernel_choice.comparison_keys) and the gate on CrypTen shares with
a dealer in memory.

Widths: every sign-gate width from 2 to 64 bits. The call sites at the default configuration use
21 (GeLU's truncated range tests), 21-23 (win counts of groups of 3-16), 23 (the truncated row
max), 33 (exact pairs under the row max's bound), 40 (the default, reciprocal, norms) and the
KV selection's 2 count + 1 bounds (tests/unit/test_fss_compact.py's SITES, compare_widths.bits_for);
widths up to 8 have a DCF with no tree levels at all (n - 1 <= 7).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from models import ops
from privinf.ledger.counting import Ledger
from protocols.mpc import fss, fss_bit, fss_native, kernel_choice
from protocols.mpc.compare import below_zero_times
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.dealer_pool import material_bytes
from protocols.mpc.vocabulary import TupleRequest
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_crypten_parties
from tests.unit.test_fss_compact import SITES
from tests.unit.test_fss_native import PATHS, _skip_unless, _top

RNG = np.random.default_rng(2021)
SITE_WIDTHS = {bits - shift for bits, _, _, shift in SITES.values()} | {21, 22, 23, 33, 40}
GATE_WIDTHS = list(range(2, 65))
assert SITE_WIDTHS <= set(GATE_WIDTHS)


def _uniform(n: int, bits: int) -> np.ndarray:
    return RNG.integers(0, 2 ** 64, n, dtype=np.uint64, endpoint=False) & _top(bits)


def _shares1(k: int) -> np.ndarray:
    return RNG.integers(-(2 ** 63), 2 ** 63 - 1, k, dtype=np.int64)


def _edge_points(alpha: np.ndarray, bits: int) -> np.ndarray:
    """Per key: 0, the top, alpha - 1, alpha, alpha + 1 and a random point (wrapping mod 2^bits)."""
    top = _top(bits)
    with np.errstate(over="ignore"):
        columns = [np.zeros_like(alpha), np.full_like(alpha, top), (alpha - np.uint64(1)) & top, alpha,
                   (alpha + np.uint64(1)) & top, _uniform(alpha.shape[0], bits)]
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", list(range(1, 65)))
def test_bit_keys_give_the_old_evaluators_predicate(path: str, bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """XOR of the two bit-output shares == sum of the arithmetic DCF's shares (beta = 1) at every point."""
    _skip_unless(path)
    # small calls split over threads too; odd widths in one thread (the kernel's blocks of 256 points)
    monkeypatch.setattr(fss_native, "THREAD_MIN", 128 if bits % 2 == 0 else 1 << 30)
    n = 389  # not a multiple of 64, of the kernel's lanes, nor of its blocks
    alpha = _uniform(n, bits)
    top = int(_top(bits))
    alpha[:6] = [0, 1, top, top - 1 if bits > 1 else 0, top >> 1, (top >> 1) + 1 if bits > 1 else 1]
    seeds = os.urandom(32 * n)
    with fss_native.disabled():
        reference = fss_bit._gen_into(alpha, bits, lambda _: seeds, 0)
        old = fss.dcf_gen(alpha, np.ones(n, dtype=np.int64), bits, os.urandom)
    arrays = reference if path == "numpy" else fss_bit._gen_into(alpha, bits, lambda _: seeds, 0)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, reference)), "keys differ from the numpy path's"
    keys = [fss_bit.BitDcfKey.from_array(p, bits, n, arrays[p]) for p in (0, 1)]
    points = _edge_points(alpha, bits)
    for column in range(points.shape[1]):
        x = np.ascontiguousarray(points[:, column])
        with fss_native.disabled():
            expected = [fss_bit.bit_dcf_eval(key, x) for key in keys]
        got = expected if path == "numpy" else [fss_bit.bit_dcf_eval(key, x) for key in keys]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), "shares differ from the numpy path's"
        with np.errstate(over="ignore"):
            old_result = fss.dcf_eval(old[0], x) + fss.dcf_eval(old[1], x)
        assert np.array_equal((got[0] ^ got[1]).astype(np.int64), old_result), column
        assert np.array_equal(old_result, (x < alpha).astype(np.int64))


def _fixed_mask_bytes(mask: np.ndarray) -> object:
    """random_bytes whose first call (the gate's masks) returns ``mask``, later calls fresh bytes."""
    calls = iter([mask.astype(np.uint64).tobytes()])
    return lambda k: next(calls, None) or os.urandom(k)


def _edge_values(width: int, n: int) -> np.ndarray:
    half = 2 ** (width - 1)
    x = RNG.integers(-half, half, n, dtype=np.int64) if width < 64 else _shares1(n)
    x[:8] = [0, 1, -1, -half, half - 1, -half + 1, half - 2, -(half // 2)]
    return x


@pytest.mark.parametrize("width", GATE_WIDTHS)
def test_bit_sign_gate_and_b2a_match_the_value_gate_on_edges(width: int) -> None:
    """msb of x on ``width`` bits through bit keys + B2A == the arithmetic gate's, for edge values
    and masks r near 0 and near 2^width - 1 (where x + r wraps)."""
    n = 600
    x = _edge_values(width, n)
    top = int(_top(width))
    mask = _uniform(n, width)
    mask[8:40] = np.array([0, 1, 2, top, top - 1, top - 2, top >> 1, (top >> 1) + 1] * 4, dtype=np.uint64)
    arrays = fss_bit.bit_sign_gen(n, width, _fixed_mask_bytes(mask), _shares1)
    old = fss.sign_gen(n, width, _fixed_mask_bytes(mask), _shares1)
    keys = [fss_bit.BitSignKey.from_array(p, width, n, arrays[p]) for p in (0, 1)]
    old_keys = [fss.SignKey.from_array(p, width, n, old[p]) for p in (0, 1)]
    x1 = _shares1(n)
    with np.errstate(over="ignore"):
        x0 = x - x1
        low = np.int64(top) if width < 64 else np.int64(-1)
        opened = (keys[0].masked(x0) + keys[1].masked(x1)) & low
        assert np.array_equal(opened, (old_keys[0].masked(x0) + old_keys[1].masked(x1)) & low)  # same r
        d = keys[0].xor_share(opened) ^ keys[1].xor_share(opened)
        result = keys[0].arithmetic(d) + keys[1].arithmetic(d)
        old_result = old_keys[0].evaluate(opened) + old_keys[1].evaluate(opened)
    assert np.array_equal(result, old_result)
    assert np.array_equal(result, (x < 0).astype(np.int64))
    words = -(-n // 64)  # the packed flips after the shares of r and of m
    with np.errstate(over="ignore"):
        m = arrays[0][-n - words:-words] + arrays[1][-n - words:-words]
    assert set(np.unique(m).tolist()) <= {0, 1} and np.array_equal(d, (x < 0).astype(np.uint8) ^ m.astype(np.uint8))


def test_single_threshold_offset_matches_the_value_gates_points() -> None:
    n, width = 500, 23
    arrays = fss_bit.bit_sign_gen(n, width, os.urandom, _shares1)
    keys = [fss_bit.BitSignKey.from_array(p, width, n, arrays[p]) for p in (0, 1)]
    x = _edge_values(width - 1, n)
    for c in (0, 1, -1, 15, -(2 ** (width - 3))):
        x[8:12] = [c - 1, c, c + 1, c + 2]
        x1 = _shares1(n)
        with np.errstate(over="ignore"):
            opened = (keys[0].masked(x - x1) + keys[1].masked(x1)) & ((1 << width) - 1)
            d = keys[0].xor_share(opened, c) ^ keys[1].xor_share(opened, c)
            result = keys[0].arithmetic(d) + keys[1].arithmetic(d)
        assert np.array_equal(result, (x < c).astype(np.int64)), c


def test_b2a_turns_the_opened_bit_and_the_mask_shares_into_the_bit() -> None:
    """b = d + m - 2 d m for every (d, m), whatever the arithmetic shares of m."""
    d = np.array([0, 0, 1, 1], dtype=np.uint8)
    m = np.array([0, 1, 0, 1], dtype=np.int64)
    m1 = _shares1(4)
    with np.errstate(over="ignore"):
        m_shares = (m - m1, m1)
    empty = np.zeros(0, dtype=np.uint64)
    keys = [fss_bit.BitSignKey(fss_bit.BitDcfKey(p, 8, empty, empty, empty, empty), empty.view(np.int64),
                               m_shares[p], empty.view(np.int64)) for p in (0, 1)]
    with np.errstate(over="ignore"):
        got = keys[0].arithmetic(d) + keys[1].arithmetic(d)
    assert np.array_equal(got, d.astype(np.int64) ^ m)


@pytest.mark.parametrize("width", GATE_WIDTHS)
def test_key_size_matches_the_formula(width: int) -> None:
    """Per element and party: seed 16 + 16 per level + leaf 16 + r 8 + m 8 bytes, 3 bits per level and 1."""
    n = 128
    depth = max(0, width - 1 - 7)
    arrays = fss_bit.bit_sign_gen(n, width, os.urandom, _shares1)
    expected = n * (16 + 16 * depth + 16 + 16) + n * (3 * depth + 1) // 8
    assert arrays[0].nbytes == arrays[1].nbytes == expected == fss_bit.bit_sign_key_bytes(width, n)
    assert TupleRequest.sign_bit((2, 64), width).output_shape() == (fss_bit.bit_sign_key_words(width, n),)
    assert material_bytes(TupleRequest.sign_bit((2, 64), width)) == 2 * expected  # the dealer holds both halves
    if width >= 16:  # bit keys save about 40% of the arithmetic keys' bytes
        assert expected < 0.63 * 8 * fss.sign_key_words(width, n)


def test_key_reprs_hide_key_material() -> None:
    arrays = fss_bit.bit_sign_gen(64, 21, os.urandom, _shares1)
    key = fss_bit.BitSignKey.from_array(0, 21, 64, arrays[0])
    assert repr(key) == "BitSignKey(party=0, bits=21, n=64)"
    assert repr(key.dcf) == "BitDcfKey(party=0, bits=20, n=64)"
    with pytest.raises(fss.FssError, match="take"):
        fss_bit.BitSignKey.from_array(0, 21, 65, arrays[0])


def test_signbit_requests_round_trip_the_vocabulary() -> None:
    request = TupleRequest.sign_bit((3, 5), 33)
    assert TupleRequest.from_json(request.to_json()) == request
    assert request.to_json() == {"kind": "signbit", "size0": [3, 5], "bits": 33}


def test_the_rule_takes_bit_keys_for_prefill_sizes_and_value_keys_for_decode_sizes() -> None:
    lan, wan = ProtocolConfig(), ProtocolConfig(kernel_profile="wan")
    prefill, decode = 128 * 3072, 16  # a BERT-base GeLU input, a decode step's row of a few entries
    assert kernel_choice.comparison_keys(prefill, 40, 1, lan) == "bit"
    assert kernel_choice.comparison_keys(decode, 40, 1, lan) == "value"
    assert kernel_choice.comparison_keys(decode, 40, 1, wan) == "value"
    assert kernel_choice.comparison_keys(prefill, 21, 2, lan) == "value"  # several thresholds: one value key
    assert kernel_choice.comparison_keys(decode, 40, 1, ProtocolConfig(comparison_keys="bit")) == "bit"
    assert kernel_choice.comparison_keys(prefill, 40, 1, ProtocolConfig(comparison_keys="value")) == "value"
    assert kernel_choice.comparison_keys(6144, 23, 1, lan) == "value"  # a decode step's first max level
    costs = kernel_choice.comparison_key_costs(64, 40)  # 64 elements: 985.75 vs 572.125 key bytes each
    weight = kernel_choice.DEALER_BYTE_WEIGHT
    assert costs == {"value": (1, 64 * 5 + round(weight * 63_088)), "bit": (2, 64 * 5 + 8 + round(weight * 36_616))}


# ----- on CrypTen shares with the dealer ----------------------------------------------------------
def _compare(rank: int, context: object, ledger: Ledger, x: torch.Tensor) -> dict[str, object]:
    shared = crypten.cryptensor(x, src=0)
    before = ledger.totals()
    with context.provider.recording() as schedule:  # type: ignore[attr-defined]
        bits = shared < 0.25
    after = ledger.totals()
    return {"bits": bits.get_plain_text(), "rounds": after.rounds - before.rounds,
            "bytes": after.bytes_sent - before.bytes_sent, "kinds": [(r.kind, r.bits) for r in schedule.requests]}


@pytest.mark.parametrize("n", [8000, 40])
def test_gate_on_crypten_shares_takes_the_cheaper_keys(n: int) -> None:
    """8,000 elements: bit keys, two rounds, 5 bytes + 1 bit per element; 40: value keys, one round."""
    x = torch.linspace(-5, 5, n)
    x[:6] = torch.tensor([0.25, 0.25 - 2 ** -16, 0.25 + 2 ** -16, 0.0, -128.0, 127.0])
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}
    (r0, r1), _ = run_crypten_parties(lambda rank, ctx: _compare(rank, ctx, ledger[rank], x), mpc_ledgers=ledger)
    assert torch.equal(r0["bits"], (x < 0.25).float()) and torch.equal(r1["bits"], r0["bits"])
    bit = n >= 8000
    assert r0["kinds"] == [("signbit" if bit else "sign", 40)]
    assert r0["rounds"] == (2 if bit else 1)
    opened = 5 * n + (8 * -(-n // 64) if bit else 0)
    assert opened <= r0["bytes"] < opened + 400  # the packed openings + frame headers
    extra = {k: v for row in ledger[0].rows() for k, v in row.counters.extra.items()}
    assert extra.get(f"fss_{'bitkeys' if bit else 'keys'}_40b_shift0") == n


def _select(rank: int, context: object, ledger: Ledger, x: torch.Tensor, values: torch.Tensor,
            keys: str) -> dict[str, object]:
    context.config = ProtocolConfig(comparison_keys=keys)  # type: ignore[attr-defined]
    shared, payload = crypten.cryptensor(x, src=0), crypten.cryptensor(values, src=0)
    before = ledger.totals()
    with context.provider.recording() as schedule, ops.compare_bound(256.0):  # type: ignore[attr-defined]
        bit, product = below_zero_times(shared, payload)
    after = ledger.totals()
    return {"bit": bit.share.clone(), "product": product.share.clone(), "scale": product.encoder.scale,
            "rounds": after.rounds - before.rounds, "kinds": [r.kind for r in schedule.requests]}


@pytest.mark.parametrize("keys", ["auto", "value"])
def test_a_product_with_the_comparison_bit_rides_on_its_rounds(keys: str) -> None:
    """compare.below_zero_times: ``[x < 0]`` and ``[x < 0] * values`` ([*S, c]) exactly (shares summed
    in the ring: the bit at scale 1, the product at the values' scale, no truncation), on bit keys
    with the product's openings in the comparison's two rounds; with value keys forced the
    comparison, then the product (two rounds as well)."""
    x = torch.linspace(-5, 5, 60).reshape(3, 20)
    x[0, :4] = torch.tensor([0.0, -2 ** -16, 2 ** -16, -200.0])
    values = torch.randn(3, 20, 2, generator=torch.Generator().manual_seed(5)) * 7
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}
    (r0, r1), _ = run_crypten_parties(lambda rank, ctx: _select(rank, ctx, ledger[rank], x, values, keys),
                                      mpc_ledgers=ledger)
    bit = (x < 0).long()
    assert torch.equal(r0["bit"] + r1["bit"], bit)
    encoded = (values * r0["scale"]).long()  # what crypten.cryptensor shares
    assert torch.equal(r0["product"] + r1["product"], encoded * bit.unsqueeze(-1))
    assert r0["rounds"] == 2
    assert r0["kinds"] == (["signbit", "additive"] if keys == "auto" else ["sign", "additive"])
