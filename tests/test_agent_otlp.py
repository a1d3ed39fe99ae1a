"""The agent's OTLP/HTTP pushes, received by a local receiver that decodes
them with the OTLP protobuf definitions: a span per call with the fetched
values and real start and end times, the resource from
OTEL_RESOURCE_ATTRIBUTES, and the metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from agent_support import CALLS_PER_ROUND, KINDS, NAP_S, Agent, Caller
from conftest import Compiler, wait_until

from bench.otlp_receiver import Receiver, attributes

pytest.importorskip("opentelemetry.proto", reason="opentelemetry-proto is a test dependency")


@pytest.fixture
def receiver() -> object:
    with Receiver() as r:
        yield r


def test_spans_and_metrics_reach_an_otlp_receiver(receiver: Receiver, tracefs: Path,
                                                  compile_c: Compiler) -> None:
    exe = compile_c("agent_calls.c")
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout,deployment.environment=test",
           "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "500"}
    os.environ.update(env)
    try:
        agent = Agent("--otlp", receiver.url, f"{exe}:handle kind=%di:s32",
                      f"r {exe}:handle twice=%ax:s32")
    finally:
        for k in env:
            del os.environ[k]
    try:
        agent.ready()
        caller = Caller(exe)
        before = time.time_ns()
        caller.round()
        after = time.time_ns()

        def handled() -> list[tuple[object, object]]:
            return [(r, s) for r, s in receiver.spans() if s.name == "uprobes/handle"]

        wait_until(lambda: len(handled()) >= CALLS_PER_ROUND, "the spans", 60)

        def counted() -> bool:
            hits = receiver.last_metrics().get("uprobes.hits")
            return hits is not None and sum(
                p.as_int for p in hits.sum.data_points
                if attributes(p.attributes).get("probe") == "uprobes/handle") == CALLS_PER_ROUND

        wait_until(counted, "the metrics", 60)
        metrics = receiver.last_metrics()
        caller.end()
        status, err = agent.stop()
    finally:
        agent.kill()
    assert status == 0, err
    spans = handled()
    assert len(spans) == CALLS_PER_ROUND
    kinds = []
    for resource, span in spans:
        res = attributes(resource.attributes)
        assert res["service.name"] == "checkout" and res["deployment.environment"] == "test"
        attrs = attributes(span.attributes)
        assert attrs["process.pid"] == caller.proc.pid
        assert attrs["process.executable.path"] == str(exe)
        assert attrs["process.executable.name"] == caller.comm
        assert attrs["uprobes.return.twice"] == 2 * attrs["uprobes.arg.kind"]
        kinds.append(attrs["uprobes.arg.kind"])
        # real times: within the round, on the wall clock, each call 2.5 ms or more
        assert before <= span.start_time_unix_nano < span.end_time_unix_nano <= after
        assert span.end_time_unix_nano - span.start_time_unix_nano >= NAP_S * 1e9
    assert sorted(kinds) == sorted(list(range(KINDS)) * (CALLS_PER_ROUND // KINDS))
    starts = sorted(s.start_time_unix_nano for _, s in spans)
    assert starts[-1] - starts[0] >= (CALLS_PER_ROUND - 1) * NAP_S * 1e9
    durations = metrics["uprobes.call.duration"].histogram.data_points
    assert sum(p.count for p in durations) == CALLS_PER_ROUND
    assert all(p.min >= NAP_S for p in durations)
