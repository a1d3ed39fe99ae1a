"""`uprobes trace --format perfetto`: a native Perfetto trace, decoded with
Perfetto's own definitions of the format (the `perfetto` package's protos)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler
from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb

from uprobes.commands import main
from uprobes.model.event import Event, ProbeInfo
from uprobes.render.perfetto import PerfettoRenderer

MONOTONIC, REALTIME, BOOTTIME = (pb.BUILTIN_CLOCK_MONOTONIC, pb.BUILTIN_CLOCK_REALTIME,
                                 pb.BUILTIN_CLOCK_BOOTTIME)


@pytest.fixture
def latency_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("latency.c")


@pytest.fixture
def timeline_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("timeline.c")


def read_trace(path: Path) -> list[Any]:
    trace = pb.Trace()
    trace.ParseFromString(path.read_bytes())
    return list(trace.packet)


def annotations(ev: Any) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in ev.debug_annotations:
        kind = a.WhichOneof("value")
        out[a.name] = getattr(a, kind) if kind else None
    return out


def slices(packets: list[Any], track: int) -> list[tuple[int, int, str, dict[str, object]]]:
    """(start, end, name, args with the end's) of the slices on `track`,
    rebuilt as the trace processor does: events sorted by time, a stack
    (a slice never ended, as exit_group's, is left out)."""
    events = sorted(((p.timestamp, i, p.track_event) for i, p in enumerate(packets)
                     if p.HasField("track_event") and p.track_event.track_uuid == track),
                    key=lambda e: (e[0], e[1]))
    open_: list[tuple[int, str, dict[str, object]]] = []
    done = []
    for ts, _, ev in events:
        if ev.type == pb.TrackEvent.TYPE_SLICE_BEGIN:
            open_.append((ts, ev.name, annotations(ev)))
        elif ev.type == pb.TrackEvent.TYPE_SLICE_END:
            start, name, args = open_.pop()
            done.append((start, ts, name, {**args, **annotations(ev)}))
    return done


def check_clocks(packets: list[Any]) -> tuple[int, int]:
    """The start and end MONOTONIC of the clock snapshots, first and last packets."""
    snaps = [p.clock_snapshot for p in packets if p.HasField("clock_snapshot")]
    assert len(snaps) == 2 and packets[0].HasField("clock_snapshot") and \
        packets[-1].HasField("clock_snapshot")
    for snap in snaps:
        assert snap.primary_trace_clock == MONOTONIC
        assert {c.clock_id for c in snap.clocks} == {MONOTONIC, REALTIME, BOOTTIME}
    mono = [next(c.timestamp for c in s.clocks if c.clock_id == MONOTONIC) for s in snaps]
    stamped = [p for p in packets if p.timestamp]
    assert stamped and all(p.timestamp_clock_id == MONOTONIC for p in stamped)
    assert all(mono[0] <= p.timestamp <= mono[1] for p in stamped)
    return mono[0], mono[1]


def test_calls_are_slices_on_the_thread_track(latency_exe: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "fib.perfetto-trace"
    assert main(["trace", "--format", "perfetto", "-o", str(out_file),
                 f"{latency_exe}:fib n=%di:s32", f"r {latency_exe}:fib v=$retval:s64",
                 f"{latency_exe}:nap us=%di:s64", "--", str(latency_exe)],
                out=io.StringIO()) == 0
    packets = read_trace(out_file)
    check_clocks(packets)
    threads = [p.track_descriptor for p in packets
               if p.HasField("track_descriptor") and p.track_descriptor.HasField("thread")]
    processes = [p.track_descriptor for p in packets
                 if p.HasField("track_descriptor") and p.track_descriptor.HasField("process")]
    assert len(threads) == 1 and len(processes) == 1
    assert threads[0].thread.thread_name == latency_exe.name[:15]
    assert threads[0].parent_uuid == processes[0].uuid
    assert threads[0].thread.tid == processes[0].process.pid
    fibs = slices(packets, threads[0].uuid)
    # fib(10): 177 calls, each a slice with its argument and return value, nested.
    assert len(fibs) == 177 and {name for _, _, name, _ in fibs} == {"fib"}
    assert all(args["return.v"] == _fib(int(args["n"])) for _, _, _, args in fibs)
    outer = max(fibs, key=lambda s: s[1] - s[0])
    assert outer[3]["n"] == 10
    assert all(outer[0] <= start and end <= outer[1] for start, end, _, _ in fibs)
    naps = [p.track_event for p in packets if p.HasField("track_event")
            and p.track_event.type == pb.TrackEvent.TYPE_INSTANT and p.track_event.name == "nap"]
    assert sorted(annotations(n)["us"] for n in naps) == [0] * 20 + [2000] * 5
    # A counter per probe: calls of fib, hits of nap, counting up by one.
    counters = {p.track_descriptor.name: p.track_descriptor.uuid for p in packets
                if p.HasField("track_descriptor") and p.track_descriptor.HasField("counter")}
    assert set(counters) == {"calls uprobes/fib", "hits uprobes/nap"}
    for name, want in (("calls uprobes/fib", 177), ("hits uprobes/nap", 25)):
        values = [v for _, ev in sorted((p.timestamp, p.track_event) for p in packets
                                        if p.HasField("track_event"))
                  for u, v in zip(ev.extra_counter_track_uuids, ev.extra_counter_values)
                  if u == counters[name]]
        assert values == list(range(1, want + 1)), name
    summary = next(p.track_event for p in packets if p.HasField("track_event")
                   and p.track_event.name == "uprobes")
    assert annotations(summary) == {"events": 177 * 2 + 25, "lost": 0}


@pytest.mark.parametrize("engine", ("kernel", "ptrace"))
def test_kernel_events_are_syscall_slices_and_thread_states(timeline_exe: Path, tmp_path: Path,
                                                           engine: str) -> None:
    out_file = tmp_path / "work.perfetto-trace"
    assert main(["trace", "-e", engine, "--format", "perfetto", "-o", str(out_file),
                 "--kernel", "sched,syscalls", f"{timeline_exe}:work", f"r {timeline_exe}:work",
                 "--", str(timeline_exe), "1", "10000", "0"], out=io.StringIO()) == 0
    packets = read_trace(out_file)
    check_clocks(packets)
    tracks = {p.track_descriptor.name or p.track_descriptor.thread.thread_name:
              p.track_descriptor.uuid for p in packets if p.HasField("track_descriptor")}
    (work,) = slices(packets, tracks[timeline_exe.name[:15]])
    calls = slices(packets, tracks["syscalls"])
    sleep = next(s for s in calls if s[2] == "clock_nanosleep")
    assert sleep[3]["ret"] == 0 and "rqtp" in sleep[3]
    assert work[0] <= sleep[0] and sleep[1] <= work[1]
    assert any(name == "openat" and args["ret"] == -2 for _, _, name, args in calls)
    # The thread's states: asleep inside the sleep, then running again.
    states = [(p.timestamp, p.generic_kernel_task_state_event.state) for p in packets
              if p.HasField("generic_kernel_task_state_event")]
    task = pb.GenericKernelTaskStateEvent
    asleep = [ts for ts, s in states if s == task.TASK_STATE_INTERRUPTIBLE_SLEEP
              and sleep[0] <= ts <= sleep[1]]
    assert asleep
    assert any(s == task.TASK_STATE_RUNNING and asleep[0] < ts <= sleep[1] for ts, s in states)
    assert Counter(p.generic_kernel_task_state_event.tid for p in packets
                   if p.HasField("generic_kernel_task_state_event")).keys() == \
        {work_tid(packets)}


def work_tid(packets: list[Any]) -> int:
    return int(next(p.track_descriptor.thread.tid for p in packets
                    if p.HasField("track_descriptor") and p.track_descriptor.HasField("thread")))


def test_packets_are_written_as_they_come() -> None:
    """A long trace is streamed: each hit reaches the file before the end."""
    out = io.BytesIO()
    info = ProbeInfo("uprobes/f", "p")
    renderer = PerfettoRenderer(out, {info.name: info})
    after_start = len(out.getvalue())
    for i in range(3):
        renderer.event(Event(probe=info.name, kind="p", pid=7, tid=7, comm="x", cpu=0,
                             ts_ns=10 + i, ip=0))
    written = out.getvalue()
    assert after_start > 0 and len(written) > after_start
    trace = pb.Trace()
    trace.ParseFromString(written)  # whole packets, decodable mid-run
    assert [p.timestamp for p in trace.packet if p.HasField("track_event")] == [10, 11, 12]


def test_perfetto_into_a_json_file_stays_chrome_json(latency_exe: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "old.json"
    assert main(["trace", "--format", "perfetto", "-o", str(out_file),
                 f"{latency_exe}:nap", "--", str(latency_exe)], out=io.StringIO()) == 0
    assert out_file.read_text().startswith('{"displayTimeUnit":"ns","traceEvents":[')
    assert "--format chrome-json" in capsys.readouterr().err


def test_perfetto_needs_a_file_for_its_bytes(latency_exe: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--format", "perfetto", f"{latency_exe}:nap", "--",
                 str(latency_exe)], out=io.StringIO()) == 2
    assert capsys.readouterr().err == \
        "uprobes: error: --format perfetto writes a binary trace: give -o FILE\n"


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
