"""`Session` consumers' filters pushed into the kernel's event filter.

Each consumer still tests its own filter on what arrives, so what a handler
gets is checked against the calls the fixtures make (known by
construction). What the pushdown changes is what arrives: `Session.events`
counts the records read, and the kernel writes one only for a hit that
passes the pushed filter. The pushed text is also read back from the
event's tracefs `filter` file while the run is on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Compiler, FiltersTarget

import uprobes

NAMES = ("alpha", "beta", "gamma")
COMMS = ("filters", "worker-a", "worker-b")
N = 60  # calls of step() per thread in the round traced
LOOPS = 7


@pytest.fixture(scope="module")
def filters_exe(compile_c: Compiler) -> Path:
    return compile_c("filters.c", "-pthread")


@pytest.fixture(scope="module")
def target_exe(compile_c: Compiler) -> Path:
    return compile_c("target.c")


def step_line(exe: Path) -> str:
    return f"{exe}:step i=%di:s64 name=+0(%si):string"


def filter_files(tracefs: Path, s: uprobes.Session) -> dict[str, str]:
    """`group/event` -> its tracefs `filter` file, for every event of the run."""
    out = {}
    for kp in s._tracer.placed:  # type: ignore[union-attr]
        path = tracefs / "events" / kp.group / kp.event / "filter"
        if path.exists():  # a probe appended to another's event has no file of its own
            out[f"{kp.group}/{kp.event}"] = path.read_text().strip()
    return out


class Round(FiltersTarget):
    """filters.c waiting: its pid is known before the Session is made; `run`
    attaches, lets one round of calls go, and returns when the fixture
    exits after it (its stdin closed)."""

    def __init__(self, exe: Path) -> None:
        super().__init__(exe, N)
        self.files: dict[str, str] = {}

    def run(self, s: uprobes.Session, tracefs: Path) -> None:
        proc = self.proc
        try:
            def go() -> None:  # every probe is in place
                self.files = filter_files(tracefs, s)
                self.go()
                assert proc.stdin is not None
                proc.stdin.close()

            s.attach(proc.pid, ready=go)
            self.done()
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
            proc.wait()


def calls(test: Callable[[str, int, str], bool]) -> Counter[tuple[str, int]]:
    """(comm, i) of the round's calls step(i, name) that pass `test(comm, i, name)`."""
    return Counter((comm, i) for comm in COMMS for i in range(N) if test(comm, i, NAMES[i % 3]))


def collect(into: Counter[tuple[str, int]]) -> Callable[[uprobes.Event], None]:
    return lambda ev: into.update([(ev.comm, ev.args["i"])])


def test_consumers_filters_are_one_kernel_filter_and_handlers_get_the_same(
        filters_exe: Path, tracefs: Path) -> None:
    rnd = Round(filters_exe)
    s = uprobes.Session(engine="kernel")
    first: Counter[tuple[str, int]] = Counter()
    second: Counter[tuple[str, int]] = Counter()
    pids: set[int] = set()
    # pid has no kernel field: tested here, the rest of the filter in the kernel
    s.probe(step_line(filters_exe), lambda ev: (pids.add(ev.pid), collect(first)(ev)),
            condition="i > 40 && i <= 50", pid=rnd.pid)
    s.probe(step_line(filters_exe), collect(second),
            condition='name == "beta"', comm="worker-a")
    rnd.run(s, tracefs)

    assert first == calls(lambda comm, i, name: 40 < i <= 50) and pids == {rnd.pid}
    assert second == calls(lambda comm, i, name: comm == "worker-a" and name == "beta")
    pushed = ('((i > 40) && (i <= 50)) || '
              '((__uprobes_comm == "worker-a") && (name == "beta"))')
    assert list(s.kernel_filters.values()) == [pushed]
    assert rnd.files == s.kernel_filters  # the tracefs file, read while the run was on
    # Records: only the hits one of them wants (3 * 60 hits in the round).
    either = calls(lambda comm, i, name: 40 < i <= 50 or (comm == "worker-a" and name == "beta"))
    assert s.events == sum(either.values()) < 3 * N
    assert s.lost == 0


def test_consumers_the_kernel_cannot_filter_for_get_every_record(
        filters_exe: Path, tracefs: Path) -> None:
    # One consumer takes everything: the kernel cannot drop anything.
    rnd = Round(filters_exe)
    s = uprobes.Session(engine="kernel")
    every: Counter[tuple[str, int]] = Counter()
    few: Counter[tuple[str, int]] = Counter()
    s.probe(step_line(filters_exe), collect(every))
    s.probe(step_line(filters_exe), collect(few), condition="i < 5", tid=rnd.pid)
    rnd.run(s, tracefs)
    assert every == calls(lambda comm, i, name: True)
    assert few == calls(lambda comm, i, name: comm == "filters" and i < 5)  # main thread
    assert s.kernel_filters == {} and set(rnd.files.values()) == {"none"}
    assert s.events == 3 * N and s.lost == 0

    # Filters only on what the kernel cannot say: a pid, a Python predicate.
    rnd = Round(filters_exe)
    s = uprobes.Session(engine="kernel")
    by_pid: Counter[tuple[str, int]] = Counter()
    by_predicate: Counter[tuple[str, int]] = Counter()
    s.probe(step_line(filters_exe), collect(by_pid), pid=rnd.pid)
    s.probe(step_line(filters_exe), collect(by_predicate), filter=lambda ev: ev.args["i"] == 7)
    rnd.run(s, tracefs)
    assert by_pid == calls(lambda comm, i, name: True)
    assert by_predicate == calls(lambda comm, i, name: i == 7)
    assert s.kernel_filters == {} and set(rnd.files.values()) == {"none"}
    assert s.events == 3 * N and s.lost == 0


def test_lines_with_different_filters_never_share_a_kernel_event(
        target_exe: Path, tracefs: Path) -> None:
    # add() and greet() take the same fetchargs in one file: unfiltered they
    # would be one kernel event, and add's filter would drop greet's hits
    # (its `a` is a pointer).
    s = uprobes.Session(engine="kernel")
    adds: list[int] = []
    greets: list[int] = []
    s.probe(f"{target_exe}:add a=%di:s64", lambda ev: adds.append(ev.args["a"]),
            condition="a < 3")
    s.probe(f"{target_exe}:greet a=%di:s64", lambda ev: greets.append(ev.args["a"]))
    assert s.spawn([str(target_exe), str(LOOPS)]) == 0
    assert adds == [0, 1, 2]
    assert len(greets) == LOOPS and all(a > 3 for a in greets)
    assert list(s.kernel_filters.values()) == ["a < 3"]
    assert s.events == 3 + LOOPS and s.lost == 0


def test_a_consumer_filter_on_no_task_is_a_usage_error() -> None:
    s = uprobes.Session(engine="kernel")
    with pytest.raises(uprobes.errors.UsageError, match=r"pid=\[\] matches no task"):
        s.probe("libc:malloc", print, pid=[])
