"""`uprobes count -e kernel` with filters on the process: `--if 'pid == N'`.

The kernel's filter has no field for the process; count binds the
condition per process instead (each counted process gets what is left of
it). Two processes of one fixture make the same calls at the same time;
the counts must be exactly those of the process (and threads, and values)
the condition names. Expected counts are computed from how the fixture
calls (three threads, step(i, names[i % 3]) for i < N), never typed in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Compiler, FiltersTarget

UPROBES = [sys.executable, "-m", "uprobes"]
N = 3000
NAMES = ("alpha", "beta", "gamma")


class Target(FiltersTarget):
    """The filters fixture with N calls a thread and round."""

    def __init__(self, exe: Path) -> None:
        super().__init__(exe, N)


@pytest.fixture(scope="module")
def exe(compile_c: Compiler) -> Path:
    return compile_c("filters.c", "-pthread")


@pytest.fixture
def two(exe: Path, tracefs: Path) -> Iterator[tuple[Target, Target]]:
    a, b = Target(exe), Target(exe)
    try:
        yield a, b
    finally:
        for t in (a, b):
            t.proc.kill()
            t.proc.wait()


def count_round(targets: tuple[Target, Target], *argv: str) -> dict[str, int]:
    """Count one round of calls of both targets (made at once)."""
    spec = f"{Path(targets[0].proc.args[0])}:step i=%di:s64 name=+0(%si):string"
    up = subprocess.Popen([*UPROBES, "count", "-e", "kernel", "--json", *argv, spec],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert up.stderr is not None
    try:
        err = ""
        while "uprobes: counting" not in err:
            line = up.stderr.readline()
            assert line, f"count ended early: {err}"
            err += line
        for t in targets:
            t.go()
        for t in targets:
            t.done()
        up.send_signal(signal.SIGINT)
        out, rest = up.communicate(timeout=120)
    finally:
        up.kill()
        up.wait()
    assert up.returncode == 0 and "Traceback" not in rest, err + rest
    doc: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return doc


def calls(i_test: object = lambda i: True, name: str | None = None) -> int:
    """Calls of step by one thread in one round that pass the tests."""
    return sum(1 for i in range(N) if i_test(i)  # type: ignore[operator]
               and (name is None or NAMES[i % 3] == name))


def test_pid_system_wide_counts_that_process_only(two: tuple[Target, Target]) -> None:
    a, b = two
    assert count_round(two, "--if", f"pid == {a.pid}") == {"uprobes/step": 3 * N}


def test_pid_conditions_bound_per_process(two: tuple[Target, Target]) -> None:
    a, b = two
    cond = f'(pid == {a.pid} && i < 10) || (pid == {b.pid} && name == "beta")'
    assert count_round(two, "--if", cond) == \
        {"uprobes/step": 3 * calls(lambda i: i < 10) + 3 * calls(name="beta")}


def test_pid_with_tid_comm_and_fetchargs(two: tuple[Target, Target]) -> None:
    a, b = two
    worker_a = a.tids[1]
    assert count_round(two, "--if", f"pid == {a.pid} && tid == {worker_a} && i & 1") == \
        {"uprobes/step": calls(lambda i: i & 1)}
    assert count_round(two, "--comm", "worker-b", "--if", f"pid == {b.pid} && i >= 100") == \
        {"uprobes/step": calls(lambda i: i >= 100)}


def test_pid_with_a_process_selected(two: tuple[Target, Target]) -> None:
    a, b = two
    assert count_round(two, "-p", str(b.pid), "--if", f"pid == {a.pid}") == {"uprobes/step": 0}
    assert count_round(two, "-p", str(a.pid), "--if", f"pid == {a.pid} && name ~ \"g*\"") == \
        {"uprobes/step": 3 * calls(name="gamma")}


@pytest.mark.parametrize("condition", [None, "pid == {pid}"])
def test_pid_counts_threads_not_children(condition: str | None, compile_c: Compiler,
                                         tracefs: Path) -> None:
    """`-p P` counts P's threads and the child it forks; `--if 'pid == P'`
    the threads alone (the child is another process)."""
    exe = compile_c("threads.c", "-pthread")
    loops = 20000
    target = subprocess.Popen([str(exe), str(loops)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TARGET_WAIT": "1", "TARGET_FORK": "1"})
    assert target.stdout is not None and target.stdin is not None
    try:
        pid = int(target.stdout.readline().split()[1])
        flt = ["--if", condition.format(pid=pid)] if condition else []
        up = subprocess.Popen([*UPROBES, "count", "-e", "kernel", "--json", "-p", str(pid),
                               *flt, f"{exe}:work"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert up.stderr is not None
        try:
            line = up.stderr.readline()
            assert "uprobes: counting" in line, line + up.stderr.read()
            target.stdin.write("go\n")
            target.stdin.flush()
            ran = target.stdout.readline()
            assert ran == f"calls work={5 * loops}\n"  # threads unharmed, child included
            out, err = up.communicate(timeout=120)  # it ends with the process
        finally:
            up.kill()
            up.wait()
        assert up.returncode == 0, err
        got = json.loads(out.strip().splitlines()[-1])
        assert got == {"uprobes/work": (4 if condition else 5) * loops}
    finally:
        target.kill()
        target.wait()


def test_pid_reaches_threads_created_later(compile_c: Compiler, tracefs: Path) -> None:
    """System-wide `--if 'pid == P'` counts threads P creates after the
    counters are open (inherited by threads), and pthread_create works."""
    exe = compile_c("late_threads.c", "-pthread")
    loops = 5000
    target = subprocess.Popen([str(exe), str(loops)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert target.stdout is not None and target.stdin is not None
    try:
        pid = int(target.stdout.readline().split()[1])
        up = subprocess.Popen([*UPROBES, "count", "-e", "kernel", "--json", "--if",
                               f"pid == {pid}", f"{exe}:work"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert up.stderr is not None
        try:
            line = up.stderr.readline()
            assert f"in process {pid} (named by the filter)" in line, line + up.stderr.read()
            target.stdin.write("go\n")
            target.stdin.flush()
            assert target.stdout.readline() == "ok\n"
            assert target.wait(timeout=60) == 0
            up.send_signal(signal.SIGINT)
            out, err = up.communicate(timeout=120)
        finally:
            up.kill()
            up.wait()
        assert up.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {"uprobes/work": 4 * loops}
    finally:
        target.kill()
        target.wait()
