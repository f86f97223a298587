"""Cost reports: every party's ledger rows plus run metadata, as JSON, CSV, a table and a PNG.

Each party keeps its own :class:`~privinf.ledger.counting.Ledger`; at the end of a session the server and
the dealer send their rows to the client as JSON (:func:`~privinf.ledger.records.rows_to_dicts`), and
the client merges them (:func:`merge_rows`) into a :class:`Report`. Raw rows stay per party;
views that combine parties (the table, ``scopes`` in the JSON, the chart) use the latency model
of :mod:`privinf.ledger.pricing`: bytes are summed over parties, while rounds, compute and wall time
are the per-cell maximum over parties (the critical path), summed over cells.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privinf.ledger.charts import ChartData, draw
from privinf.ledger.pricing import (
    LAN,
    WAN,
    Estimate,
    NetworkProfile,
    cells,
    combine_parties,
    estimate,
    estimate_phases,
    price,
)
from privinf.ledger.records import (
    ROOT_SCOPE,
    Counters,
    LedgerFormatError,
    Phase,
    Row,
    rows_from_dicts,
    sum_counters,
    totals_by_op,
)
from privinf.ledger.tables import num_col, render, text_col

SCHEMA = "privinf.report/1"
MIB = float(2**20)


class ReportError(ValueError):
    """A report, or the rows it is built from, is inconsistent or malformed."""


def merge_rows(*parts: Iterable[Row]) -> list[Row]:
    """Concatenate the rows of several parties' ledgers, one party per argument.

    Refuses a party that appears in two arguments or a repeated (party, scope, phase, step)
    cell, which would count the same work twice.
    """
    merged: list[Row] = []
    seen_parties: set[str] = set()
    seen_cells: set[tuple[str, str, Phase, str]] = set()
    for part in parts:
        rows = list(part)
        parties = {row.party for row in rows}
        if len(parties) > 1:
            raise ReportError(f"merge_rows: one argument holds rows of several parties {sorted(parties)}")
        if parties & seen_parties:
            raise ReportError(f"merge_rows: rows of party {next(iter(parties))!r} given twice")
        seen_parties |= parties
        for row in rows:
            key = (row.party, row.name, row.phase, row.step)
            if key in seen_cells:
                raise ReportError(f"merge_rows: duplicate row for party {row.party!r} scope {row.name!r}")
            seen_cells.add(key)
            merged.append(row)
    return merged


def group_name(name: str, depth: int | None) -> str:
    """``encoder.layer.3.attn.softmax`` at depth 3 is ``encoder.layer.3``; None keeps it."""
    if depth is None or name == ROOT_SCOPE:
        return name
    if depth < 1:
        raise ReportError(f"group depth must be at least 1, got {depth}")
    return ".".join(name.split(".")[:depth])


@dataclass(frozen=True)
class LayerSummary:
    """One scope (or group of scopes) combined over parties for one phase, with estimates."""

    name: str
    op: str
    phase: str
    bytes_sent: int
    bytes_recv: int
    rounds: int
    compute_s: float
    wall_s: float
    storage_bytes: int
    estimates: dict[str, Estimate]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; ``estimates`` maps profile name to latency seconds."""
        return {
            "name": self.name, "op": self.op, "phase": self.phase, "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_recv, "rounds": self.rounds, "compute_s": self.compute_s,
            "wall_s": self.wall_s, "storage_bytes": self.storage_bytes,
            "estimates": {k: v.latency_s for k, v in self.estimates.items()},
        }


@dataclass
class Report:
    """A run's costs: all parties' rows and what was run, on which network profiles."""

    model: str
    protocol: str
    variant: str
    output: Any
    rows: list[Row]
    profiles: tuple[NetworkProfile, ...] = (LAN, WAN)
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. a variant on weights not distilled for it

    def __post_init__(self) -> None:
        if not all(isinstance(w, str) for w in self.warnings):
            raise ReportError("report warnings must be strings")
        self.warnings = list(self.warnings)
        for key in ("model", "protocol", "variant"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ReportError(f"report {key} must be a non-empty string")
        try:
            self.output = json.loads(json.dumps(self.output, default=_plain))
            self.meta = json.loads(json.dumps(self.meta, default=_plain))
        except (TypeError, ValueError) as exc:
            raise ReportError(f"report output and meta must be JSON-serialisable: {exc}") from None
        self.rows = merge_rows(*self._rows_by_party())
        self.profiles = tuple(self.profiles)
        names = [p.name for p in self.profiles]
        if not names or len(set(names)) != len(names):
            raise ReportError(f"report needs network profiles with distinct names, got {names}")

    @classmethod
    def from_rows(cls, *parties: Iterable[Row], model: str, protocol: str, variant: str,
                  output: Any, profiles: Iterable[NetworkProfile] = (LAN, WAN),
                  meta: dict[str, Any] | None = None) -> Report:
        """Build from each party's rows, one party per positional argument (see :func:`merge_rows`)."""
        return cls(model, protocol, variant, output, merge_rows(*parties), tuple(profiles), dict(meta or {}))

    def _rows_by_party(self) -> list[list[Row]]:
        by_party: dict[str, list[Row]] = {}
        for row in self.rows:
            if not isinstance(row, Row):
                raise ReportError(f"report rows must be Row objects, got {type(row).__name__}")
            by_party.setdefault(row.party, []).append(row)
        return list(by_party.values())

    # ----- derived views -----------------------------------------------------------------
    @property
    def parties(self) -> list[str]:
        """Party names in first-seen order."""
        return list(dict.fromkeys(row.party for row in self.rows))

    @property
    def steps(self) -> list[str]:
        """Step labels in first-seen order ("" marks rows recorded outside any step)."""
        return list(dict.fromkeys(row.step for row in self.rows))

    def profile(self, name: str) -> NetworkProfile:
        """The report's network profile called ``name``."""
        for prof in self.profiles:
            if prof.name == name:
                return prof
        raise ReportError(f"report has no network profile {name!r} (has {[p.name for p in self.profiles]})")

    def totals(self, phase: Phase | None = None) -> Counters:
        """Sum of every party's rows (optionally of one phase)."""
        return sum_counters(r.counters for r in self.rows if phase is None or r.phase == phase)

    def totals_by_phase(self) -> dict[str, Counters]:
        """Totals of the offline and the online phase."""
        return {ph.value: self.totals(ph) for ph in Phase}

    def totals_by_party(self) -> dict[str, Counters]:
        """Each party's own totals (both phases)."""
        return {p: sum_counters(r.counters for r in self.rows if r.party == p) for p in self.parties}

    def storage_by_party(self) -> dict[str, dict[str, Any]]:
        """Bytes each party must hold: total and per kind (triples, weight masks, keys...)."""
        return {p: {"total": c.storage_bytes, "by_kind": dict(c.storage)}
                for p, c in self.totals_by_party().items()}

    def estimates(self) -> dict[str, dict[str, Estimate]]:
        """Per profile: online, offline and total estimated latency."""
        return {p.name: estimate_phases(self.rows, p) for p in self.profiles}

    def step_estimates(self, profile: str, phase: Phase = Phase.ONLINE) -> dict[str, Estimate]:
        """Estimated latency per step (prefill, decode.0, ...) for per-token reporting."""
        prof = self.profile(profile)
        return {s: estimate([r for r in self.rows if r.step == s], prof, phase) for s in self.steps}

    def layers(self, depth: int | None = None, phase: Phase | None = Phase.ONLINE,
               party: str | None = None, step: str | None = None) -> list[LayerSummary]:
        """Rows combined over parties and steps per scope group (and phase), in first-seen order.

        ``depth`` groups scopes by name prefix (3 -> ``encoder.layer.3``); ``phase`` None keeps
        both phases as separate lines; ``party`` and ``step`` filter the rows first.
        """
        if party is not None and party not in self.parties:
            raise ReportError(f"report has no party {party!r} (has {self.parties})")
        if step is not None and step not in self.steps:
            raise ReportError(f"report has no step {step!r}")
        selected = [r for r in self.rows if (party is None or r.party == party)
                    and (step is None or r.step == step)]
        groups: dict[tuple[str, str], list[list[Row]]] = {}
        for (name, ph, _step), cell in cells(selected, phase).items():
            groups.setdefault((group_name(name, depth), ph.value), []).append(cell)
        ops = {r.name: r.op for r in self.rows}
        out = []
        for (name, ph), cell_list in groups.items():
            paths = [combine_parties(r.counters for r in cell) for cell in cell_list]
            members = [r for cell in cell_list for r in cell]
            member_ops = {r.op for r in members}
            op = ops.get(name) or (member_ops.pop() if len(member_ops) == 1 else "mixed")
            ests: dict[str, Estimate] = {}
            for prof in self.profiles:
                ests[prof.name] = sum((price(p, prof) for p in paths), Estimate(prof.name))
            out.append(LayerSummary(
                name=name, op=op, phase=ph,
                bytes_sent=sum(r.counters.bytes_sent for r in members),
                bytes_recv=sum(r.counters.bytes_recv for r in members),
                rounds=sum(p.rounds for p in paths),
                compute_s=sum(p.compute_s for p in paths),
                wall_s=sum(max(r.counters.wall_s for r in cell) for cell in cell_list),
                storage_bytes=sum(r.counters.storage_bytes for r in members),
                estimates=ests,
            ))
        return out

    # ----- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema ``privinf.report/1``)."""
        return {
            "schema": SCHEMA,
            "model": self.model,
            "protocol": self.protocol,
            "variant": self.variant,
            "output": self.output,
            "meta": self.meta,
            "warnings": self.warnings,
            "profiles": [p.to_dict() for p in self.profiles],
            "parties": self.parties,
            "layers": [r.to_dict() for r in self.rows],
            "scopes": [s.to_dict() for s in self.layers(phase=None)],
            "totals": self.totals().to_dict(),
            "totals_by_phase": {k: c.to_dict() for k, c in self.totals_by_phase().items()},
            "totals_by_party": {k: c.to_dict() for k, c in self.totals_by_party().items()},
            "totals_by_op": {k: c.to_dict() for k, c in totals_by_op(self.rows).items()},
            "storage_by_party": self.storage_by_party(),
            "estimates": {name: {ph: e.to_dict() for ph, e in by_phase.items()}
                          for name, by_phase in self.estimates().items()},
            "steps": self._steps_dict(),
        }

    def _steps_dict(self) -> dict[str, dict[str, float]]:
        """Online latency per labelled step and profile."""
        per_profile = {p.name: self.step_estimates(p.name) for p in self.profiles}
        return {s: {name: ests[s].latency_s for name, ests in per_profile.items()}
                for s in self.steps if s}

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON document."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> Report:
        """Rebuild from :meth:`to_dict` output; derived sections are recomputed and checked."""
        if not isinstance(data, dict):
            raise ReportError(f"report must be a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA:
            raise ReportError(f"report schema is {data.get('schema')!r}, expected {SCHEMA!r}")
        try:
            rows = rows_from_dicts(data["layers"])
            profiles = tuple(NetworkProfile.from_dict(p) for p in data["profiles"])
            report = cls(data["model"], data["protocol"], data["variant"], data["output"], rows,
                         profiles, dict(data.get("meta", {})), list(data.get("warnings", [])))
        except KeyError as exc:
            raise ReportError(f"report is missing field {exc.args[0]!r}") from None
        except LedgerFormatError as exc:
            raise ReportError(f"report layers: {exc}") from None
        stored = data.get("totals", {})
        recomputed = report.totals()
        for key in ("bytes_sent", "bytes_recv", "rounds", "storage_bytes"):
            if key in stored and stored[key] != getattr(recomputed, key):
                raise ReportError(f"report totals.{key} is {stored[key]} but its layers add up to "
                                  f"{getattr(recomputed, key)}")
        return report

    @classmethod
    def from_json(cls, text: str) -> Report:
        """Read a report written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ReportError(f"report is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # ----- CSV -----------------------------------------------------------------------------
    def to_csv(self, path: str | Path | None = None) -> str:
        """One line per row (party, scope, phase, step); storage kinds and extra counters get
        their own ``storage.<kind>`` / ``extra.<key>`` columns. Written to ``path`` if given."""
        kinds = sorted({k for r in self.rows for k in r.counters.storage})
        extras = sorted({k for r in self.rows for k in r.counters.extra})
        base = ["name", "op", "party", "phase", "step", "bytes_sent", "bytes_recv", "messages_sent",
                "messages_recv", "rounds", "compute_s", "wall_s", "wait_s", "storage_bytes"]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(base + [f"storage.{k}" for k in kinds] + [f"extra.{k}" for k in extras])
        for row in self.rows:
            d = row.to_dict()
            writer.writerow([d[k] for k in base]
                            + [row.counters.storage.get(k, 0) for k in kinds]
                            + [row.counters.extra.get(k, 0.0) for k in extras])
        text = buffer.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    # ----- terminal table ------------------------------------------------------------------
    def render_table(self, depth: int | None = None, phase: Phase | None = Phase.ONLINE,
                     party: str | None = None, step: str | None = None, name_width: int = 34) -> str:
        """A per-layer table: MiB sent/received (summed over parties), rounds, compute and wall
        ms (critical path), estimated ms per profile, and a totals line; then the other phase's
        totals and each party's storage. Arguments as in :meth:`layers`."""
        layers = self.layers(depth, phase, party, step)
        est_names = [p.name for p in self.profiles]
        columns = [text_col("layer", name_width, keep="tail"), text_col("op", 16)] + (
            [text_col("phase")] if phase is None else []) + [
            num_col(h) for h in ("MiB sent", "MiB recv", "rounds", "compute ms", "wall ms")] + [
            num_col(f"{n} ms") for n in est_names]
        lines = [_layer_cells(s, est_names, phase is None) for s in layers]
        totals = [_total_cells(layers, est_names, phase is None, "total")]
        if phase is not None and party is None and step is None:
            other = Phase.OFFLINE if phase == Phase.ONLINE else Phase.ONLINE
            other_layers = self.layers(None, other)
            if other_layers:
                totals.append(_total_cells(other_layers, est_names, False, f"{other.value} total"))
        title = (f"{self.model} / {self.protocol} / {self.variant}  phase={phase.value if phase else 'all'}"
                 + (f" party={party}" if party else "") + (f" step={step}" if step else "")
                 + (f" depth={depth}" if depth else ""))
        out = [title, render(columns, lines, totals)]
        for name, storage in self.storage_by_party().items():
            if storage["total"]:
                kinds = ", ".join(f"{k} {_size(v)}" for k, v in storage["by_kind"].items())
                out.append(f"storage {name}: {_size(storage['total'])} ({kinds})")
        out.append("profiles: " + "  ".join(p.spec() for p in self.profiles))
        return "\n".join(out)

    # ----- PNG chart -----------------------------------------------------------------------
    def to_png(self, path: str | Path, depth: int | None = None, step: str | None = None) -> Path:
        """Chart per layer at ``depth`` (see :mod:`privinf.ledger.charts`): online and offline MiB
        sent per party and estimated latency per profile, on log scales. ``step`` filters rows."""
        return draw(self.chart_data(depth, step), path)

    def chart_data(self, depth: int | None = None, step: str | None = None) -> ChartData:
        """What :meth:`to_png` draws: one row per scope group at ``depth``, both phases."""
        layers = self.layers(depth, phase=None, step=step)
        if not layers:
            raise ReportError("report has no rows to chart")
        names = list(dict.fromkeys(s.name for s in layers))
        ops: dict[str, set[str]] = {}
        for s in layers:
            ops.setdefault(s.name, set()).add(s.op)
        row_of = {name: i for i, name in enumerate(names)}
        mib: dict[str, dict[str, list[float]]] = {ph.value: {} for ph in Phase}
        for party in self.parties:
            for s in self.layers(depth, phase=None, party=party, step=step):
                mib[s.phase].setdefault(party, [0.0] * len(names))[row_of[s.name]] += s.bytes_sent / MIB
        latency: dict[str, dict[str, list[float]]] = {ph.value: {} for ph in Phase}
        for s in layers:
            for prof in self.profiles:
                series = latency[s.phase].setdefault(prof.spec(), [0.0] * len(names))
                series[row_of[s.name]] += s.estimates[prof.name].latency_s * 1e3
        return ChartData(self._chart_title(depth, step), self._chart_totals(step),
                         [_chart_label(n, ops[n].pop() if len(ops[n]) == 1 else "mixed") for n in names],
                         mib, latency)

    def _chart_title(self, depth: int | None, step: str | None) -> str:
        return (f"{self.model} / {self.protocol} / {self.variant}"
                + f"  (depth {depth if depth else 'all'}" + (f", step {step}" if step else "") + ")")

    def _chart_totals(self, step: str | None) -> str:
        """One line: MiB sent and estimated seconds per phase and profile."""
        rows = [r for r in self.rows if step is None or r.step == step]
        parts = []
        for ph in (Phase.ONLINE, Phase.OFFLINE):
            sent = sum(r.counters.bytes_sent for r in rows if r.phase == ph) / MIB
            times = ", ".join(f"{p.name} {estimate(rows, p, ph).latency_s:.2f} s" for p in self.profiles)
            parts.append(f"{ph.value}: {sent:,.2f} MiB sent, {times}")
        return "   |   ".join(parts)


def _chart_label(name: str, op: str) -> str:
    """A chart row's label: the scope, and its op kind when the name does not say it."""
    return name if op in ("mixed", name.rsplit(".", 1)[-1]) else f"{name} [{op}]"


def _plain(obj: Any) -> Any:
    """JSON fallback for numpy / torch values in outputs: arrays to lists, scalars to numbers."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _size(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    value, unit = float(nbytes), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"


def _layer_cells(s: LayerSummary, est_names: list[str], with_phase: bool) -> list[str]:
    return ([s.name, s.op] + ([s.phase] if with_phase else [])
            + _numbers(s.bytes_sent, s.bytes_recv, s.rounds, s.compute_s, s.wall_s,
                       [s.estimates[n].latency_s for n in est_names]))


def _total_cells(layers: list[LayerSummary], est_names: list[str], with_phase: bool,
                 label: str) -> list[str]:
    return ([label, ""] + ([""] if with_phase else [])
            + _numbers(sum(s.bytes_sent for s in layers), sum(s.bytes_recv for s in layers),
                       sum(s.rounds for s in layers), sum(s.compute_s for s in layers),
                       sum(s.wall_s for s in layers),
                       [sum(s.estimates[n].latency_s for s in layers) for n in est_names]))


def _numbers(sent: int, recv: int, rounds: int, compute_s: float, wall_s: float,
             latencies: list[float]) -> list[str]:
    return ([f"{sent / MIB:.3f}", f"{recv / MIB:.3f}", str(rounds), f"{compute_s * 1e3:.2f}",
             f"{wall_s * 1e3:.2f}"] + [f"{v * 1e3:.2f}" for v in latencies])

