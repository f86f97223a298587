"""FSS comparisons: the DCF and sign gate in numpy, and CrypTen's comparisons routed through them.

The CrypTen part runs two party threads over memory channels with the dealer serving both
(``run_crypten_parties`` from the dealer tests): every comparison CrypTen makes (``<``, ``relu``,
``max``, ``sigmoid``'s sign) must give the same bits as plaintext, and each costs one opening.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from models import ops
from privinf.ledger.counting import Ledger
from protocols.mpc import fss
from protocols.mpc.compare import ComparisonError, check_comparisons
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.numerics import share_kernels
from protocols.mpc.vocabulary import DealerError, TupleRequest
from protocols.routes.local_run import run_crypten_parties

RNG = np.random.default_rng(7)
WORDS = 2 ** 64


def _uniform(n: int, bits: int) -> np.ndarray:
    values = RNG.integers(0, 2 ** 63, n, dtype=np.uint64) * np.uint64(2) + RNG.integers(0, 2, n, dtype=np.uint64)
    return values if bits == 64 else values & np.uint64((1 << bits) - 1)


@pytest.mark.parametrize("bits", [1, 3, 17, 40, 63, 64])
def test_dcf_shares_sum_to_beta_below_alpha(bits: int) -> None:
    n = 600
    alpha = _uniform(n, bits)
    alpha[:3] = [0, 1, (1 << bits) - 1 if bits < 64 else WORDS - 1]
    beta = RNG.integers(-(2 ** 40), 2 ** 40, n).astype(np.int64)
    k0, k1 = fss.dcf_gen(alpha, beta, bits, os.urandom)
    k0 = fss.DcfKey.from_array(0, bits, n, k0.to_array())  # through the wire format
    k1 = fss.DcfKey.from_array(1, bits, n, k1.to_array())
    top = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(WORDS - 1)
    for x in (alpha, (alpha - np.uint64(1)) & top, (alpha + np.uint64(1)) & top, _uniform(n, bits)):
        with np.errstate(over="ignore"):
            total = fss.dcf_eval(k0, x) + fss.dcf_eval(k1, x)
        assert np.array_equal(total, np.where(x < alpha, beta, 0))


def test_dcf_key_alone_looks_unrelated_to_alpha() -> None:
    # one party's evaluations on all inputs of a 4-bit domain are not the function's values
    alpha = np.full(16, 9, dtype=np.uint64)
    k0, _ = fss.dcf_gen(alpha, np.ones(16, dtype=np.int64), 4, os.urandom)
    alone = fss.dcf_eval(k0, np.arange(16, dtype=np.uint64))
    assert not np.array_equal(alone, (np.arange(16) < 9).astype(np.int64))
    assert len(set(alone.tolist())) > 8


@pytest.mark.parametrize("bits", [2, 16, 40, 64])
def test_sign_gate_gives_shares_of_x_below_zero(bits: int) -> None:
    n = 3000
    shares1 = lambda k: RNG.integers(-(2 ** 63), 2 ** 63 - 1, k, dtype=np.int64)  # noqa: E731
    a0, a1 = fss.sign_gen(n, bits, os.urandom, shares1)
    assert a0.shape == a1.shape == (fss.sign_key_words(bits, n),)
    g0, g1 = fss.SignKey.from_array(0, bits, n, a0), fss.SignKey.from_array(1, bits, n, a1)
    limit = 2 ** (bits - 1)
    x = RNG.integers(-limit, limit - 1, n, dtype=np.int64, endpoint=True) if bits < 64 else \
        RNG.integers(-(2 ** 63), 2 ** 63 - 1, n, dtype=np.int64)
    x[:4] = [0, -1, limit - 1, -limit]
    x1 = shares1(n)
    with np.errstate(over="ignore"):
        x0 = x - x1
        opened = g0.masked(x0) + g1.masked(x1)
        bit = g0.evaluate(opened) + g1.evaluate(opened)
    assert np.array_equal(bit, (x < 0).astype(np.int64))


def test_bad_widths_and_key_shapes_are_refused() -> None:
    with pytest.raises(fss.FssError, match="1..64 bits"):
        fss.dcf_gen(np.zeros(2, np.uint64), np.ones(2, np.int64), 65, os.urandom)
    with pytest.raises(fss.FssError, match="does not fit in 3 bits"):
        fss.dcf_gen(np.array([9], np.uint64), np.ones(1, np.int64), 3, os.urandom)
    with pytest.raises(fss.FssError, match="2..64 bits"):
        fss.sign_gen(4, 1, os.urandom, lambda k: np.zeros(k, np.int64))
    with pytest.raises(fss.FssError, match="3 40-bit sign keys take"):
        fss.SignKey.from_array(0, 40, 3, np.zeros(15, np.int64))
    with pytest.raises(DealerError, match="sign request takes only bits"):
        TupleRequest.sign((4,), 80)
    assert TupleRequest.from_json(TupleRequest.sign((2, 3), 40).to_json()) == TupleRequest.sign((2, 3), 40)
    assert TupleRequest.sign((2, 3), 40).output_shape() == (fss.sign_key_words(40, 6),)
    with pytest.raises(ComparisonError, match="unknown comparison method 'magic'"):
        check_comparisons("magic")
    assert "alpha" not in repr(fss.dcf_gen(np.zeros(1, np.uint64), np.ones(1, np.int64), 8, os.urandom)[0])


X = torch.tensor([[3.5, -1.25, 0.0, 7.0, -0.001, 2.0], [-300.0, 150.5, 1e-3, -2.0, 0.5, 42.0]])


def _comparisons(rank: int, context: cp.PartyContext) -> dict[str, torch.Tensor]:
    x = crypten.cryptensor(X, src=0)
    return {
        "lt": (x < 0.5).get_plain_text(),
        "relu": x.relu().get_plain_text(),
        "max": x.max(dim=1)[0].get_plain_text(),
        "argmax": x.argmax(dim=1).get_plain_text(),
        "sigmoid": (x * 0.1).sigmoid().get_plain_text(),
    }


def _run(comparisons: str) -> tuple[dict[str, torch.Tensor], Ledger]:
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, torch.Tensor]:
        context.config = dataclasses.replace(context.config, comparisons=check_comparisons(comparisons))
        return _comparisons(rank, context)

    (out0, out1), _ = run_crypten_parties(party, mpc_ledgers=ledger)
    for key in out0:
        assert torch.equal(out0[key], out1[key])
    return out0, ledger[0]


def test_crypten_comparisons_through_fss_match_plaintext_and_the_circuit() -> None:
    fss_out, fss_ledger = _run("fss")
    circuit_out, circuit_ledger = _run("circuit")
    assert torch.equal(fss_out["lt"], (X < 0.5).float())
    assert torch.allclose(fss_out["relu"], X.relu(), atol=1e-4)
    assert torch.allclose(fss_out["max"], X.max(dim=1)[0], atol=1e-4)
    assert torch.equal(fss_out["argmax"], torch.nn.functional.one_hot(X.argmax(dim=1), 6).float())
    assert torch.allclose(fss_out["sigmoid"], torch.sigmoid(X * 0.1), atol=1e-2)
    for key in ("lt", "argmax"):
        assert torch.equal(fss_out[key], circuit_out[key]), key
    for key in ("relu", "max", "sigmoid"):  # equal up to fixed-point truncation noise
        assert torch.allclose(fss_out[key], circuit_out[key], atol=3e-3), key
    fss_totals, circuit_totals = fss_ledger.totals(), circuit_ledger.totals()
    assert fss_totals.bytes_sent < circuit_totals.bytes_sent / 2
    assert fss_totals.rounds < circuit_totals.rounds / 2


def test_one_fss_comparison_is_one_round_of_its_width_in_bytes_per_element() -> None:
    """40-bit comparisons open 5 bytes per element, 32-bit ones (``compare_bound``) 4 (value keys:
    below ~700 elements bit-output keys cost more whole, kernel_choice.comparison_keys)."""
    n = 500
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        x = crypten.cryptensor(torch.linspace(-5, 5, n), src=0)
        out: dict[str, object] = {}
        for name, limit in (("wide", None), ("narrow", 2.0**14)):
            before = ledger[rank].totals()
            if limit is None:
                bits = x < 0.25
            else:
                with ops.compare_bound(limit):
                    bits = x < 0.25
            after = ledger[rank].totals()
            out[name] = {"bytes": after.bytes_sent - before.bytes_sent, "rounds": after.rounds - before.rounds,
                         "bits": bits.get_plain_text()}
        return out

    (r0, _), _ = run_crypten_parties(party, mpc_ledgers=ledger)
    for name, width in (("wide", 5), ("narrow", 4)):
        assert r0[name]["rounds"] == 1
        assert width * n <= r0[name]["bytes"] < width * n + 200, name  # the packed values + one frame header
        assert torch.equal(r0[name]["bits"], (torch.linspace(-5, 5, n) < 0.25).float())


def test_argmax_last_tournament_on_shares_matches_torch_including_ties() -> None:
    x = torch.tensor([[0.5, 3.0, -1.0, 3.0, 2.0, 0.0, 2.5], [-4.0, -3.5, -9.0, -3.5, -8.0, -3.6, -7.0]])
    values, index = ops.argmax_last(x)
    assert torch.equal(index, torch.tensor([1.0, 1.0])) and torch.equal(values, torch.tensor([3.0, -3.5]))

    def party(rank: int, context: cp.PartyContext) -> tuple[torch.Tensor, torch.Tensor]:
        with share_kernels():
            m, i = ops.argmax_last(crypten.cryptensor(x, src=0))
        return m.get_plain_text(), i.get_plain_text()

    (got, _), _ = run_crypten_parties(party)
    assert torch.allclose(got[0], values, atol=1e-3)
    assert torch.equal(got[1], torch.tensor([1.0, 1.0]))  # ties keep the earlier entry, as torch


def test_masked_values_are_reduced_to_the_gate_width_before_opening() -> None:
    # the full 64-bit sum x + r would reveal whether x + r wrapped, i.e. information on x
    bits, n = 12, 4000
    a0, a1 = fss.sign_gen(n, bits, os.urandom, lambda k: RNG.integers(-(2 ** 63), 2 ** 63 - 1, k, dtype=np.int64))
    g0, g1 = fss.SignKey.from_array(0, bits, n, a0), fss.SignKey.from_array(1, bits, n, a1)
    x = np.full(n, -3, dtype=np.int64)
    x1 = RNG.integers(-(2 ** 63), 2 ** 63 - 1, n, dtype=np.int64)
    with np.errstate(over="ignore"):
        m0, m1 = g0.masked(x - x1), g1.masked(x1)
    assert m0.min() >= 0 and m1.min() >= 0 and max(m0.max(), m1.max()) < 2 ** bits
    with np.errstate(over="ignore"):
        opened = m0 + m1
        assert np.array_equal(g0.evaluate(opened) + g1.evaluate(opened), np.ones(n, dtype=np.int64))


def test_compare_bound_narrows_the_gate_and_stays_exact_within_it() -> None:
    from protocols.mpc.compare import bits_for

    assert bits_for(None, 40, 16) == 40 and bits_for(2.0 ** 14, 40, 16) == 32 and bits_for(2.0 ** 40, 40, 16) == 40
    assert bits_for(2.0 ** 14, 40, 12) == 28
    values = torch.tensor([-16000.0, -3.5, -1e-3, 0.0, 2e-3, 9000.0, 16383.0])

    def party(rank: int, context: cp.PartyContext) -> tuple[list[int], torch.Tensor]:
        x = crypten.cryptensor(values, src=0)
        with context.provider.recording() as schedule, ops.compare_bound(2.0 ** 14):
            bits = (x < 0).get_plain_text()
        return [r.bits for r in schedule.requests if r.kind == "sign"], bits

    ((widths, bits), _), _ = run_crypten_parties(party)
    assert widths == [32]
    assert torch.equal(bits, (values < 0).float())
    with pytest.raises(ValueError, match="positive limit"):
        with ops.compare_bound(0):
            pass


def test_chunked_generation_and_evaluation_cover_every_element(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fss, "GEN_CHUNK", 128)
    monkeypatch.setattr(fss, "EVAL_CHUNK", 192)
    n, bits = 1000, 24  # chunks end inside a 64-element block of packed control bits
    alpha = _uniform(n, bits)
    beta = RNG.integers(-(2 ** 30), 2 ** 30, n).astype(np.int64)
    k0, k1 = fss.dcf_gen(alpha, beta, bits, os.urandom)
    x = _uniform(n, bits)
    x[::3] = alpha[::3]
    with np.errstate(over="ignore"):
        total = fss.dcf_eval(k0, x) + fss.dcf_eval(k1, x)
    assert np.array_equal(total, np.where(x < alpha, beta, 0))
