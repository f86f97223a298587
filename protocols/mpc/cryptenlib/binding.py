"""What is bound to the calling thread while CrypTen runs in it.

CrypTen reaches its randomness and its tuple provider through process-global lookups, so the
hooks installed by :func:`protocols.mpc.cryptenlib.install` ask this module which party the
calling thread is: how it draws randomness (set by ``install``: privinf's CSPRNG streams and
dealer, or CrypTen's own generators and provider) and, in the privinf case, its
:class:`~protocols.mpc.cryptenlib.provider.PartyContext` (set by :func:`bind` after
``crypten.init()``). Everything is thread-local, so two parties can run as threads of one process
(unit tests, :mod:`protocols.routes.local_run`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PRIVINF_RANDOMNESS = "privinf"  # CSPRNG streams for sharing, the dealer for tuples
CRYPTEN_RANDOMNESS = "crypten"  # CrypTen's Mersenne-Twister generators and its own provider
RANDOMNESS = (PRIVINF_RANDOMNESS, CRYPTEN_RANDOMNESS)

_THREAD = threading.local()


class ProviderError(ValueError):
    """Misuse of the dealer provider or of the CSPRNG hooks (unbound thread, bad device...)."""


def set_randomness(randomness: str | None) -> None:
    """Record how this thread draws randomness (None: forget; set by ``install``/``uninstall``)."""
    if randomness is not None and randomness not in RANDOMNESS:
        raise ProviderError(f"randomness must be one of {RANDOMNESS}, got {randomness!r}")
    _THREAD.randomness = randomness


def uses_crypten_randomness() -> bool:
    """True only in a thread installed with CrypTen's own randomness; every other thread (also one
    that installed nothing) gets privinf's CSPRNG and refuses torch generators."""
    return getattr(_THREAD, "randomness", None) == CRYPTEN_RANDOMNESS


@contextmanager
def bind(context: Any) -> Iterator[Any]:
    """Route CrypTen's provider and generator lookups in this thread to ``context`` (a
    :class:`~protocols.mpc.cryptenlib.provider.PartyContext`; typed loosely: that module sits
    above this one)."""
    previous = getattr(_THREAD, "context", None)
    _THREAD.context = context
    try:
        yield context
    finally:
        _THREAD.context = previous


def bound() -> Any | None:
    """The context bound to this thread, or None (plain CrypTen sessions, e.g. in tests)."""
    return getattr(_THREAD, "context", None)


def current() -> Any:
    """The context bound to this thread (raises if none: CrypTen would otherwise fall back to MT)."""
    context = getattr(_THREAD, "context", None)
    if context is None:
        raise ProviderError("no privinf PartyContext bound in this thread: wrap CrypTen calls in bind(context)")
    return context
