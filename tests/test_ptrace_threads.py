"""Several ptrace tracers in one process, each in a thread of its own; and
an idle tracer outside the main thread, which must not poll.

The kernel lets any thread of a process wait for the stops of every other
thread's tracees unless the wait says __WNOTHREAD: a tracer that took
another's stop would leave that tracee stopped for good. Each tracer here
must see its own program's hits, all of them, and its exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Compiler, killed_after, wait_until

import uprobes
from uprobes.commands.resolve import parse_specs
from uprobes.engines import signals
from uprobes.engines.ptrace.tracer import PtraceTracer
from uprobes.resolve.resolver import Resolver

# Enough hits that two tracers' stops overlap many times over: each hit
# keeps its stop pending while the handler runs, and the other tracer's
# wait polls meanwhile.
LOOPS = (3000, 2000)
RUN_S = 120.0  # the bound for both runs together; they take a second or two idle


@pytest.fixture(scope="module")
def programs(compile_c: Compiler) -> list[Path]:
    """target.c twice, under names of their own: one program per tracer."""
    return [compile_c("target.c", name=f"target-thread-{i}") for i in range(len(LOOPS))]


def test_tracers_in_two_threads_each_count_their_own_program(
        programs: list[Path], capfd: pytest.CaptureFixture[str]) -> None:
    sessions = [uprobes.Session(engine="ptrace") for _ in LOOPS]
    hits = [0] * len(LOOPS)
    statuses: list[int | None] = [None] * len(LOOPS)
    errors: list[BaseException | None] = [None] * len(LOOPS)
    pids: list[int] = []

    for i, (s, exe) in enumerate(zip(sessions, programs)):
        def on_add(ev: uprobes.Event, i: int = i) -> None:
            hits[i] += 1
        s.probe(f"{exe}:add", on_add)

    def run(i: int) -> None:
        try:
            statuses[i] = sessions[i].spawn([str(programs[i]), str(LOOPS[i])],
                                            launched=pids.append)
        except BaseException as e:  # the main thread reports it
            errors[i] = e

    workers = [threading.Thread(target=run, args=(i,), name=f"tracer-{i}")
               for i in range(len(LOOPS))]
    for w in workers:
        w.start()
    deadline = time.monotonic() + RUN_S
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    stuck = [w.name for w in workers if w.is_alive()]
    if stuck:  # end the runs (the loops off the main thread see stop() at once)
        for s in sessions:
            s.stop()
        for w in workers:
            w.join(30)
        for pid in pids:  # a program left in a stop no tracer will resume
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for w in workers:
            w.join(30)
    assert not stuck, f"{stuck} did not finish within {RUN_S:g} s: hits so far {hits}"
    assert errors == [None] * len(LOOPS)
    assert statuses == [0] * len(LOOPS)
    printed = sorted(int(n) for n in re.findall(r"^calls add=(\d+) ", capfd.readouterr().out,
                                                re.MULTILINE))
    assert printed == sorted(LOOPS)  # each program's own count of its calls
    assert hits == list(LOOPS)
    assert [s.events for s in sessions] == list(LOOPS)


# ---------------------------------------------------------------- idle tracers

IDLE_S = 1.0  # how long the idle tracer is watched (at least)
# A blocking tracer wakes once per period of its timer (50 ms); one that
# polls with no back-off wakes a thousand times a second or more.
WAKEUPS_PER_S = 40


@pytest.fixture(params=["wake handler", "no wake handler"])
def wake_handler(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The run with WAKE_SIGNAL's handler installed (blocking waits, as the
    agent runs) and without it (a worker thread of a Python API user: polls
    that back off)."""
    installed = request.param == "wake handler"
    previous = signal.getsignal(signals.WAKE_SIGNAL)
    if installed:
        signals.install_wake_handler()
    try:
        yield installed
    finally:
        signal.signal(signals.WAKE_SIGNAL, previous)


def _voluntary_switches(tid: int) -> int:
    """How often thread `tid` of this process gave up the CPU (a wait that
    slept, a sleep): once per wake-up of an idle loop."""
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/self/task/TID/status")


@pytest.mark.parametrize("trapfree", [False, "time"])
def test_an_idle_tracer_in_a_thread_wakes_rarely_and_stops_when_told(
        compile_c: Compiler, wake_handler: bool, trapfree: bool | str) -> None:
    exe = compile_c("agent_calls.c")
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    with killed_after(proc):
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        specs = [f"{exe}:handle"] + ([f"r {exe}:handle"] if trapfree else [])
        probes = Resolver(pid=proc.pid, uretprobe=False).resolve_all(parse_specs(specs))
        tracer = PtraceTracer(probes, pid=proc.pid, trapfree=trapfree)
        tids: list[int] = []
        errors: list[BaseException] = []
        running = threading.Event()

        def run() -> None:
            tids.append(threading.get_native_id())
            try:
                with tracer:
                    running.set()
                    tracer.count(None)
            except BaseException as e:  # the main thread reports it
                errors.append(e)
            finally:
                running.set()

        worker = threading.Thread(target=run, name="idle-tracer")
        worker.start()
        try:
            assert running.wait(120) and not errors, errors
            proc.stdin.write("go\n")  # hits while the tracer waits: each one seen
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "done 20"
            if trapfree:
                wait_until(lambda: sum(h.count for h in tracer.latencies().histograms.values())
                           == 20, "20 calls timed")
            else:
                assert tracer.live_counts() == {"uprobes/handle": 20}
            time.sleep(0.2)  # past the first polls' back-off, if it polls
            before, start = _voluntary_switches(tids[0]), time.monotonic()
            time.sleep(IDLE_S)
            woke = _voluntary_switches(tids[0]) - before
            elapsed = time.monotonic() - start
        finally:
            tracer.stop()  # from another thread: wakes a blocked wait
            worker.join(60)
        assert not worker.is_alive(), "stop() did not end the tracer's run"
        assert not errors, errors
        assert woke <= WAKEUPS_PER_S * elapsed + 20, \
            f"the idle tracer woke {woke} times in {elapsed:.2f} s"
        proc.stdin.write("go\n")  # untraced again, it runs as before
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done 40"
        proc.stdin.close()
        assert proc.wait(60) == 0
