"""How many kernel events a run places, and so how long it takes to place
and to remove its probes: identical probe points are one site when counted,
probe points share events however many collide, and past MAX_EVENTS the run
is refused before anything is placed."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import Compiler, run_in_session

from uprobes.commands.resolve import parse_specs
from uprobes.engines.kernel.counting import KernelCounter
from uprobes.engines.kernel.groups import MAX_EVENTS
from uprobes.engines.kernel.records import PAGE_MASK, kernel_probes, shared_events
from uprobes.resolve.resolver import Resolver
from uprobes.sys.tracefs import Tracefs

UPROBES = [sys.executable, "-m", "uprobes"]
# A bound on runs that take seconds; without sharing and the limit they take
# an hour (a set of grace periods per event), and the test still ends.
BOUND_S = 300


def run_bounded(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return run_in_session(argv, BOUND_S)


@pytest.fixture(scope="module")
def target(compile_c: Compiler) -> Path:
    return compile_c("target.c")


def test_twenty_thousand_identical_lines_count_as_one_site(target: Path, tracefs: Path) -> None:
    """20,000 names for one probe point: one kernel event, each name counted
    (the fixture prints how many calls it made)."""
    names = [f"g/e{i}" for i in range(20_000)]
    up = run_bounded([*UPROBES, "count", "-e", "kernel", "--json",
                      *(f"p:{n} {target}:add" for n in names), "--", str(target), "7"])
    assert up.returncode == 0, up.stderr[-2000:]
    assert "calls add=7 " in up.stdout
    assert json.loads(up.stdout.splitlines()[-1]) == {n: 7 for n in names}


@pytest.mark.parametrize("pids", ["process", "system-wide"])
def test_identical_sites_are_placed_once(pids: str, target: Path, tracefs: Path) -> None:
    """Each way of counting (per-site counters for a process, uprobe_profile
    system-wide) places identical lines as one probe point and counts it
    under every name; a different line at the same place keeps its own."""
    specs = [f"p:g/a {target}:add", f"p:g/b {target}:add", f"p:g/c {target}:add",
             f"p:g/d {target}:greet"]
    probes = Resolver().resolve_all(parse_specs(specs))
    proc = subprocess.Popen([str(target), "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "TARGET_WAIT": "1"})
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().startswith("ready ")
        counter = KernelCounter(probes, pids=[proc.pid] if pids == "process" else None)
        with counter:
            assert counter.group is not None
            ours = [ln for ln in Tracefs(tracefs).list_events()
                    if ln.split()[0].split(":")[1].startswith(counter.group.name + "/")]
            assert len(ours) == 2, ours  # add once, greet once
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().startswith("calls add=5 greet=5")
            assert proc.wait(timeout=60) == 0
            assert counter.counts == {"g/a": 5, "g/b": 5, "g/c": 5, "g/d": 5}
    finally:
        proc.kill()
        proc.wait()


def test_past_the_limit_nothing_is_placed(target: Path, tracefs: Path) -> None:
    """Probes that need more than MAX_EVENTS events (one place, different
    fetchargs: they can share none) are refused in one line, exit 2, before
    anything is placed; 20,000 of them are refused as fast."""
    for n in (MAX_EVENTS + 1, 20_000):
        up = run_bounded([*UPROBES, "trace", "-e", "kernel",
                          *(f"p:g/e{i} {target}:add a{i}=%di" for i in range(n)),
                          "--", str(target), "3"])
        assert up.returncode == 2, up.stderr[-2000:]
        assert up.stderr.count("\n") == 1 and f"at most {MAX_EVENTS} per run" in up.stderr, \
            up.stderr[-2000:]
        assert up.stdout == ""  # the command never ran


def test_shared_events_are_the_fewest(target: Path) -> None:
    """However the probes collide on their low 12 bits, a file, kind and
    fetchargs take as many events as the most frequent bits, each event
    holding distinct bits and each probe in one event."""
    base = Resolver().resolve_all(parse_specs([f"{target}:add"]))[0]
    rng = random.Random(7)
    offsets = [rng.choice([0x1000 * k + low for k in range(1, 40) for low in (0x10, 0x20, 0x30)])
               for _ in range(3000)] + [base.file_offset] * 2_000
    probes = [replace(base, file_offset=o) for o in offsets]
    kps = kernel_probes(probes, "uprobes_0")
    events = shared_events(kps)
    assert sorted(id(kp) for e in events for kp in e) == sorted(id(kp) for kp in kps)
    for members in events:
        lows = [kp.file_offset & PAGE_MASK for kp in members]
        assert len(set(lows)) == len(lows)
    assert len(events) == max(Counter(o & PAGE_MASK for o in offsets).values())
