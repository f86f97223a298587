"""Cost ledger: counts what each party sends, receives, waits for and stores, per scope.

This module is a leaf: it imports nothing else of privinf, so every layer may import it.
Counting lives here; pricing (network profiles) lives in :mod:`privinf.pricing`; reports in
:mod:`privinf.reports`.

Scopes are named by model path (``encoder.layer.3.attn.softmax``). Counts recorded while a scope
is open go to the innermost open scope (exclusive attribution), so a report's rows add up to
its totals. Scopes open automatically from module forward hooks (:meth:`Ledger.attach`); model
code never mentions the ledger. The transport records bytes and rounds as it sends, always.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Iterator


class Phase(str, Enum):
    """Offline material (triples, weight masks, keys) vs per-inference online work."""

    OFFLINE = "offline"
    ONLINE = "online"


ROOT_SCOPE = "<session>"


@dataclass
class Counters:
    """What one party did inside one scope and phase."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    messages_sent: int = 0
    messages_recv: int = 0
    rounds: int = 0
    wall_s: float = 0.0
    wait_s: float = 0.0
    storage_bytes: int = 0
    storage: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def compute_s(self) -> float:
        """Wall time not spent blocked on the network."""
        return max(0.0, self.wall_s - self.wait_s)

    def add(self, other: "Counters") -> None:
        self.bytes_sent += other.bytes_sent
        self.bytes_recv += other.bytes_recv
        self.messages_sent += other.messages_sent
        self.messages_recv += other.messages_recv
        self.rounds += other.rounds
        self.wall_s += other.wall_s
        self.wait_s += other.wait_s
        self.storage_bytes += other.storage_bytes
        for key, value in other.storage.items():
            self.storage[key] = self.storage.get(key, 0) + value
        for key, value in other.extra.items():
            self.extra[key] = self.extra.get(key, 0.0) + value

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_s"] = self.compute_s
        return data


@dataclass(frozen=True)
class Row:
    """One line of a report: a scope of one party in one phase."""

    name: str
    op: str
    party: str
    phase: Phase
    counters: Counters

    def to_dict(self) -> dict[str, Any]:
        c = self.counters
        return {
            "name": self.name,
            "op": self.op,
            "party": self.party,
            "phase": self.phase.value,
            "bytes_sent": c.bytes_sent,
            "bytes_recv": c.bytes_recv,
            "messages_sent": c.messages_sent,
            "messages_recv": c.messages_recv,
            "rounds": c.rounds,
            "compute_s": round(c.compute_s, 6),
            "wall_s": round(c.wall_s, 6),
            "wait_s": round(c.wait_s, 6),
            "storage_bytes": c.storage_bytes,
            "storage": dict(c.storage),
            **({"extra": dict(c.extra)} if c.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Row":
        counters = Counters(
            bytes_sent=int(data["bytes_sent"]),
            bytes_recv=int(data["bytes_recv"]),
            messages_sent=int(data.get("messages_sent", 0)),
            messages_recv=int(data.get("messages_recv", 0)),
            rounds=int(data["rounds"]),
            wall_s=float(data["wall_s"]),
            wait_s=float(data.get("wait_s", float(data["wall_s"]) - float(data["compute_s"]))),
            storage_bytes=int(data["storage_bytes"]),
            storage=dict(data.get("storage", {})),
            extra=dict(data.get("extra", {})),
        )
        return cls(data["name"], data["op"], data["party"], Phase(data["phase"]), counters)


class Ledger:
    """Per-party counters keyed by (scope, phase), with a stack of open scopes.

    One ledger per party per session. Thread-safe: transport reader threads record receives
    while the party's main thread holds the scope stack; counts land in whatever scope the
    main thread has open at that moment.
    """

    def __init__(self, party: str) -> None:
        self.party = party
        self._lock = threading.RLock()
        self._stack: list[tuple[str, str]] = [(ROOT_SCOPE, "session")]
        self._phase = Phase.ONLINE
        self._counters: dict[tuple[str, Phase], Counters] = {}
        self._ops: dict[str, str] = {ROOT_SCOPE: "session"}
        self._order: list[tuple[str, Phase]] = []
        self._scope_started: list[float] = []

    # ----- scopes and phases -------------------------------------------------------------
    @property
    def current_scope(self) -> str:
        return self._stack[-1][0]

    @property
    def current_phase(self) -> Phase:
        return self._phase

    def _cell(self, scope: str | None = None, phase: Phase | None = None) -> Counters:
        key = (scope or self._stack[-1][0], phase or self._phase)
        cell = self._counters.get(key)
        if cell is None:
            cell = Counters()
            self._counters[key] = cell
            self._order.append(key)
        return cell

    def open_scope(self, name: str, op: str | None = None) -> None:
        """Open a scope; prefer :meth:`scope`. Used by forward hooks."""
        with self._lock:
            now = time.perf_counter()
            self._charge_wall(now)
            self._stack.append((name, op or name.rsplit(".", 1)[-1]))
            self._ops.setdefault(name, op or name.rsplit(".", 1)[-1])
            self._cell()
            self._scope_started.append(now)

    def close_scope(self, name: str | None = None) -> None:
        """Close the innermost scope (and check it is ``name`` when given)."""
        with self._lock:
            if len(self._stack) == 1:
                raise RuntimeError("ledger: close_scope with no open scope")
            top = self._stack[-1][0]
            if name is not None and top != name:
                raise RuntimeError(f"ledger: closing scope {name!r} but {top!r} is innermost")
            now = time.perf_counter()
            self._charge_wall(now)
            self._stack.pop()
            self._scope_started.pop()
            if self._scope_started:
                self._scope_started[-1] = now
            else:
                self._root_mark = now

    def _charge_wall(self, now: float) -> None:
        """Exclusive wall time: time since the innermost scope last (re)started."""
        if self._scope_started:
            self._cell().wall_s += now - self._scope_started[-1]
            self._scope_started[-1] = now
        else:
            mark = getattr(self, "_root_mark", None)
            if mark is not None:
                self._cell().wall_s += now - mark
            self._root_mark = now

    @contextmanager
    def scope(self, name: str, op: str | None = None) -> Iterator[None]:
        """Attribute everything recorded inside to ``name`` (exclusive of nested scopes)."""
        self.open_scope(name, op)
        try:
            yield
        finally:
            self.close_scope(name)

    @contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        """Count everything inside as ``phase`` (offline preprocessing vs online)."""
        with self._lock:
            self._charge_wall(time.perf_counter())
            previous, self._phase = self._phase, Phase(phase)
        try:
            yield
        finally:
            with self._lock:
                self._charge_wall(time.perf_counter())
                self._phase = previous

    # ----- recording ---------------------------------------------------------------------
    def record_send(self, nbytes: int, messages: int = 1) -> None:
        with self._lock:
            cell = self._cell()
            cell.bytes_sent += int(nbytes)
            cell.messages_sent += messages

    def record_recv(self, nbytes: int, messages: int = 1) -> None:
        with self._lock:
            cell = self._cell()
            cell.bytes_recv += int(nbytes)
            cell.messages_recv += messages

    def record_rounds(self, n: int = 1) -> None:
        """Sequential exchanges on the critical path."""
        with self._lock:
            self._cell().rounds += n

    def record_wait(self, seconds: float) -> None:
        """Time blocked waiting for a peer (subtracted from wall to give compute)."""
        with self._lock:
            self._cell().wait_s += seconds

    def record_storage(self, kind: str, nbytes: int) -> None:
        """Bytes this party must hold (triples, weight masks, KV shares, keys...)."""
        with self._lock:
            cell = self._cell()
            cell.storage_bytes += int(nbytes)
            cell.storage[kind] = cell.storage.get(kind, 0) + int(nbytes)

    def record_extra(self, key: str, value: float) -> None:
        """Route-specific counters (HE: ct_ops, rotations, levels, ct_bytes...)."""
        with self._lock:
            cell = self._cell()
            cell.extra[key] = cell.extra.get(key, 0.0) + value

    # ----- automatic scopes from nn.Module hooks ------------------------------------------
    def attach(self, module: Any, prefix: str = "") -> "HookHandle":
        """Open a scope around every submodule's forward, named by its module path.

        The op kind is the module's ``op_kind`` attribute when it has one, else its class name
        in lower case. Works for any input type (torch tensors, CrypTensors, ciphertexts).
        """
        handles = []
        for path, sub in module.named_modules():
            name = ".".join(p for p in (prefix, path) if p) or type(module).__name__.lower()
            op = getattr(sub, "op_kind", None) or type(sub).__name__.lower()

            def pre(_mod: Any, _args: Any, name: str = name, op: str = op) -> None:
                self.open_scope(name, op)

            def post(_mod: Any, _args: Any, _out: Any, name: str = name) -> None:
                self.close_scope(name)

            handles.append(sub.register_forward_pre_hook(pre))
            handles.append(sub.register_forward_hook(post, always_call=True))
        return HookHandle(handles)

    # ----- reading -----------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """All non-empty (scope, phase) cells, in first-touched order."""
        with self._lock:
            self._charge_wall(time.perf_counter()) if len(self._stack) > 1 else None
            out = []
            for key in self._order:
                c = self._counters[key]
                if _is_empty(c):
                    continue
                copy = Counters()
                copy.add(c)
                out.append(Row(key[0], self._ops.get(key[0], key[0]), self.party, key[1], copy))
            return out

    def totals(self, phase: Phase | None = None) -> Counters:
        total = Counters()
        for row in self.rows():
            if phase is None or row.phase == phase:
                total.add(row.counters)
        return total

    def reset(self) -> None:
        """Forget all counts (keeps the open scopes)."""
        with self._lock:
            self._counters.clear()
            self._order.clear()


def _is_empty(c: Counters) -> bool:
    return not (
        c.bytes_sent or c.bytes_recv or c.rounds or c.wall_s or c.storage_bytes or c.extra
        or c.messages_sent or c.messages_recv
    )


class HookHandle:
    """Removes the forward hooks installed by :meth:`Ledger.attach`."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def totals_by_op(rows: list[Row]) -> dict[str, Counters]:
    """Sum rows by op kind (matmul, softmax, gelu, ...), across parties and phases."""
    out: dict[str, Counters] = {}
    for row in rows:
        out.setdefault(row.op, Counters()).add(row.counters)
    return out
