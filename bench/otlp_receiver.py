"""A local OTLP/HTTP receiver (for the agent's tests and its soak bench): it decodes what
arrives with the OTLP protobuf definitions (opentelemetry-proto) and keeps
it; `up = False` makes it answer 503, as a backend that is away."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        self._decode = {
            "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest,
                           trace_service_pb2.ExportTraceServiceResponse),
            "/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest,
                            metrics_service_pb2.ExportMetricsServiceResponse),
        }
        self.traces: list[Any] = []
        self.metrics: list[Any] = []
        self.refused = 0
        self.up = True
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                kinds = receiver._decode.get(self.path)
                if kinds is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                if not receiver.up:
                    with receiver.lock:
                        receiver.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                request_type, response_type = kinds
                request = request_type.FromString(body)
                with receiver.lock:
                    (receiver.traces if self.path == "/v1/traces" else
                     receiver.metrics).append(request)
                reply = response_type().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[tuple[Any, Any]]:
        """(resource, span) of every span received."""
        with self.lock:
            requests = list(self.traces)
        return [(rs.resource, span) for req in requests for rs in req.resource_spans
                for ss in rs.scope_spans for span in ss.spans]

    def last_metrics(self) -> dict[str, Any]:
        """name -> Metric of the latest metrics push."""
        with self.lock:
            if not self.metrics:
                return {}
            req = self.metrics[-1]
        return {m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics}


def attributes(kvs: Any) -> dict[str, Any]:
    """OTLP KeyValues as a dict of plain values."""
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out
