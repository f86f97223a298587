"""The one plain-text table renderer of privinf (reports, CLI listings, benchmarks), built on rich.

Tables render the same wherever they go: no colour or control codes (the console is never a
terminal), ASCII rules only, and a fixed console width far above any table so that cells are never
wrapped or shrunk by the terminal's size; a column is clipped only where its :class:`Col` says so.
Trailing spaces are stripped, so tests and CI can compare the text line by line.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.box import Box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Wider than any table we print: rich then lays each table out at its natural width, whatever
# the terminal or $COLUMNS says.
CONSOLE_WIDTH = 4096
ELLIPSIS = "\u2026"
# ASCII rules under the header and between row groups; spaces between columns, no outer frame.
# Lines: top, head, head_row, mid, row (group separator), foot_row, foot, bottom.
RULES = Box("    \n    \n -- \n    \n -- \n -- \n    \n    \n", ascii=True)


@dataclass(frozen=True)
class Col:
    """One column: its header, alignment, and an optional clip width keeping the head or the tail.

    ``keep="tail"`` suits dotted scope paths (``…attn.softmax``), ``"head"`` plain labels.
    """

    header: str
    numeric: bool = False
    max_width: int | None = None
    keep: Literal["head", "tail"] = "head"

    def clip(self, text: str) -> str:
        """``text`` cut to ``max_width`` with an ellipsis on the side that is dropped."""
        if self.max_width is None or len(text) <= self.max_width:
            return text
        if self.keep == "tail":
            return ELLIPSIS + text[len(text) - self.max_width + 1:]
        return text[:self.max_width - 1] + ELLIPSIS


def text_col(header: str, max_width: int | None = None, keep: Literal["head", "tail"] = "head") -> Col:
    """A left-aligned text column."""
    return Col(header, numeric=False, max_width=max_width, keep=keep)


def num_col(header: str) -> Col:
    """A right-aligned number column."""
    return Col(header, numeric=True)


def render(columns: Sequence[Col], *groups: Sequence[Sequence[str]], show_header: bool = True) -> str:
    """Columns over row groups separated by a dashed rule (e.g. layers, then totals).

    Each row holds one already-formatted string per column; numbers keep the format the caller
    gave them. Empty groups are skipped.
    """
    table = Table(box=RULES, show_header=show_header, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style="", highlight=False)
    for col in columns:
        table.add_column(col.header, justify="right" if col.numeric else "left", no_wrap=True)
    filled = [group for group in groups if group]
    for index, group in enumerate(filled):
        for row_index, row in enumerate(group):
            if len(row) != len(columns):
                raise ValueError(f"table row has {len(row)} cells for {len(columns)} columns: {list(row)}")
            last = row_index == len(group) - 1 and index < len(filled) - 1
            table.add_row(*(Text(col.clip(cell)) for col, cell in zip(columns, row)), end_section=last)
    return _plain(table)


def _plain(table: Table) -> str:
    """``table`` as text: no colour, no terminal codes, no trailing spaces."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=CONSOLE_WIDTH, force_terminal=False, force_jupyter=False,
                      force_interactive=False, no_color=True, color_system=None, markup=False,
                      emoji=False, highlight=False, legacy_windows=False, soft_wrap=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
