"""OpenTelemetry over OTLP/HTTP: spans from entry/return pairs, and the
metrics, pushed by a thread of their own.

The probing thread only appends a finished call to a bounded queue (a
full queue drops it and counts it: `uprobes_dropped_total{reason=
"otlp_queue_full"}`); the push thread turns calls into spans and exports
them, and exports a snapshot of the metrics at each metric interval. A
backend that is slow or gone holds up only that thread: its failed batches
are counted (`otlp_export_failed`), a note says when it went away and when
it came back, and probing goes on.

The exporters are the SDK's (opentelemetry-exporter-otlp-proto-http), so
the standard variables configure them: OTEL_EXPORTER_OTLP_ENDPOINT (or
the per-signal _TRACES_ and _METRICS_ ones), _HEADERS, _TIMEOUT,
_COMPRESSION, _CERTIFICATE; OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
name the resource (service.name `uprobes-agent` unless they say
otherwise); OTEL_BSP_SCHEDULE_DELAY (ms between span batches, 5000),
OTEL_BSP_MAX_QUEUE_SIZE (2048), OTEL_BSP_MAX_EXPORT_BATCH_SIZE (512) and
OTEL_METRIC_EXPORT_INTERVAL (ms, 60000) set the pace.

Times: an event's stamp is CLOCK_MONOTONIC; a span needs the epoch. The
offset between the two clocks is taken once, when the agent starts (the
wall-clock reading between two monotonic ones), and added to every stamp:
spans keep the monotonic clock's spacing exactly, and a later step of the
wall clock (NTP) does not move them.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from uprobes.errors import UprobesError
from uprobes.model.event import Event

from .config import FIXED_LABELS
from .metrics import LATENCY_BOUNDS_NS, Metrics

SCOPE = "uprobes.agent"


def epoch_offset_ns(tries: int = 16) -> int:
    """What to add to a CLOCK_MONOTONIC stamp to get ns since the epoch: the
    wall clock read between two monotonic readings, from the try whose two
    readings were closest (a thread preempted between them would put the
    offset off by half the gap)."""
    best_gap, offset = None, 0
    for _ in range(tries):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        if best_gap is None or after - before < best_gap:
            best_gap, offset = after - before, wall - (before + after) // 2
    return offset


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise UprobesError(f"{name}={os.environ[name]!r} is not a whole number") from None


def _args(prefix: str, ev: Event) -> dict[str, Any]:
    """An event's fetched values as span attributes (hidden ones left out)."""
    out: dict[str, Any] = {}
    for name, value in ev.args.items():
        if name.startswith("__") or value is None:
            continue
        out[prefix + name] = value if not isinstance(value, list) else [
            v for v in value if v is not None]
    return out


class OtlpSink:
    """While entered, calls handed to `call()` become spans, and the metrics
    are pushed, over OTLP/HTTP to `endpoint` (None: the standard variables)."""

    def __init__(self, metrics: Metrics, endpoint: str | None,
                 executable: Callable[[int, str], str], note: Callable[[str], object]) -> None:
        self.metrics = metrics
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.executable = executable
        self.note = note
        self.offset_ns = epoch_offset_ns()
        self.started_ns = time.time_ns()
        self.queue_size = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self.batch_size = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.span_delay_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self.metric_interval_s = _env_int("OTEL_METRIC_EXPORT_INTERVAL", 60000) / 1000
        self._calls: deque[tuple[Event, Event]] = deque()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._down = False
        self.exported_spans = 0
        self._span_exporter: Any = None
        self._metric_exporter: Any = None
        self._resource: Any = None

    # ------------------------------------------------------------ probing thread

    def call(self, entry: Event, ret: Event) -> None:
        """A finished call (the probing thread): queued, or dropped and counted."""
        if len(self._calls) >= self.queue_size:
            self.metrics.drop("otlp_queue_full")
            return
        self._calls.append((entry, ret))
        if len(self._calls) >= self.batch_size:
            self._wake.set()

    # ------------------------------------------------------------ push thread

    def __enter__(self) -> OtlpSink:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
        except ImportError as e:
            raise UprobesError("--otlp needs opentelemetry-sdk and "
                               "opentelemetry-exporter-otlp-proto-http "
                               "(pip install 'uprobes[otlp]')") from e
        # Failed exports are counted and noted by us; the SDK's own log of each
        # retry would fill the journal while a backend is away.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        resource = Resource.create()
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "uprobes-agent"}))
        self._resource = resource
        traces = f"{self.endpoint}/v1/traces" if self.endpoint else None
        metrics = f"{self.endpoint}/v1/metrics" if self.endpoint else None
        self._span_exporter = OTLPSpanExporter(endpoint=traces)
        self._metric_exporter = OTLPMetricExporter(endpoint=metrics)
        self._thread = threading.Thread(target=self._push, name="uprobes-otlp", daemon=True)
        self._thread.start()
        return self

    def _push(self) -> None:
        next_spans = time.monotonic() + self.span_delay_s
        next_metrics = time.monotonic() + self.metric_interval_s
        while not self._stop.is_set():
            now = time.monotonic()
            self._wake.wait(max(0.0, min(next_spans, next_metrics) - now))
            self._wake.clear()
            now = time.monotonic()
            if now >= next_spans or len(self._calls) >= self.batch_size:
                self._export_spans()
                next_spans = now + self.span_delay_s
            if now >= next_metrics:
                self._export_metrics()
                next_metrics = now + self.metric_interval_s

    def _export_spans(self) -> None:
        while self._calls:
            batch: list[tuple[Event, Event]] = []
            while self._calls and len(batch) < self.batch_size:
                batch.append(self._calls.popleft())
            spans = [self._span(entry, ret) for entry, ret in batch]
            if self._ok(self._span_exporter.export(spans), "spans"):
                self.exported_spans += len(spans)
            else:
                self.metrics.drop("otlp_export_failed", len(spans))
            if self._stop.is_set() and self._down:
                self.metrics.drop("otlp_export_failed", len(self._calls))
                self._calls.clear()
                return

    def _span(self, entry: Event, ret: Event) -> Any:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        context = SpanContext(trace_id=random.getrandbits(128) or 1,
                              span_id=random.getrandbits(64) or 1, is_remote=False,
                              trace_flags=TraceFlags(TraceFlags.SAMPLED))
        attributes: dict[str, Any] = {
            "process.pid": entry.pid, "thread.id": entry.tid,
            "process.executable.name": entry.comm,
            "process.executable.path": self.executable(entry.pid, entry.comm),
            "uprobes.probe": entry.probe}
        attributes.update(_args("uprobes.arg.", entry))
        attributes.update(_args("uprobes.return.", ret))
        return ReadableSpan(
            name=entry.probe, context=context, resource=self._resource,
            attributes=attributes, kind=SpanKind.INTERNAL,
            start_time=entry.ts_ns + self.offset_ns, end_time=ret.ts_ns + self.offset_ns,
            instrumentation_scope=InstrumentationScope(SCOPE))

    def _export_metrics(self) -> None:
        data = self._metrics_data()
        if not self._ok(self._metric_exporter.export(data), "metrics"):
            self.metrics.drop("otlp_export_failed")

    def _metrics_data(self) -> Any:
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Histogram,
            HistogramDataPoint,
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
            Sum,
        )
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        snap = self.metrics.snapshot()
        start, now = self.started_ns, time.time_ns()
        cumulative = AggregationTemporality.CUMULATIVE
        bounds = [b / 1e9 for b in LATENCY_BOUNDS_NS]
        hits, calls, dropped = [], [], []
        for pm in snap.probes.values():
            names = FIXED_LABELS + pm.label_names
            for values, n in pm.hits.items():
                hits.append(NumberDataPoint(dict(zip(names, values)), start, now, n))
            for values, s in pm.latency.items():
                calls.append(HistogramDataPoint(
                    dict(zip(names, values)), start, now, s.count, s.sum_ns / 1e9,
                    s.buckets, bounds, s.min_ns / 1e9, s.max_ns / 1e9))
        for reason, n in sorted(snap.dropped.items()):
            dropped.append(NumberDataPoint({"reason": reason}, start, now, n))
        metrics = [
            Metric("uprobes.hits", "Probe hits.", "{hit}", Sum(hits, cumulative, True)),
            Metric("uprobes.call.duration", "How long calls took.", "s",
                   Histogram(calls, cumulative)),
            Metric("uprobes.dropped", "Hits or items not counted, by reason.", "{item}",
                   Sum(dropped, cumulative, True)),
        ]
        scope = ScopeMetrics(InstrumentationScope(SCOPE), metrics, "")
        return MetricsData([ResourceMetrics(self._resource, [scope], "")])

    def _ok(self, result: Any, what: str) -> bool:
        ok = bool(result.name == "SUCCESS")
        if not ok and not self._down:
            self.note(f"the OTLP backend did not take {what}: they are counted in "
                      "uprobes_dropped_total{reason=\"otlp_export_failed\"} until it does")
        elif ok and self._down:
            self.note("the OTLP backend takes exports again")
        self._down = not ok
        return ok

    def __exit__(self, *exc: object) -> None:
        """A last push of what is queued and of the metrics, then the exporters
        shut down (a backend that is away does not hold the exit up long:
        the push thread is given up after its export timeout)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(_env_int("OTEL_EXPORTER_OTLP_TIMEOUT", 10) + 5)
            if not self._thread.is_alive():
                self._export_spans()
                self._export_metrics()
        for exporter in (self._span_exporter, self._metric_exporter):
            if exporter is not None:
                exporter.shutdown()
