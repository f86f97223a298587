"""The dealer's background pool: material for the next inferences of a session, made ahead on
worker threads into a bounded store and handed out in request order.

Once the parties have announced a recorded request schedule (``preprocess``), the pool knows
what they will ask for: the next inferences of the same schedule, or, for a generation, the
next steps in the order a previous generation asked for them. It *confirms* what a party
asks for, *speculates* up to ``ahead`` more segments (one segment = one inference or one
generation step of a schedule) past the last confirmed one, and generates both in index order
on ``workers`` background threads while the parties compute, each large request's FSS keys
split across ``keygen_processes`` worker processes. Per request index it makes the
material once: party 0's correction and, for a sign request, both parties' halves of the FSS
keys; each party takes its own half, in order, and the store forgets a request as soon as
nobody needs it any more.

Prediction (:meth:`MaterialPool.confirm`): the schedules the parties confirmed, in order, form a
history; after the last one the pool expects what followed the same schedule the previous time
it was confirmed (a session repeating one shape expects that shape again; a repeated generation
expects the steps of the previous one). Without such evidence it does not speculate, so a
session that never repeats costs no wasted generation. A speculation that turns out wrong is
dropped (never handed out), and a request made online at an index the pool had speculated on
drops the speculation and pauses it until the next confirmation.

Bounds and errors: the store holds at most ``max_bytes`` of generated material (corrections and
both halves of keys, counted from their shapes before generating; one request larger than the
bound is made alone); generation waits while the store is full. A party asking for material
not generated yet waits for it, at most ``wait_s`` seconds per request. Every failure is a
named :class:`DealerError` (or :class:`PoolClosed`), never a hang: asking for more than
``ahead`` inferences at once, a request that differs from the one planned at its index, parties
that disagree, a failed generation, or a request after :meth:`MaterialPool.close`, which also
wakes every waiter, joins the workers and frees the store.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from privinf.ledger.counting import Ledger
from protocols.mpc import fss
from protocols.mpc.keygen_workers import KeygenWorkers, default_processes
from protocols.mpc.vocabulary import CORRECTED_RANK, FETCHED_BY_BOTH, DealerError, RequestSchedule, TupleRequest, _numel

MAX_HISTORY = 4096  # confirmed segments remembered for prediction (one short digest each)
MAX_SCHEDULES = 1024  # distinct schedules remembered for prediction
DEFAULT_POOL_BYTES = 2 << 30  # a dealer session's store bound unless its party file sets pool_mib
JOIN_S = 2.0  # how long close() waits in all for workers to finish the requests they are generating


class PoolClosed(DealerError):
    """The pool was closed (the session ended or failed) while a party needed material from it."""


@dataclass(frozen=True)
class PoolLimits:
    """How far ahead the dealer generates and how much it may hold.

    ``ahead``: segments (inferences, or steps of a generation) generated beyond what the parties
    asked for, and the most one ``preprocess`` message may ask for (the session's agreed
    ``preprocess``). ``max_bytes``: generated material held at once (both halves of FSS keys
    count). ``workers``: generator threads; one by default, because FSS key generation
    (:func:`protocols.mpc.fss.sign_gen`, numpy on 16k-element chunks) holds the GIL for most of
    its time: a second thread cost 60% more CPU for no gain in wall time on a 2-core machine
    (bench/dealer_pool.py). ``keygen_processes``: worker processes that share each large
    request's FSS key generation (:mod:`protocols.mpc.keygen_workers`, started on first use and
    stopped by :meth:`MaterialPool.close`); ``None``: the host's cores minus one, at least one;
    0: generate in the worker thread. ``wait_s``: the longest a party waits for one request.
    """

    ahead: int = 1
    max_bytes: int = DEFAULT_POOL_BYTES
    workers: int = 1
    wait_s: float = 120.0
    keygen_processes: int | None = None

    def __post_init__(self) -> None:
        if self.ahead < 1 or self.max_bytes < 1 or self.workers < 1 or self.wait_s <= 0:
            raise DealerError(f"pool limits must be positive: {self}")
        if self.keygen_processes is not None and self.keygen_processes < 0:
            raise DealerError(f"keygen_processes must be >= 0, got {self.keygen_processes}")

    @property
    def processes(self) -> int:
        """Key-generation worker processes this pool uses (0: none)."""
        return default_processes() if self.keygen_processes is None else self.keygen_processes


PLANNED, GENERATING, READY, FAILED = "planned", "generating", "ready", "failed"
Generate = Callable[[int, TupleRequest], dict[int, torch.Tensor]]


@dataclass(eq=False)
class _Slot:
    """The material of one request index: planned, being generated, ready or failed."""

    index: int
    request: TupleRequest
    nbytes: int
    confirmed: set[int] = field(default_factory=set)  # ranks that asked for this index
    state: str = PLANNED
    halves: dict[int, torch.Tensor] = field(default_factory=dict)  # rank -> material not yet taken
    error: str = ""
    dropped: bool = False


def material_bytes(request: TupleRequest) -> int:
    """Bytes the dealer holds for one request: party 0's correction, or both halves of sign keys."""
    one = 8 * _numel(request.output_shape())
    return 2 * one if request.kind in FETCHED_BY_BOTH else one


def needed_by(request: TupleRequest) -> tuple[int, ...]:
    """Ranks that take material for ``request`` from the dealer (both for sign keys)."""
    return (0, 1) if request.kind in FETCHED_BY_BOTH else (CORRECTED_RANK,)


class MaterialPool:
    """Material of confirmed and predicted segments, generated ahead by worker threads."""

    def __init__(self, generate: Generate, limits: PoolLimits, ledger: Ledger | None = None) -> None:
        self._generate = generate
        self.limits = limits
        self._ledger = ledger
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._planned: list[int] = []  # heap of indices whose slot may still be PLANNED
        self._reserved = 0  # bytes of slots being generated or held
        self.peak_bytes = 0
        self._generated = 0  # requests generated (dropped speculation included)
        self._predicted = 0  # requests asked for that the pool had planned on its own
        self._history: list[str] = []
        self._schedules: dict[str, RequestSchedule] = {}
        self._confirmed_end = 0  # first index after the last confirmed segment
        self._speculate = True
        self._closed: str | None = None
        self._keygen = KeygenWorkers(limits.processes) if limits.processes else None  # started on first use
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"dealer-pool-{i}")
                         for i in range(limits.workers)]
        for thread in self._threads:
            thread.start()

    def __repr__(self) -> str:
        return (f"MaterialPool(slots={len(self._slots)}, bytes={self._reserved}, "
                f"closed={self._closed is not None})")

    @property
    def held_bytes(self) -> int:
        """Bytes of material being generated or waiting to be taken."""
        return self._reserved

    def stats(self) -> dict[str, int]:
        """Counts for reports and tests: slots held (confirmed / speculative), bytes, requests
        generated, and requests the parties asked for that the pool had predicted."""
        with self._cond:
            confirmed = sum(1 for s in self._slots.values() if s.confirmed)
            return {"confirmed": confirmed, "speculative": len(self._slots) - confirmed,
                    "held_bytes": self._reserved, "peak_bytes": self.peak_bytes, "generated": self._generated,
                    "predicted": self._predicted}

    @property
    def keygen_pids(self) -> list[int]:
        """Process ids of the running key-generation workers (none before first use and after close)."""
        return self._keygen.pids if self._keygen is not None else []

    @property
    def alive_threads(self) -> int:
        """Worker threads still running (0 after :meth:`close`)."""
        return sum(t.is_alive() for t in self._threads)

    # ----- what the parties ask for ------------------------------------------------------
    def confirm(self, rank: int, start: int, schedule: RequestSchedule, inferences: int) -> None:
        """``rank`` asks for ``inferences`` runs of ``schedule`` from request ``start`` on."""
        if inferences > self.limits.ahead:
            raise DealerError(f"rank {rank} asks for {inferences} inferences at once, more than the session's "
                              f"preprocess = {self.limits.ahead}")
        digest = schedule.digest()
        with self._cond:
            self._check_open()
            if rank == CORRECTED_RANK:  # it takes every request: what it skipped nobody will ask for
                self._drop_speculation(lambda slot: slot.index < start)
            for k in range(inferences):
                first = start + k * len(schedule)
                self._confirm_segment(rank, first, schedule)
                if first >= self._confirmed_end:  # the first rank to ask for this segment
                    self._remember(digest, schedule)
                    self._confirmed_end = first + len(schedule)
            self._speculate = True
            self._plan_speculation()
            self._cond.notify_all()

    def online(self, index: int, rank: int) -> None:
        """``rank`` asks for request ``index`` online: beyond the confirmed segments the parties
        record something new, so speculation from there on is dropped and paused."""
        with self._cond:
            slot = self._slots.get(index)
            if slot is not None and slot.confirmed:
                raise DealerError(f"rank {rank} asks online for request {index}, which rank(s) "
                                  f"{sorted(slot.confirmed)} asked to preprocess: the parties disagree")
            if index < self._confirmed_end:
                return  # a slower party's request from before the segments the other one confirmed
            self._drop_speculation(lambda s: s.index >= index)
            self._speculate = False
            self._cond.notify_all()

    def take(self, rank: int, index: int, request: TupleRequest, wait_s: float | None = None) -> torch.Tensor:
        """``rank``'s material for request ``index``, waiting until it is generated, at most
        ``wait_s`` (the limits' by default)."""
        wait_s = self.limits.wait_s if wait_s is None else wait_s
        began = time.perf_counter()
        deadline = began + wait_s
        with self._cond:
            self._check_open()
            slot = self._slots.get(index)
            if slot is None or rank not in slot.confirmed:
                raise DealerError(f"rank {rank} takes request {index}, which it did not ask to preprocess")
            if slot.request != request:
                raise DealerError(f"request {index} is {slot.request.to_json()} in the schedule, "
                                  f"not {request.to_json()}")
            while slot.state in (PLANNED, GENERATING) and self._closed is None:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise DealerError(f"material for request {index} was not ready within "
                                      f"{wait_s:g} s (the dealer is behind)")
                self._cond.wait(left)
            self._check_open()
            if slot.state == FAILED:
                raise DealerError(f"generating request {index} failed: {slot.error}")
            half = slot.halves.pop(rank, None)
            if half is None:
                raise DealerError(f"rank {rank} asked twice for request {index}")
            self._reserved -= half.numel() * 8
            if not slot.halves:
                del self._slots[index]
            self._cond.notify_all()
        self._record("pool_wait_s", time.perf_counter() - began)
        return half

    def close(self, reason: str = "the session ended", join_s: float = JOIN_S) -> None:
        """Stop generating, wake every waiter with :class:`PoolClosed`, free the store and join the
        workers, waiting ``join_s`` in all: a worker inside one long generation finishes it on
        its own (a daemon thread), drops the result and exits."""
        with self._cond:
            if self._closed is None:
                self._closed = reason
            for slot in list(self._slots.values()):
                self._drop(slot)
            self._planned.clear()
            self._cond.notify_all()
        deadline = time.perf_counter() + join_s
        if self._keygen is not None:
            self._keygen.close(min(join_s, JOIN_S))  # a generation in progress fails; its result is dropped
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.perf_counter()))

    # ----- planning ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed is not None:
            raise PoolClosed(f"the dealer's material pool is closed: {self._closed}")

    def _confirm_segment(self, rank: int, first: int, schedule: RequestSchedule) -> None:
        """Mark the requests of one segment that ``rank`` takes from the dealer as asked for by it."""
        for offset, request in enumerate(schedule.requests):
            index = first + offset
            slot = self._slots.get(index)
            if slot is not None and slot.request != request:
                if slot.confirmed:
                    raise DealerError(f"rank {rank} asks for {request.to_json()} as request {index}, rank(s) "
                                      f"{sorted(slot.confirmed)} for {slot.request.to_json()}: the parties disagree")
                self._drop_speculation(lambda s, index=index: s.index >= index)
                slot = None
            if rank not in needed_by(request):
                continue
            if slot is None:
                slot = self._add(index, request)
            elif not slot.confirmed:
                self._predicted += 1
            if rank in slot.confirmed:
                raise DealerError(f"rank {rank} asked twice for request {index}")
            slot.confirmed.add(rank)

    def _add(self, index: int, request: TupleRequest) -> _Slot:
        slot = _Slot(index, request, material_bytes(request))
        self._slots[index] = slot
        heapq.heappush(self._planned, index)
        return slot

    def _drop_speculation(self, which: Callable[[_Slot], bool]) -> None:
        """Forget unconfirmed slots selected by ``which`` (a worker on one discards its result)."""
        for slot in [s for s in self._slots.values() if not s.confirmed and which(s)]:
            self._drop(slot)

    def _drop(self, slot: _Slot) -> None:
        del self._slots[slot.index]
        slot.dropped = True
        if slot.state == READY:
            self._reserved -= sum(h.numel() * 8 for h in slot.halves.values())
            slot.halves.clear()

    def _remember(self, digest: str, schedule: RequestSchedule) -> None:
        self._history.append(digest)
        del self._history[:-MAX_HISTORY]
        self._schedules.pop(digest, None)
        self._schedules[digest] = schedule
        while len(self._schedules) > MAX_SCHEDULES:
            self._schedules.pop(next(iter(self._schedules)))

    def predict(self, count: int) -> list[str]:
        """Digests of the ``count`` segments expected after the confirmed ones (fewer without evidence)."""
        seen = list(self._history)
        out: list[str] = []
        while len(out) < count and seen:
            last = seen[-1]
            earlier = next((i for i in range(len(seen) - 2, -1, -1) if seen[i] == last), None)
            if earlier is None or seen[earlier + 1] not in self._schedules:
                break
            out.append(seen[earlier + 1])
            seen.append(out[-1])
        return out

    def _plan_speculation(self) -> None:
        """Plan the predicted segments after the confirmed end (those not planned already)."""
        if not self._speculate:
            return
        index = self._confirmed_end
        for digest in self.predict(self.limits.ahead):
            for request in self._schedules[digest].requests:
                slot = self._slots.get(index)
                if slot is not None and slot.request != request:
                    self._drop_speculation(lambda s, index=index: s.index >= index)
                    slot = None
                if slot is None:
                    self._add(index, request)
                index += 1
        self._drop_speculation(lambda s, end=index: s.index >= end)

    # ----- generation --------------------------------------------------------------------
    def _claim(self) -> _Slot | None:
        """The lowest planned slot, if the byte bound lets it be generated now."""
        while self._planned:
            index = self._planned[0]
            slot = self._slots.get(index)
            if slot is None or slot.state != PLANNED:
                heapq.heappop(self._planned)
                continue
            if self._reserved and self._reserved + slot.nbytes > self.limits.max_bytes:
                return None
            heapq.heappop(self._planned)
            slot.state = GENERATING
            self._reserved += slot.nbytes
            self.peak_bytes = max(self.peak_bytes, self._reserved)
            return slot
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                slot = self._claim()
                while slot is None and self._closed is None:
                    self._cond.wait()
                    slot = self._claim()
                if self._closed is not None:
                    return
            began = time.perf_counter()
            try:
                halves, error = self._generate_one(slot), ""
            except Exception as exc:  # handed to the party that takes it, as a DealerError
                halves, error = {}, f"{type(exc).__name__}: {exc}"
            self._record("pool_generate_s", time.perf_counter() - began)
            self._finish(slot, halves, error)

    def _generate_one(self, slot: _Slot) -> dict[int, torch.Tensor]:
        """One request's material, its large FSS key generation on the worker processes if any."""
        if self._keygen is None:
            return self._generate(slot.index, slot.request)
        with fss.generating_with(self._keygen.corrections, self._keygen.processes):
            return self._generate(slot.index, slot.request)

    def _finish(self, slot: _Slot, halves: dict[int, torch.Tensor], error: str) -> None:
        with self._cond:
            self._generated += 1
            if slot.dropped or self._closed is not None:
                self._reserved -= slot.nbytes
            else:
                wanted = needed_by(slot.request)
                slot.halves = {r: halves[r] for r in wanted if r in halves}
                slot.state, slot.error = (READY, "") if not error and len(slot.halves) == len(wanted) \
                    else (FAILED, error or "the generator returned no material for a rank")
                self._reserved += sum(h.numel() * 8 for h in slot.halves.values()) - slot.nbytes
            self._cond.notify_all()

    def _record(self, key: str, seconds: float) -> None:
        """Add ``seconds`` to the dealer ledger's ``key`` (in whatever row is current: the sum counts)."""
        if self._ledger is not None:
            self._ledger.record_extra(key, seconds)
