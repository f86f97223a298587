"""Each party's CrypTen tuple provider (the dealer) and what one party binds to its thread.

CrypTen asks its *tuple provider* (``crypten.mpc.get_default_provider()``, chosen by
``crypten.cfg.mpc.provider``) for Beaver triples, squares, binary triples, wraps and B2A bits,
drawn from Mersenne-Twister generators. While privinf's integration is installed
(:func:`protocols.mpc.cryptenlib.install`) the provider table names ``"PRIVINF"``, which forwards
every request to the :class:`DealerProvider` of the :class:`PartyContext` bound to the calling
thread with :func:`bind`: it expands the party's shares from its dealer seed and takes the
corrections and FSS keys from the dealer. The sharing randomness (``crypten.generators``) comes
from the context's :class:`~protocols.mpc.cryptenlib.randomness.PartyRandomness`.

Install before ``crypten.init()``; create and bind the :class:`PartyContext` after it (the
pairwise seeds are agreed over the initialised communicator). Only CPU tensors are supported.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models import ops
from privinf.ledger.counting import Ledger, Phase
from protocols.mpc.compare import bits_for, less_than_zero
from protocols.mpc.cryptenlib.binding import ProviderError, bind, bound, current
from protocols.mpc.cryptenlib.compat import crypten
from protocols.mpc.cryptenlib.randomness import PartyRandomness, as_shape, check_device
from protocols.mpc.csprng import check_seed
from protocols.mpc.dealer import expand_shares
from protocols.mpc.fss import SignKey
from protocols.mpc.fss_bit import BitSignKey
from protocols.mpc.fss_dpf import DpfKey
from protocols.mpc.vocabulary import (
    CORRECTED_RANK,
    FETCHED_BY_BOTH,
    KEY_KINDS,
    TAG_CORR,
    TAG_MSG,
    DealerError,
    RequestSchedule,
    ScopeLabel,
    TupleRequest,
)
from protocols.net.channels import Channel
from protocols.protocol_config import ProtocolConfig

__all__ = ["DealerProvider", "PartyContext", "ProviderError", "bind", "bound", "current"]


class DealerProvider:
    """One party's tuple provider: expands its own shares from its dealer seed.

    Rank 1 expands all its triple shares itself and asks the dealer only for its FSS sign-gate
    keys (whose correction words both keys share); rank 0 takes its dependent share (the
    correction) and its sign keys from preprocessed material if any is stored, else asks the
    dealer online (one JSON request and one array reply on the dealer channel). Every request is
    public (shapes only) and can be recorded into a :class:`RequestSchedule` with :meth:`recording`.

    With a ledger, each request is labelled with the scope it is made in (:class:`ScopeLabel`):
    the dealer charges what it sends to that scope, and preprocessed material is charged (offline,
    bytes and storage) to the scope of the request that will consume it.
    """

    def __init__(self, rank: int, seed: bytes, dealer: Channel | None = None, ledger: Ledger | None = None) -> None:
        if rank not in (0, 1):
            raise ProviderError(f"rank must be 0 or 1, got {rank}")
        self.rank = rank
        self._seed = check_seed(seed)
        self._dealer = dealer
        self._ledger = ledger
        self._index = 0
        self._store: deque[tuple[int, TupleRequest, torch.Tensor]] = deque()
        self._recording: RequestSchedule | None = None
        self._reserved_until = 0  # first request index not covered by material asked for

    def __repr__(self) -> str:
        return f"DealerProvider(rank={self.rank}, requests={self._index}, stored={len(self._store)})"

    @property
    def dealer(self) -> Channel | None:
        """This party's link to the dealer (weight-stationary preprocessing shares it)."""
        return self._dealer

    @property
    def requests_made(self) -> int:
        return self._index

    @property
    def stored(self) -> int:
        """Preprocessed corrections not yet used."""
        return len(self._store)

    @contextmanager
    def recording(self) -> Iterator[RequestSchedule]:
        """Record the requests made inside the block (e.g. one inference) as a schedule."""
        schedule = RequestSchedule()
        self._recording = schedule
        try:
            yield schedule
        finally:
            self._recording = None

    def preprocess(self, schedule: RequestSchedule, inferences: int) -> int:
        """Offline: have the dealer stream material for ``inferences`` runs of ``schedule``.

        Rank 0 stores every correction (``triples`` storage) and its FSS sign keys; rank 1 only
        its sign keys (``comparison keys``), and returns 0 without asking when there are none.
        Returns the bytes stored.
        """
        if inferences < 1 or len(schedule) == 0:
            raise ProviderError(f"nothing to preprocess: {inferences} inferences of {len(schedule)} requests")
        mine = [r.kind in FETCHED_BY_BOTH or self.rank == CORRECTED_RANK for r in schedule.requests]
        if not any(mine):
            return 0
        if self._dealer is None:
            raise ProviderError(f"rank {self.rank} needs a dealer channel to preprocess")
        start = max(self._index, self._reserved_until)
        self._reserved_until = start + inferences * len(schedule)
        msg = {"type": "preprocess", "start": start, "inferences": inferences, "schedule": schedule.to_json()}
        stored = {"triples": 0, "comparison keys": 0, "lookup keys": 0}
        with self._offline():
            self._dealer.send_json(TAG_MSG, msg)
            index = start
            for _ in range(inferences):
                for request, wanted in zip(schedule.requests, mine):
                    if wanted:
                        with self._charged(request):
                            corr = self._receive(request)
                            what = ("comparison keys" if request.kind in KEY_KINDS
                                    else "lookup keys" if request.kind == "dpf" else "triples")
                            if self._ledger is not None:
                                self._ledger.record_storage(what, corr.numel() * 8)
                        self._store.append((index, request, corr))
                        stored[what] += corr.numel() * 8
                    index += 1
        return sum(stored.values())

    def close(self) -> None:
        """Tell the dealer this party is done with its link (ends the dealer's serve loop)."""
        if self._dealer is not None:
            self._dealer.send_json(TAG_MSG, {"type": "end"})

    # ----- CrypTen's provider interface ------------------------------------------------------
    def generate_additive_triple(self, size0: Any, size1: Any, op: str, device: Any = None,
                                 *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        """Beaver triple (a, b, op(a, b)) for mul/matmul/conv ops, as arithmetic shares."""
        if args:
            raise ProviderError(f"positional op arguments are not supported for {op}: pass them by name")
        shares = self._tuple(TupleRequest.additive(size0, size1, op, **kwargs), device)
        return _arith(shares["a"]), _arith(shares["b"]), _arith(shares["c"])

    def square(self, size: Any, device: Any = None) -> tuple[Any, Any]:
        """(r, r*r) as arithmetic shares."""
        shares = self._tuple(TupleRequest("square", tuple(size)), device)
        return _arith(shares["r"]), _arith(shares["r2"])

    def generate_binary_triple(self, size0: Any, size1: Any, device: Any = None) -> tuple[Any, Any, Any]:
        """XOR-shared (a, b, a & b)."""
        shares = self._tuple(TupleRequest("binary", tuple(size0), tuple(size1)), device)
        return _binary(shares["a"]), _binary(shares["b"]), _binary(shares["c"])

    def wrap_rng(self, size: Any, device: Any = None) -> tuple[Any, Any]:
        """Random shared r and a sharing of the number of wraps of its shares."""
        shares = self._tuple(TupleRequest("wraps", tuple(size)), device)
        return _arith(shares["r"]), _arith(shares["theta_r"])

    def B2A_rng(self, size: Any, device: Any = None) -> tuple[Any, Any]:  # noqa: N802 - CrypTen's name
        """A random bit shared both arithmetically and by XOR."""
        shares = self._tuple(TupleRequest("B2A", tuple(size)), device)
        return _arith(shares["rA"]), _binary(shares["rB"])

    def one_hot_mask(self, size: Any, domain: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This party's shares of a random ``rho`` per element (uniform mod ``domain`` once summed)
        and of the unit vector ``e_rho`` at scale 2^16 [*size, domain] (:mod:`protocols.mpc.onehot`)."""
        shares = self._tuple(TupleRequest.one_hot(as_shape(size), domain), None)
        return shares["r"], shares["u"]

    def row_scale_masks(self, size: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shares of a mask ``a`` [*size], a row mask ``b`` [*size[:-1], 1] and of ``[a * a, a * b]``
        [2, *size], for :mod:`protocols.mpc.fused_norm` (one opening of ``x`` for ``x^2`` and ``x s``)."""
        shares = self._tuple(TupleRequest("rowscale", as_shape(size)), None)
        return shares["a"], shares["b"], shares["ab"]

    def gelu_masks(self, size: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Shares of the masks [len(GELU_MASKS), *size] and of their products
        [len(GELU_PRODUCTS), *size] for :mod:`protocols.mpc.fused_gelu`."""
        shares = self._tuple(TupleRequest("gelu", as_shape(size)), None)
        return shares["masks"], shares["products"]

    def sign_key(self, size: Any, bits: int) -> SignKey:
        """This party's FSS sign-gate keys for a tensor of ``size`` (both ranks fetch theirs)."""
        index, request = self._next_index(TupleRequest.sign(as_shape(size), bits))
        count = int(np.prod(request.size0, dtype=np.int64))
        return SignKey.from_array(self.rank, bits, count, self._correction(index, request).numpy())

    def bit_sign_key(self, size: Any, bits: int) -> BitSignKey:
        """This party's bit-output FSS sign-gate keys (:mod:`protocols.mpc.fss_bit`) for a tensor of ``size``."""
        index, request = self._next_index(TupleRequest.sign_bit(as_shape(size), bits))
        count = int(np.prod(request.size0, dtype=np.int64))
        return BitSignKey.from_array(self.rank, bits, count, self._correction(index, request).numpy())

    def dpf_key(self, size: Any, bits: int, payload: int = 1, shift: int = 0) -> tuple[torch.Tensor, DpfKey]:
        """This party's share of a random ring ``mask`` [*size] and its DPF keys (:mod:`protocols.mpc.fss_dpf`)
        at ``(mask >> shift) mod 2^bits`` with payload ``(1,)`` or ``(1, mask)`` (both ranks fetch the
        shared words; the root seeds and the mask come from the party's own stream)."""
        shares = self._tuple(TupleRequest.dpf(as_shape(size), bits, payload, shift), None)
        count = shares["mask"].numel()
        return shares["mask"], DpfKey.from_parts(self.rank, bits, count, shares["seeds"].numpy(),
                                                 shares["shared"].numpy(), payload)

    # ----- internals -------------------------------------------------------------------------
    _DEPENDENT = {"additive": "c", "square": "r2", "binary": "c", "wraps": "theta_r", "B2A": "rA",
                  "onehot": "u", "rowscale": "ab", "gelu": "products", "dpf": "shared"}

    def _next_index(self, request: TupleRequest) -> tuple[int, TupleRequest]:
        """The next request index and the request labelled with the scope it is made in."""
        index = self._index
        self._index += 1
        request = request.labelled(self._label())
        if self._recording is not None:
            self._recording.append(request)
        return index, request

    def _label(self) -> ScopeLabel | None:
        """The ledger's current scope, op and step; None without a ledger or for a scope name a
        label cannot carry (the dealer then charges its session row)."""
        if self._ledger is None:
            return None
        try:
            return ScopeLabel(self._ledger.current_scope, self._ledger.current_op, self._ledger.current_step)
        except DealerError:
            return None

    @contextmanager
    def _charged(self, request: TupleRequest) -> Iterator[None]:
        """Charge what is recorded inside to the scope that will consume ``request``."""
        label = request.label
        if self._ledger is None or label is None:
            yield
            return
        with self._ledger.attribute(label.scope, label.op, label.step or None):
            yield

    def _tuple(self, request: TupleRequest, device: Any) -> dict[str, torch.Tensor]:
        check_device(device)
        index, request = self._next_index(request)
        shares = expand_shares(self._seed, self.rank, index, request)
        if self.rank == CORRECTED_RANK or request.kind in FETCHED_BY_BOTH:
            shares[self._DEPENDENT[request.kind]] = self._correction(index, request)
        return shares

    def _correction(self, index: int, request: TupleRequest) -> torch.Tensor:
        if self._store:
            stored_index, stored_request, corr = self._store.popleft()
            if stored_index != index or stored_request != request:
                raise ProviderError(
                    f"request {index} ({request.to_json()}) does not match the preprocessed schedule "
                    f"(request {stored_index}: {stored_request.to_json()})")
            return corr
        if self._dealer is None:
            raise ProviderError(f"no preprocessed correction left for request {index} and no dealer channel")
        self._dealer.send_json(TAG_MSG, {"type": "tuple", "index": index, "request": request.to_json()})
        if self._ledger is not None:
            self._ledger.record_rounds(1)  # a round trip to the dealer on this party's critical path
        return self._receive(request)

    def _receive(self, request: TupleRequest) -> torch.Tensor:
        assert self._dealer is not None
        data = self._dealer.recv(TAG_CORR)
        corr = torch.from_numpy(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
        expected = request.output_shape()
        if tuple(corr.shape) != expected or corr.dtype != torch.int64:
            raise ProviderError(f"dealer sent {corr.dtype} {list(corr.shape)} for {request.kind}, "
                                f"expected int64 {list(expected)}")
        return corr

    @contextmanager
    def _offline(self) -> Iterator[None]:
        if self._ledger is None:
            yield
            return
        with self._ledger.phase(Phase.OFFLINE):
            yield


def _arith(share: torch.Tensor) -> Any:
    from crypten.mpc.primitives import ArithmeticSharedTensor

    return ArithmeticSharedTensor.from_shares(share, precision=0)


def _binary(share: torch.Tensor) -> Any:
    from crypten.mpc.primitives import BinarySharedTensor

    return BinarySharedTensor.from_shares(share)


@dataclass
class PartyContext:
    """What one party's thread needs bound while CrypTen runs: its randomness, its provider and
    the session's protocol configuration (e.g. how comparisons run: ``"fss"``, dealer keys,
    :mod:`protocols.mpc.compare`; ``"circuit"``, CrypTen's own)."""

    rank: int
    randomness: PartyRandomness
    provider: DealerProvider
    seed: bytes = field(repr=False)  # the party's dealer seed (also keys weight-stationary masks)
    config: ProtocolConfig = ProtocolConfig()

    @classmethod
    def create(cls, seed: bytes, dealer: Channel | None = None, ledger: Ledger | None = None,
               config: ProtocolConfig | None = None) -> PartyContext:
        """After ``crypten.init``: agree pairwise seeds with the peer, build the dealer provider.

        ``dealer`` is this party's link to the dealer (rank 1 fetches only FSS keys on it).
        """
        rank = crypten.communicator.get().get_rank()
        return cls(rank, PartyRandomness.agree(), DealerProvider(rank, seed, dealer, ledger), check_seed(seed),
                   config or ProtocolConfig())

    def compares_with_keys(self, x: Any) -> bool:
        """Whether ``x < 0`` runs on the dealer's FSS keys here (else on CrypTen's circuit)."""
        return self.config.comparisons == "fss" and x.ptype.name == "arithmetic"

    def less_than_zero(self, x: Any) -> Any:
        """``[x < 0]`` by the FSS gate, as wide as the innermost ``models.ops.compare_bound`` allows."""
        bits = bits_for(ops.comparison_bound(), self.config.comparison_bits, self.config.fixed_point_bits)
        return less_than_zero(x, self.provider, bits)
