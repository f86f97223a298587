"""CrypTen hooks for the dealer provider and for CSPRNG-only sharing randomness.

CrypTen draws randomness in two places, both from ``torch.Generator`` (Mersenne Twister):

1. Its *tuple provider* (``crypten.mpc.get_default_provider()``, chosen by
   ``crypten.cfg.mpc.provider``) for Beaver triples, squares, binary triples, wraps and B2A
   bits. We register :class:`DealerProvider` under the name ``"PRIVINF"`` in CrypTen's provider
   table and select it; every request then goes to the party's own provider object.
2. ``crypten.generators`` (pairwise "prev"/"next" generators for pseudo-random zero sharings
   used by every input sharing, and "local"/"global") and the two sampling functions of
   ``crypten.common.rng`` that draw from them. We replace the generator table with views onto
   CSPRNG :class:`~protocols.mpc.csprng.Stream` objects and the two functions (where CrypTen
   imported them by name: ``crypten.common.rng``, ``crypten.mpc.primitives.arithmetic``,
   ``crypten.mpc.primitives.binary``) with versions that only accept streams and refuse a
   ``torch.Generator``.

CrypTen reaches both through process-global lookups that take no argument we could pass our
objects through, so :func:`install` patches those lookups once per process to dispatch to the
:class:`PartyContext` bound to the calling thread with :func:`bind` (thread-local, so two parties
can run as threads in one process, as in the unit tests). :func:`uninstall` restores CrypTen.
Nothing else in privinf reads the binding.

``crypten.init()`` would also create and seed (64-bit seeds) Mersenne-Twister generators in
``crypten._setup_prng``; :func:`install` replaces that function with a no-op, so after install no
``torch.Generator`` exists in CrypTen's 2PC path at all (CrypTen's TTP/TFP providers still use
them, but they are not selected). Install before ``crypten.init()``; create and bind the
:class:`PartyContext` after it (the pairwise seeds are agreed over the initialised communicator).
Only CPU tensors are supported.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models import ops
from privinf.ledger.counting import Ledger, Phase
from protocols.mpc.compare import (
    DEFAULT_COMPARISONS,
    DEFAULT_SIGN_BITS,
    bits_for,
    check_comparisons,
    less_than_zero,
)
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.csprng import SEED_BYTES, Stream, check_seed, new_seed
from protocols.mpc.dealer import (
    CORRECTED_RANK,
    TAG_CORR,
    TAG_MSG,
    RequestSchedule,
    TupleRequest,
    expand_shares,
)
from protocols.mpc.fss import SignKey
from protocols.net.channels import Channel

PROVIDER_NAME = "PRIVINF"
_GENERATOR_ROLES = ("prev", "next", "local", "global")


class ProviderError(ValueError):
    """Misuse of the dealer provider or of the CSPRNG hooks (unbound thread, bad device...)."""


# ----- per-party state ------------------------------------------------------------------------
def _seed_tensor(seed: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(check_seed(seed), dtype=np.int64).copy())


def _tensor_seed(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().cpu().to(torch.int64).numpy().tobytes()
    if len(data) != SEED_BYTES:
        raise ProviderError(f"received a {len(data)}-byte seed, expected {SEED_BYTES}")
    return data


class PartyRandomness:
    """The CSPRNG streams that stand in for ``crypten.generators`` for one party."""

    def __init__(self, prev_seed: bytes, next_seed: bytes, local_seed: bytes, global_seed: bytes) -> None:
        self._streams = {
            "prev": Stream(prev_seed, "przs"),
            "next": Stream(next_seed, "przs"),
            "local": Stream(local_seed, "local"),
            "global": Stream(global_seed, "global"),
        }

    def __repr__(self) -> str:
        return "PartyRandomness(prev, next, local, global)"

    def stream(self, role: str) -> Stream:
        if role not in self._streams:
            raise ProviderError(f"unknown generator role {role!r}; expected one of {_GENERATOR_ROLES}")
        return self._streams[role]

    @classmethod
    def agree(cls) -> PartyRandomness:
        """Agree fresh 128-bit pairwise and global seeds over CrypTen's communicator (2 parties).

        Same pattern as CrypTen's ``_sync_seeds``: each party sends its "next" seed to the next
        party and receives its "prev" seed from the previous one; party 0 broadcasts the global
        seed. The dealer never learns these seeds.
        """
        comm = crypten.communicator.get()
        rank, world = comm.get_rank(), comm.get_world_size()
        if world != 2:
            raise ProviderError(f"privinf's CrypTen integration is 2-party, world size is {world}")
        mine = new_seed()
        theirs = torch.zeros(SEED_BYTES // 8, dtype=torch.int64)
        other = 1 - rank
        sending = comm.isend(_seed_tensor(mine), other)
        receiving = comm.irecv(theirs, src=other)
        sending.wait()
        receiving.wait()
        global_seed = comm.broadcast(_seed_tensor(new_seed()), 0)
        return cls(prev_seed=_tensor_seed(theirs), next_seed=mine, local_seed=new_seed(),
                   global_seed=_tensor_seed(global_seed))


class DealerProvider:
    """One party's tuple provider: expands its own shares from its dealer seed.

    Rank 1 expands all its triple shares itself and asks the dealer only for its FSS sign-gate
    keys (whose correction words both keys share); rank 0 takes its dependent share (the
    correction) and its sign keys from preprocessed material if any is stored, else asks the
    dealer online (one JSON request and one array reply on the dealer channel). Every request is
    public (shapes only) and can be recorded into a :class:`RequestSchedule` with :meth:`recording`.
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
        mine = [r.kind == "sign" or self.rank == CORRECTED_RANK for r in schedule.requests]
        if not any(mine):
            return 0
        if self._dealer is None:
            raise ProviderError(f"rank {self.rank} needs a dealer channel to preprocess")
        start = max(self._index, self._reserved_until)
        self._reserved_until = start + inferences * len(schedule)
        msg = {"type": "preprocess", "start": start, "inferences": inferences, "schedule": schedule.to_json()}
        stored = {"triples": 0, "comparison keys": 0}
        with self._offline():
            self._dealer.send_json(TAG_MSG, msg)
            index = start
            for _ in range(inferences):
                for request, wanted in zip(schedule.requests, mine):
                    if wanted:
                        corr = self._receive(request)
                        self._store.append((index, request, corr))
                        stored["comparison keys" if request.kind == "sign" else "triples"] += corr.numel() * 8
                    index += 1
            if self._ledger is not None:
                for what, nbytes in stored.items():
                    if nbytes:
                        self._ledger.record_storage(what, nbytes)
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
        shares = self._tuple(TupleRequest.one_hot(_shape(size), domain), None)
        return shares["r"], shares["u"]

    def row_scale_masks(self, size: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shares of a mask ``a`` [*size], a row mask ``b`` [*size[:-1], 1] and of ``[a * a, a * b]``
        [2, *size], for :mod:`protocols.mpc.fused_norm` (one opening of ``x`` for ``x^2`` and ``x s``)."""
        shares = self._tuple(TupleRequest("rowscale", _shape(size)), None)
        return shares["a"], shares["b"], shares["ab"]

    def gelu_masks(self, size: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Shares of the masks [len(GELU_MASKS), *size] and of their products
        [len(GELU_PRODUCTS), *size] for :mod:`protocols.mpc.fused_gelu`."""
        shares = self._tuple(TupleRequest("gelu", _shape(size)), None)
        return shares["masks"], shares["products"]

    def sign_key(self, size: Any, bits: int) -> SignKey:
        """This party's FSS sign-gate keys for a tensor of ``size`` (both ranks fetch theirs)."""
        request = TupleRequest.sign(_shape(size), bits)
        index = self._next_index(request)
        count = int(np.prod(request.size0, dtype=np.int64))
        return SignKey.from_array(self.rank, bits, count, self._correction(index, request).numpy())

    # ----- internals -------------------------------------------------------------------------
    _DEPENDENT = {"additive": "c", "square": "r2", "binary": "c", "wraps": "theta_r", "B2A": "rA",
                  "onehot": "u", "rowscale": "ab", "gelu": "products"}

    def _next_index(self, request: TupleRequest) -> int:
        index = self._index
        self._index += 1
        if self._recording is not None:
            self._recording.append(request)
        return index

    def _tuple(self, request: TupleRequest, device: Any) -> dict[str, torch.Tensor]:
        _check_device(device)
        index = self._next_index(request)
        shares = expand_shares(self._seed, self.rank, index, request)
        if self.rank == CORRECTED_RANK:
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


def _check_device(device: Any) -> None:
    if device is not None and torch.device(device).type != "cpu":
        raise ProviderError(f"privinf's CSPRNG provider supports CPU tensors only, got device {device}")


@dataclass
class PartyContext:
    """What one party's thread needs bound while CrypTen runs: its randomness, its provider and
    how comparisons run (``"fss"``: dealer keys, :mod:`protocols.mpc.compare`; ``"circuit"``:
    CrypTen's own)."""

    rank: int
    randomness: PartyRandomness
    provider: DealerProvider
    seed: bytes = field(repr=False)  # the party's dealer seed (also keys weight-stationary masks)
    comparisons: str = DEFAULT_COMPARISONS
    sign_bits: int = DEFAULT_SIGN_BITS

    @classmethod
    def create(cls, seed: bytes, dealer: Channel | None = None, ledger: Ledger | None = None,
               comparisons: str = DEFAULT_COMPARISONS) -> PartyContext:
        """After ``crypten.init``: agree pairwise seeds with the peer, build the dealer provider.

        ``dealer`` is this party's link to the dealer (rank 1 fetches only FSS keys on it).
        """
        rank = crypten.communicator.get().get_rank()
        return cls(rank, PartyRandomness.agree(), DealerProvider(rank, seed, dealer, ledger), check_seed(seed),
                   check_comparisons(comparisons))


_BOUND = threading.local()


@contextmanager
def bind(context: PartyContext) -> Iterator[PartyContext]:
    """Route CrypTen's provider and generator lookups in this thread to ``context``."""
    previous = getattr(_BOUND, "context", None)
    _BOUND.context = context
    try:
        yield context
    finally:
        _BOUND.context = previous


def bound() -> PartyContext | None:
    """The context bound to this thread, or None (plain CrypTen sessions, e.g. in tests)."""
    return getattr(_BOUND, "context", None)


def current() -> PartyContext:
    """The context bound to this thread (raises if none: CrypTen would otherwise fall back to MT)."""
    context = getattr(_BOUND, "context", None)
    if context is None:
        raise ProviderError("no privinf PartyContext bound in this thread: wrap CrypTen calls in bind(context)")
    return context


# ----- the hooks ------------------------------------------------------------------------------
class _GeneratorView:
    """Stands in for ``crypten.generators[role]``: indexing by device gives the bound party's stream."""

    def __init__(self, role: str) -> None:
        self.role = role

    def __getitem__(self, device: Any) -> Stream:
        _check_device(device)
        return current().randomness.stream(self.role)


class _GeneratorTable(dict):
    """``crypten.generators`` while installed: {role: view}. A dict subclass so that the
    communicator hook (:mod:`protocols.mpc.cryptenlib.communicator`) sees the table is already per-thread
    and keeps it."""


def _skip_mersenne_twister_setup() -> None:
    """Replaces ``crypten._setup_prng`` (called by ``crypten.init``): no torch generators are
    created or seeded; :meth:`PartyRandomness.agree` does the seed exchange with 128-bit seeds."""


def _stream_for(generator: Any) -> Stream:
    if generator is None:
        return current().randomness.stream("local")
    if isinstance(generator, Stream):
        return generator
    raise ProviderError(f"CrypTen asked for randomness from a {type(generator).__name__}; privinf allows only "
                        "CSPRNG streams in the share and triple path")


def _shape(size: Any) -> tuple[int, ...]:
    return (int(size),) if isinstance(size, int) else tuple(int(d) for d in size)


def generate_random_ring_element(size: Any, ring_size: int = 2**64, generator: Any = None,
                                 **kwargs: Any) -> torch.Tensor:
    """Drop-in for ``crypten.common.rng.generate_random_ring_element`` drawing from a CSPRNG stream."""
    if ring_size != 2**64:
        raise ProviderError(f"only the ring Z_2^64 is supported, got ring size {ring_size}")
    _check_device(kwargs.get("device"))
    return _stream_for(generator).ring(_shape(size))


def generate_kbit_random_tensor(size: Any, bitlength: int | None = None, generator: Any = None,
                                **kwargs: Any) -> torch.Tensor:
    """Drop-in for ``crypten.common.rng.generate_kbit_random_tensor`` drawing from a CSPRNG stream."""
    _check_device(kwargs.get("device"))
    return _stream_for(generator).bits(_shape(size), 64 if bitlength is None else bitlength)


class _ThreadBoundProvider:
    """The object registered in CrypTen's provider table: forwards to the bound party's provider."""

    NAME = PROVIDER_NAME

    def generate_additive_triple(self, *args: Any, **kwargs: Any) -> Any:
        return current().provider.generate_additive_triple(*args, **kwargs)

    def square(self, *args: Any, **kwargs: Any) -> Any:
        return current().provider.square(*args, **kwargs)

    def generate_binary_triple(self, *args: Any, **kwargs: Any) -> Any:
        return current().provider.generate_binary_triple(*args, **kwargs)

    def wrap_rng(self, *args: Any, **kwargs: Any) -> Any:
        return current().provider.wrap_rng(*args, **kwargs)

    def B2A_rng(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        return current().provider.B2A_rng(*args, **kwargs)

    def trace(self, tracing: bool = True) -> None:
        raise ProviderError("CrypTen tuple tracing is replaced by DealerProvider.recording() and preprocess()")

    def trace_once(self) -> None:
        self.trace()

    def fill_cache(self) -> None:
        self.trace()


def _ltz(self: Any) -> Any:
    """Stands in for ``MPCTensor._ltz``: the bound party's FSS gate, or CrypTen's circuit."""
    context = getattr(_BOUND, "context", None)
    if context is None or context.comparisons != "fss" or self.ptype.name != "arithmetic":
        return _saved["ltz"](self)
    return less_than_zero(self, context.provider, bits_for(ops.comparison_bound(), context.sign_bits))


_RNG_MODULES = ("crypten.common.rng", "crypten.mpc.primitives.arithmetic", "crypten.mpc.primitives.binary")
_RNG_FUNCS = {"generate_random_ring_element": generate_random_ring_element,
              "generate_kbit_random_tensor": generate_kbit_random_tensor}
_install_lock = threading.Lock()
_saved: dict[str, Any] = {}


def _providers() -> dict[str, Any]:
    return getattr(crypten.mpc, "__SUPPORTED_PROVIDERS")


def install() -> None:
    """Patch CrypTen (once per process, idempotent) to use the bound party's provider and streams."""
    import importlib

    with _install_lock:
        if _saved:
            return
        _saved["provider_cfg"] = crypten.cfg.mpc.provider
        _saved["generators"] = crypten.generators
        for module_name in _RNG_MODULES:
            module = importlib.import_module(module_name)
            for func_name, replacement in _RNG_FUNCS.items():
                if hasattr(module, func_name):
                    _saved[f"{module_name}:{func_name}"] = getattr(module, func_name)
                    setattr(module, func_name, replacement)
        _saved["ltz"] = crypten.mpc.MPCTensor._ltz
        crypten.mpc.MPCTensor._ltz = _ltz
        _saved["setup_prng"] = crypten._setup_prng
        crypten._setup_prng = _skip_mersenne_twister_setup
        crypten.generators = _GeneratorTable({role: _GeneratorView(role) for role in _GENERATOR_ROLES})
        _providers()[PROVIDER_NAME] = _ThreadBoundProvider()
        crypten.cfg.mpc.provider = PROVIDER_NAME


def uninstall() -> None:
    """Undo :func:`install`, restoring CrypTen's own provider choice and generators."""
    import importlib

    with _install_lock:
        if not _saved:
            return
        for key, original in list(_saved.items()):
            if ":" in key:
                module_name, func_name = key.split(":")
                setattr(importlib.import_module(module_name), func_name, original)
        crypten.generators = _saved["generators"]
        crypten.mpc.MPCTensor._ltz = _saved["ltz"]
        crypten._setup_prng = _saved["setup_prng"]
        _providers().pop(PROVIDER_NAME, None)
        crypten.cfg.mpc.provider = _saved["provider_cfg"]
        _saved.clear()


def is_installed() -> bool:
    return bool(_saved)
