"""How the CLI's tables and times look.

Tables fit the terminal (80 columns when it cannot tell): few columns by default, the long
ones (names, reasons) wrapped rather than cut, so no cell ends in an ellipsis; `--wide`
prints every column at its natural width and lets the terminal wrap the lines. Times are
the reader's: relative ("3 min ago") or the local clock, and with `--utc` ISO 8601 in UTC,
marked so (a trailing Z).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Column, Table

from orchestrator.progress import ago


def short(header: str, justify: str = "left") -> Column:
    """A column of short values (ids, states, numbers): never wrapped, never cut."""
    return Column(header, no_wrap=True, justify=justify)  # type: ignore[arg-type]


def long(header: str, ratio: int = 1) -> Column:
    """A column of free text (names, reasons, errors): wrapped to the room left."""
    return Column(header, overflow="fold", ratio=ratio)


def table(*columns: Column | str, title: str | None = None) -> Table:
    """A table with a rule under its header and no vertical lines: two spaces between
    columns, so more of the 80 columns go to the values. Keep the columns' least widths
    under the terminal's: past that rich crops the free-text columns."""
    cols = [short(c) if isinstance(c, str) else c for c in columns]
    # One space of padding and the (blank) divider: two columns between cells, not three.
    return Table(*cols, title=title, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False,
                 show_edge=False)


def print_table(console: Console, shown: Table, wide: bool = False) -> None:
    """Print a table in the terminal's width; `wide`: at the width its cells need."""
    if not wide:
        console.print(shown)
        return
    natural = Measurement.get(console, console.options.update_width(10_000), shown).maximum
    width = console.width
    console.width = max(width, natural)  # print(width=) cannot exceed the console's
    try:
        console.print(shown, crop=False)
    finally:
        console.width = width


@dataclass
class Clock:
    """Times for people: `utc` prints ISO 8601 UTC (with a Z), else local and relative."""

    utc: bool = False
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def iso(self, moment: datetime) -> str:
        return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def ago(self, moment: datetime | None) -> str:
        """When, relative to now: "3 min ago"."""
        if moment is None:
            return ""
        return self.iso(moment) if self.utc else ago(moment, self.now)

    def at(self, moment: datetime | None) -> str:
        """When, on the local clock: 14:03:12 today, else 11-28 14:03."""
        if moment is None:
            return ""
        if self.utc:
            return self.iso(moment)
        local = moment.astimezone()
        if local.date() == self.now.astimezone().date():
            return local.strftime("%H:%M:%S")
        return local.strftime("%m-%d %H:%M")


def aligned(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """Rows of plain cells as aligned lines (two spaces between columns)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines
