"""One clock for every event: hits of both engines on CLOCK_MONOTONIC, and the
clock snapshots (MONOTONIC, REALTIME, BOOTTIME) every timestamped output keeps."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler

from uprobes.commands import main

ENGINES = ("kernel", "ptrace")


@pytest.fixture
def timeline_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("timeline.c")


def trace_docs(argv: list[str]) -> list[dict[str, Any]]:
    out = io.StringIO()
    assert main(["trace", "--json", *argv], out=out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def check_clocks(clocks: dict[str, dict[str, int]], stamps: list[int]) -> None:
    start, end = clocks["start"], clocks["end"]
    for name in ("monotonic_ns", "realtime_ns", "boottime_ns"):
        assert 0 < start[name] <= end[name], (name, clocks)
    # BOOTTIME counts suspend too; MONOTONIC does not: never behind it.
    assert start["boottime_ns"] >= start["monotonic_ns"]
    # Every event lies between the snapshots, on their MONOTONIC clock.
    assert stamps and all(start["monotonic_ns"] <= ts <= end["monotonic_ns"] for ts in stamps)


@pytest.mark.parametrize("engine", ENGINES)
def test_json_hits_lie_between_the_clock_snapshots(timeline_exe: Path, engine: str) -> None:
    *hits, summary = trace_docs(["-e", engine, f"{timeline_exe}:mark n=%di:s32",
                                 f"{timeline_exe}:work", "--", str(timeline_exe), "2", "0", "0"])
    assert [h["args"]["n"] for h in hits if h["probe"] == "uprobes/mark"] == [1, 2]
    assert len(hits) == 4 and summary["summary"]["events"] == 4
    check_clocks(summary["summary"]["clocks"], [h["ts_ns"] for h in hits])


def test_chrome_json_keeps_the_clock_snapshots(timeline_exe: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "trace.json"
    assert main(["trace", "--format", "chrome-json", "-o", str(out_file),
                 f"{timeline_exe}:mark n=%di:s32", "--", str(timeline_exe), "0"],
                out=io.StringIO()) == 0
    doc = json.loads(out_file.read_text())
    stamps = [int(e["ts"] * 1000) for e in doc["traceEvents"] if e["ph"] != "M"]
    assert len(stamps) == 2
    check_clocks(doc["uprobes"]["clocks"], stamps)


def between_marks(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents strictly between the hits of mark(1) and mark(2)."""
    marks = [i for i, d in enumerate(docs) if d.get("probe") == "uprobes/mark"]
    assert [docs[i]["args"]["n"] for i in marks] == [1, 2], docs
    return docs[marks[0] + 1:marks[1]]


def in_time_order(docs: list[dict[str, Any]]) -> bool:
    stamps = [d["ts_ns"] for d in docs if "ts_ns" in d]
    return stamps == sorted(stamps)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_syscall_made_between_two_probes_shows_between_their_hits(
        timeline_exe: Path, engine: str) -> None:
    *docs, summary = trace_docs(["-e", engine, "--kernel", "syscalls,sched",
                                 f"{timeline_exe}:mark n=%di:s32", "--", str(timeline_exe), "0"])
    assert in_time_order(docs)
    calls = [(d["kernel"], d["name"], d["fields"].get("ret"))
             for d in between_marks(docs) if d.get("kernel", "").startswith("syscall")]
    # The ptrace engine may make calls of its own in the program between
    # the hits (none here: both marks are placed before it runs); openat is
    # the fixture's.
    assert ("syscall_enter", "openat", None) in calls
    assert calls.index(("syscall_enter", "openat", None)) + 1 == \
        calls.index(("syscall_exit", "openat", -2))  # ENOENT
    kernel = [d for d in docs if "kernel" in d]
    # Filtered in the kernel to the command: no other task's events, on a
    # machine where other tasks run and make system calls all the time.
    pid = docs[0]["pid"]
    assert kernel and {d["pid"] for d in kernel} == {pid}
    assert summary["summary"]["kernel"] == {"events": len(kernel), "lost": 0}
    # exit_group ends the program: its last system call.
    assert calls and [d["name"] for d in kernel if d["kernel"] == "syscall_enter"][-1] == \
        "exit_group"


@pytest.mark.parametrize("engine", ENGINES)
def test_sleep_inside_a_call_shows_off_cpu_then_on_cpu(timeline_exe: Path, engine: str) -> None:
    *docs, _ = trace_docs(["-e", engine, "--kernel", "sched,syscalls",
                           f"{timeline_exe}:work", f"r {timeline_exe}:work",
                           "--", str(timeline_exe), "1", "10000", "0"])
    assert in_time_order(docs)
    ends = [i for i, d in enumerate(docs) if d.get("probe", "").startswith("uprobes/work")]
    assert len(ends) == 2
    inside = [(d["kernel"], d["name"], d["fields"].get("state"))
              for d in docs[ends[0] + 1:ends[1]] if "kernel" in d]
    sleep = inside.index(("syscall_enter", "clock_nanosleep", None))
    asleep = inside.index(("off_cpu", "sched_switch", "S"), sleep)
    woken = inside.index(("on_cpu", "sched_switch", None), asleep)
    inside.index(("syscall_exit", "clock_nanosleep", None), woken)  # raises if absent
    nanosleep = [d for d in docs[ends[0] + 1:ends[1]]
                 if d.get("kernel") == "syscall_exit" and d["name"] == "clock_nanosleep"]
    assert nanosleep[0]["fields"]["ret"] == 0


def test_wakeups_made_by_uprobes_itself_are_kept(timeline_exe: Path) -> None:
    """The ptrace engine stops the thread at each hit and resumes it: the
    wakeup's sample is the waker's, uprobes', but the event is the traced
    thread's and shows (uprobes' own events are told by the event's task).
    Every stop (`off_cpu` in state `t`) ends with its wakeup, then `on_cpu`."""
    *docs, _ = trace_docs(["-e", "ptrace", "--kernel", "sched", f"{timeline_exe}:mark n=%di:s32",
                           "--", str(timeline_exe), "0"])
    tid = next(d["tid"] for d in docs if d.get("probe") == "uprobes/mark")
    states = [(d["kernel"], d["fields"].get("state")) for d in docs
              if d.get("kernel") in ("off_cpu", "wakeup", "on_cpu") and d["tid"] == tid]
    stops = [i for i, s in enumerate(states) if s == ("off_cpu", "t")]
    assert len(stops) >= 2, states  # (the two hits of mark, at least)
    for i in stops[:-1]:  # the last may be the thread's end
        assert states[i + 1:i + 3] == [("wakeup", None), ("on_cpu", None)], states[i:i + 3]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_tracepoint_by_name_and_page_faults(timeline_exe: Path, engine: str) -> None:
    *docs, _ = trace_docs(["-e", engine, "--kernel", "syscalls:sys_enter_openat,faults",
                           f"{timeline_exe}:mark n=%di:s32", "--", str(timeline_exe), "0"])
    named = [d for d in between_marks(docs) if d.get("kernel") == "tracepoint"]
    assert [d["name"] for d in named] == ["syscalls:sys_enter_openat"]
    assert named[0]["fields"]["flags"] == 0  # O_RDONLY, as the fixture opens it
    faults = [d for d in docs if d.get("kernel") == "page_fault"]
    assert faults and all(d["fields"]["address"] > 0 for d in faults)


def test_text_lines_of_kernel_events(timeline_exe: Path) -> None:
    out = io.StringIO()
    assert main(["trace", "--kernel", "syscalls", f"{timeline_exe}:mark n=%di:s32",
                 "--", str(timeline_exe), "0"], out=out) == 0
    lines = out.getvalue().splitlines()
    first = next(i for i, line in enumerate(lines) if line.endswith("n=1"))
    second = next(i for i, line in enumerate(lines) if line.endswith("n=2"))
    between = [line.split(": ", 1)[1] for line in lines[first + 1:second]]
    assert any(b.startswith("sys_enter: openat(dfd=0xffffff9c, ") for b in between), between
    assert "sys_exit: openat = -2" in between


def test_chrome_json_has_syscall_and_off_cpu_slices(timeline_exe: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "trace.json"
    assert main(["trace", "--format", "chrome-json", "-o", str(out_file), "--kernel",
                 "sched,syscalls", f"{timeline_exe}:work", f"r {timeline_exe}:work",
                 "--", str(timeline_exe), "1", "10000", "0"], out=io.StringIO()) == 0
    doc = json.loads(out_file.read_text())
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    work = next(s for s in slices if s["name"] == "work")
    sleep = next(s for s in slices if s["cat"] == "syscall" and s["name"] == "clock_nanosleep")
    off = [s for s in slices if s["name"] == "off-cpu (S)"]
    assert sleep["args"]["ret"] == 0
    # Nested as they happened: the sleep inside the call, off the CPU inside the sleep.
    assert work["ts"] <= sleep["ts"] and sleep["ts"] + sleep["dur"] <= work["ts"] + work["dur"]
    assert any(sleep["ts"] <= s["ts"] and s["ts"] + s["dur"] <= sleep["ts"] + sleep["dur"]
               for s in off)
    assert doc["uprobes"]["kernel"]["lost"] == 0


@pytest.mark.parametrize(("words", "said"), [
    ("sched:sched_swich", "this kernel has no tracepoint sched:sched_swich; did you mean "
                          "sched:sched_switch"),
    ("schedule", "--kernel 'schedule': not sched, syscalls, faults nor a GROUP:EVENT"),
])
def test_unknown_kernel_events_say_what_there_is(timeline_exe: Path, words: str, said: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "--kernel", words, f"{timeline_exe}:mark",
                 "--", str(timeline_exe), "0"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"uprobes: error: {said}") and err.count("\n") == 1, err


@pytest.mark.parametrize("engine", ENGINES)
def test_a_process_by_pid_gets_its_own_kernel_events(running_forever: int, engine: str,
                                                     tracefs: Path) -> None:
    running = running_forever
    exe = Path(f"/proc/{running}/exe").resolve()
    *docs, _ = trace_docs(["-e", engine, "--duration", "1", "--kernel", "syscalls",
                           f"{exe}:tick i=%di:s64", "-p", str(running)])
    assert in_time_order(docs)
    ticks = [i for i, d in enumerate(docs) if d.get("probe") == "uprobes/tick"]
    assert len(ticks) >= 3, docs[-5:]
    assert {d["pid"] for d in docs if "kernel" in d} == {running}
    # Between two ticks, the loop's nanosleep (glibc's clock_nanosleep), whole.
    calls = [(d["kernel"], d["name"]) for d in docs[ticks[-2] + 1:ticks[-1]] if "kernel" in d]
    assert calls == [("syscall_enter", "clock_nanosleep"), ("syscall_exit", "clock_nanosleep")]


def test_kernel_events_lost_are_counted_even_at_the_end(tracefs: Path,
                                                        compile_c: Compiler) -> None:
    """A ring too small to hold the run, read only once it is over: the
    kernel writes no PERF_RECORD_LOST (it never has room again), and the
    loss is still counted, exactly, from its own count of each tracepoint."""
    from uprobes.engines.kevents.source import KernelEvents
    from uprobes.engines.launch import launch
    exe = compile_c("../../bench/syscall_rate.c")
    with KernelEvents(["raw_syscalls:sys_enter", "raw_syscalls:sys_exit"],
                      ring_pages=1) as events:
        child = launch([str(exe), "20000", "0.1"])
        events.open(child=child.pid)
        child.release()
        assert child.wait() == 0
        events.disable()
        read = len(events.read())
        made = 2000
        assert events.lost > 0
        # Every call's entry and exit: read or counted lost (and a few calls
        # of the program's own start and end).
        assert read + events.lost >= 2 * made


def test_kernel_event_json_lines_are_what_json_writes() -> None:
    """The JSON lines template of a kernel event writes, byte for byte, what
    json.dumps of its document does (odd comms, no fields, string fields)."""
    from uprobes.model.kevent import KernelEvent
    from uprobes.render.jsonl import JsonLinesRenderer
    out = io.StringIO()
    renderer = JsonLinesRenderer(out, {})
    events = [KernelEvent(5, 1, 2, 0, "syscall_enter", "openat", 'a"b%c\\', {"dfd": -100}),
              KernelEvent(6, 1, 2, 1, "syscall_enter", "openat", "x", {"dfd": 3}),
              KernelEvent(7, 1, 2, 0, "off_cpu", "sched_switch", "x", {"state": "S"}),
              KernelEvent(8, 1, 2, 0, "on_cpu", "sched_switch", "x", {})]
    for ev in events:
        renderer.kernel_event(ev)
    assert out.getvalue().splitlines() == [
        json.dumps(ev.as_dict(), separators=(",", ":"), ensure_ascii=False) for ev in events]


def test_kernel_rows_json_lines_are_what_json_writes() -> None:
    """Rows of all-int shapes go by one template per shape and a text per
    task; the others by the event's document; both write, byte for byte,
    what json.dumps does, and in the rows' order."""
    from uprobes.model.kevent import KernelRow, KernelShape, row_event, shape_id
    from uprobes.render.jsonl import JsonLinesRenderer
    odd = shape_id(KernelShape("syscall_enter", "op%s\"n", ("a%d", 'b"'), ints=True))
    none = shape_id(KernelShape("syscall_exit", "getppid", (), ints=True))
    off = shape_id(KernelShape("off_cpu", "sched_switch", ("state", "next_pid")))
    rows: list[KernelRow] = [
        (5, 1, 2, 0, 'a"b%c\\', odd, (1, -100)), (6, 1, 2, 0, 'a"b%c\\', none, ()),
        (7, 1, 2, 1, "x\u2028y", off, ("R+", 9)), (8, 3, 4, 1, "x\u2028y", odd, (2**64 - 1, 0)),
        (9, 1, 2, 0, 'a"b%c\\', odd, (1, -100))]
    out = io.StringIO()
    JsonLinesRenderer(out, {}).kernel_rows(rows)
    assert out.getvalue() == "".join(
        json.dumps(row_event(r).as_dict(), separators=(",", ":"), ensure_ascii=False) + "\n"
        for r in rows)


@pytest.mark.root  # system-wide probes are the kernel engine's
def test_system_wide_kernel_events_leave_uprobes_out(running_forever: int) -> None:
    *docs, summary = trace_docs(["-e", "kernel", "--duration", "1", "--kernel", "syscalls",
                                 "libc:getppid"])
    kernel = [d for d in docs if "kernel" in d]
    assert summary["summary"]["kernel"]["events"] == len(kernel)
    # Another process's system calls are there; ours (the reader's) are not.
    assert any(d["pid"] == running_forever and d["name"] == "clock_nanosleep" for d in kernel)
    assert all(d["pid"] != os.getpid() for d in kernel)


def test_timeline_merges_overlapping_reads_in_time_order() -> None:
    """Reads whose first events are older than the last one already held
    (stamped before a read, written after it) still come out in time order,
    with the hits between them where their stamps put them."""
    from uprobes.engines.kevents.decode import ON_CPU
    from uprobes.model.event import ProbeInfo
    from uprobes.model.kevent import KernelRow
    from uprobes.render.jsonl import JsonLinesRenderer
    from uprobes.render.timeline import Timeline

    class Reads:
        """A source handing over prepared reads, one a call."""
        count = 0
        lost = 0
        drained = True

        def __init__(self, reads: list[list[int]]) -> None:
            self.reads = reads

        def read_rows(self) -> list[KernelRow]:
            stamps = self.reads.pop(0) if self.reads else []
            self.count += len(stamps)
            return [(ts, 1, 1, 0, "t", ON_CPU, ()) for ts in stamps]

    out = io.StringIO()
    info = ProbeInfo("uprobes/f", "p")
    timeline = Timeline(JsonLinesRenderer(out, {info.name: info}),
                        Reads([[10, 20, 30], [25, 40], [35, 50, 60], [45]]))
    timeline.tick(0)  # nothing is old enough to write yet
    timeline.tick(0)
    assert out.getvalue() == ""
    timeline.hits([(42, 1, 1, 0, info.name, "t", 0, None, ())])
    timeline.summary(1, 0)
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    stamps = [d["ts_ns"] for d in docs if "ts_ns" in d]
    assert stamps == [10, 20, 25, 30, 35, 40, 42, 45, 50, 60]
    assert [d.get("probe") for d in docs if d.get("ts_ns") == 42] == ["uprobes/f"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_session_gets_kernel_events_between_its_hits(timeline_exe: Path, engine: str) -> None:
    """`Session(kernel=...)` with `on_kernel`: the kernel's events of the
    command reach their handler in time order with the probes' events, so
    the openat that between() makes between its two mark() calls arrives
    between the two hits' handlers."""
    import uprobes

    s = uprobes.Session(engine, kernel="syscalls")
    seen: list[tuple[str, object, int]] = []
    s.probe(f"{timeline_exe}:mark n=%di:s32", lambda ev: seen.append(("hit", ev.args["n"],
                                                                      ev.ts_ns)))

    @s.on_kernel
    def on_kernel(ev: Any) -> None:
        seen.append((ev.kind, ev.name, ev.ts_ns))
    assert s.spawn([str(timeline_exe), "0"]) == 0
    hits = [i for i, (kind, _, _) in enumerate(seen) if kind == "hit"]
    assert [seen[i][1] for i in hits] == [1, 2]
    inside = [(kind, name) for kind, name, _ in seen[hits[0] + 1:hits[1]]]
    assert ("syscall_enter", "openat") in inside and ("syscall_exit", "openat") in inside
    stamps = [ts for _, _, ts in seen]
    assert stamps == sorted(stamps)
    assert s.kernel_events == len(seen) - 2 and s.kernel_lost == 0
    assert [name for kind, name, _ in seen if kind == "syscall_enter"][-1] == "exit_group"


def test_kernel_handlers_need_the_session_to_ask_for_kernel_events() -> None:
    import uprobes
    from uprobes.errors import UsageError

    with pytest.raises(UsageError, match="Session\\(kernel="):
        uprobes.Session().on_kernel(print)


def test_a_kernel_handlers_error_ends_the_run_and_reaches_the_caller(timeline_exe: Path) -> None:
    """An exception in an `on_kernel` handler (which may run on the reader's
    thread) stops the run and is raised by spawn(); the command runs on to its
    end unharmed and is reaped."""
    import uprobes

    s = uprobes.Session("kernel", kernel="syscalls")
    s.probe(f"{timeline_exe}:mark n=%di:s32", lambda ev: None)

    def broken(ev: Any) -> None:
        raise ValueError("a handler's own bug")
    s.on_kernel(broken)
    with pytest.raises(ValueError, match="a handler's own bug"):
        s.spawn([str(timeline_exe), "20", "20000", "0"])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_thread_born_later_gets_its_wakeups(tracefs: Path, compile_c: Compiler,
                                              tmp_path: Path, engine: str) -> None:
    """sched_wakeup is about another task, so it is opened per CPU and filtered
    in the kernel to the traced threads; a thread the command starts later
    joins that filter once its first switch off the CPU is read: of its 60
    sleeps of 50 ms, the wakeups after that are recorded (none were before).
    The reader reads every 100 ms; 3 s of sleeps leave it room on a loaded
    machine (20 sleeps, 1 s, could end before a starved reader read one)."""
    import subprocess
    import sys

    exe = compile_c("late_sleepers.c", "-pthread")
    out = tmp_path / "t.jsonl"
    run = subprocess.run([sys.executable, "-m", "uprobes", "trace", "--json", "-e", engine,
                          "-o", str(out), "--kernel", "sched", f"{exe}:begin", "--", str(exe)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    sleeper = int(run.stdout.split()[-1])
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    offs = [d for d in docs if d.get("kernel") == "off_cpu" and d["tid"] == sleeper]
    wakeups = [d for d in docs if d.get("kernel") == "wakeup" and d["tid"] == sleeper]
    assert len(offs) >= 60, offs
    assert wakeups and {d["pid"] for d in wakeups} == {docs[0]["pid"]}, wakeups
