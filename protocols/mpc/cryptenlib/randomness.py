"""CrypTen's sharing randomness: the one owner of ``crypten.generators`` and its samplers.

CrypTen draws the randomness of every input sharing (pseudo-random zero sharings from the
pairwise "prev"/"next" generators) and of its "local"/"global" draws from ``crypten.generators``
through the two sampling functions of ``crypten.common.rng``, all ``torch.Generator``s (Mersenne
Twister, 64-bit seeds set up by ``crypten._setup_prng`` in ``crypten.init()``). While privinf's
integration is installed (:func:`protocols.mpc.cryptenlib.install`), these stand in for them:

- :class:`PartyGenerators` is ``crypten.generators``: one table that answers per thread. A
  thread installed with privinf's randomness gets views onto the CSPRNG
  :class:`~protocols.mpc.csprng.Stream` objects of the :class:`PartyRandomness` in its bound
  ``PartyContext``; a thread installed with CrypTen's own randomness (baselines, transport
  tests) gets its own {device: torch.Generator} dicts, so two such parties in two threads do not
  overwrite each other's seeds.
- :func:`generate_random_ring_element` and :func:`generate_kbit_random_tensor` draw from the
  streams and refuse a ``torch.Generator`` (CrypTen's own functions in a CrypTen-randomness thread).
- :func:`setup_prng` replaces ``crypten._setup_prng``: no torch generator is created or seeded
  for privinf parties (:meth:`PartyRandomness.agree` exchanges 128-bit seeds instead).

Only CPU tensors are supported.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from protocols.mpc.cryptenlib.binding import ProviderError, current, uses_crypten_randomness
from protocols.mpc.cryptenlib.compat import crypten
from protocols.mpc.csprng import SEED_BYTES, Stream, check_seed, new_seed

GENERATOR_ROLES = ("prev", "next", "local", "global")
# CrypTen's own functions, taken at import (before anything is installed): a thread that uses
# CrypTen's randomness still calls them.
_CRYPTEN_SETUP_PRNG = crypten._setup_prng
_CRYPTEN_RING_ELEMENT = crypten.common.rng.generate_random_ring_element
_CRYPTEN_KBIT_TENSOR = crypten.common.rng.generate_kbit_random_tensor


def check_device(device: Any) -> None:
    """Refuse any device but the CPU (the CSPRNG streams and the dealer produce CPU tensors)."""
    if device is not None and torch.device(device).type != "cpu":
        raise ProviderError(f"privinf's CSPRNG provider supports CPU tensors only, got device {device}")


def as_shape(size: Any) -> tuple[int, ...]:
    """A size as CrypTen passes it (an int, a list or a torch.Size) as a tuple of ints."""
    return (int(size),) if isinstance(size, int) else tuple(int(d) for d in size)


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
        """The stream CrypTen's generator ``role`` stands for."""
        if role not in self._streams:
            raise ProviderError(f"unknown generator role {role!r}; expected one of {GENERATOR_ROLES}")
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


class _StreamView:
    """``crypten.generators[role]`` for a privinf party: indexing by device gives its stream."""

    def __init__(self, role: str) -> None:
        self.role = role

    def __getitem__(self, device: Any) -> Stream:
        check_device(device)
        return current().randomness.stream(self.role)


class PartyGenerators(Mapping):
    """``crypten.generators`` while installed: {role: generators}, answered per thread (module doc)."""

    def __init__(self) -> None:
        self._views = {role: _StreamView(role) for role in GENERATOR_ROLES}
        self._torch = threading.local()

    def __getitem__(self, role: str) -> Any:
        if role not in self._views:
            raise KeyError(role)
        if not uses_crypten_randomness():
            return self._views[role]
        mine = getattr(self._torch, "generators", None)
        if mine is None:
            mine = self._torch.generators = {key: {} for key in GENERATOR_ROLES}
        return mine[role]

    def __iter__(self) -> Iterator[str]:
        return iter(GENERATOR_ROLES)

    def __len__(self) -> int:
        return len(GENERATOR_ROLES)

    def forget_thread(self) -> None:
        """Drop the calling thread's torch generators (its party is uninstalled)."""
        self._torch.generators = None


def setup_prng() -> None:
    """Replaces ``crypten._setup_prng`` (called by ``crypten.init``): CrypTen's seed exchange for a
    CrypTen-randomness thread, nothing for a privinf party (no torch generator is created)."""
    if uses_crypten_randomness():
        _CRYPTEN_SETUP_PRNG()


def _stream_for(generator: Any) -> Stream:
    if generator is None:
        return current().randomness.stream("local")
    if isinstance(generator, Stream):
        return generator
    raise ProviderError(f"CrypTen asked for randomness from a {type(generator).__name__}; privinf allows only "
                        "CSPRNG streams in the share and triple path")


def generate_random_ring_element(size: Any, ring_size: int = 2**64, generator: Any = None,
                                 **kwargs: Any) -> torch.Tensor:
    """Drop-in for ``crypten.common.rng.generate_random_ring_element`` drawing from a CSPRNG stream."""
    if uses_crypten_randomness():
        return _CRYPTEN_RING_ELEMENT(size, ring_size=ring_size, generator=generator, **kwargs)
    if ring_size != 2**64:
        raise ProviderError(f"only the ring Z_2^64 is supported, got ring size {ring_size}")
    check_device(kwargs.get("device"))
    return _stream_for(generator).ring(as_shape(size))


def generate_kbit_random_tensor(size: Any, bitlength: int | None = None, generator: Any = None,
                                **kwargs: Any) -> torch.Tensor:
    """Drop-in for ``crypten.common.rng.generate_kbit_random_tensor`` drawing from a CSPRNG stream."""
    if uses_crypten_randomness():
        return _CRYPTEN_KBIT_TENSOR(size, bitlength=bitlength, generator=generator, **kwargs)
    check_device(kwargs.get("device"))
    return _stream_for(generator).bits(as_shape(size), 64 if bitlength is None else bitlength)


SAMPLERS = {"generate_random_ring_element": generate_random_ring_element,
            "generate_kbit_random_tensor": generate_kbit_random_tensor}
