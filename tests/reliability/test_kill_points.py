"""kill -9 of the ptrace engine at chosen points of its work
(UPROBES_TEST_SIGKILL: engines/ptrace/killpoint.py), no timer raced: the
traced program runs on untraced, its output and exit status its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler

from uprobes.engines.ptrace import killpoint

UPROBES = [sys.executable, "-m", "uprobes"]
LOOPS = "100000"


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
    untraced = subprocess.run([str(recording_exe), "loop", LOOPS], capture_output=True,
                              timeout=120, check=True).stdout
    argv = [*UPROBES, "trace", "-e", "ptrace", "-o", os.devnull,
            *[s.format(exe=recording_exe) for s in specs], "--",
            "sh", "-c", '"$0" loop ' + LOOPS + '; echo "status $?"', str(recording_exe)]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**os.environ, killpoint.ENV: "exec-placed"})
    # stdout reaches EOF once the orphaned sh (which holds it too) has ended.
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == -signal.SIGKILL, stderr.decode()
    assert stdout == untraced + b"status 0\n", stderr.decode()
