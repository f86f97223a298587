"""Cost ledger: counts what each party sends, receives, waits for and stores, per scope.

Like the rest of :mod:`privinf.ledger` it imports nothing outside the ledger, so every layer may
import it. The :class:`Ledger` (scopes, phases, steps, module hooks) lives here; what it records
(:class:`Counters`, :class:`Row`, :class:`Phase` and their JSON form) in :mod:`privinf.ledger.records`,
re-exported here; pricing (network profiles) in :mod:`privinf.ledger.pricing`; reports in
:mod:`privinf.ledger.reports`.

Scopes are named by model path (``encoder.layer.3.attn.softmax``). Counts recorded while a scope
is open go to the innermost open scope (exclusive attribution), so a report's rows add up to
its totals. Scopes open automatically from module forward hooks (:meth:`Ledger.attach`); model
code never mentions the ledger. The transport records bytes and rounds as it sends, always.

Every count lands in a cell keyed by (scope, phase, step): the phase separates offline material
from online work, and the step label groups one inference step of a decoder (``prefill``,
``decode.0``, ``decode.1``...) so per-token costs can be reported. Wall time is charged to the
innermost scope between scope/phase/step transitions, so the rows' wall seconds add up to the
time elapsed since the ledger was created (or reset).

A party that works on behalf of another party's scope (the dealer answering a request made
inside the client's ``encoder.3.attn.softmax``) charges that work to the same scope name with
:meth:`Ledger.attribute`, per thread, whatever its own scope stack holds, so every party's rows
for one layer share its name.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from privinf.ledger.records import (
    NO_STEP,
    ROOT_SCOPE,
    Counters,
    LedgerFormatError,
    Phase,
    Row,
    rows_from_dicts,
    rows_to_dicts,
    sum_counters,
    totals_by_op,
)

# The record types are re-exported: callers import them from here together with Ledger.
__all__ = ["NO_STEP", "ROOT_SCOPE", "Counters", "HookHandle", "Ledger", "LedgerFormatError", "Phase", "Row",
           "rows_from_dicts", "rows_to_dicts", "sum_counters", "totals_by_op"]

_TOKENS = itertools.count(1)  # distinguishes the hook sets of separate attach() calls


class _ThreadContexts:
    """(phase, step, attributed scope) contexts entered by several threads on one ledger.

    A thread's counts go to its own innermost context; a thread that entered none (a transport
    reader) follows the most recently entered context of any thread (normally the party's main
    thread), else the default. A new context starts from what the thread saw before, changing
    only the phase or only the step. Each thread leaves only its own context, so concurrent
    users of one ledger (a dealer serving two parties) cannot leave it stuck.
    """

    def __init__(self, default: Any) -> None:
        self._default = default
        self._entries: list[tuple[int, Any, object]] = []

    def push(self, value: Any) -> object:
        token = object()
        self._entries.append((threading.get_ident(), value, token))
        return token

    def pop(self, token: object) -> None:
        self._entries = [e for e in self._entries if e[2] is not token]

    def get(self) -> Any:
        entries = self._entries
        if not entries:
            return self._default
        me = threading.get_ident()
        for ident, value, _token in reversed(entries):
            if ident == me:
                return value
        return entries[-1][1]


@dataclass
class _Frame:
    """One open scope on the stack."""

    name: str
    op: str
    started: float
    token: int | None = None


class Ledger:
    """Per-party counters keyed by (scope, phase, step), with a stack of open scopes.

    One ledger per party per session. Thread-safe for recording: transport reader threads
    record sends, receives and waits while one thread (the one that opened the outermost open
    scope) holds the scope stack; their counts land in whatever scope that thread has open at
    that moment. Opening or closing scopes from another thread while the stack is held raises
    ``RuntimeError`` instead of silently garbling attribution. Phases and steps are per thread
    (see :class:`_ThreadContexts`): threads that set none follow the main thread's.
    """

    def __init__(self, party: str, clock: Callable[[], float] = time.perf_counter) -> None:
        if not party:
            raise ValueError("ledger: party name must be non-empty")
        self.party = party
        self._clock = clock
        self._lock = threading.RLock()
        self._stack: list[_Frame] = [_Frame(ROOT_SCOPE, "session", clock())]
        # per thread: (phase, step, scope the thread's counts are attributed to or None for the stack's)
        self._contexts = _ThreadContexts((Phase.ONLINE, NO_STEP, None))
        self._owner: int | None = None
        self._counters: dict[tuple[str, Phase, str], Counters] = {}
        self._ops: dict[str, str] = {ROOT_SCOPE: "session"}
        self._order: list[tuple[str, Phase, str]] = []

    # ----- scopes, phases and steps ------------------------------------------------------
    @property
    def current_scope(self) -> str:
        """Scope new counts from the calling thread are charged to: the one it is attributing
        to (:meth:`attribute`), else the innermost open scope (``<session>`` at the root)."""
        return self._contexts.get()[2] or self._stack[-1].name

    @property
    def current_op(self) -> str:
        """Op kind of :attr:`current_scope` (``session`` at the root)."""
        name = self.current_scope
        return self._ops.get(name, name)

    @property
    def current_phase(self) -> Phase:
        """Phase new counts from the calling thread are charged to."""
        return self._contexts.get()[0]

    @property
    def current_step(self) -> str:
        """Step label new counts from the calling thread are charged to ("" outside any step)."""
        return self._contexts.get()[1]

    @property
    def depth(self) -> int:
        """Number of open scopes (0 at the session root)."""
        return len(self._stack) - 1

    def _cell(self) -> Counters:
        phase, step, attributed = self._contexts.get()
        key = (attributed or self._stack[-1].name, phase, step)
        cell = self._counters.get(key)
        if cell is None:
            cell = Counters()
            self._counters[key] = cell
            self._order.append(key)
        return cell

    def _charge_wall(self) -> None:
        """Exclusive wall time: time since the innermost scope last (re)started."""
        now = self._clock()
        top = self._stack[-1]
        self._cell().wall_s += now - top.started
        top.started = now

    def _check_owner(self, what: str) -> None:
        me = threading.get_ident()
        if self._owner is not None and self._owner != me:
            raise RuntimeError(
                f"ledger {self.party}: {what} from another thread while thread {self._owner} "
                "holds the scope stack"
            )

    def open_scope(self, name: str, op: str | None = None, _token: int | None = None) -> None:
        """Open a scope; prefer :meth:`scope`. Used by forward hooks."""
        if not name:
            raise ValueError("ledger: scope name must be non-empty")
        with self._lock:
            self._check_owner(f"opening scope {name!r}")
            self._charge_wall()
            kind = op or name.rsplit(".", 1)[-1]
            self._stack.append(_Frame(name, kind, self._clock(), _token))
            self._ops.setdefault(name, kind)
            self._cell()
            self._owner = threading.get_ident()

    def close_scope(self, name: str | None = None) -> None:
        """Close the innermost scope (and check it is ``name`` when given)."""
        with self._lock:
            self._check_owner("closing a scope")
            if len(self._stack) == 1:
                raise RuntimeError("ledger: close_scope with no open scope")
            top = self._stack[-1].name
            if name is not None and top != name:
                raise RuntimeError(f"ledger: closing scope {name!r} but {top!r} is innermost")
            self._pop()

    def _pop(self) -> None:
        self._charge_wall()
        self._stack.pop()
        self._stack[-1].started = self._clock()
        if len(self._stack) == 1:
            self._owner = None

    def _unwind_token(self, token: int, name: str | None) -> None:
        """Close hook-opened scopes of ``token`` down to and including the innermost ``name``
        (or all of them when ``name`` is None); scopes left open by an exception go too."""
        with self._lock:
            depths = [d for d in range(1, len(self._stack))
                      if self._stack[d].token == token and (name is None or self._stack[d].name == name)]
            if not depths:
                return
            self._check_owner("closing a scope")
            target = depths[0] if name is None else depths[-1]
            while len(self._stack) > target:
                self._pop()

    @contextmanager
    def scope(self, name: str, op: str | None = None) -> Iterator[None]:
        """Attribute everything recorded inside to ``name`` (exclusive of nested scopes)."""
        self.open_scope(name, op)
        try:
            yield
        finally:
            self.close_scope(name)

    @contextmanager
    def phase(self, phase: Phase | str) -> Iterator[None]:
        """Count everything inside as ``phase`` (offline preprocessing vs online)."""
        new = Phase(phase)
        with self._within(lambda current: (new, *current[1:])):
            yield

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Label everything inside as one step (``prefill``, ``decode.3``) for per-token reports."""
        if not isinstance(label, str) or not label:
            raise ValueError("ledger: step label must be a non-empty string")
        with self._within(lambda current: (current[0], label, current[2])):
            yield

    @contextmanager
    def attribute(self, name: str, op: str, step: str | None = None) -> Iterator[None]:
        """Charge what the calling thread records inside to scope ``name`` of kind ``op`` (and
        to ``step`` when given), whatever the scope stack holds; other threads are unaffected.

        For work done on behalf of another party's scope: the dealer answers a request made in
        the client's ``encoder.3.attn.softmax`` inside ``attribute("encoder.3.attn.softmax",
        "softmax")``. Wall time is charged as for scopes, at this thread's transitions.
        """
        if not name or not op:
            raise ValueError("ledger: attribute needs a non-empty scope name and op")
        if step is not None and not step:
            raise ValueError("ledger: an attributed step label must be non-empty (or None)")
        with self._lock:
            self._ops.setdefault(name, op)
        with self._within(lambda current: (current[0], current[1] if step is None else step, name)):
            yield

    @contextmanager
    def _within(self, derive: Any) -> Iterator[None]:
        """Push ``derive((phase, step, attributed scope))`` as this thread's context for the body."""
        with self._lock:
            self._charge_wall()
            entry = self._contexts.push(derive(self._contexts.get()))
        try:
            yield
        finally:
            with self._lock:
                self._charge_wall()
                self._contexts.pop(entry)

    # ----- recording ---------------------------------------------------------------------
    def record_send(self, nbytes: int, messages: int = 1) -> None:
        """Bytes this party put on the wire (payload plus framing)."""
        _non_negative("record_send", nbytes, messages)
        with self._lock:
            cell = self._cell()
            cell.bytes_sent += int(nbytes)
            cell.messages_sent += int(messages)

    def record_recv(self, nbytes: int, messages: int = 1) -> None:
        """Bytes this party took off the wire."""
        _non_negative("record_recv", nbytes, messages)
        with self._lock:
            cell = self._cell()
            cell.bytes_recv += int(nbytes)
            cell.messages_recv += int(messages)

    def record_rounds(self, n: int = 1) -> None:
        """Sequential exchanges on the critical path."""
        _non_negative("record_rounds", n)
        with self._lock:
            self._cell().rounds += int(n)

    def record_wait(self, seconds: float) -> None:
        """Time blocked waiting for a peer (subtracted from wall to give compute)."""
        _non_negative("record_wait", seconds)
        with self._lock:
            self._cell().wait_s += float(seconds)

    def record_storage(self, kind: str, nbytes: int) -> None:
        """Bytes this party must hold (triples, weight masks, KV shares, keys...)."""
        if not kind:
            raise ValueError("ledger: record_storage needs a non-empty kind")
        _non_negative("record_storage", nbytes)
        with self._lock:
            cell = self._cell()
            cell.storage_bytes += int(nbytes)
            cell.storage[kind] = cell.storage.get(kind, 0) + int(nbytes)

    def record_extra(self, key: str, value: float) -> None:
        """Route-specific additive counters (HE: ct_ops, rotations, levels, ct_bytes...)."""
        if not key:
            raise ValueError("ledger: record_extra needs a non-empty key")
        with self._lock:
            cell = self._cell()
            cell.extra[key] = cell.extra.get(key, 0.0) + float(value)

    # ----- automatic scopes from nn.Module hooks ------------------------------------------
    def attach(self, module: Any, prefix: str = "") -> HookHandle:
        """Open a scope around every submodule's forward, named by its module path.

        The op kind is the module's ``op_kind`` attribute when it has one, else its class name
        in lower case. Works for any input type (torch tensors, CrypTensors, ciphertexts).
        When a forward raises, the post hooks (``always_call``) close the scopes it opened;
        scopes left open by an interrupt that skipped them are closed on the next call of
        ``module``, so the stack never stays corrupt.
        """
        handles = []
        token = next(_TOKENS)
        for path, sub in module.named_modules():
            name = ".".join(p for p in (prefix, path) if p) or type(module).__name__.lower()
            op = getattr(sub, "op_kind", None) or type(sub).__name__.lower()
            is_root = sub is module

            def pre(_mod: Any, _args: Any, name: str = name, op: str = op, is_root: bool = is_root) -> None:
                if is_root:
                    self._unwind_token(token, None)
                self.open_scope(name, op, _token=token)

            def post(_mod: Any, _args: Any, _out: Any, name: str = name) -> None:
                self._unwind_token(token, name)

            handles.append(sub.register_forward_pre_hook(pre))
            handles.append(sub.register_forward_hook(post, always_call=True))
        return HookHandle(handles)

    # ----- reading -----------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """All non-empty (scope, phase, step) cells, in first-touched order (copies)."""
        with self._lock:
            self._charge_wall()
            return [
                Row(key[0], self._ops.get(key[0], key[0]), self.party, key[1],
                    self._counters[key].copy(), key[2])
                for key in self._order
                if not self._counters[key].is_empty()
            ]

    def totals(self, phase: Phase | None = None) -> Counters:
        """Sum of all rows, or of one phase's rows."""
        return sum_counters(r.counters for r in self.rows() if phase is None or r.phase == phase)

    def storage(self) -> dict[str, int]:
        """Bytes held per storage kind, over all scopes and phases."""
        return dict(self.totals().storage)

    def reset(self) -> None:
        """Forget all counts and restart the wall clock (keeps the open scopes)."""
        with self._lock:
            self._counters.clear()
            self._order.clear()
            now = self._clock()
            for frame in self._stack:
                frame.started = now


def _non_negative(what: str, *values: float) -> None:
    for value in values:
        if value < 0:
            raise ValueError(f"ledger: {what} got a negative count {value!r}")


class HookHandle:
    """Removes the forward hooks installed by :meth:`Ledger.attach`."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Uninstall every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
