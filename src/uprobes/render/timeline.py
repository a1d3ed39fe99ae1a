"""Hits and the kernel's events in one stream, in time order (`trace --kernel`).

`Timeline` sits between an engine and a renderer: each batch of hits the
engine hands over is preceded by every kernel event stamped before it (the
engines deliver hits in time order, and a kernel event is in its ring as
soon as it happens, so every event older than a hit is readable when the
hit arrives). What is newer waits for a later hit or the end, with a
bound on how much waits: past it, the oldest go out. `tick()`, called
by a thread of the caller's every few milliseconds, reads the kernel's
events whether hits come or not (their rings must not fill) and writes
those older than `LAG_NS`: no engine hands a hit over that late.
The renderer is called under one lock, from whichever thread.

Kernel events of a thread that ended before they were read carry no comm
(`<...>`); a hit of that thread names it.
"""

from __future__ import annotations

import heapq
import threading
from bisect import bisect_right
from operator import itemgetter
from typing import Protocol

from uprobes.model.event import Event, Hit
from uprobes.model.kevent import KernelRow

MAX_HELD = 100_000
"""Kernel events held back waiting for a later hit, at most."""
LAG_NS = 2_000_000_000
"""How late an engine may hand a hit over (the ptrace engine's recording
rings give up on a slot after a second)."""
_UNNAMED = "<...>"
_MAX_PIECES = 100_000  # reads of a backlog's pieces in one go, at most


class KernelEventSource(Protocol):
    """Where the kernel's events come from (engines/kevents/source.py)."""

    count: int
    drained: bool
    """The last read took all there was (a long backlog comes in pieces)."""

    @property
    def lost(self) -> int:
        """Events the kernel dropped."""

    def read_rows(self) -> list[KernelRow]:
        """Events recorded since the last read, in time order."""


class KernelEventRenderer(Protocol):
    """A trace renderer that also shows kernel events."""

    def hits(self, hits: list[Hit]) -> None: ...

    def event(self, event: Event) -> None: ...

    def kernel_rows(self, rows: list[KernelRow]) -> None:
        """Kernel events, in time order (`model.kevent.row_event` makes each
        a `KernelEvent`)."""

    def kernel_summary(self, events: int, lost: int) -> None:
        """How many kernel events were written and lost (before `summary`)."""

    def summary(self, events: int, lost: int) -> None: ...


class Timeline:
    """A renderer for the engine: hits, with the kernel's events merged in."""

    def __init__(self, inner: KernelEventRenderer, source: KernelEventSource,
                 max_held: int = MAX_HELD) -> None:
        self.inner = inner
        self.source = source
        self.max_held = max_held
        # What waits, in time order: `_held[_first:]` (what went out before
        # `_first` is dropped now and then, not row by row).
        self._held: list[KernelRow] = []
        self._first = 0
        self._comms: dict[int, str] = {}
        self._lock = threading.Lock()

    def _take(self) -> None:
        new = self.source.read_rows()
        if not new:
            return
        held, first = self._held, self._first
        # Both are in time order, and what overlaps is a few events at the
        # end of `held` (stamped before the last read, written after it):
        # only those are merged, never the whole of what waits.
        ts = new[0][0]
        cut = len(held)
        while cut > first and held[cut - 1][0] > ts:
            cut -= 1
        if cut < len(held):
            tail = held[cut:]
            del held[cut:]
            held.extend(heapq.merge(tail, new, key=_ts))
        else:
            held.extend(new)
        excess = len(held) - first - self.max_held
        if excess > 0:
            self._write(first + excess)

    def _write(self, upto: int) -> None:
        """Write what waits up to `held[upto]` (not included)."""
        held, first = self._held, self._first
        rows = held[first:upto]
        if upto >= len(held):
            held.clear()
            self._first = 0
        elif upto > len(held) // 2:
            del held[:upto]
            self._first = 0
        else:
            self._first = upto
        comms = self._comms
        if comms:
            rows = [row if row[4] != _UNNAMED or row[2] not in comms
                    else (*row[:4], comms[row[2]], *row[5:]) for row in rows]
        self.inner.kernel_rows(rows)

    def _release(self, before: int) -> None:
        held, first = self._held, self._first
        if first < len(held) and held[first][0] <= before:
            self._write(bisect_right(held, before, first, key=_ts))

    def tick(self, now_ns: int) -> None:
        """Read the kernel's events; write those older than `now_ns - LAG_NS`."""
        with self._lock:
            self._take()
            self._release(now_ns - LAG_NS)

    def hits(self, hits: list[Hit]) -> None:
        with self._lock:
            self._hits(hits)

    def _catch_up(self, before: int) -> None:
        """Read until every kernel event stamped up to `before` is held: a
        source far behind hands its backlog over in pieces (what is older
        than `before` goes out as it comes: it is older than what waits)."""
        self._take()
        for _ in range(_MAX_PIECES):
            if self.source.drained:
                break
            self._release(before)
            self._take()

    def _hits(self, hits: list[Hit]) -> None:
        self._catch_up(hits[0][0] if hits else 0)
        start = 0
        held = self._held
        for i, hit in enumerate(hits):
            self._comms[hit[2]] = hit[5]
            if self._first < len(held) and held[self._first][0] <= hit[0]:
                if i > start:
                    self.inner.hits(hits[start:i])
                start = i
                self._release(hit[0])
        if start < len(hits):
            self.inner.hits(hits[start:])

    def event(self, event: Event) -> None:
        with self._lock:
            self._catch_up(event.ts_ns)
            self._comms[event.tid] = event.comm
            self._release(event.ts_ns)
            self.inner.event(event)

    def summary(self, events: int, lost: int) -> None:
        """Everything still held, then the renderer's summary."""
        with self._lock:
            # A source hands a long backlog over a piece at a time (it has
            # stopped recording by now: the pieces come to an end).
            for _ in range(_MAX_PIECES):
                self._take()
                self._release(1 << 63)
                if self.source.drained:
                    break
            self.inner.kernel_summary(self.source.count, self.source.lost)
            self.inner.summary(events, lost)


_ts = itemgetter(0)
