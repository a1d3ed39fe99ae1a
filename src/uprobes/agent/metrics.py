"""What the agent has measured, held for the exporters: hits per probe and
label set, call latencies as bucketed histograms, and what was not counted.

One thread writes the series (the probing thread: hits and calls) and
others read them (the Prometheus endpoint, push loops) by snapshots. No
lock is taken per hit: a lock the probing thread takes and releases at
every hit starves a reader waiting on it (Python's locks are not fair, and
the writer takes it again before the waiter wakes), and a scrape then
waits for as long as hits keep coming. A snapshot copies each table in one
step instead (`dict(d)` and `list(d.items())` run under the interpreter
lock, never interleaved with a writer's store); a histogram's count is
taken from its copied buckets, so a snapshot is always consistent.

Series are bounded per probe (`max_series`): a hit whose label set would
make one more series past the bound is counted in `overflow` for its probe
instead (and a call past the bound of the latency series in
`overflow_calls`), so extra labels from fetched values can never grow
memory without bound, and every hit is counted somewhere.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(1 << k for k in range(8, 35))
"""Upper bounds of the latency buckets: powers of two from 256 ns to 17 s
(and +Inf beyond). Classic buckets: see docs/agent.md for why not native
histograms."""

DEFAULT_MAX_SERIES = 1000
"""Series one probe may have in one metric before its hits overflow."""

Labels = tuple[str, ...]
"""Label values in a probe's order: probe, executable, comm, then the extra labels."""


@dataclass
class LatencySeries:
    """Calls of one label set: count, sum and per-bucket (not cumulative) counts."""

    count: int = 0
    sum_ns: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    min_ns: int = 0
    max_ns: int = 0

    def add(self, ns: int) -> None:
        if not self.count or ns < self.min_ns:
            self.min_ns = ns
        if ns > self.max_ns:
            self.max_ns = ns
        self.count += 1
        self.sum_ns += ns
        self.buckets[bisect_left(LATENCY_BOUNDS_NS, ns)] += 1

    def copy(self) -> LatencySeries:
        buckets = list(self.buckets)
        return LatencySeries(sum(buckets), self.sum_ns, buckets, self.min_ns, self.max_ns)

    def merge(self, other: LatencySeries) -> None:
        """Add the calls of `other` (another process's, the same labels)."""
        if other.count and (not self.count or other.min_ns < self.min_ns):
            self.min_ns = other.min_ns
        self.max_ns = max(self.max_ns, other.max_ns)
        self.count += other.count
        self.sum_ns += other.sum_ns
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]


@dataclass
class ProbeMetrics:
    """One configured probe's series (its hits, and its calls when timed)."""

    label_names: tuple[str, ...]
    hits: dict[Labels, int] = field(default_factory=dict)
    latency: dict[Labels, LatencySeries] = field(default_factory=dict)
    overflow_hits: int = 0
    overflow_calls: int = 0


@dataclass
class Snapshot:
    """A copy of the metrics at one moment."""

    probes: dict[str, ProbeMetrics]
    dropped: dict[str, int]
    unpaired: int
    placed: int
    followed: int | None = None  # processes followed (the ptrace engine), else None


class Metrics:
    """The agent's measurements; `key` names a configured probe (its line)."""

    def __init__(self, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.max_series = max_series
        self._drop_lock = threading.Lock()  # drops come from several threads
        self._probes: dict[str, ProbeMetrics] = {}
        self._dropped: dict[str, int] = {}
        self.unpaired = 0
        """Returns whose entry was not seen, and calls abandoned (longjmp)."""
        self.placed = 0
        """Probes in place now."""
        self.live_lost: Callable[[], int] | None = None
        """The kernel's lost records while a run goes on (`ring_full`)."""
        self.live_hits: Callable[[], dict[str, dict[Labels, int]]] | None = None
        """Counts-only (counting.py): key -> labels -> hits the kernel counted
        in the run going on, added to the series' own at each snapshot."""
        self.live_timed: Callable[[], tuple[dict[str, dict[Labels, int]],
                                            dict[str, dict[Labels, LatencySeries]]]] | None = None
        """On the ptrace engine (following.py): the hits and the calls timed
        in the processes followed (key -> labels -> ...), read together (one
        read of their shared memory per snapshot), added as `live_hits` are."""
        self.live_followed: Callable[[], int] | None = None
        """On the ptrace engine: how many processes are followed now."""

    def keep_only(self, keys: dict[str, tuple[str, ...]]) -> None:
        """Configured probes (key -> extra label names) from now on: the series of
        a probe no longer configured, or whose labels changed, are forgotten;
        the others keep their counts. (Called with no probes running.)"""
        probes = dict(self._probes)
        for key in list(probes):
            if keys.get(key) != probes[key].label_names:
                del probes[key]
        for key, names in keys.items():
            probes.setdefault(key, ProbeMetrics(names))
        self._probes = probes

    def hit(self, key: str, labels: Labels) -> None:
        """One hit (the probing thread only)."""
        pm = self._probes[key]
        hits = pm.hits
        n = hits.get(labels)
        if n is not None:
            hits[labels] = n + 1
        elif len(hits) < self.max_series:
            hits[labels] = 1
        else:
            pm.overflow_hits += 1

    def call(self, key: str, labels: Labels, ns: int) -> None:
        """One call's duration (the probing thread only)."""
        pm = self._probes[key]
        series = pm.latency.get(labels)
        if series is None:
            if len(pm.latency) >= self.max_series:
                pm.overflow_calls += 1
                return
            series = pm.latency[labels] = LatencySeries()
        series.add(ns)

    def add_hits(self, counts: dict[str, dict[Labels, int]]) -> None:
        """Hits counted elsewhere (a counts-only run that ended), kept in the
        series (no probing thread runs meanwhile)."""
        for key, series in counts.items():
            pm = self._probes.get(key)
            if pm is None:
                continue
            for labels, n in series.items():
                if labels in pm.hits or len(pm.hits) < self.max_series:
                    pm.hits[labels] = pm.hits.get(labels, 0) + n
                else:
                    pm.overflow_hits += n

    def add_calls(self, calls: dict[str, dict[Labels, LatencySeries]]) -> None:
        """Calls timed elsewhere (the ptrace engine's run that ended), kept in
        the series (no probing thread runs meanwhile)."""
        for key, series in calls.items():
            pm = self._probes.get(key)
            if pm is None:
                continue
            for labels, calls_of in series.items():
                mine = pm.latency.get(labels)
                if mine is None and len(pm.latency) >= self.max_series:
                    pm.overflow_calls += calls_of.count
                    continue
                if mine is None:
                    mine = pm.latency[labels] = LatencySeries()
                mine.merge(calls_of)

    def drop(self, reason: str, n: int = 1) -> None:
        """`n` hits (or items) not counted, for `reason`: exported, never silent."""
        with self._drop_lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + n

    def set_dropped(self, reason: str, total: int) -> None:
        """A drop count kept elsewhere (the kernel's lost records), as a total."""
        with self._drop_lock:
            self._dropped[reason] = total

    def snapshot(self) -> Snapshot:
        probes: dict[str, ProbeMetrics] = {}
        live = self.live_hits
        counted = live() if live is not None else {}
        live_timed = self.live_timed
        timed_hits, timed = live_timed() if live_timed is not None else ({}, {})
        for key, pm in list(self._probes.items()):
            latency = {lb: s.copy() for lb, s in list(pm.latency.items())}
            hits = dict(pm.hits)
            for got in (counted, timed_hits):
                for labels, n in got.get(key, {}).items():
                    hits[labels] = hits.get(labels, 0) + n
            for labels, series in timed.get(key, {}).items():
                mine = latency.get(labels)
                if mine is None:
                    latency[labels] = series
                else:
                    mine.merge(series)
            probes[key] = ProbeMetrics(pm.label_names, hits, latency,
                                       pm.overflow_hits, pm.overflow_calls)
        with self._drop_lock:
            dropped = dict(self._dropped)
        lost = self.live_lost
        if lost is not None:
            dropped["ring_full"] = lost()
        followed = self.live_followed
        return Snapshot(probes, dropped, self.unpaired, self.placed,
                        followed() if followed is not None else None)
