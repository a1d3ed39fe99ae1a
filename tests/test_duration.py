"""--duration ends a run on every command and both engines: with -- CMD the
command is ended too (SIGTERM, then SIGKILL), as perf stat --timeout ends
its own; with -p the process runs on untouched."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Compiler, run_in_session

UPROBES = [sys.executable, "-m", "uprobes"]
COMMANDS = ["trace", "count", "latency", "top", "stacks"]
ENGINES = ["kernel", "ptrace"]
# A bound on a run told to last about a second: far above it even on a loaded
# machine, and the test still ends when the duration is ignored.
BOUND_S = 90


@pytest.fixture(scope="module")
def forever(compile_c: Compiler) -> Path:
    return compile_c("forever.c")


def run_bounded(argv: list[str], env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    """Run uprobes in a session of its own; on timeout end the whole session
    (uprobes and the command it started), then fail."""
    return run_in_session(argv, BOUND_S, env=env)


def ended_command(stderr: str) -> int:
    m = re.search(r"note: --duration \S+ passed: ending the command \(pid (\d+)\) with SIGTERM",
                  stderr)
    assert m, stderr[-2000:]
    return int(m.group(1))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("command", COMMANDS)
def test_duration_ends_the_command(command: str, engine: str, forever: Path,
                                   tracefs: Path) -> None:
    up = run_bounded([*UPROBES, command, "-e", engine, "--duration", "1",
                      f"{forever}:tick", "--", str(forever)])
    assert "Traceback" not in up.stderr, up.stderr[-3000:]
    assert up.returncode == 128 + signal.SIGTERM, up.stderr[-2000:]
    assert up.stdout.startswith("ready "), up.stdout[:200]  # the command's own output first
    pid = ended_command(up.stderr)
    assert not Path(f"/proc/{pid}").exists()  # ended and reaped


def test_duration_kills_a_command_that_ignores_sigterm(forever: Path, tracefs: Path) -> None:
    up = run_bounded([*UPROBES, "count", "-e", "kernel", "--duration", "0.5",
                      f"{forever}:tick", "--", str(forever)],
                     env={**os.environ, "FOREVER_IGNORE_TERM": "1"})
    assert up.returncode == 128 + signal.SIGKILL, up.stderr[-2000:]
    assert not Path(f"/proc/{ended_command(up.stderr)}").exists()
    assert "uprobes/tick" in up.stdout


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("command", COMMANDS)
def test_duration_with_pid_leaves_the_process_running(command: str, engine: str,
                                                      running_forever: int, forever: Path,
                                                      tracefs: Path) -> None:
    running = running_forever
    up = run_bounded([*UPROBES, command, "-e", engine, "--duration", "0.5",
                      f"{forever}:tick", "-p", str(running)])
    assert up.returncode == 0 and "Traceback" not in up.stderr, up.stderr[-3000:]
    assert "ending the command" not in up.stderr
    state = Path(f"/proc/{running}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state in "RS", state  # alive, neither stopped nor traced nor a zombie
    assert Path(f"/proc/{running}/status").read_text().count("TracerPid:\t0\n") == 1
