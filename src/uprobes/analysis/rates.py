"""Hits per probe and process, read as rates between snapshots.

`add()` runs for every hit (in the thread that delivers events);
`snapshot()` may run in another thread: it copies the counters whole (a
dict copy is one step under the GIL), so no lock sits on the hit path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from uprobes.model.event import Event


@dataclass(frozen=True)
class RateRow:
    probe: str
    pid: int
    comm: str
    per_second: float
    total: int


@dataclass
class HitRates:
    _counts: dict[tuple[str, int], int] = field(default_factory=dict)
    _comms: dict[int, str] = field(default_factory=dict)
    _last: dict[tuple[str, int], int] = field(default_factory=dict)
    _last_at: float = field(default_factory=time.monotonic)

    def add(self, ev: Event) -> None:
        key = (ev.probe, ev.pid)
        self._counts[key] = self._counts.get(key, 0) + 1
        if ev.tid == ev.pid or ev.pid not in self._comms:
            self._comms[ev.pid] = ev.comm

    @property
    def total(self) -> int:
        return sum(self._counts.copy().values())

    def snapshot(self) -> list[RateRow]:
        """Every (probe, process) seen, with its rate since the last snapshot,
        busiest first."""
        now = time.monotonic()
        counts, comms = self._counts.copy(), self._comms.copy()
        span = max(now - self._last_at, 1e-9)
        rows = [RateRow(probe, pid, comms.get(pid, "?"),
                        (n - self._last.get((probe, pid), 0)) / span, n)
                for (probe, pid), n in counts.items()]
        self._last, self._last_at = counts, now
        return sorted(rows, key=lambda r: (-r.per_second, -r.total, r.probe, r.pid))
