"""The Prometheus endpoint: `/metrics` over HTTP (prometheus_client's
server, in its own thread), built from a snapshot of `Metrics` at each
scrape.

Metrics (every counter since the agent started; a probe's series go when a
reload removes it):

- `uprobes_hits_total{probe, executable, comm, ...}`: hits per series;
- `uprobes_call_duration_seconds{probe, executable, comm, ...}`: a classic
  histogram of call durations, for functions with an entry and a return line;
- `uprobes_series_overflow_total{line, metric}`: hits (or calls) of a probe
  line past its bound on series in `metric`, counted here instead;
- `uprobes_dropped_total{reason}`: hits or items not counted (`ring_full`:
  records the kernel dropped);
- `uprobes_unpaired_returns_total`: returns whose entry was not seen, calls
  left without returning;
- `uprobes_probes`: probe lines in place;
- `uprobes_followed_processes` (`-e ptrace` only): processes followed now.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from uprobes.errors import UprobesError

from .config import FIXED_LABELS
from .metrics import LATENCY_BOUNDS_NS, Metrics

_LE = tuple(b / 1e9 for b in LATENCY_BOUNDS_NS) + (math.inf,)


class MetricsCollector:
    """A prometheus_client collector over `Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import Metric
        snap = self.metrics.snapshot()
        hits = Metric("uprobes_hits", "Probe hits.", "counter")
        calls = Metric("uprobes_call_duration_seconds",
                       "How long calls took, from a function's entry to its return.",
                       "histogram")
        overflow = Metric("uprobes_series_overflow", "Hits (calls) of a probe line past its "
                          "bound on series in a metric, counted here.", "counter")
        le = [repr(b) if b != math.inf else "+Inf" for b in _LE]
        for line, pm in snap.probes.items():
            names = FIXED_LABELS + pm.label_names
            for values, n in pm.hits.items():
                hits.add_sample("uprobes_hits_total", dict(zip(names, values)), n)
            for values, series in pm.latency.items():
                base = dict(zip(names, values))
                cumulative = 0
                for bound, n in zip(le, series.buckets):
                    cumulative += n
                    calls.add_sample("uprobes_call_duration_seconds_bucket",
                                     {**base, "le": bound}, cumulative)
                calls.add_sample("uprobes_call_duration_seconds_count", base, series.count)
                calls.add_sample("uprobes_call_duration_seconds_sum", base, series.sum_ns / 1e9)
            overflow.add_sample("uprobes_series_overflow_total",
                                {"line": line, "metric": "uprobes_hits"}, pm.overflow_hits)
            if pm.latency or pm.overflow_calls:
                overflow.add_sample("uprobes_series_overflow_total",
                                    {"line": line, "metric": "uprobes_call_duration_seconds"},
                                    pm.overflow_calls)
        dropped = Metric("uprobes_dropped", "Hits or items not counted, by reason.", "counter")
        for reason, n in sorted(snap.dropped.items()):
            dropped.add_sample("uprobes_dropped_total", {"reason": reason}, n)
        unpaired = Metric("uprobes_unpaired_returns",
                          "Returns whose entry was not seen, and calls left without returning.",
                          "counter")
        unpaired.add_sample("uprobes_unpaired_returns_total", {}, snap.unpaired)
        placed = Metric("uprobes_probes", "Probe lines in place.", "gauge")
        placed.add_sample("uprobes_probes", {}, snap.placed)
        yield from (hits, calls, overflow, dropped, unpaired, placed)
        if snap.followed is not None:
            followed = Metric("uprobes_followed_processes",
                              "Processes whose calls are timed in them now (-e ptrace).", "gauge")
            followed.add_sample("uprobes_followed_processes", {}, snap.followed)
            yield followed


def _registry(metrics: Metrics) -> Any:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError as e:
        raise UprobesError("the agent needs prometheus_client "
                           "(pip install prometheus-client)") from e
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(metrics))
    return registry


def exposition(metrics: Metrics) -> str:
    """The /metrics page as it would be served now (the text format)."""
    from prometheus_client import generate_latest
    return generate_latest(_registry(metrics)).decode()


class PrometheusEndpoint:
    """`/metrics` served at (host, port) while entered."""

    def __init__(self, metrics: Metrics, address: tuple[str, int]) -> None:
        self.metrics = metrics
        self.address = address
        self._server: Any = None

    def __enter__(self) -> PrometheusEndpoint:
        registry = _registry(self.metrics)
        from prometheus_client import start_http_server
        host, port = self.address
        try:
            self._server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise UprobesError(f"cannot serve /metrics at {host}:{port}: {e.strerror}") from e
        return self

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
