"""Tables for people: rich on a terminal, plain aligned columns in a pipe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO


def write_table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[str]],
                title: str | None = None, right: Sequence[int] = (),
                widest: int | None = None) -> None:
    """Write `rows` under `headers`; columns whose index is in `right` align right.
    With `widest`, no column is padded wider: a longer cell (a C++ name of
    hundreds of characters) runs over and shifts the rest of its row only."""
    if out.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left", box=None, header_style="bold")
        for i, h in enumerate(headers):
            table.add_column(h, justify="right" if i in right else "left", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        Console(file=out).print(table)
        return
    if title:
        out.write(title + "\n")
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    if widest is not None:
        widths = [min(w, max(widest, len(h))) for w, h in zip(widths, headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                 for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    out.write(line(headers) + "\n")
    for row in rows:
        out.write(line(row) + "\n")
