"""The whole cost of one inference, one rule for every system the benches compare.

:class:`Totals` holds, per inference: what each computing party sends online, the dealer (or
TTP) material each receives offline, online rounds, dealer round trips, and the walls of the
online and offline spans (each the max over the computing parties of that party's
``end - start``), plus the once-per-session set-up and what each party stores. It is filled from
privinf's ledger rows (:func:`privinf_totals`) or from CrypTen's own statistics
(``bench/crypten_baseline.py``), then priced on the profiles of :mod:`privinf.ledger.pricing`
with the same formula for both (:func:`priced`): the computing parties' link on one profile,
the dealer's links on another (the dealer on each party's LAN, or across the WAN).

Definitions (per inference unless noted):

* online bytes of a party: what it sends in the online phase (CrypTen: half its sent + received
  statistic). "online bytes per party" is the max over the two parties.
* offline bytes of a party: the dealer material it receives (privinf: triples, FSS keys,
  weight-stationary corrections; CrypTen-TTP: the TTP's answers, all to rank 0).
* total bytes per party: max over the parties of online sent + offline received.
* dealer link bytes: the sum over parties of their offline bytes, priced on the dealer's one
  uplink (:mod:`privinf.ledger.pricing` prices a dealer that way).
* walls: online and offline spans measured on loopback, each the max over the computing
  parties; total = online + offline.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privinf.ledger.pricing import LAN, WAN, CriticalPath, NetworkProfile, estimate, price
from privinf.ledger.records import ROOT_SCOPE, Phase, Row

MIB = float(2**20)
COMPUTING = ("client", "server")
SETUP_SCOPE = "setup"
GENERATE_KEY = "pool_generate_s"  # the dealer pool's generation seconds in its ledger rows' extras
SESSION_KINDS = frozenset({"weight_masks", "seeds"})  # storage kept for the session, not per inference
PLACEMENTS = (("parties LAN, dealer on each party's LAN", LAN, LAN),
              ("parties WAN, dealer on each party's LAN", WAN, LAN),
              ("parties LAN, dealer across the WAN", LAN, WAN),
              ("parties WAN, dealer across the WAN", WAN, WAN))


class TotalsError(RuntimeError):
    """Reports or statistics do not have the shape the whole-cost rule needs."""


@dataclass
class Totals:
    """Per-inference figures of one system (see the module docstring for each definition)."""

    name: str
    online_sent: dict[str, float]
    offline_recv: dict[str, float]
    rounds: int
    offline_round_trips: float
    online_s: float
    offline_s: float
    dealer_cpu_s: float | None = None
    setup_bytes: float = 0.0
    setup_s: float = 0.0
    stored: dict[str, float] = field(default_factory=dict)
    kept: dict[str, float] = field(default_factory=dict)
    dealer_sent: float | None = None  # the dealer's own count of what it sent, per inference (a cross-check)
    dealer_gen_s: float | None = None  # the dealer pool's generation seconds per inference (its ledger extras)

    @property
    def online_bytes(self) -> float:
        """Online bytes sent by the busier party."""
        return max(self.online_sent.values(), default=0.0)

    @property
    def offline_bytes(self) -> float:
        """Dealer material received by the party that receives the most."""
        return max(self.offline_recv.values(), default=0.0)

    @property
    def total_bytes(self) -> float:
        """Max over the parties of online sent + offline received."""
        parties = set(self.online_sent) | set(self.offline_recv)
        return max((self.online_sent.get(p, 0.0) + self.offline_recv.get(p, 0.0) for p in parties), default=0.0)

    @property
    def dealer_bytes(self) -> float:
        """What the dealer sends for one inference (both parties' material)."""
        return sum(self.offline_recv.values())

    @property
    def total_s(self) -> float:
        """Online plus offline wall per inference."""
        return self.online_s + self.offline_s


def priced(t: Totals, parties: NetworkProfile, dealer: NetworkProfile) -> tuple[float, float]:
    """Estimated (online, offline) seconds per inference: loopback wall + round trips x RTT +
    bytes / bandwidth, the parties' link on ``parties`` and the dealer's uplink on ``dealer``."""
    online = price(CriticalPath(t.online_s, t.rounds, int(t.online_bytes)), parties).latency_s
    offline = price(CriticalPath(t.offline_s, round(t.offline_round_trips), int(t.dealer_bytes)), dealer).latency_s
    return online, offline


# ----- privinf: totals from the ledger rows of a session ------------------------------------
def party_sum(rows: Iterable[Row], party: str, phase: Phase, field_name: str, skip: Sequence[str] = ()) -> float:
    """Sum of one counter over ``party``'s rows of ``phase``, scopes in ``skip`` left out."""
    return sum(getattr(r.counters, field_name) for r in rows
               if r.party == party and r.phase == phase and r.name not in skip)


def online_rounds(rows: Sequence[Row]) -> int:
    """Online rounds on the critical path: per (scope, step) cell the max over parties, summed."""
    return estimate(rows, LAN, Phase.ONLINE).rounds


def privinf_totals(name: str, warm: Sequence[Row], measured: Sequence[Sequence[Row]],
                   dealer_cpu_s: float | None = None, setup_s: float = 0.0) -> Totals:
    """Totals per inference of a privinf session: ``warm`` = the first inference's rows (its
    dealer material fetched online while the schedule was recorded), ``measured`` = the rows of
    each later inference (material preprocessed offline).

    Online figures are medians over ``measured``. Material per party = (everything the party
    received offline over the session, set-up excluded, + what it fetched online in the warm-up:
    its online bytes received there minus a measured inference's) / (1 + len(measured)); each
    inference of a seen shape needs the same material, whenever it is fetched. Offline wall per
    party = its offline (non-set-up) wall over the session / len(measured): the inferences whose
    material was preprocessed (material preprocessed at the warm-up for all of them, such as the
    server's weight-stationary corrections, is counted in full: errs slow). Dealer round trips:
    one per preprocessing batch (a row group with material) and party."""
    if not measured:
        raise TotalsError("privinf totals need at least one inference after the warm-up")
    everything = [list(warm)] + [list(rows) for rows in measured]
    n_all, n_pre = len(everything), len(measured)
    skip_root = (ROOT_SCOPE,)
    sent = {p: statistics.median(party_sum(r, p, Phase.ONLINE, "bytes_sent") for r in measured) for p in COMPUTING}
    recv_online = {p: statistics.median(party_sum(r, p, Phase.ONLINE, "bytes_recv") for r in measured)
                   for p in COMPUTING}
    material, off_wall, batches = {}, {}, {}
    for p in COMPUTING:
        offline = sum(party_sum(r, p, Phase.OFFLINE, "bytes_recv", (SETUP_SCOPE,)) for r in everything)
        fetched_online = max(0.0, party_sum(warm, p, Phase.ONLINE, "bytes_recv") - recv_online[p])
        material[p] = (offline + fetched_online) / n_all
        off_wall[p] = sum(party_sum(r, p, Phase.OFFLINE, "wall_s", (SETUP_SCOPE,)) for r in everything) / n_pre
        batches[p] = sum(1 for r in everything if party_sum(r, p, Phase.OFFLINE, "bytes_recv", (SETUP_SCOPE,)))
    rounds = {online_rounds(r) for r in measured}
    if len(rounds) != 1:
        raise TotalsError(f"{name}: online rounds differ between inferences: {sorted(rounds)}")
    online_s = statistics.median(max(party_sum(r, p, Phase.ONLINE, "wall_s", skip_root) for p in COMPUTING)
                                 for r in measured)
    stored, kept = storage_split([r for rows in everything for r in rows], n_pre)
    dealer_sent = sum(r.counters.bytes_sent for rows in everything for r in rows if r.party == "dealer") / n_all
    generated = [r.counters.extra[GENERATE_KEY] for rows in everything for r in rows
                 if r.party == "dealer" and GENERATE_KEY in r.counters.extra]
    return Totals(
        name, sent, material, rounds.pop(), max(batches.values()) / n_pre, online_s, max(off_wall.values()),
        dealer_cpu_s, setup_bytes=sum(r.counters.bytes_sent for rows in everything for r in rows
                                      if r.name == SETUP_SCOPE and r.party in COMPUTING),
        setup_s=setup_s, stored=stored, kept=kept, dealer_sent=dealer_sent,
        dealer_gen_s=sum(generated) / n_all if generated else None)


def storage_split(rows: Iterable[Row], units: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per computing party: (storage per unit = kinds other than the session's / ``units``,
    storage kept for the session: weight masks and seeds)."""
    kinds: dict[str, dict[str, float]] = {p: {} for p in COMPUTING}
    for r in rows:
        if r.party in kinds:
            for kind, nbytes in r.counters.storage.items():
                kinds[r.party][kind] = kinds[r.party].get(kind, 0) + nbytes
    stored = {p: sum(v for k, v in ks.items() if k not in SESSION_KINDS) / units for p, ks in kinds.items()}
    kept = {p: sum(v for k, v in ks.items() if k in SESSION_KINDS) for p, ks in kinds.items()}
    return stored, kept


def setup_wall(rows: Iterable[Row]) -> float:
    """The set-up span: max over the computing parties of their set-up rows' wall."""
    rows = list(rows)
    return max(sum(r.counters.wall_s for r in rows if r.party == p and r.name == SETUP_SCOPE) for p in COMPUTING)


def _proc_stats() -> dict[int, tuple[int, float]]:
    """Every process's (parent pid, CPU seconds of itself and its reaped children) from ``/proc``."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            out[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    return out


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far: all its threads, its live descendants
    (a dealer's key-generation worker processes) and the children it has reaped (Linux ``/proc``)."""
    stats = _proc_stats()
    total, todo, seen = 0.0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen or current not in stats:
            continue
        seen.add(current)
        total += stats[current][1]
        todo += [child for child, (parent, _) in stats.items() if parent == current]
    return total


# ----- tables ---------------------------------------------------------------------------------
def mib(x: float) -> str:
    """Bytes as MiB with two decimals."""
    return f"{x / MIB:.2f}"


def _per_party(values: dict[str, float]) -> str:
    return f"{values.get('client', 0.0) / MIB:.2f} / {values.get('server', 0.0) / MIB:.2f}"


def _ratio(theirs: float, ours: float) -> str:
    return f"{theirs / ours:.2f}x" if ours > 0 else "-"


def totals_rows(title: str, cols: list[Totals], unit: str = "inference") -> list[list[str]]:
    """Table rows (label, one cell per column, first column / last column) of the whole cost:
    bytes, rounds, walls, priced totals, set-up and storage; figures per ``unit`` (inference or step)."""
    base, ours = cols[0], cols[-1]

    def row(label: str, get: Any, fmt: Any = mib) -> list[str]:
        return [label, *(fmt(get(t)) for t in cols), _ratio(get(base), get(ours))]

    def plain(label: str, cells: list[str]) -> list[str]:
        return [label, *cells, ""]

    sec, two = "{:.3f}".format, "{:.2f}".format
    rows = [
        row(f"{title}: online rounds", lambda t: t.rounds, str),
        row("  online MiB sent per party (max)", lambda t: t.online_bytes),
        plain("    client / server", [_per_party(t.online_sent) for t in cols]),
        row("  offline MiB per party (dealer/TTP material, max)", lambda t: t.offline_bytes),
        plain("    client / server", [_per_party(t.offline_recv) for t in cols]),
        row(f"  TOTAL MiB per party per {unit}", lambda t: t.total_bytes),
        row(f"  dealer uplink MiB per {unit} (both parties)", lambda t: t.dealer_bytes),
        plain("    the dealer's own count of MiB sent", [mib(t.dealer_sent) if t.dealer_sent is not None else "-"
                                                         for t in cols]),
        row(f"  dealer round trips per {unit}", lambda t: t.offline_round_trips, "{:.0f}".format),
        plain(f"  dealer generation s per {unit} (pool, all workers)",
              [sec(t.dealer_gen_s) if t.dealer_gen_s is not None else "-" for t in cols]),
        plain(f"  dealer/TTP CPU s per {unit}", [sec(t.dealer_cpu_s) if t.dealer_cpu_s is not None else "-"
                                                    for t in cols]),
        row("  online wall s (max over parties)", lambda t: t.online_s, sec),
        row("  offline wall s (max over parties)", lambda t: t.offline_s, sec),
        row(f"  TOTAL wall s per {unit}", lambda t: t.total_s, sec),
    ]
    for label, parties, dealer in PLACEMENTS:
        rows.append(row(f"  est. total s, {label}", lambda t, p=parties, d=dealer: sum(priced(t, p, d)), two))
        rows.append(plain("    online + offline", ["{:.2f} + {:.2f}".format(*priced(t, parties, dealer))
                                                    for t in cols]))
    rows += [
        plain("  set-up per session: MiB / s", [f"{t.setup_bytes / MIB:.2f} / {t.setup_s:.2f}" for t in cols]),
        plain(f"  stored per {unit} MiB, client / server", [_per_party(t.stored) for t in cols]),
        plain("  kept per session MiB, client / server", [_per_party(t.kept) for t in cols]),
    ]
    return rows


# ----- targets ---------------------------------------------------------------------------------
def verdict(ok: bool, text: str) -> str:
    """One PASS/MISS line."""
    return f"{'PASS' if ok else 'MISS'}  {text}"


def target_lines(ours: Totals, ttp: Totals | None, full_size: bool, online_mib: float, online_rounds_max: int,
                 offline_mib: float) -> list[str]:
    """Issue 16's targets that a BERT-base layer bench measures (absolute ones only at seq 128)."""
    out = []
    if ttp is not None:
        out.append(verdict(ours.total_bytes <= ttp.total_bytes,
                           f"total MiB per party per inference <= CrypTen-TTP's: {ours.total_bytes / MIB:.2f} vs "
                           f"{ttp.total_bytes / MIB:.2f}"))
        out.append(verdict(ours.total_s <= ttp.total_s,
                           f"total wall per inference <= CrypTen-TTP's: {ours.total_s:.2f} s vs {ttp.total_s:.2f} s"))
    if full_size:
        out.append(verdict(ours.online_bytes <= online_mib * MIB,
                           f"online MiB per party <= {online_mib:.2f}: {ours.online_bytes / MIB:.2f}"))
        out.append(verdict(ours.rounds <= online_rounds_max, f"online rounds <= {online_rounds_max}: {ours.rounds}"))
        out.append(verdict(ours.offline_bytes <= offline_mib * MIB,
                           f"offline dealer MiB per party <= {offline_mib:g}: {ours.offline_bytes / MIB:.2f}"))
    generation = ((ours.dealer_gen_s, "pool generation s") if ours.dealer_gen_s is not None
                  else (ours.dealer_cpu_s, "dealer CPU s"))
    if generation[0] is not None:
        out.append(verdict(generation[0] <= ours.online_s, f"dealer generation ({generation[1]}) <= online wall: "
                                                           f"{generation[0]:.2f} s vs {ours.online_s:.2f} s"))
    return out


def as_dict(t: Totals) -> dict[str, Any]:
    """JSON-able figures with the derived totals."""
    out = {k: v for k, v in vars(t).items()}
    out.update(online_bytes=t.online_bytes, offline_bytes=t.offline_bytes, total_bytes=t.total_bytes,
               dealer_bytes=t.dealer_bytes, total_s=t.total_s)
    out["priced"] = {label: dict(zip(("online_s", "offline_s"), priced(t, parties, dealer)))
                     for label, parties, dealer in PLACEMENTS}
    return out
