"""Everything privinf changes in CrypTen, installed and removed as one: :func:`install` / :func:`uninstall`.

CrypTen reaches its communicator, configuration, randomness, tuple provider and comparison
circuit through process-global names that take no argument we could pass a party through. The
first :func:`install` in the process rebinds all of them at once; the last :func:`uninstall`
puts CrypTen's own objects back:

- ``DistributedCommunicator`` in ``crypten.communicator`` and ``crypten.mpc.context``: the class
  :class:`~protocols.mpc.cryptenlib.communicator.ChannelCommunicator` (CrypTen picks its class by
  that name; patching ``get`` alone hangs ``crypten.init()``);
- ``crypten.cfg``: reads cached (:mod:`protocols.mpc.cryptenlib.config_cache`);
- ``crypten.generators``, ``crypten._setup_prng`` and the two samplers of ``crypten.common.rng``
  (also where CrypTen imported them by name): :mod:`protocols.mpc.cryptenlib.randomness`, the one
  owner of the generator table;
- ``crypten.mpc.get_default_provider``: the bound party's dealer provider
  (:mod:`protocols.mpc.cryptenlib.provider`), whatever ``cfg.mpc.provider`` says (a config
  object swapped by ``cfg.temp_override`` cannot lose the choice);
- ``MPCTensor._ltz`` (every comparison): the FSS gate of :mod:`protocols.mpc.compare` when the
  bound party compares with dealer keys, CrypTen's circuit otherwise;
- ``MPCTensor.shallow_copy`` (every op's result), ``clone``, ``from_shares`` (every comparison
  result and wrapped share) and the dummy behind the static ``MPCTensor.cat`` / ``stack``
  (``CrypTensorMetaclass.__getattribute__``): without CrypTen's constructor, which secret-shares
  an empty tensor first (a PRZS and an encoding, about 75 us per tensor; no randomness is drawn
  for an empty tensor, so results are bit for bit the same);
- ``CrypTensor.__getattribute__`` (every attribute and op of a shared tensor) and CrypTen's
  autograd switch: CrypTen's lookup without its validation hook (``cfg.debug.validation_mode``
  decrypts every result to check it, which a session between two companies must never do) and
  without its reads of class lists through the metaclass on every access (about 3x faster per
  access), and autograd off (private inference never differentiates; with it on, every op goes
  through a freshly built autograd closure and two more lookups).

The set of replaced names does not depend on the arguments or on the order of installs: what
differs between parties is bound to their thread (channel, rank, ledger and how the thread
draws randomness here; the ``PartyContext`` with :func:`~protocols.mpc.cryptenlib.provider.bind`),
and every replacement asks the calling thread. So two parties run as two threads of one process,
installs nest (counted per thread and per process), and a thread installed with CrypTen's own
randomness (``randomness="crypten"``: baselines, transport tests) sees CrypTen's generators,
samplers and provider while another thread uses privinf's. The onnx compatibility fix is not
undone: CrypTen cannot be imported without it (:mod:`protocols.mpc.cryptenlib.compat`).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import OmegaConf

from privinf.ledger.counting import Ledger
from protocols.mpc.cryptenlib import config_cache
from protocols.mpc.cryptenlib.binding import (
    PRIVINF_RANDOMNESS,
    RANDOMNESS,
    ProviderError,
    bound,
    current,
    set_randomness,
    uses_crypten_randomness,
)
from protocols.mpc.cryptenlib.communicator import ChannelCommunicator, CommunicatorError
from protocols.mpc.cryptenlib.compat import crypten
from protocols.mpc.cryptenlib.randomness import SAMPLERS, PartyGenerators, setup_prng
from protocols.net.channels import Channel

PROVIDER_NAME = "PRIVINF"
SAMPLER_MODULES = ("crypten.common.rng", "crypten.mpc.primitives.arithmetic", "crypten.mpc.primitives.binary")


class _PartyProvider:
    """What ``crypten.mpc.get_default_provider()`` returns to a privinf party: forwards every tuple
    request to the dealer provider of the ``PartyContext`` bound to the calling thread."""

    NAME = PROVIDER_NAME

    def generate_additive_triple(self, *args: Any, **kwargs: Any) -> Any:
        """Beaver triple for a mul/matmul/conv op."""
        return current().provider.generate_additive_triple(*args, **kwargs)

    def square(self, *args: Any, **kwargs: Any) -> Any:
        """(r, r*r) shares."""
        return current().provider.square(*args, **kwargs)

    def generate_binary_triple(self, *args: Any, **kwargs: Any) -> Any:
        """XOR-shared (a, b, a & b)."""
        return current().provider.generate_binary_triple(*args, **kwargs)

    def wrap_rng(self, *args: Any, **kwargs: Any) -> Any:
        """Random shared r and a sharing of its wraps."""
        return current().provider.wrap_rng(*args, **kwargs)

    def B2A_rng(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - CrypTen's name
        """A random bit shared arithmetically and by XOR."""
        return current().provider.B2A_rng(*args, **kwargs)

    def trace(self, tracing: bool = True) -> None:
        """Refused: privinf records with ``DealerProvider.recording()`` and ``preprocess()``."""
        raise ProviderError("CrypTen tuple tracing is replaced by DealerProvider.recording() and preprocess()")

    def trace_once(self) -> None:
        """Refused, as :meth:`trace`."""
        self.trace()

    def fill_cache(self) -> None:
        """Refused, as :meth:`trace`."""
        self.trace()


_PARTY_PROVIDER = _PartyProvider()


_lock = threading.Lock()
_installs = 0  # outstanding installs in the process, every thread together
_saved: dict[str, Any] = {}  # CrypTen's own objects while ours are in place
_thread = threading.local()  # .party: (channel, rank, ledger, randomness); .depth: installs in this thread


def _ltz(self: Any) -> Any:
    """Stands in for ``MPCTensor._ltz``: the bound party's FSS gate, or CrypTen's circuit."""
    context = bound()
    if context is None or not context.compares_with_keys(self):
        return _saved["ltz"](self)
    return context.less_than_zero(self)


def _bare(cls: type) -> Any:
    """An instance of the CrypTensor class ``cls`` without CrypTen's constructor (which secret-shares
    an empty tensor: a PRZS and an encoding, ~75 us); its shares are set by the caller."""
    result = object.__new__(cls)
    crypten.CrypTensor.__init__(result, requires_grad=False)
    return result


def _shallow_copy(self: Any) -> Any:
    """Stands in for ``MPCTensor.shallow_copy`` (every op's result wrapper): the same object, built by :func:`_bare`."""
    result = _bare(type(self))
    result._tensor = self._tensor
    result.ptype = self.ptype
    return result


def _clone(self: Any) -> Any:
    """Stands in for ``MPCTensor.clone``: a deep copy built by :func:`_bare`."""
    result = _bare(type(self))
    result._tensor = self._tensor.clone()
    result.ptype = self.ptype
    return result


def _from_shares(share: Any, precision: Any = None, ptype: Any = None) -> Any:
    """Stands in for ``MPCTensor.from_shares`` (every comparison result, every share wrapped by
    privinf's kernels): the tensor over ``share``, built by :func:`_bare`."""
    ptype = crypten.mpc.ptype.arithmetic if ptype is None else ptype
    result = _bare(crypten.mpc.MPCTensor)
    result._tensor = ptype.to_tensor().from_shares(share, precision=precision)
    result.ptype = ptype
    return result


def _class_attribute(cls: type, name: str) -> Any:
    """Stands in for ``CrypTensorMetaclass.__getattribute__`` (``MPCTensor.cat`` / ``stack``): the
    static function through a dummy instance built by :func:`_bare`, as CrypTen's reaches it."""
    if name in _STATIC_FUNCTIONS:
        dummy = _bare(cls)
        dummy.__IS_DUMMY__ = True
        return cls.__getattribute__(dummy, name)
    return type.__getattribute__(cls, name)


_CONSTRUCTORS = {"shallow_copy": _shallow_copy, "clone": _clone, "from_shares": staticmethod(_from_shares)}
_METACLASS = type(crypten.CrypTensor)
_STATIC_FUNCTIONS = frozenset(importlib.import_module("crypten.cryptensor").STATIC_FUNCTIONS)


_CRYPTENSOR_ATTRS = crypten.CrypTensor.__dict__  # read without the metaclass's lookup
_PROTECTED = frozenset([*crypten.CrypTensor.PROTECTED_ATTRIBUTES, "copy_"])
_REQUIRED = frozenset(crypten.CrypTensor.REQUIRED_FUNCTIONS)
_BUILTIN = dict(crypten.CrypTensor.PYTHON_BUILTIN)
_GRAD_FUNCTIONS = importlib.import_module("crypten.gradients").FUNCTION_REGISTRY
_LOOKUP = getattr(crypten.CrypTensor.__getattribute__, "__wrapped__", crypten.CrypTensor.__getattribute__)


def _attribute(self: Any, name: str) -> Any:
    """Stands in for ``CrypTensor.__getattribute__`` (every attribute and op of a shared tensor):
    CrypTen's lookup without its validation hook and, with autograd off, without its per-access
    reads of class lists through the metaclass (about 4,000 accesses per party in a decode step);
    in-place names and autograd go to CrypTen's own lookup. Written here because CrypTen offers no
    switch for either."""
    if name in _PROTECTED:
        return object.__getattribute__(self, name)
    if _CRYPTENSOR_ATTRS["AUTOGRAD_ENABLED"]:
        return _LOOKUP(self, name)
    name = _BUILTIN.get(name, name)
    if name[-1:] == "_" and name[-2:] != "__":
        return _LOOKUP(self, name)
    grad_fn = _GRAD_FUNCTIONS.get(name)
    if grad_fn is None:
        return object.__getattribute__(self, name)
    try:
        return object.__getattribute__(self, name)
    except AttributeError:
        if name in _REQUIRED:
            raise
        return object.__getattribute__(self, "_get_forward_function_no_ctx")(grad_fn)


def _default_provider() -> Any:
    """Stands in for ``crypten.mpc.get_default_provider``: privinf's dealer for a privinf party,
    the provider CrypTen's config names for a thread that uses CrypTen's randomness."""
    if uses_crypten_randomness():
        return _saved["get_default_provider"]()
    return _PARTY_PROVIDER


def _patch() -> None:
    comm_pkg = crypten.communicator
    _saved["communicator"] = comm_pkg.DistributedCommunicator
    _saved["context_communicator"] = crypten.mpc.context.DistributedCommunicator
    comm_pkg.DistributedCommunicator = ChannelCommunicator
    crypten.mpc.context.DistributedCommunicator = ChannelCommunicator
    config_cache.use_cached_reads()
    _saved["generators"] = crypten.generators
    crypten.generators = PartyGenerators()
    _saved["setup_prng"] = crypten._setup_prng
    crypten._setup_prng = setup_prng
    for module_name in SAMPLER_MODULES:
        module = importlib.import_module(module_name)
        for func_name, replacement in SAMPLERS.items():
            if hasattr(module, func_name):
                _saved[f"{module_name}:{func_name}"] = getattr(module, func_name)
                setattr(module, func_name, replacement)
    _saved["ltz"] = crypten.mpc.MPCTensor._ltz
    crypten.mpc.MPCTensor._ltz = _ltz
    for name, replacement in _CONSTRUCTORS.items():
        _saved[name] = crypten.mpc.MPCTensor.__dict__[name]
        setattr(crypten.mpc.MPCTensor, name, replacement)
    _saved["class_attribute"] = _METACLASS.__getattribute__
    _METACLASS.__getattribute__ = _class_attribute
    _saved["get_default_provider"] = crypten.mpc.get_default_provider
    crypten.mpc.get_default_provider = _default_provider
    tensor = crypten.CrypTensor
    _saved["getattribute"] = tensor.__getattribute__
    tensor.__getattribute__ = _attribute
    _saved["autograd"] = tensor.AUTOGRAD_ENABLED
    tensor.set_grad_enabled(False)


def _unpatch() -> None:
    crypten.CrypTensor.set_grad_enabled(_saved.pop("autograd"))
    crypten.CrypTensor.__getattribute__ = _saved.pop("getattribute")
    crypten.mpc.get_default_provider = _saved.pop("get_default_provider")
    crypten.mpc.MPCTensor._ltz = _saved.pop("ltz")
    _METACLASS.__getattribute__ = _saved.pop("class_attribute")
    for name in _CONSTRUCTORS:
        setattr(crypten.mpc.MPCTensor, name, _saved.pop(name))
    for key in [key for key in _saved if ":" in key]:
        module_name, func_name = key.split(":")
        setattr(importlib.import_module(module_name), func_name, _saved.pop(key))
    crypten._setup_prng = _saved.pop("setup_prng")
    crypten.generators = _saved.pop("generators")
    config_cache.release()
    crypten.mpc.context.DistributedCommunicator = _saved.pop("context_communicator")
    crypten.communicator.DistributedCommunicator = _saved.pop("communicator")


_DEFAULT_FUNCTIONS: dict[str, Any] = {}  # CrypTen's shipped ``functions`` settings, read once


def check_functions_config() -> None:
    """Refuse a CrypTen configuration whose ``functions`` settings (exp iterations, the reciprocal's
    and the root's methods...) differ from the ones CrypTen ships: they choose the circuits of its
    approximations, both parties must compute the same ones, and a session carries no copy of
    them. A setting changed in one process (or a ``cfg.temp_override`` left in force by two
    parties run as threads without ``parties_as_threads``) otherwise shows up mid-session as a
    peer sending an unexpected message; here it is one line, before any secret moves."""
    if not _DEFAULT_FUNCTIONS:
        _DEFAULT_FUNCTIONS.update(OmegaConf.to_container(config_cache.shipped_config().functions))
    current = OmegaConf.to_container(crypten.cfg.config.functions)
    for key, default in _DEFAULT_FUNCTIONS.items():
        if current.get(key) != default:
            raise CommunicatorError(
                f"CrypTen's cfg.functions.{key} is {current.get(key)!r}, not CrypTen's default {default!r}: privinf "
                "parties run CrypTen's shipped function settings so that both compute the same circuits; "
                "reload CrypTen's defaults with crypten.cfg.load_config(None) (or start a fresh process) "
                "before the session")
    extra = sorted(set(current) - set(_DEFAULT_FUNCTIONS))
    if extra:
        raise CommunicatorError(f"CrypTen's cfg.functions has settings CrypTen does not ship: {extra}")


def install(channel: Channel, rank: int, ledger: Ledger | None = None, randomness: str = PRIVINF_RANDOMNESS) -> None:
    """Install privinf's CrypTen integration for the party this thread runs (before ``crypten.init()``).

    ``channel`` links to the other computing party, ``rank`` is 0 or 1, ``ledger`` gets one
    round per exchange. ``randomness``: ``"privinf"`` (CSPRNG streams and the dealer provider;
    bind a ``PartyContext`` after ``crypten.init()``) or ``"crypten"`` (CrypTen's own generators
    and provider: baselines and transport tests). Counted: installing the same party again in
    this thread nests (one :func:`uninstall` each); another party in this thread is refused, and
    so is a CrypTen configuration with changed function settings (:func:`check_functions_config`).
    """
    if not isinstance(channel, Channel):
        raise CommunicatorError(f"install needs a protocols.net.channels.Channel, got {type(channel).__name__}")
    if rank not in (0, 1):
        raise CommunicatorError(f"rank must be 0 or 1 for 2-party CrypTen, got {rank!r}")
    if randomness not in RANDOMNESS:
        raise CommunicatorError(f"randomness must be one of {RANDOMNESS}, got {randomness!r}")
    party = (channel, rank, ledger, randomness)
    depth = getattr(_thread, "depth", 0)
    if depth and _thread.party != party:
        raise CommunicatorError("another party is already installed in this thread; call uninstall() first")
    if not depth:
        check_functions_config()
    global _installs
    with _lock:
        if _installs == 0:
            _patch()
        _installs += 1
    if not depth:
        _thread.party = party
        ChannelCommunicator.attach(channel, rank, ledger)
        set_randomness(randomness)
    _thread.depth = depth + 1


def uninstall() -> None:
    """Undo one :func:`install` in this thread; CrypTen's own objects return with the last one in
    the process. Does nothing in a thread with nothing installed."""
    depth = getattr(_thread, "depth", 0)
    if not depth:
        return
    _thread.depth = depth - 1
    if depth == 1:
        ChannelCommunicator.detach()
        crypten.generators.forget_thread()
        set_randomness(None)
        _thread.party = None
    global _installs
    with _lock:
        _installs -= 1
        if _installs == 0:
            _unpatch()


@contextmanager
def crypten_session(channel: Channel, rank: int, ledger: Ledger | None = None, party_name: str | None = None,
                    randomness: str = PRIVINF_RANDOMNESS) -> Iterator[ChannelCommunicator]:
    """:func:`install` + ``crypten.init()`` for the body, then ``crypten.uninit()`` + :func:`uninstall`."""
    install(channel, rank, ledger, randomness)
    try:
        crypten.init(party_name=party_name)
        try:
            yield ChannelCommunicator.get()
        finally:
            crypten.uninit()
    finally:
        uninstall()
