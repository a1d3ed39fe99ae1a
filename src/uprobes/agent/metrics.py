"""What the agent has measured, held for the exporters: hits per probe and
label set, call latencies as bucketed histograms, and what was not counted.

One lock guards it: the probing thread adds hits, an exporter's thread
(the Prometheus endpoint, a push loop) takes snapshots. A snapshot is a
copy, so an exporter never holds the probing thread up for longer than
the copy takes.

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

    def add(self, ns: int) -> None:
        self.count += 1
        self.sum_ns += ns
        self.buckets[bisect_left(LATENCY_BOUNDS_NS, ns)] += 1

    def copy(self) -> LatencySeries:
        return LatencySeries(self.count, self.sum_ns, list(self.buckets))


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


class Metrics:
    """The agent's measurements; `key` names a configured probe (its line)."""

    def __init__(self, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.max_series = max_series
        self.lock = threading.Lock()
        self._probes: dict[str, ProbeMetrics] = {}
        self._dropped: dict[str, int] = {}
        self.unpaired = 0
        """Returns whose entry was not seen, and calls abandoned (longjmp)."""
        self.placed = 0
        """Probes in place now."""
        self.live_lost: Callable[[], int] | None = None
        """The kernel's lost records while a run goes on (`ring_full`)."""

    def keep_only(self, keys: dict[str, tuple[str, ...]]) -> None:
        """Configured probes (key -> extra label names) from now on: the series of
        a probe no longer configured, or whose labels changed, are forgotten;
        the others keep their counts."""
        with self.lock:
            for key in list(self._probes):
                if keys.get(key) != self._probes[key].label_names:
                    del self._probes[key]
            for key, names in keys.items():
                self._probes.setdefault(key, ProbeMetrics(names))

    def hit(self, key: str, labels: Labels) -> None:
        with self.lock:
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
        with self.lock:
            pm = self._probes[key]
            series = pm.latency.get(labels)
            if series is None:
                if len(pm.latency) >= self.max_series:
                    pm.overflow_calls += 1
                    return
                series = pm.latency[labels] = LatencySeries()
            series.add(ns)

    def drop(self, reason: str, n: int = 1) -> None:
        """`n` hits (or items) not counted, for `reason`: exported, never silent."""
        with self.lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + n

    def set_dropped(self, reason: str, total: int) -> None:
        """A drop count kept elsewhere (the kernel's lost records), as a total."""
        with self.lock:
            self._dropped[reason] = total

    def snapshot(self) -> Snapshot:
        with self.lock:
            probes: dict[str, ProbeMetrics] = {k: ProbeMetrics(pm.label_names, dict(pm.hits),
                                      {lb: s.copy() for lb, s in pm.latency.items()},
                                      pm.overflow_hits, pm.overflow_calls)
                      for k, pm in self._probes.items()}
            dropped = dict(self._dropped)
        live = self.live_lost
        if live is not None:
            dropped["ring_full"] = live()
        return Snapshot(probes, dropped, self.unpaired, self.placed)
