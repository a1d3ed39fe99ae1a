"""A program that installs a seccomp filter after the probes are placed
(tests/fixtures/py_sandbox.py): the system calls of our code in the
program, the trap-free Python walk's (getpid, process_vm_readv:
trapfree/pywalk.py) and a name test's or name key's prctl
(trapfree/timing.py `comm_into`), are guarded by the seccomp word
(trapfree/sandboxes.py), so the program ends as it does untraced, and
every hit is still counted or said: after the filter, a stack without its
Python frames, a name not read (docs/python.md, docs/filters.md)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import killed_after, read_fd_until

FIXTURE = str(Path(__file__).parent / "fixtures" / "py_sandbox.py")
PYTHON = "/usr/bin/python3.11"
UPROBES = [sys.executable, "-m", "uprobes"]
BEFORE, AFTER = 5, 300
RUN_S = 120


def _run(argv: list[str], traced: list[str] | None, placed: str = "1 of 1 probes trap-free"
         ) -> tuple[str, int, str, str, str]:
    """The fixture run to its end, traced by `traced` + `-p PID libc:getuid`
    (placed before it goes on, stopped once it has made its calls) or not:
    (its stdout, its exit status, uprobes' stdout and stderr, its
    /proc/PID/maps once uprobes has ended). `placed`: what uprobes says
    once its probes are in."""
    prog = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    run = None
    try:
        with killed_after(prog, RUN_S):
            assert prog.stdin is not None and prog.stdout is not None
            assert prog.stdout.readline() == "ready\n"
            said = ""
            if traced is not None:
                run = subprocess.Popen([*UPROBES, *traced, "-p", str(prog.pid), "libc:getuid"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                assert run.stderr is not None
                said = read_fd_until(run.stderr.fileno(), placed)
                assert placed in said, said
            prog.stdin.write("go\n")
            prog.stdin.flush()
            calls = prog.stdout.readline()
            got = err = ""
            if run is not None:
                run.send_signal(signal.SIGINT)
                got, err = run.communicate(timeout=RUN_S)
                assert run.returncode == 0, said + err
            maps = Path(f"/proc/{prog.pid}/maps").read_text()
            rest, _ = prog.communicate("end\n", timeout=RUN_S)
            return calls + rest, prog.returncode, got, said + err, maps
    finally:
        prog.kill()
        prog.wait()
        if run is not None:
            run.kill()
            run.wait()


@pytest.mark.root
@pytest.mark.parametrize(("syscall", "how"), [("process_vm_readv", "self"),
                                              ("getpid", "self"),
                                              ("process_vm_readv", "tsync")])
def test_a_filter_installed_after_placement_does_not_kill_the_program(
        syscall: str, how: str) -> None:
    """The filter kills the process on `syscall`, installed by the thread
    that then hits (`self`) or by another thread for all (`tsync`): traced
    by `stacks --python -p`, the program prints what it prints untraced and
    exits 0 (before the guard it died of SIGSYS at its first hit after the
    filter); the hits before the filter have their Python frames, those
    after have their native ones, all counted."""
    argv = [PYTHON, FIXTURE, syscall, how, str(BEFORE), str(AFTER)]
    expected, status, _, _, _ = _run(argv, None)
    assert (expected, status) == (f"calls {BEFORE + AFTER}\n", 0)
    out, status, folded, said, maps = _run(argv, ["stacks", "--folded", "-e", "ptrace",
                                                  "--python"])
    assert (out, status) == (expected, 0), said
    counts = {line.rpartition(" ")[0]: int(line.rpartition(" ")[2])
              for line in folded.splitlines() if line.strip()}
    assert sum(counts.values()) == BEFORE + AFTER, folded
    framed = sum(n for stack, n in counts.items() if ";Worker.before (" in stack)
    assert framed == BEFORE, folded
    assert not any("Worker.after" in stack for stack in counts), folded
    assert f"{AFTER} hits are recorded without their Python frames: process " in said, said
    assert "entered seccomp() or prctl(PR_SET_SECCOMP)" in said, said
    assert "bpf-map" not in maps, maps  # the word's mapping retired at detach


@pytest.mark.root
@pytest.mark.parametrize("command", [["stacks", "--folded", "--python"],
                                     ["count", "--comm", "python3.11"]])
def test_the_kernel_words_are_not_left_mapped(command: list[str]) -> None:
    """The seccomp word (`--python`) and the rename word (`--comm`) are
    mapped into the program while uprobes runs; after it detached the
    program has no `anon_inode:bpf-map` mapping left (each run left one,
    holding its BPF map, for as long as the program lived), and it ends as
    untraced."""
    argv = [PYTHON, FIXTURE, "process_vm_readv", "self", str(BEFORE), str(AFTER)]
    out, status, got, said, maps = _run(argv, [command[0], "-e", "ptrace", *command[1:]])
    assert (out, status) == (f"calls {BEFORE + AFTER}\n", 0), said
    if command[0] == "count":
        assert got.split() == ["PROBE", "COUNT", "uprobes/getuid", str(BEFORE + AFTER)], got
    assert "bpf-map" not in maps, maps


@pytest.mark.root
@pytest.mark.parametrize("command", [["count", "--comm", "python3.11"], ["count", "--by", "comm"]])
def test_a_filter_that_kills_prctl_after_placement_leaves_names_unread(
        command: list[str]) -> None:
    """A filter killing the process on prctl, installed by another thread
    with TSYNC (whose creation moves the rename word: the next hit asks
    for its name again): the name test (`--comm`) and the name key (`--by
    comm`) ask for the thread's name in the program by prctl, and before
    the guard the program died of SIGSYS there. Now it prints and exits
    as untraced; the hits before the filter are named, those after are
    not (not counted by --comm, with a note; `[unknown]` by --by comm)."""
    argv = [PYTHON, FIXTURE, "prctl", "tsync", str(BEFORE), str(AFTER)]
    out, status, got, said, _ = _run(argv, [command[0], "-e", "ptrace", *command[1:]],
                                      "Ctrl-C to stop")
    assert (out, status) == (f"calls {BEFORE + AFTER}\n", 0), said
    if "--comm" in command:
        assert got.split() == ["PROBE", "COUNT", "uprobes/getuid", str(BEFORE)], got
        assert f"{AFTER} hits whose thread name could not be read" in said, said
    else:
        rows = {line.split()[0]: int(line.split()[1]) for line in got.splitlines()[2:]}
        assert rows == {"[unknown]": AFTER, "python3.11": BEFORE}, got
