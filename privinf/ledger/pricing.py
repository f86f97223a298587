"""Network profiles and the latency model that turns ledger counts into estimated seconds.

Counting (:mod:`privinf.ledger.counting`) is separate from pricing: the same rows can be priced on a LAN
and on a WAN. The model, per priced cell (one scope, one phase, one step)::

    latency = compute_s + rounds * rtt_s + critical_bytes * 8 / bandwidth_bps

How the parties of one cell combine. The parties work in parallel and meet at every exchange,
so a cell costs what its slowest party costs:

* ``compute_s`` = max over parties of that party's compute seconds (wall minus wait);
* ``rounds`` = max over parties of the rounds each recorded: the cell's critical path of
  sequential exchanges (in symmetric 2PC both parties record the same number);
* ``critical_bytes`` = max over parties of the bytes one party *sent*. Every party has its own
  full-duplex link at the profile's bandwidth, so what it sends is serialised on its uplink
  while the peer's sends travel the other way at the same time; received bytes are not priced
  again (they are the peer's sent bytes). A dealer that sends to two parties is priced on its
  one uplink, which errs on the slow side. Dealer material fetched online is charged to the
  layer that consumes it, so it shares that layer's cell and is priced as if sent while the
  computing parties exchange theirs; it arrives before they use it, which errs on the fast side
  by at most the computing parties' own bytes in that cell.

Cells are then summed: scopes run one after another (each layer waits for the previous
layer's output), as do steps. Offline and online are priced separately (pass ``phase``):
offline material (triples, weight masks, keys) can be produced before the input exists, so the
online estimate is the latency a user sees and the offline estimate is the preparation cost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from privinf.ledger.records import Counters, Phase, Row


class ProfileError(ValueError):
    """A network profile or profile string is invalid."""


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([^\s0-9].*?)?\s*$")

_BIT = 1.0
_BYTE = 8.0
BANDWIDTH_UNITS: dict[str, float] = {
    "bps": _BIT, "kbps": 1e3, "Kbps": 1e3, "Mbps": 1e6, "Gbps": 1e9, "Tbps": 1e12,
    "bit/s": _BIT, "kbit/s": 1e3, "Mbit/s": 1e6, "Gbit/s": 1e9,
    "B/s": _BYTE, "kB/s": 8e3, "KB/s": 8e3, "MB/s": 8e6, "GB/s": 8e9,
    "KiB/s": 8.0 * 2**10, "MiB/s": 8.0 * 2**20, "GiB/s": 8.0 * 2**30,
}
_AMBIGUOUS = {"KBps", "kBps", "MBps", "GBps", "TBps", "Bps"}
TIME_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e3, "us": 1e6, "\u00b5s": 1e6, "ns": 1e9}  # per second


@dataclass(frozen=True)
class NetworkProfile:
    """A link between parties: bandwidth in bits per second and round-trip time in seconds."""

    name: str
    bandwidth_bps: float
    rtt_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ProfileError(
                f"profile name {self.name!r} must start with a letter and use letters, digits, _ . -"
            )
        bw, rtt = self.bandwidth_bps, self.rtt_s
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not math.isfinite(bw) or bw <= 0:
            raise ProfileError(f"profile {self.name}: bandwidth must be a positive number of bits/s, got {bw!r}")
        if isinstance(rtt, bool) or not isinstance(rtt, (int, float)) or not math.isfinite(rtt) or rtt < 0:
            raise ProfileError(f"profile {self.name}: rtt must be a non-negative number of seconds, got {rtt!r}")
        object.__setattr__(self, "bandwidth_bps", float(bw))
        object.__setattr__(self, "rtt_s", float(rtt))

    def spec(self) -> str:
        """The profile as a string :func:`parse_profile` reads back to an equal profile."""
        return f"{self.name}:bw={_format_bandwidth(self.bandwidth_bps)},rtt={_format_time(self.rtt_s)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"name": self.name, "bandwidth_bps": self.bandwidth_bps, "rtt_s": self.rtt_s}

    @classmethod
    def from_dict(cls, data: Any) -> NetworkProfile:
        """Inverse of :meth:`to_dict`, validating the fields."""
        if not isinstance(data, dict):
            raise ProfileError(f"network profile must be a JSON object, got {type(data).__name__}")
        try:
            return cls(data["name"], data["bandwidth_bps"], data["rtt_s"])
        except KeyError as exc:
            raise ProfileError(f"network profile is missing field {exc.args[0]!r}") from None


LAN = NetworkProfile("lan", 3e9, 0.8e-3)
WAN = NetworkProfile("wan", 200e6, 40e-3)
PRESETS: dict[str, NetworkProfile] = {LAN.name: LAN, WAN.name: WAN}


def parse_profile(spec: str) -> NetworkProfile:
    """Read ``lan``, ``wan``, ``name:bw=1Gbps,rtt=5ms`` or a preset with overrides (``wan:rtt=80ms``).

    Bandwidth units: bps, kbps, Mbps, Gbps, Tbps, bit/s forms, and bytes per second (B/s, KB/s,
    MB/s, GB/s, KiB/s, MiB/s, GiB/s). RTT units: s, ms, us, ns. A new name needs both keys.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ProfileError("network profile string is empty (expected e.g. 'lan' or 'x:bw=1Gbps,rtt=5ms')")
    name, sep, body = spec.strip().partition(":")
    name = name.strip()
    base = PRESETS.get(name.lower())
    if not sep:
        if base is None:
            raise ProfileError(
                f"unknown network profile {name!r}: use one of {sorted(PRESETS)} or 'name:bw=...,rtt=...'"
            )
        return base
    values: dict[str, str] = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        key = "bw" if key == "bandwidth" else key
        if not eq or not value.strip():
            raise ProfileError(f"profile {name!r}: {item.strip()!r} is not key=value")
        if key not in ("bw", "rtt"):
            raise ProfileError(f"profile {name!r}: unknown key {key!r} (use bw and rtt)")
        if key in values:
            raise ProfileError(f"profile {name!r}: {key} given twice")
        values[key] = value.strip()
    missing = [k for k in ("bw", "rtt") if k not in values]
    if base is None and missing:
        raise ProfileError(f"profile {name!r}: missing {' and '.join(missing)} (e.g. bw=1Gbps,rtt=5ms)")
    bandwidth = (parse_bandwidth(values["bw"]) if "bw" in values else base.bandwidth_bps)  # type: ignore[union-attr]
    rtt = parse_time(values["rtt"]) if "rtt" in values else base.rtt_s  # type: ignore[union-attr]
    return NetworkProfile(base.name if base is not None else name, bandwidth, rtt)


def parse_bandwidth(text: str) -> float:
    """``"1Gbps"`` -> 1e9 bits per second; ``"100MB/s"`` -> 8e8."""
    number, unit = _split_quantity(text, "bandwidth")
    if unit in _AMBIGUOUS:
        raise ProfileError(
            f"bandwidth unit {unit!r} is ambiguous: write {unit[:-3]}bps for bits or {unit[:-3]}B/s for bytes"
        )
    if unit not in BANDWIDTH_UNITS:
        raise ProfileError(f"bandwidth {text!r}: unknown unit {unit!r} (use one of {', '.join(BANDWIDTH_UNITS)})")
    value = number * BANDWIDTH_UNITS[unit]
    if value <= 0:
        raise ProfileError(f"bandwidth {text!r} must be positive")
    return value


def parse_time(text: str) -> float:
    """``"5ms"`` -> 0.005 seconds."""
    number, unit = _split_quantity(text, "rtt")
    if unit not in TIME_UNITS:
        raise ProfileError(f"rtt {text!r}: unknown unit {unit!r} (use one of {', '.join(TIME_UNITS)})")
    return number / TIME_UNITS[unit]


def _split_quantity(text: str, what: str) -> tuple[float, str]:
    match = _QUANTITY.match(text)
    if match is None:
        raise ProfileError(f"{what} {text!r} is not a number with a unit (e.g. 1Gbps, 5ms)")
    number, unit = float(match.group(1)), match.group(2)
    if not unit:
        raise ProfileError(f"{what} {text!r} needs a unit (e.g. 1Gbps, 5ms)")
    if not math.isfinite(number):
        raise ProfileError(f"{what} {text!r} is not finite")
    return number, unit


def _format_bandwidth(bps: float) -> str:
    for unit in ("Tbps", "Gbps", "Mbps", "kbps"):
        text = f"{bps / BANDWIDTH_UNITS[unit]:g}{unit}"
        if bps >= BANDWIDTH_UNITS[unit] and parse_bandwidth(text) == bps:
            return text
    return f"{bps!r}bps"


def _format_time(seconds: float) -> str:
    for unit in ("s", "ms", "us", "ns"):
        text = f"{seconds * TIME_UNITS[unit]:g}{unit}"
        if seconds * TIME_UNITS[unit] >= 1 and parse_time(text) == seconds:
            return text
    return f"{seconds!r}s"


# ----- the latency model ----------------------------------------------------------------
@dataclass(frozen=True)
class CriticalPath:
    """What one cell costs when its parties run in parallel (see the module docstring)."""

    compute_s: float = 0.0
    rounds: int = 0
    critical_bytes: int = 0


def combine_parties(counters: Iterable[Counters]) -> CriticalPath:
    """Critical path of one cell: max compute, max rounds, max bytes sent by one party."""
    items = list(counters)
    if not items:
        return CriticalPath()
    return CriticalPath(
        compute_s=max(c.compute_s for c in items),
        rounds=max(c.rounds for c in items),
        critical_bytes=max(c.bytes_sent for c in items),
    )


@dataclass(frozen=True)
class Estimate:
    """Estimated latency under one profile, kept in its three parts."""

    profile: str
    compute_s: float = 0.0
    rounds: int = 0
    critical_bytes: int = 0
    rtt_s: float = 0.0
    transfer_s: float = 0.0

    @property
    def latency_s(self) -> float:
        """compute + rounds * RTT + bytes / bandwidth."""
        return self.compute_s + self.rtt_s + self.transfer_s

    def __add__(self, other: Estimate) -> Estimate:
        if other.profile != self.profile:
            raise ValueError(f"cannot add estimates for profiles {self.profile!r} and {other.profile!r}")
        return Estimate(
            self.profile, self.compute_s + other.compute_s, self.rounds + other.rounds,
            self.critical_bytes + other.critical_bytes, self.rtt_s + other.rtt_s,
            self.transfer_s + other.transfer_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, with the derived ``latency_s``."""
        return {
            "profile": self.profile, "latency_s": self.latency_s, "compute_s": self.compute_s,
            "rounds": self.rounds, "critical_bytes": self.critical_bytes, "rtt_s": self.rtt_s,
            "transfer_s": self.transfer_s,
        }


def price(path: CriticalPath, profile: NetworkProfile) -> Estimate:
    """Price one cell's critical path on ``profile``."""
    return Estimate(
        profile.name, path.compute_s, path.rounds, path.critical_bytes,
        path.rounds * profile.rtt_s, path.critical_bytes * 8.0 / profile.bandwidth_bps,
    )


def cells(rows: Iterable[Row], phase: Phase | None = None) -> dict[tuple[str, Phase, str], list[Row]]:
    """Rows grouped into priced cells (scope, phase, step), in first-seen order."""
    out: dict[tuple[str, Phase, str], list[Row]] = {}
    for row in rows:
        if phase is None or row.phase == Phase(phase):
            out.setdefault((row.name, row.phase, row.step), []).append(row)
    return out


def estimate(rows: Iterable[Row], profile: NetworkProfile, phase: Phase | None = None) -> Estimate:
    """Estimated latency of ``rows`` (all parties) on ``profile``: each (scope, phase, step)
    cell priced on its critical path, then summed. ``phase`` limits it to offline or online."""
    total = Estimate(profile.name)
    for group in cells(rows, phase).values():
        total = total + price(combine_parties(r.counters for r in group), profile)
    return total


def estimate_groups(rows: Iterable[Row], profile: NetworkProfile, key: Callable[[Row], str],
                    phase: Phase | None = None) -> dict[str, Estimate]:
    """Estimates per group (e.g. per transformer block): cells priced one by one, then summed
    within the group named by ``key(row)``; the groups add up to :func:`estimate`."""
    out: dict[str, Estimate] = {}
    for group in cells(rows, phase).values():
        name = key(group[0])
        out[name] = out.get(name, Estimate(profile.name)) + price(
            combine_parties(r.counters for r in group), profile
        )
    return out


def estimate_phases(rows: Iterable[Row], profile: NetworkProfile) -> dict[str, Estimate]:
    """``online`` (what a user waits for), ``offline`` (preparation) and their ``total``."""
    rows = list(rows)
    online = estimate(rows, profile, Phase.ONLINE)
    offline = estimate(rows, profile, Phase.OFFLINE)
    return {"online": online, "offline": offline, "total": online + offline}
