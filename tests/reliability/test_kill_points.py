"""kill -9 of the ptrace engine at chosen points of its work
(UPROBES_TEST_SIGKILL: engines/tracee/killpoint.py), no timer raced: the
traced program runs on untraced, its output and exit status its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler

from uprobes.engines.tracee import killpoint

UPROBES = [sys.executable, "-m", "uprobes"]
LOOPS = "100000"


@pytest.fixture(scope="module")
def orphan_exe(compile_c: Compiler) -> Path:
    return compile_c("orphan.c", "-pthread")


@pytest.fixture(scope="module")
def recording_exe(compile_c: Compiler) -> Path:
    return compile_c("recording.c", "-pthread")


@pytest.mark.parametrize("specs", [
    ["{exe}:work a=%di"],                      # trap-free: a jump into a recording ring
    ["--no-trapfree", "{exe}:work a=%di"],     # an int3 at work
])
def test_sigkill_after_placing_at_exec(tracefs: Path, recording_exe: Path,
                                       specs: list[str]) -> None:
    # The point is first reached at sh's exec (without the handler's step
    # case sh died of it: no status line at all). The exec's thread was last
    # single-stepped (to the exec's return, then through the remote calls
    # that set up its XOL area and SIGTRAP handler): its stop still carries
    # that step's SIGTRAP, which a dead tracer's detach delivers.
    _killed_at(recording_exe, specs, "exec-placed")


def _killed_at(recording_exe: Path, specs: list[str], point: str) -> None:
    """A `trace` of `sh -c '"$0" loop N; echo status $?' EXE` kills itself at
    `point`: sh's output is the untraced program's and its status 0."""
    untraced = subprocess.run([str(recording_exe), "loop", LOOPS], capture_output=True,
                              timeout=120, check=True).stdout
    argv = [*UPROBES, "trace", "-e", "ptrace", "-o", os.devnull,
            *[s.format(exe=recording_exe) for s in specs], "--",
            "sh", "-c", '"$0" loop ' + LOOPS + '; echo "status $?"', str(recording_exe)]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**os.environ, killpoint.ENV: point})
    # stdout reaches EOF once the orphaned sh (which holds it too) has ended.
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == -signal.SIGKILL, stderr.decode()
    assert stdout == untraced + b"status 0\n", stderr.decode()


# The calls injected by a `trace` of `sh -c '"$0" loop N; ...' EXE`: 1-3 in sh
# (its XOL area, orphan area and SIGTRAP handler), 4-6 in EXE at its exec
# (the same), then EXE's trap-free ring (7: memfd_create, 8: mmap, 9: close,
# 10: mmap) or, with --no-trapfree, 7: an mmap. From 7 on, EXE's SIGTRAP
# handler is installed.
@pytest.mark.parametrize(("specs", "point"), [
    (["{exe}:work a=%di"], "injected-7"),
    (["{exe}:work a=%di"], "injecting-8"),
    (["{exe}:work a=%di"], "injected-9"),
    (["--no-trapfree", "{exe}:work a=%di"], "injected-7"),
    (["--no-trapfree", "{exe}:work a=%di"], "injecting-7"),
])
def test_sigkill_inside_an_injected_call(tracefs: Path, recording_exe: Path,
                                         specs: list[str], point: str) -> None:
    # A thread killed out of an injected call ran on with the call's
    # registers (`injected`: after its `syscall`; `injecting`: the call made
    # once it resumed), from the `syscall` instruction's own code: SIGSEGV.
    # The call is made at the orphan area's own `syscall`, whose next
    # instructions give the thread back the registers it had.
    _killed_at(recording_exe, specs, point)


# A `count -p` of orphan.c waiting in read(): 1 and 2 map its XOL and orphan
# areas, 3 installs its SIGTRAP handler, then trap-free counters (4:
# memfd_create, 5: mmap, 6: close, 7: mmap) or, with --no-trapfree, 4: mmap.
# The thread lent to the calls is inside read() (-ERESTARTSYS): killed, it
# must restart that read, as it would have once resumed.
@pytest.mark.parametrize(("specs", "point"), [
    (["{exe}:f_mov"], "injected-3"),
    (["{exe}:f_mov"], "injecting-4"),
    (["{exe}:f_mov"], "injected-5"),
    (["--no-trapfree", "{exe}:f_mov"], "injected-4"),
])
def test_sigkill_inside_an_injected_call_with_p(tracefs: Path, orphan_exe: Path,
                                                specs: list[str], point: str) -> None:
    proc = subprocess.Popen([str(orphan_exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        def ask(command: str) -> bytes:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(command.encode() + b"\n")
            proc.stdin.flush()
            return proc.stdout.readline()

        assert ask("go 300") == b"done\n"
        run = subprocess.run([*UPROBES, "count", "-e", "ptrace", "-o", os.devnull, "-p",
                              str(proc.pid), *[s.format(exe=orphan_exe) for s in specs]],
                             capture_output=True, timeout=120,
                             env={**os.environ, killpoint.ENV: point})
        assert run.returncode == -signal.SIGKILL, run.stderr.decode()
        assert ask("go 3000") == b"done\n"
        assert ask("quit") == b"errors=0\n"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("specs", [["{exe}:tick"], ["--no-trapfree", "{exe}:tick"]])
def test_sigkill_inside_an_injected_call_lent_by_a_sleeping_thread(
        tracefs: Path, compile_c: Compiler, specs: list[str]) -> None:
    # The thread is inside nanosleep (-ERESTART_RESTARTBLOCK): killed in the
    # call that installs the SIGTRAP handler (3), it must go on sleeping
    # through restart_syscall, as it would have once resumed, not return
    # the kernel's internal error or wake early.
    exe = compile_c("sleeper.c")
    proc = subprocess.Popen([str(exe), "3000"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        run = subprocess.run([*UPROBES, "count", "-e", "ptrace", "-o", os.devnull, "-p",
                              str(proc.pid), *[s.format(exe=exe) for s in specs]],
                             capture_output=True, timeout=120,
                             env={**os.environ, killpoint.ENV: "injected-3"})
        assert run.returncode == -signal.SIGKILL, run.stderr.decode()
        assert proc.stdout.readline() == "rc=0 slept=1\n"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
