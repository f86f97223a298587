"""CrypTen's ``cfg`` with cached reads, and per thread when both parties run in one process.

CrypTen reads its OmegaConf configuration on every tensor attribute access
(``cfg.debug.validation_mode`` in ``CrypTensor.__getattribute__``) and in every arithmetic op
(``cfg.encoder.precision_bits``, ``cfg.mpc.active_security``...): ~80,000 reads per party and
GPT-2 decode step at ~20 us each through OmegaConf, a sixth of a party's time. While a session is
installed (:func:`protocols.mpc.cryptenlib.install`) ``crypten.cfg`` is an instance of
:class:`CachedConfig`: the first read of a name in a given config object goes through OmegaConf
and is kept; later reads are plain attribute lookups. Values are the same: a cache belongs to
one config object, and ``cfg.temp_override`` / ``load_config`` / ``set_config`` / top-level
assignment all install a new object (a fresh cache); nested assignment
(``cfg.mpc.provider = ...``) writes through to OmegaConf and drops the cached value.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig

from protocols.mpc.cryptenlib.compat import crypten

_BASE = type(crypten.cfg)
_OWN = frozenset(dir(_BASE)) | {"config", "_local", "__dict__", "__class__"}
_MAX_CONFIGS = 64


class _View:
    """Cached attribute view of one OmegaConf node (sub-nodes are views too)."""

    def __init__(self, node: DictConfig) -> None:
        object.__setattr__(self, "_node", node)

    def __getattr__(self, name: str) -> Any:  # only called for names not cached yet
        value = getattr(object.__getattribute__(self, "_node"), name)
        if isinstance(value, DictConfig):
            value = _View(value)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_node"), name, value)
        self.__dict__.pop(name, None)

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def __repr__(self) -> str:
        return f"_View({object.__getattribute__(self, '_node')!r})"


_views: dict[int, tuple[Any, dict[str, Any]]] = {}


def _cached(config: Any, name: str) -> Any:
    entry = _views.get(id(config))
    if entry is None or entry[0] is not config:
        if len(_views) >= _MAX_CONFIGS:
            _views.clear()
        entry = (config, {})
        _views[id(config)] = entry
    first, _, rest = name.partition(".")
    try:
        value = entry[1][first]
    except KeyError:
        value = getattr(config, first)
        if isinstance(value, DictConfig):
            value = _View(value)
        entry[1][first] = value
    for key in rest.split(".") if rest else ():  # dotted names through the views: one cache per node
        value = getattr(value, key)
    return value


class CachedConfig(_BASE):  # type: ignore[misc, valid-type]
    """CrypTen's config class with cached reads (see module doc)."""

    def __getattribute__(self, name: str) -> Any:
        if name in _OWN:
            return object.__getattribute__(self, name)
        return _cached(object.__getattribute__(self, "config"), name)


class ThreadLocalConfig(CachedConfig):
    """CrypTen's cfg with a per-thread ``config`` (see :func:`parties_as_threads`)."""

    _local = threading.local()

    @property
    def config(self) -> Any:
        local = getattr(self._local, "config", None)  # not `or`: a DictConfig's truth value walks its keys
        return local if local is not None else self.__dict__["config"]

    @config.setter
    def config(self, value: Any) -> None:
        self._local.config = value


def shipped_config() -> Any:
    """A fresh copy of the configuration CrypTen ships (its ``default.yaml``), as an OmegaConf node."""
    return _BASE().config


_lock = threading.Lock()
_users = 0


def _set_class(cls: type) -> None:
    """Switch ``crypten.cfg``'s class; the caches start empty, since writes made while the
    plain class was in place went to OmegaConf directly, past the views."""
    _views.clear()
    crypten.cfg.__class__ = cls


def use_cached_reads() -> None:
    """Make ``crypten.cfg`` a :class:`CachedConfig` (counted; undo with :func:`release`)."""
    global _users
    with _lock:
        if _users == 0 and type(crypten.cfg) is _BASE:
            _set_class(CachedConfig)
        _users += 1


def release() -> None:
    """Undo one :func:`use_cached_reads`; CrypTen's own class returns with the last one."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if _users == 0 and type(crypten.cfg) is CachedConfig:
            _set_class(_BASE)


@contextmanager
def parties_as_threads() -> Iterator[None]:
    """Let both computing parties run as threads of this process (tests, benches, debugging).

    ``cfg.temp_override`` (inside softmax, max, reciprocal) swaps CrypTen's whole config object
    and restores it afterwards; two party threads would interleave those swaps and run
    different circuits. Inside this block the config is per thread (and its reads cached). A
    deployment runs one party per process and never needs it.
    """
    original = type(crypten.cfg)
    _set_class(ThreadLocalConfig)
    try:
        yield
    finally:
        _set_class(original)
