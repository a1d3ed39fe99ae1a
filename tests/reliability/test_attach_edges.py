"""Attaching to processes in awkward states: stopped by a signal, filtered by
seccomp, zombies, or ending while the probes are placed. uprobes ends (each
run bounded here), says what it found in one line, and the program finishes
as it would have untraced."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Compiler

UPROBES = [sys.executable, "-m", "uprobes"]
LOOPS = 2000
RUN_S = int(os.environ.get("ATTACH_EDGES_RUN_S", "60"))  # the bound of every uprobes run here: a hang fails the test, it never waits forever


@pytest.fixture(scope="module")
def threads_exe(compile_c: Compiler) -> Path:
    return compile_c("threads.c", "-pthread")


def _state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("" once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text[text.rindex(")") + 2]


def _wait_state(pid: int, states: str) -> None:
    deadline = time.monotonic() + 30
    while _state(pid) not in states and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _state(pid) in states, (pid, _state(pid))


def _stopped(exe: Path) -> subprocess.Popen[str]:
    """threads.c waiting for its go line, then stopped with SIGSTOP."""
    proc = subprocess.Popen([str(exe), str(LOOPS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TARGET_WAIT": "1"})
    assert proc.stdout is not None
    assert proc.stdout.readline().split()[0] == "ready"
    os.kill(proc.pid, signal.SIGSTOP)
    _wait_state(proc.pid, "T")
    return proc


def _continue_and_finish(proc: subprocess.Popen[str]) -> None:
    """SIGCONT, the go line: the program runs to its end, unharmed."""
    os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate("go\n", timeout=RUN_S)
    assert proc.returncode == 0, proc.returncode
    assert out == f"calls work={4 * LOOPS}\n"


def _one_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("uprobes: error:")]
    assert len(errors) <= 1, stderr


@pytest.mark.parametrize("how", [["count"], ["count", "--no-trapfree"], ["trace"],
                                 ["trace", "--no-trapfree"]])
def test_a_stopped_process_is_attached_and_left_stopped(how: list[str], threads_exe: Path,
                                                         tracefs: Path) -> None:
    proc = _stopped(threads_exe)
    try:
        done = subprocess.run([*UPROBES, how[0], "-e", "ptrace", *how[1:], "-p", str(proc.pid),
                               f"{threads_exe}:work", "--duration", "0.5"],
                              capture_output=True, text=True, timeout=RUN_S)
        _one_line(done.stderr)
        assert done.returncode == 0, done.stderr
        assert f"process {proc.pid} is stopped" in done.stderr, done.stderr
        if how[0] == "count":
            assert "(1 of 1 probes not hit)" in done.stdout, done.stdout  # it did not run
        else:
            assert done.stdout == "", done.stdout
        assert _state(proc.pid) == "T"  # still stopped, and no longer traced
        assert "TracerPid:\t0\n" in Path(f"/proc/{proc.pid}/status").read_text()
        _continue_and_finish(proc)
    finally:
        proc.kill()
        proc.wait()


def _attached_to_stopped(threads_exe: Path, *extra: str) -> tuple[subprocess.Popen[str],
                                                                  subprocess.Popen[str]]:
    """uprobes counting in a stopped threads.c, once it said it counts."""
    proc = _stopped(threads_exe)
    run = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", *extra, "-p", str(proc.pid),
                            f"{threads_exe}:work"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    assert run.stderr is not None
    seen = b""
    deadline = time.monotonic() + RUN_S
    while b"Ctrl-C to stop" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([run.stderr], [], [], left)[0]:
            run.kill()
            proc.kill()
            pytest.fail(f"uprobes never started counting: {seen.decode()}")
        chunk = os.read(run.stderr.fileno(), 4096)
        if not chunk:
            proc.kill()
            pytest.fail(f"uprobes ended before counting: {seen.decode()}")
        seen += chunk
    return proc, run


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_a_run_on_a_stopped_process(sig: int, threads_exe: Path,
                                                       tracefs: Path) -> None:
    proc, run = _attached_to_stopped(threads_exe)
    try:
        run.send_signal(sig)
        out, err = run.communicate(timeout=RUN_S)
        _one_line(err)
        assert run.returncode == 0, err
        assert "(1 of 1 probes not hit)" in out, out
        _continue_and_finish(proc)
    finally:
        run.kill()
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("trapfree", [[], ["--no-trapfree"]])
def test_sigkill_of_uprobes_leaves_a_stopped_process_able_to_go_on(
        trapfree: list[str], threads_exe: Path, tracefs: Path) -> None:
    proc, run = _attached_to_stopped(threads_exe, *trapfree)
    try:
        run.kill()
        run.communicate(timeout=RUN_S)
        _continue_and_finish(proc)
    finally:
        proc.kill()
        proc.wait()
