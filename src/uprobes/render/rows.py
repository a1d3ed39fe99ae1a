"""Rows: the fast path's hits as numbers, written from one line template.

Both engines have a fast path to text (the kernel engine's runs of alike
records, the trap-free engine's recorded rings) that hands a renderer
pieces of hits sharing everything but their time and arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Rows = Iterable[tuple[int, ...]]
"""A piece's hits as rows `(ts_ns, *args)`, all numbers."""


@dataclass(frozen=True)
class RowShape:
    """A piece of hits of one probe that share everything but their time and
    arguments (a fast path of either engine): what they share. Its hits
    come as rows `(ts_ns, *args)`, all numbers, one struct unpack each; a
    renderer writes them from one line template holding the rest."""

    probe: str
    comm: str
    pid: int
    tid: int
    cpu: int
    ip: int
    func: int | None
