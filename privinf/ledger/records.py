"""What the ledger records: counters per (scope, phase, step) cell, report rows and their JSON form.

A leaf like the rest of :mod:`privinf.ledger`. :class:`~privinf.ledger.counting.Ledger` fills
:class:`Counters` as a party works; :class:`Row` is one finished cell, which parties exchange as
JSON (:func:`rows_to_dicts` / :func:`rows_from_dicts`) so the client can merge every party's rows
into a report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Phase(str, Enum):
    """Offline material (triples, weight masks, keys) vs per-inference online work."""

    OFFLINE = "offline"
    ONLINE = "online"


ROOT_SCOPE = "<session>"
NO_STEP = ""


class LedgerFormatError(ValueError):
    """A ledger row read from JSON (e.g. sent by a peer) is missing a field or malformed."""


@dataclass
class Counters:
    """What one party did inside one scope and phase.

    ``storage`` maps a kind (``triples``, ``weight_masks``, ``kv_shares``, ``galois_keys``...)
    to bytes placed in storage; ``storage_bytes`` is their sum. ``extra`` holds route-specific
    additive counters (HE: ``ct_ops``, ``rotations``, ``levels`` consumed, ``ct_bytes``).
    """

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

    def add(self, other: Counters) -> None:
        """Add ``other`` into these counters (every field is additive)."""
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

    def copy(self) -> Counters:
        """An independent copy."""
        out = Counters()
        out.add(self)
        return out

    def is_empty(self) -> bool:
        """True when nothing at all was recorded."""
        return not (
            self.bytes_sent or self.bytes_recv or self.rounds or self.wall_s or self.wait_s
            or self.storage_bytes or self.extra or self.messages_sent or self.messages_recv
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, with the derived ``compute_s``."""
        data = asdict(self)
        data["compute_s"] = self.compute_s
        return data


def sum_counters(items: Iterable[Counters]) -> Counters:
    """Sum of several counters."""
    total = Counters()
    for item in items:
        total.add(item)
    return total


_INT_FIELDS = ("bytes_sent", "bytes_recv", "messages_sent", "messages_recv", "rounds", "storage_bytes")
_OPTIONAL = ("messages_sent", "messages_recv")


@dataclass(frozen=True)
class Row:
    """One line of a report: a scope of one party in one phase (and step)."""

    name: str
    op: str
    party: str
    phase: Phase
    counters: Counters
    step: str = NO_STEP

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; floats are kept exact so the dict round-trips."""
        c = self.counters
        return {
            "name": self.name,
            "op": self.op,
            "party": self.party,
            "phase": self.phase.value,
            "step": self.step,
            "bytes_sent": c.bytes_sent,
            "bytes_recv": c.bytes_recv,
            "messages_sent": c.messages_sent,
            "messages_recv": c.messages_recv,
            "rounds": c.rounds,
            "compute_s": c.compute_s,
            "wall_s": c.wall_s,
            "wait_s": c.wait_s,
            "storage_bytes": c.storage_bytes,
            "storage": dict(c.storage),
            **({"extra": dict(c.extra)} if c.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Row:
        """Inverse of :meth:`to_dict`; raises :class:`LedgerFormatError` on malformed input."""
        if not isinstance(data, dict):
            raise LedgerFormatError(f"ledger row must be a JSON object, got {type(data).__name__}")
        try:
            ints = {k: _count(data, k) for k in _INT_FIELDS if k in data or k not in _OPTIONAL}
            wall_s = _seconds(data, "wall_s")
            wait_s = (_seconds(data, "wait_s") if "wait_s" in data
                      else max(0.0, wall_s - _seconds(data, "compute_s")))
            storage = {str(k): int(v) for k, v in dict(data.get("storage", {})).items()}
            extra = {str(k): float(v) for k, v in dict(data.get("extra", {})).items()}
            phase = Phase(data["phase"])
            name, op, party = str(data["name"]), str(data["op"]), str(data["party"])
        except KeyError as exc:
            raise LedgerFormatError(f"ledger row is missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise LedgerFormatError(f"ledger row {data.get('name')!r} is malformed: {exc}") from None
        if sum(storage.values()) != ints["storage_bytes"]:
            raise LedgerFormatError(
                f"ledger row {name!r}: storage_bytes {ints['storage_bytes']} != sum of storage kinds"
            )
        counters = Counters(wall_s=wall_s, wait_s=wait_s, storage=storage, extra=extra, **ints)
        return cls(name, op, party, phase, counters, str(data.get("step", NO_STEP)))


def _count(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _seconds(data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{key} must be a non-negative number, got {value!r}")
    return float(value)


def rows_to_dicts(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Rows as JSON-able dicts (what a party sends to the client at the end of a session)."""
    return [row.to_dict() for row in rows]


def rows_from_dicts(data: Any) -> list[Row]:
    """Rows from :func:`rows_to_dicts` output received as JSON from a peer."""
    if not isinstance(data, list):
        raise LedgerFormatError(f"ledger rows must be a JSON list, got {type(data).__name__}")
    return [Row.from_dict(item) for item in data]


def totals_by_op(rows: list[Row]) -> dict[str, Counters]:
    """Sum rows by op kind (matmul, softmax, gelu, ...), across parties and phases."""
    out: dict[str, Counters] = {}
    for row in rows:
        out.setdefault(row.op, Counters()).add(row.counters)
    return out
