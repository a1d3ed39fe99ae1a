"""`uprobes latency --breakdown`: where each call's time goes, checked against
a fixture that knows: 10 ms asked of nanosleep, then 10 ms of its thread's
CPU time spun, each call (however busy the machine: waiting for a CPU is
its own part)."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import Compiler

from uprobes.analysis.breakdown import ON_CPU, Call, breakdowns
from uprobes.commands import main
from uprobes.model.kevent import KernelEvent

CALLS, SLEEP_US, SPIN_US = 3, 10_000, 10_000


@pytest.fixture
def timeline_exe(tracefs: Path, compile_c: Compiler) -> Path:
    return compile_c("timeline.c")


@pytest.mark.parametrize("engine", ("kernel", "ptrace"))
def test_sleep_and_spin_match_the_programs_own_accounting(
        timeline_exe: Path, engine: str, capfd: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert main(["latency", "-e", engine, "--breakdown", "--json", f"{timeline_exe}:work", "--",
                 str(timeline_exe), str(CALLS), str(SLEEP_US), str(SPIN_US)], out=out) == 0
    own = re.search(r"work calls=(\d+) slept_ns=(\d+) spun_ns=(\d+)", capfd.readouterr().out)
    assert own, out.getvalue()
    calls, slept, spun = map(int, own.groups())
    work = json.loads(out.getvalue())["uprobes/work"]
    assert work["count"] == calls == CALLS
    parts = work["parts"]
    # Asleep: the nanosleep asked for (the timer's slack is well under 1%).
    assert parts["off-cpu sleeping"]["total_ns"] == pytest.approx(slept, rel=0.05)
    # ... in every call: a wakeup missed (read from another CPU's ring before
    # the switch it ends) would leave a call's wait for a CPU counted asleep.
    assert parts["off-cpu sleeping"]["max_ns"] <= SLEEP_US * 1000 * 1.05
    # On the CPU: the spin the program measured by its thread's CPU clock,
    # plus the little else the call does (within a few percent).
    assert parts[ON_CPU]["total_ns"] == pytest.approx(spun, rel=0.05)
    # The system call that slept holds the sleep (and the wait for a CPU after it).
    assert parts["syscall clock_nanosleep"]["total_ns"] >= parts["off-cpu sleeping"]["total_ns"]
    # On and off the CPU add up to the calls' time.
    off = sum(p["total_ns"] for name, p in parts.items() if name.startswith("off-cpu"))
    assert parts[ON_CPU]["total_ns"] + off == work["total_ns"]


def test_text_shows_a_table_and_a_histogram_per_part(timeline_exe: Path) -> None:
    out = io.StringIO()
    assert main(["latency", "--breakdown", f"{timeline_exe}:work", "--", str(timeline_exe),
                 "1", "2000", "1000"], out=out) == 0
    text = out.getvalue()
    assert "uprobes/work: where the time of 1 calls went" in text
    for part in (ON_CPU, "off-cpu sleeping", "syscall clock_nanosleep"):
        assert re.search(rf"^  {part} +\d", text, re.M), text
        assert f"uprobes/work: {part}\n" in text


def ev(ts: int, kind: str, name: str = "sched_switch", **fields: object) -> KernelEvent:
    return KernelEvent(ts, 1, 1, 0, kind, name, "t", dict(fields))


def test_a_call_is_cut_by_its_threads_intervals() -> None:
    events = [ev(5, "syscall_enter", "read"), ev(10, "off_cpu", state="S"),
              ev(18, "wakeup"), ev(25, "on_cpu"), ev(26, "syscall_exit", "read", ret=3),
              ev(40, "off_cpu", state="R+"), ev(50, "on_cpu")]
    (b,) = breakdowns([Call("f", 1, 0, 30), Call("f", 1, 35, 45)], events).values()
    got = {part: h.total for part, h in b.parts.items()}
    # First call: 8 asleep, 7 waiting for a CPU once woken, 21 in read; second: 5 preempted.
    assert got == {ON_CPU: 15 + 5, "off-cpu sleeping": 8, "off-cpu runnable": 7 + 5,
                   "syscall read": 21}
    assert b.calls == 2 and b.total_ns == 40
    assert b.parts["syscall read"].min == 0  # a call without the part counts 0


def test_svg_bars_are_stacked_by_part(timeline_exe: Path, tmp_path: Path) -> None:
    svg = tmp_path / "b.svg"
    out = io.StringIO()
    assert main(["latency", "--breakdown", "--json", "--svg", str(svg), f"{timeline_exe}:work",
                 "--", str(timeline_exe), "3", "2000", "1000"], out=out) == 0
    parts = json.loads(out.getvalue())["uprobes/work"]["parts"]
    ns = "{http://www.w3.org/2000/svg}"
    bars = [g for g in ET.parse(svg).getroot().iter(f"{ns}g")
            if g.get("class") == "bucket" and g.get("data-function") == "uprobes/work"]
    assert sum(int(g.get("data-count", "0")) for g in bars) == 3
    drawn: dict[str, int] = {}
    for g in bars:
        bar, *segments = g.findall(f"{ns}rect")
        assert sum(float(r.get("height", "0")) for r in segments) == pytest.approx(
            float(bar.get("height", "0")), abs=0.05)
        for r in segments:
            drawn[r.get("data-part", "")] = drawn.get(r.get("data-part", ""), 0) + \
                int(r.get("data-ns", "0"))
    # Each part's time over the bars is its time in the calls (system calls,
    # which overlap the rest, are not stacked).
    assert drawn == {name: p["total_ns"] for name, p in parts.items()
                     if not name.startswith("syscall ")}
