"""The per-layer PNG chart of a cost report, drawn off-screen with matplotlib.

A leaf like the rest of :mod:`privinf.ledger`: :meth:`privinf.ledger.reports.Report.to_png` turns a
report into a :class:`ChartData` (one row per layer at the chosen depth) and :func:`draw` renders
it. Four panels share the layer axis: online MiB sent per party, online estimated latency per
network profile, then the same two for the offline phase. Every panel has a log scale, so a row
holding 1 KiB is as visible as one holding 1 GiB (and the session's set-up row cannot flatten the
layers' bars); a value of zero draws no bar. The title and the totals line sit above the panels,
the one legend (parties' and profiles' colours) below them, clear of both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PHASES = ("online", "offline")
ROW_INCHES = 0.22  # height of one layer row
HEAD_INCHES = 1.8  # title and totals line above the panels, legend and axis labels below
MAX_INCHES = 120.0  # matplotlib's canvas has limits; a deeper chart wants a smaller --depth
PARTY_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:cyan", "tab:olive")
PROFILE_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:gray")


@dataclass(frozen=True)
class ChartData:
    """What the chart shows: ``labels`` top to bottom; per phase, MiB sent per party and
    estimated milliseconds per profile, one value per label."""

    title: str
    subtitle: str
    labels: list[str]
    mib_sent: dict[str, dict[str, list[float]]]  # phase -> party -> MiB sent per row
    latency_ms: dict[str, dict[str, list[float]]]  # phase -> profile label -> estimated ms per row

    def __post_init__(self) -> None:
        for table in (self.mib_sent, self.latency_ms):
            for phase, series in table.items():
                if phase not in PHASES:
                    raise ValueError(f"chart phase must be one of {PHASES}, got {phase!r}")
                for name, values in series.items():
                    if len(values) != len(self.labels):
                        raise ValueError(f"chart series {phase}/{name} has {len(values)} values for "
                                         f"{len(self.labels)} rows")


def draw(data: ChartData, path: str | Path, dpi: int = 100) -> Path:
    """Render ``data`` as a PNG at ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not data.labels:
        raise ValueError("a chart needs at least one row")
    height = min(MAX_INCHES, HEAD_INCHES + ROW_INCHES * len(data.labels))
    fig = Figure(figsize=(18, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4, sharey=True)
    parties = list(dict.fromkeys(p for series in data.mib_sent.values() for p in series))
    profiles = list(dict.fromkeys(p for series in data.latency_ms.values() for p in series))
    party_colour = {p: PARTY_COLOURS[i % len(PARTY_COLOURS)] for i, p in enumerate(parties)}
    profile_colour = {p: PROFILE_COLOURS[i % len(PROFILE_COLOURS)] for i, p in enumerate(profiles)}
    for column, phase in enumerate(PHASES):
        _panel(axes[2 * column], data.mib_sent.get(phase, {}), party_colour, f"{phase}: MiB sent, per party")
        _panel(axes[2 * column + 1], data.latency_ms.get(phase, {}), profile_colour,
               f"{phase}: estimated ms (critical path), per profile")
    rows = list(range(len(data.labels)))
    axes[0].set_yticks(rows, data.labels, fontsize=7)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # first layer on top
    fig.suptitle(f"{data.title}\n{data.subtitle}", fontsize=10)
    handles = [Patch(color=c, label=p) for p, c in (party_colour | profile_colour).items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, len(handles)), fontsize=8,
               frameon=False)
    target = Path(path)
    fig.savefig(target, format="png", dpi=dpi)
    return target


def _panel(ax: Any, series: dict[str, list[float]], colours: dict[str, str], title: str) -> None:
    """Grouped horizontal bars, one per series in each row, on a log scale."""
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.tick_params(axis="x", labelsize=7)
    positive = [v for values in series.values() for v in values if v > 0]
    if not positive:
        ax.text(0.5, 0.5, "nothing in this phase", transform=ax.transAxes, ha="center", fontsize=9)
        ax.set_xticks([])
        return
    ax.set_xscale("log")
    ax.set_xlim(min(positive) / 2, max(positive) * 2)
    bar = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        shown = [(row, v) for row, v in enumerate(values) if v > 0]
        ax.barh([row - 0.4 + bar * (i + 0.5) for row, _ in shown], [v for _, v in shown], height=bar,
                color=colours[name])
