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

import dataclasses
import heapq
import threading
from collections import deque
from typing import Protocol

from uprobes.model.event import Event, Hit
from uprobes.model.kevent import KernelEvent

MAX_HELD = 100_000
"""Kernel events held back waiting for a later hit, at most."""
LAG_NS = 2_000_000_000
"""How late an engine may hand a hit over (the ptrace engine's recording
rings give up on a slot after a second)."""


class KernelEventSource(Protocol):
    """Where the kernel's events come from (engines/kevents/source.py)."""

    count: int

    @property
    def lost(self) -> int:
        """Events the kernel dropped."""

    def read(self) -> list[KernelEvent]:
        """The events recorded since the last read, in time order."""


class KernelEventRenderer(Protocol):
    """A trace renderer that also shows kernel events."""

    def hits(self, hits: list[Hit]) -> None: ...

    def event(self, event: Event) -> None: ...

    def kernel_event(self, event: KernelEvent) -> None: ...

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
        self._held: deque[KernelEvent] = deque()
        self._comms: dict[int, str] = {}
        self._lock = threading.Lock()

    def _take(self) -> None:
        new = self.source.read()
        if not new:
            return
        held = self._held
        # Both are in time order, and what overlaps is a few events at the
        # end of `held` (stamped before the last read, written after it):
        # only those are merged, never the whole of what waits.
        first = new[0].ts_ns
        tail: list[KernelEvent] = []
        while held and held[-1].ts_ns > first:
            tail.append(held.pop())
        if tail:
            tail.reverse()
            held.extend(heapq.merge(tail, new, key=_ts))
        else:
            held.extend(new)
        while len(held) > self.max_held:
            self._write(held.popleft())

    def _write(self, ev: KernelEvent) -> None:
        if ev.comm == "<...>" and ev.tid in self._comms:
            ev = dataclasses.replace(ev, comm=self._comms[ev.tid])
        self.inner.kernel_event(ev)

    def _release(self, before: int) -> None:
        held = self._held
        while held and held[0].ts_ns <= before:
            self._write(held.popleft())

    def tick(self, now_ns: int) -> None:
        """Read the kernel's events; write those older than `now_ns - LAG_NS`."""
        with self._lock:
            self._take()
            self._release(now_ns - LAG_NS)

    def hits(self, hits: list[Hit]) -> None:
        with self._lock:
            self._hits(hits)

    def _hits(self, hits: list[Hit]) -> None:
        self._take()
        start = 0
        for i, hit in enumerate(hits):
            self._comms[hit[2]] = hit[5]
            if self._held and self._held[0].ts_ns <= hit[0]:
                if i > start:
                    self.inner.hits(hits[start:i])
                start = i
                self._release(hit[0])
        if start < len(hits):
            self.inner.hits(hits[start:])

    def event(self, event: Event) -> None:
        with self._lock:
            self._take()
            self._comms[event.tid] = event.comm
            self._release(event.ts_ns)
            self.inner.event(event)

    def summary(self, events: int, lost: int) -> None:
        """Everything still held, then the renderer's summary."""
        with self._lock:
            self._take()
            self._release(1 << 63)
            self.inner.kernel_summary(self.source.count, self.source.lost)
            self.inner.summary(events, lost)


def _ts(ev: KernelEvent) -> int:
    return ev.ts_ns

