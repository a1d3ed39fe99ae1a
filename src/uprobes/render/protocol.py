"""What an engine needs of a renderer: batches of hits (every trace
renderer), and for the fast path, lines from row templates (text and JSON
lines). Engines take renderers by these protocols, never by class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from uprobes.model.event import Hit
from uprobes.render.rows import Rows, RowShape


class HitRenderer(Protocol):
    """A renderer that takes batches of hits (every trace renderer)."""

    def hits(self, hits: list[Hit]) -> None: ...


@runtime_checkable
class LineRenderer(HitRenderer, Protocol):
    """What the fast path needs of a renderer (text and JSON lines have it)."""

    def row_lines(self, shape: RowShape) -> str | Callable[[Rows], list[str]] | None:
        """How to write a piece of rows of `shape`: a %-template a row
        fills as it is (then no line of this renderer holds a newline but
        its last character, so that a template repeated fills many rows at
        once and the text splits back into lines), or a function of the
        rows, or None (hit by hit)."""

    def lines(self, hits: list[Hit]) -> list[str]: ...

    def write_lines(self, lines: list[str]) -> None: ...
