"""The dealer's background pool: back-pressure, the byte bound, named errors, threads joined at
the end, and the same material as the dealer without a pool (in memory, no CrypTen)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.csprng import new_seed
from protocols.mpc.dealer import Dealer, compute_correction, receive_seed
from protocols.mpc.dealer_pool import MaterialPool, PoolClosed, PoolLimits, material_bytes
from protocols.mpc.fss import SignKey
from protocols.mpc.vocabulary import TAG_CORR, TAG_MSG, DealerError, RequestSchedule, TupleRequest
from protocols.net.channels import Channel, PeerAborted, PeerLost, memory_pair, run_parties

torch.set_num_threads(1)
SQUARE = TupleRequest("square", (4, 4))  # 128 bytes of correction
SCHEDULE = RequestSchedule([SQUARE, TupleRequest.additive((2, 3), (3, 2), "matmul"), TupleRequest.sign((6,), 16)])


class GatedGenerator:
    """Corrections of squares (``index`` filled in), each index waiting for its gate if it has one."""

    def __init__(self) -> None:
        self.gates: dict[int, threading.Event] = {}
        self.started: dict[int, threading.Event] = {}
        self.pool: MaterialPool | None = None
        self.held: list[int] = []  # the pool's held bytes at each generation (itself included)

    def gate(self, index: int) -> threading.Event:
        self.started[index] = threading.Event()
        self.gates[index] = threading.Event()
        return self.gates[index]

    def __call__(self, index: int, request: TupleRequest) -> dict[int, torch.Tensor]:
        if self.pool is not None:
            self.held.append(self.pool.held_bytes)
        if index in self.gates:
            self.started[index].set()
            assert self.gates[index].wait(30)
        return {0: torch.full(request.output_shape(), index, dtype=torch.int64)}


def _pool(limits: PoolLimits) -> tuple[MaterialPool, GatedGenerator]:
    generator = GatedGenerator()
    pool = MaterialPool(generator, limits)
    generator.pool = pool
    return pool, generator


def test_a_party_that_runs_ahead_waits_bounded_then_gets_its_own_material() -> None:
    pool, generator = _pool(PoolLimits(ahead=4, wait_s=30, workers=2))
    gate = generator.gate(2)
    try:
        pool.confirm(0, 0, RequestSchedule([SQUARE]), 4)
        assert int(pool.take(0, 0, SQUARE)[0, 0]) == 0
        assert generator.started[2].wait(30)
        with pytest.raises(DealerError, match="not ready within 0.2 s"):
            pool.take(0, 2, SQUARE, wait_s=0.2)  # its generation is held back: the party waits, then hears why
        got: list[torch.Tensor] = []
        taker = threading.Thread(target=lambda: got.extend([pool.take(0, 1, SQUARE), pool.take(0, 2, SQUARE)]))
        taker.start()
        gate.set()
        taker.join(30)
        assert [int(t[0, 0]) for t in got] == [1, 2] and torch.equal(got[1], torch.full((4, 4), 2))
        assert int(pool.take(0, 3, SQUARE)[0, 0]) == 3
        with pytest.raises(DealerError, match="asked twice|did not ask"):
            pool.take(0, 3, SQUARE)
    finally:
        gate.set()
        pool.close()


def test_the_store_bound_holds_and_an_oversized_request_is_made_alone() -> None:
    one = material_bytes(SQUARE)
    pool, generator = _pool(PoolLimits(ahead=10, max_bytes=3 * one, workers=2))
    try:
        pool.confirm(0, 0, RequestSchedule([SQUARE]), 10)
        for index in range(10):
            assert int(pool.take(0, index, SQUARE)[0, 0]) == index
        assert generator.held and max(generator.held) <= 3 * one and pool.peak_bytes <= 3 * one
    finally:
        pool.close()
    big = TupleRequest("square", (64, 64))
    pool, generator = _pool(PoolLimits(ahead=2, max_bytes=one))
    try:
        pool.confirm(0, 0, RequestSchedule([big]), 2)
        assert pool.take(0, 0, big).shape == (64, 64) and pool.take(0, 1, big).shape == (64, 64)
        assert max(generator.held) == material_bytes(big)  # alone: nothing else was held beside it
    finally:
        pool.close()


def test_requests_outside_the_schedule_beyond_the_bound_or_after_the_end_are_named_errors() -> None:
    pool, _ = _pool(PoolLimits(ahead=2))
    schedule = RequestSchedule([SQUARE])
    with pytest.raises(DealerError, match="3 inferences at once, more than the session's preprocess = 2"):
        pool.confirm(0, 0, schedule, 3)
    pool.confirm(0, 0, schedule, 2)
    with pytest.raises(DealerError, match="in the schedule"):
        pool.take(0, 0, TupleRequest("square", (5,)))
    with pytest.raises(DealerError, match="did not ask to preprocess"):
        pool.take(0, 7, SQUARE)
    with pytest.raises(DealerError, match="the parties disagree"):
        pool.confirm(1, 0, RequestSchedule([TupleRequest.sign((3,), 8)]), 1)
    pool.close("the session ended")
    with pytest.raises(PoolClosed, match="closed: the session ended"):
        pool.take(0, 1, SQUARE)
    with pytest.raises(PoolClosed):
        pool.confirm(0, 2, schedule, 1)
    assert pool.alive_threads == 0 and pool.held_bytes == 0


def test_close_wakes_a_waiting_party_and_joins_the_workers() -> None:
    pool, generator = _pool(PoolLimits(ahead=1, workers=2))
    gate = generator.gate(0)
    pool.confirm(0, 0, RequestSchedule([SQUARE]), 1)
    assert generator.started[0].wait(30)
    errors: list[BaseException] = []

    def take() -> None:
        try:
            pool.take(0, 0, SQUARE)
        except DealerError as exc:
            errors.append(exc)

    taker = threading.Thread(target=take)
    taker.start()
    pool.close("rank 1's dealer link failed", join_s=0)
    taker.join(30)
    assert not taker.is_alive() and isinstance(errors[0], PoolClosed) and "link failed" in str(errors[0])
    gate.set()  # the worker finishes the request it was making, then stops
    pool.close()
    assert pool.alive_threads == 0 and pool.held_bytes == 0


def test_speculation_follows_the_confirmed_history_and_is_dropped_when_wrong() -> None:
    pool, _ = _pool(PoolLimits(ahead=2))
    a, b = RequestSchedule([SQUARE]), RequestSchedule([SQUARE, SQUARE])
    try:
        pool.confirm(0, 0, a, 1)
        assert pool.stats()["speculative"] == 0  # no evidence yet: nothing made in vain
        pool.confirm(0, 1, b, 1)
        pool.confirm(0, 3, a, 1)
        assert pool.predict(3) == [b.digest(), a.digest(), b.digest()]
        assert pool.stats()["speculative"] == 3  # b then a after index 4
        pool.online(5, 0)  # the parties record something new there: speculation from 5 on is gone
        assert pool.stats()["speculative"] == 1
        pool.confirm(0, 4, b, 1)
        assert [int(pool.take(0, i, SQUARE)[0, 0]) for i in range(6)] == list(range(6))
    finally:
        pool.close()


def _pair(dealer: Dealer) -> tuple[dict[int, cp.DealerProvider], dict[int, Any]]:
    links = {r: memory_pair("dealer", f"p{r}") for r in (0, 1)}
    dealer.distribute_seeds({r: links[r][0] for r in (0, 1)})
    providers = {r: cp.DealerProvider(r, receive_seed(links[r][1]), links[r][1]) for r in (0, 1)}
    return providers, {r: links[r][0] for r in (0, 1)}


def _inference(provider: cp.DealerProvider) -> list[Any]:
    return [provider.square((4, 4)), provider.generate_additive_triple((2, 3), (3, 2), "matmul"),
            provider.sign_key((6,), 16)]


def _party_runs(provider: cp.DealerProvider, inferences: int, ahead: int) -> list[list[Any]]:
    """One party: one recorded (online) inference, then preprocessed ones as MpcParty asks."""
    with provider.recording() as schedule:
        runs = [_inference(provider)]
    for done in range(1, inferences):
        if provider.stored == 0:
            provider.preprocess(schedule, max(1, ahead - done))
        runs.append(_inference(provider))
    provider.close()
    return runs


def _session(dealer: Dealer, inferences: int, ahead: int) -> tuple[list[list[Any]], list[list[Any]]]:
    """Both parties at once (:func:`_party_runs`), each with its dealer loop."""
    providers, ends = _pair(dealer)
    out0, out1, *_ = run_parties(lambda: _party_runs(providers[0], inferences, ahead),
                                 lambda: _party_runs(providers[1], inferences, ahead),
                                 lambda: dealer.serve(ends[0], 0), lambda: dealer.serve(ends[1], 1), timeout_s=120)
    return out0, out1


def _check_run(run0: list[Any], run1: list[Any]) -> None:
    (r0, rr0), (a0, b0, c0), key0 = run0
    (r1, rr1), (a1, b1, c1), key1 = run1
    r = r0.share + r1.share
    assert torch.equal(rr0.share + rr1.share, r * r)
    assert torch.equal(c0.share + c1.share, (a0.share + a1.share) @ (b0.share + b1.share))
    x = np.array([-3, -1, 0, 1, 2, -32768 + 1], dtype=np.int64)
    x1 = np.arange(6, dtype=np.int64) * 977
    opened = key0.masked(x - x1) + key1.masked(x1)
    assert isinstance(key0, SignKey) and np.array_equal(key0.evaluate(opened) + key1.evaluate(opened), (x < 0) * 1)


def test_pooled_sessions_give_valid_material_equal_to_the_plain_dealer_and_end_cleanly() -> None:
    seeds = {0: new_seed(), 1: new_seed()}
    pooled = Dealer(seeds=seeds, pool=PoolLimits(ahead=3, workers=2))
    out0, out1 = _session(pooled, inferences=6, ahead=3)
    for run0, run1 in zip(out0, out1):
        _check_run(run0, run1)
    pool = pooled.pool
    assert pool is not None and pool.alive_threads == 0 and pool.held_bytes == 0
    stats = pool.stats()
    assert stats["generated"] >= 5 * len(SCHEDULE)  # every preprocessed inference came from the pool
    assert stats["predicted"] == 3 * len(SCHEDULE)  # inferences 4 to 6 were planned before the parties asked
    plain0, _ = _session(Dealer(seeds=seeds), inferences=6, ahead=3)
    for index, (run, plain) in enumerate(zip(out0, plain0)):  # corrections depend on the seeds and the index
        assert torch.equal(run[0][1].share, plain[0][1].share), index
        assert torch.equal(run[1][2].share, plain[1][2].share), index
        assert torch.equal(run[1][2].share, compute_correction(seeds, 3 * index + 1, SCHEDULE[1])), index



class BreakableLink:
    """A memory link with a gRPC link's failure hook (``on_failure``), broken on demand."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._hooks: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def on_failure(self, hook: Any) -> None:
        self._hooks.append(hook)

    def fail(self, error: PeerLost) -> None:
        for hook in self._hooks:
            hook(error)


def test_a_broken_link_wakes_the_loop_waiting_for_material_and_the_pool_stops() -> None:
    gate, started = threading.Event(), threading.Event()

    class SlowDealer(Dealer):
        def generate(self, index: int, request: TupleRequest) -> dict[int, torch.Tensor]:
            started.set()
            assert gate.wait(30)
            return super().generate(index, request)

    dealer = SlowDealer(pool=PoolLimits(ahead=2))
    dealer_end, party_end = memory_pair("dealer", "p0")
    link = BreakableLink(dealer_end)
    party_end.send_json(TAG_MSG, {"type": "preprocess", "start": 0, "inferences": 1,
                                  "schedule": RequestSchedule([SQUARE]).to_json()})
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            dealer.serve(link, 0)  # type: ignore[arg-type]
        except DealerError as exc:
            errors.append(exc)

    loop = threading.Thread(target=serve)
    loop.start()
    assert started.wait(30)  # the loop waits for material being made
    link.fail(PeerLost("p0 went away"))
    gate.set()
    loop.join(30)
    assert not loop.is_alive() and isinstance(errors[0], PoolClosed) and "p0 went away" in str(errors[0])
    assert dealer.pool is not None and dealer.pool.alive_threads == 0 and dealer.pool.held_bytes == 0


def test_a_rank_whose_loop_starts_after_the_other_ended_is_still_served() -> None:
    # Under load a party's dealer loop may start only after the other party's whole session: the
    # pool used to close when the first loop ended as "the last one running", and the late rank's
    # preprocess hung until its idle limit (the flaky test_fss_dpf case).
    dealer = Dealer(pool=PoolLimits(ahead=2, workers=2))
    providers, ends = _pair(dealer)
    out0, _ = run_parties(lambda: _party_runs(providers[0], 4, 2), lambda: dealer.serve(ends[0], 0), timeout_s=60)
    assert dealer.pool is not None and dealer.pool.alive_threads > 0  # rank 1 is still to come
    out1, _ = run_parties(lambda: _party_runs(providers[1], 4, 2), lambda: dealer.serve(ends[1], 1), timeout_s=60)
    for run0, run1 in zip(out0, out1, strict=True):
        _check_run(run0, run1)
    assert dealer.pool.alive_threads == 0 and dealer.pool.held_bytes == 0  # closed when both had ended


def test_a_failing_loop_aborts_its_party_at_once() -> None:
    dealer = Dealer(pool=PoolLimits(ahead=2))
    dealer_end, party_end = memory_pair("dealer", "p0")
    party_end.send_json(TAG_MSG, {"type": "nonsense"})
    with pytest.raises(DealerError, match="unknown dealer message type"):
        dealer.serve(dealer_end, 0)
    with pytest.raises(PeerAborted, match="the dealer stopped serving rank 0: DealerError: unknown dealer message"):
        party_end.recv(TAG_CORR, timeout=5)  # at once, not after the link's idle limit
