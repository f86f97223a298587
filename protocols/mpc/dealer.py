"""The dealer of correlated randomness (Beaver triples and friends) for 2-party MPC.

The dealer shares one 128-bit seed with each computing party (sent once, offline, over the
mutually authenticated link). For tuple request number ``k`` every party expands its own shares
locally from ``Stream(seed_p, "tuple/k")``; party 1 expands *all* of its shares, party 0 expands
its random operands (a0, b0, ...) but not the dependent one. The dealer expands both parties'
streams, computes the full tuple and sends party 0 only its dependent share, the *correction*
(e.g. ``c0 = (a0 + a1) * (b0 + b1) - c1``). So the dealer ships one tensor per request, to one
party, and nothing to party 1. CrypTen's TTP does the same with Mersenne-Twister generators and
``torch.distributed``; this module is the CSPRNG, channel-based replacement.

Request descriptors (:class:`TupleRequest`) are public: kind, shapes, op and conv arguments,
nothing secret. For a given model, variant and input shape the sequence is deterministic, so it
can be recorded once (:class:`RequestSchedule`) and the dealer can generate the corrections for
``N`` inferences ahead of time (preprocessed mode) instead of answering request by request
(online mode). Both modes are served by :meth:`Dealer.serve` over one :class:`Channel` per party.

With :class:`~protocols.mpc.dealer_pool.PoolLimits` the dealer answers ``preprocess`` from a
background pool (:mod:`protocols.mpc.dealer_pool`): worker threads generate the material of the
requested and of the predicted next inferences into a bounded store while the parties compute,
so a party that asks finds it made (or waits, bounded, for the rest). Without limits it
generates in the request loop, as asked. Both give the same corrections for the same seeds.

The wire vocabulary (tags, message types, request layouts) is :mod:`protocols.mpc.vocabulary`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from privinf.ledger.counting import Ledger, Phase
from protocols.mpc import fss, fss_bit, fss_dpf, secure_linear
from protocols.mpc.csprng import SEED_BYTES, Stream, check_seed, new_seed
from protocols.mpc.dealer_pool import MaterialPool, PoolLimits
from protocols.mpc.vocabulary import (
    CORRECTED_RANK,
    FETCHED_BY_BOTH,
    GELU_MASKS,
    GELU_PRODUCTS,
    KEY_KINDS,
    MSG_END,
    MSG_PREPROCESS,
    MSG_REPORT,
    MSG_TUPLE,
    MSG_WS_PREPROCESS,
    TAG_CORR,
    TAG_MSG,
    TAG_SEED,
    DealerError,
    RequestSchedule,
    TupleRequest,
    _numel,
)
from protocols.net.channels import Channel, PeerAborted, PeerLost, TransportError


class ScheduleCache:
    """Recorded request schedules by key, at most ``max_requests`` requests in all (about 300 B
    each): the oldest schedules are dropped first, the newest is always kept."""

    def __init__(self, max_requests: int) -> None:
        if max_requests < 1:
            raise DealerError(f"max_requests must be >= 1, got {max_requests}")
        self.max_requests = max_requests
        self._schedules: dict[Any, RequestSchedule] = {}
        self._requests = 0

    def __len__(self) -> int:
        return len(self._schedules)

    @property
    def requests(self) -> int:
        """Requests held in all schedules."""
        return self._requests

    def get(self, key: Any) -> RequestSchedule | None:
        return self._schedules.get(key)

    def put(self, key: Any, schedule: RequestSchedule) -> None:
        old = self._schedules.pop(key, None)
        self._requests -= len(old) if old is not None else 0
        self._schedules[key] = schedule
        self._requests += len(schedule)
        while self._requests > self.max_requests and len(self._schedules) > 1:
            self._requests -= len(self._schedules.pop(next(iter(self._schedules))))


def count_wraps(shares: list[torch.Tensor]) -> torch.Tensor:
    """How many times the int64 sum of ``shares`` wraps around 2^64 (signed), as in CrypTen."""
    result = torch.zeros_like(shares[0])
    prev = shares[0]
    for cur in shares[1:]:
        nxt = prev + cur
        result -= ((prev < 0) & (cur < 0) & (nxt >= 0)).long()
        result += ((prev >= 0) & (cur >= 0) & (nxt < 0)).long()
        prev = nxt
    return result


def expand_shares(seed: bytes, rank: int, index: int, request: TupleRequest) -> dict[str, torch.Tensor]:
    """The shares party ``rank`` derives locally for request ``index`` (all but its correction).

    Party 1 gets every share; party 0 gets the random operands only. The order of reads from
    the stream is fixed per kind: this function is the single definition both the parties and
    the dealer use, so they cannot drift apart.
    """
    if rank not in (0, 1):
        raise DealerError(f"the dealer serves 2 parties (ranks 0 and 1), not rank {rank}")
    if request.kind in KEY_KINDS:
        return {}  # both parties receive their whole key from the dealer
    stream = Stream(seed, f"tuple/{index}")
    helper = rank != CORRECTED_RANK
    out: dict[str, torch.Tensor] = {}
    if request.kind in ("additive", "binary"):
        out["a"], out["b"] = stream.ring(request.size0), stream.ring(request.size1)
        if helper:
            out["c"] = stream.ring(request.output_shape())
    elif request.kind == "onehot":
        out["r"] = stream.ring(request.size0)
        if helper:
            out["u"] = stream.ring(request.output_shape())
    elif request.kind == "dpf":  # both parties expand the same way; both receive the shared key words
        out["mask"] = stream.ring(request.size0)
        out["seeds"] = torch.from_numpy(fss_dpf.root_seeds(stream.read(16 * _numel(request.size0)),
                                                           _numel(request.size0)).view(np.int64))
    elif request.kind == "gelu":
        out["masks"] = stream.ring((len(GELU_MASKS),) + request.size0)
        if helper:
            out["products"] = stream.ring(request.output_shape())
    elif request.kind == "rowscale":
        if not request.size0:
            raise DealerError("a rowscale request needs a shape with a last (row) dimension")
        out["a"] = stream.ring(request.size0)
        out["b"] = stream.ring(request.size0[:-1] + (1,))
        if helper:
            out["ab"] = stream.ring(request.output_shape())
    elif request.kind in ("square", "wraps"):
        out["r"] = stream.ring(request.size0)
        if helper:
            out["r2" if request.kind == "square" else "theta_r"] = stream.ring(request.size0)
    else:  # B2A
        out["rB"] = stream.bits(request.size0, 1)
        if helper:
            out["rA"] = stream.ring(request.size0)
    return out


def compute_correction(seeds: dict[int, bytes], index: int, request: TupleRequest) -> torch.Tensor:
    """Party 0's dependent share for request ``index``: full value minus party 1's share."""
    if request.kind in KEY_KINDS:
        raise DealerError("sign keys come from a Dealer's key store, not from the seeds alone")
    p0 = expand_shares(seeds[0], 0, index, request)
    p1 = expand_shares(seeds[1], 1, index, request)
    if request.kind == "additive":
        full = getattr(torch, request.op)(p0["a"] + p1["a"], p0["b"] + p1["b"], **dict(request.kwargs))
        return full - p1["c"]
    if request.kind == "square":
        r = p0["r"] + p1["r"]
        return r * r - p1["r2"]
    if request.kind == "binary":
        return ((p0["a"] ^ p1["a"]) & (p0["b"] ^ p1["b"])) ^ p1["c"]
    if request.kind == "wraps":
        return count_wraps([p0["r"], p1["r"]]) - p1["theta_r"]
    if request.kind == "gelu":
        masks = dict(zip(GELU_MASKS, p0["masks"] + p1["masks"]))
        return torch.stack([masks[i] * masks[j] for i, j in GELU_PRODUCTS]) - p1["products"]
    if request.kind == "rowscale":
        a, b = p0["a"] + p1["a"], p0["b"] + p1["b"]
        return torch.stack([a * a, a * b]) - p1["ab"]
    if request.kind == "dpf":
        return _dpf_words(p0, p1, request)
    if request.kind == "onehot":
        rho = (p0["r"] + p1["r"]) & (request.domain - 1)
        unit = torch.nn.functional.one_hot(rho, request.domain) << 16  # at CrypTen's scale 2^16
        return unit - p1["u"]
    return (p0["rB"] ^ p1["rB"]) - p1["rA"]


def _dpf_words(p0: dict[str, torch.Tensor], p1: dict[str, torch.Tensor], request: TupleRequest) -> torch.Tensor:
    """The key words both parties share for a dpf request: a DPF at ``(mask >> shift) mod 2^bits``
    with payload ``(1,)`` or ``(1, mask)`` (``mask`` = the sum of the parties' stream shares)."""
    mask = (p0["mask"] + p1["mask"]).reshape(-1).numpy()
    alpha = (mask.view(np.uint64) >> np.uint64(request.shift)) & np.uint64((1 << request.bits) - 1)
    beta = np.ones((mask.shape[0], request.payload), dtype=np.int64)
    if request.payload == 2:
        beta[:, 1] = mask
    seeds = torch.stack([p0["seeds"], p1["seeds"]]).numpy().view(np.uint64)
    return torch.from_numpy(fss_dpf.dpf_gen(alpha, beta, request.bits, seeds)[0])


def send_seed(channel: Channel, seed: bytes) -> None:
    """Dealer side of seed distribution (once per session, offline)."""
    channel.send(TAG_SEED, check_seed(seed))


def receive_seed(channel: Channel, ledger: Ledger | None = None) -> bytes:
    """Party side of seed distribution; records the seed as offline storage."""
    data = channel.recv(TAG_SEED)
    if not isinstance(data, bytes) or len(data) != SEED_BYTES:
        raise DealerError(f"dealer seed must be {SEED_BYTES} raw bytes")
    if ledger is not None:
        with ledger.phase(Phase.OFFLINE):
            ledger.record_storage("seeds", SEED_BYTES)
    return data


def sign_halves(request: TupleRequest) -> tuple[np.ndarray, np.ndarray]:
    """Both parties' halves of fresh FSS sign keys for ``request`` (randomness from ``os.urandom``)."""
    shares = lambda k: np.frombuffer(os.urandom(8 * k), dtype=np.int64)  # noqa: E731
    gen = fss_bit.bit_sign_gen if request.kind == "signbit" else fss.sign_gen
    return gen(_numel(request.size0), request.bits, os.urandom, shares)


class SignKeyStore:
    """FSS sign-gate keys generated once per request index, each half taken by its party.

    Both parties fetch their own half (in any order, from their own dealer link), so the dealer
    keeps the half not yet taken. Keys are drawn from ``os.urandom`` and never derived from
    the parties' seeds.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[TupleRequest, dict[int, np.ndarray]]] = {}

    def __repr__(self) -> str:
        return f"SignKeyStore(pending={len(self._pending)})"

    def take(self, index: int, request: TupleRequest, rank: int) -> torch.Tensor:
        with self._lock:
            entry = self._pending.get(index)
            if entry is None:
                keys = sign_halves(request)
                entry = (request, {0: keys[0], 1: keys[1]})
                self._pending[index] = entry
            stored, halves = entry
            if stored != request:
                raise DealerError(f"sign request {index} differs between the parties: "
                                  f"{stored.to_json()} vs {request.to_json()}")
            if rank not in halves:
                raise DealerError(f"rank {rank} asked twice for sign keys {index}")
            half = halves.pop(rank)
            if not halves:
                del self._pending[index]
        return torch.from_numpy(half)

    def pending_in(self, start: int, stop: int) -> bool:
        """Whether a half of keys for an index in ``[start, stop)`` waits for its other party."""
        with self._lock:
            return any(start <= index < stop for index in self._pending)


class Dealer:
    """Holds one seed per computing party and answers requests for corrections.

    ``serve(channel, rank)`` runs the request loop for one party's link until that party sends
    ``end``; run one loop per party link (threads or tasks) when both talk to the dealer. With
    ``pool`` limits, ``preprocess`` is answered from a background pool (closed when the last
    loop ends, when any loop fails, or by :meth:`close`).
    """

    def __init__(self, ledger: Ledger | None = None, seeds: dict[int, bytes] | None = None,
                 pool: PoolLimits | None = None) -> None:
        self.ledger = ledger
        self._seeds = {r: check_seed(s) for r, s in (seeds or {0: new_seed(), 1: new_seed()}).items()}
        self._sign_keys = SignKeyStore()
        self._pool_limits = pool
        self._pool: MaterialPool | None = None
        self._lock = threading.Lock()
        self._serving: set[int] = set()
        self._seeded: set[int] = set()  # ranks sent their seed: the loops the session waits for
        self._ended: set[int] = set()  # ranks whose loop ended normally
        self._closed = False
        if sorted(self._seeds) != [0, 1]:
            raise DealerError(f"the dealer needs seeds for ranks 0 and 1, got ranks {sorted(self._seeds)}")
        if ledger is not None:
            with ledger.phase(Phase.OFFLINE):
                ledger.record_storage("seeds", SEED_BYTES * len(self._seeds))

    def __repr__(self) -> str:  # never shows the seeds
        return "Dealer(ranks=[0, 1])"

    @property
    def pool(self) -> MaterialPool | None:
        """The background pool, once a ``preprocess`` started it (None without pool limits)."""
        return self._pool

    def distribute_seeds(self, channels: dict[int, Channel]) -> None:
        """Send each party its seed (offline)."""
        for rank, channel in channels.items():
            if rank not in self._seeds:
                raise DealerError(f"no seed for rank {rank}")
            with self._lock:
                self._seeded.add(rank)
            if self.ledger is not None:
                with self.ledger.phase(Phase.OFFLINE):
                    send_seed(channel, self._seeds[rank])
            else:
                send_seed(channel, self._seeds[rank])

    def generate(self, index: int, request: TupleRequest) -> dict[int, torch.Tensor]:
        """The material of request ``index`` by rank: party 0's correction, or both halves of sign keys."""
        if request.kind in KEY_KINDS:
            keys = sign_halves(request)
            return {0: torch.from_numpy(keys[0]), 1: torch.from_numpy(keys[1])}
        if request.kind == "dpf":  # the same words for both parties
            words = compute_correction(self._seeds, index, request)
            return {0: words, 1: words}
        return {CORRECTED_RANK: compute_correction(self._seeds, index, request)}

    def correction(self, index: int, request: TupleRequest, rank: int = CORRECTED_RANK) -> torch.Tensor:
        """Party 0's correction for request ``index``, or ``rank``'s half of sign keys (online)."""
        if rank != CORRECTED_RANK and request.kind not in FETCHED_BY_BOTH:
            raise DealerError(f"rank {rank} expands its own {request.kind} shares; only sign keys are sent to it")
        if self._pool is not None:
            self._pool.online(index, rank)
        if request.kind in KEY_KINDS:
            return self._sign_keys.take(index, request, rank)
        return compute_correction(self._seeds, index, request)

    def preprocess(self, start: int, inferences: int, schedule: RequestSchedule,
                   rank: int = CORRECTED_RANK) -> Iterator[torch.Tensor]:
        """Corrections (rank 0) or sign keys (both ranks) for ``inferences`` runs of ``schedule``
        starting at request ``start``; rank 1 gets its sign keys only."""
        if inferences < 1:
            raise DealerError(f"inferences must be >= 1, got {inferences}")
        if len(schedule) == 0:
            raise DealerError("cannot preprocess an empty request schedule")
        if self._pool_limits is None:
            yield from self._generate_in_place(start, inferences, schedule, rank)
            return
        stop = start + inferences * len(schedule)
        if self._sign_keys.pending_in(start, stop):
            raise DealerError(f"rank {rank} preprocesses requests {start}..{stop - 1}, which the other party "
                              "asked for online: the parties disagree")
        pool = self._material_pool()
        pool.confirm(rank, start, schedule, inferences)
        for index in range(start, stop):
            request = schedule[(index - start) % len(schedule)]
            if rank == CORRECTED_RANK or request.kind in FETCHED_BY_BOTH:
                with self._charged(request):  # the consumer sends it inside: charged to its layer
                    yield pool.take(rank, index, request)

    def _generate_in_place(self, start: int, inferences: int, schedule: RequestSchedule,
                           rank: int) -> Iterator[torch.Tensor]:
        index = start
        for _ in range(inferences):
            for request in schedule.requests:
                if rank == CORRECTED_RANK or request.kind in FETCHED_BY_BOTH:
                    with self._charged(request):  # the consumer sends it inside: charged to its layer
                        yield self.correction(index, request, rank)
                index += 1

    def _material_pool(self) -> MaterialPool:
        with self._lock:
            if self._closed:
                raise DealerError("the dealer's session has ended")
            if self._pool is None:
                assert self._pool_limits is not None
                self._pool = MaterialPool(self.generate, self._pool_limits, self.ledger)
            return self._pool

    def _stop_pool(self, reason: str) -> None:
        """Wake everyone waiting on the pool with ``reason`` (from the link loop: no joining)."""
        with self._lock:
            self._closed = True
            pool = self._pool
        if pool is not None:
            pool.close(reason, join_s=0)

    def close(self, reason: str = "the session ended") -> None:
        """Stop the background pool (its threads joined, its material freed); idempotent."""
        with self._lock:
            self._closed = True
            pool = self._pool
        if pool is not None:
            pool.close(reason)

    def serve(self, channel: Channel, rank: int, on_report: Callable[[], None] | None = None) -> int:
        """Answer ``rank``'s messages until it sends ``end``; returns the number of corrections sent.

        A ``report`` message calls ``on_report`` (the session sends the dealer's ledger rows).
        When the loop fails, the pool is closed and, unless its link is gone or its party went
        quiet, the party is told (an abort naming the error, so it does not wait out its idle
        limit for an answer that will not come); so it is when the link breaks
        (links with ``on_failure``, e.g. gRPC), which wakes a loop waiting for material at once
        instead of after ``wait_s``. When the loop ends normally the pool is closed once every
        rank sent its seed has ended (a loop that has not started yet is still to come), or,
        without :meth:`distribute_seeds`, once no loop is running.
        """
        with self._lock:
            self._serving.add(rank)
        on_failure = getattr(channel, "on_failure", None)
        if callable(on_failure):
            on_failure(lambda error: self._stop_pool(f"rank {rank}'s dealer link failed: {error}"))
        ended = False
        try:
            sent = self._serve_loop(channel, rank, on_report)
            ended = True
            return sent
        except (PeerAborted, PeerLost):
            raise  # the link is gone, or its party went quiet: nobody there waits for an answer
        except Exception as exc:
            said = f": {exc}" if isinstance(exc, (DealerError, TransportError)) else ""  # our messages hold no secrets
            channel.abort(f"the dealer stopped serving rank {rank}: {type(exc).__name__}{said}")
            raise
        finally:
            with self._lock:
                self._serving.discard(rank)
                if ended:
                    self._ended.add(rank)
                last = not self._serving and self._ended >= self._seeded
            if not ended:
                self.close(f"rank {rank}'s dealer link failed")
            elif last:
                self.close()

    def _serve_loop(self, channel: Channel, rank: int, on_report: Callable[[], None] | None) -> int:
        sent = 0
        expected_index = 0
        while True:
            msg = channel.recv_json(TAG_MSG)
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == MSG_END:
                return sent
            if kind == MSG_REPORT:
                if on_report is None:
                    raise DealerError("this dealer link does not serve reports")
                on_report()
                continue
            if kind == MSG_TUPLE:
                index = int(msg["index"])
                if index < expected_index:
                    raise DealerError(f"request index {index} repeats or goes back (expected >= {expected_index})")
                expected_index = index + 1
                request = TupleRequest.from_json(msg["request"])
                with self._charged(request):
                    self._send(channel, self.correction(index, request, rank), Phase.ONLINE)
                sent += 1
            elif kind == MSG_PREPROCESS:
                schedule = RequestSchedule.from_json(msg["schedule"])
                start, n = int(msg["start"]), int(msg["inferences"])
                if start < expected_index:
                    raise DealerError(f"preprocess start {start} overlaps requests already served")
                expected_index = start + n * len(schedule)
                for corr in self.preprocess(start, n, schedule, rank):
                    self._send(channel, corr, Phase.OFFLINE)
                    sent += 1
            elif kind == MSG_WS_PREPROCESS:
                for corr in secure_linear.dealer_corrections(self._seeds, rank, msg):
                    self._send(channel, corr, Phase.OFFLINE)
                    sent += 1
            else:
                raise DealerError(f"unknown dealer message type {kind!r}")

    def _charged(self, request: TupleRequest) -> contextlib.AbstractContextManager[None]:
        """Charge the work inside to the ledger scope the request was made in (its label)."""
        label = request.label
        if self.ledger is None or label is None:
            return contextlib.nullcontext()
        return self.ledger.attribute(label.scope, label.op, label.step or None)

    def _send(self, channel: Channel, tensor: torch.Tensor, phase: Phase) -> None:
        if self.ledger is None:
            channel.send(TAG_CORR, tensor)
            return
        with self.ledger.phase(phase):
            channel.send(TAG_CORR, tensor)
