"""Several ptrace tracers in one process, each in a thread of its own.

The kernel lets any thread of a process wait for the stops of every other
thread's tracees unless the wait says __WNOTHREAD: a tracer that took
another's stop would leave that tracee stopped for good. Each tracer here
must see its own program's hits, all of them, and its exit.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import Compiler

import uprobes

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
