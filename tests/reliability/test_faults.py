"""Faults: SIGKILL then cleanup, two runs on one binary at once, a target
that ends while probes are placed, and bad input (stop signals at random
moments: test_stop_signals.py; kill -9 of the ptrace engine:
test_orphans.py). The target always finishes correctly; nothing is left
behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Compiler, reapers_of, wait_until
from test_faults_support import (  # noqa: F401 (threads_exe: a fixture)
    EXPECTED,
    LOOPS,
    UPROBES,
    our_group_lines,
    threads_exe,
    wait_placed,
)

from uprobes.commands import main


def _sigkill_mid_run(threads_exe: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    run = subprocess.Popen([*UPROBES, "trace", "-o", os.devnull, f"{threads_exe}:work",
                            "--", str(threads_exe), str(LOOPS * 5)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_placed(run.pid)
    # The command is uprobes' child: find it before uprobes dies.
    children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
    return run, [int(c) for c in children]


def _wait_gone(pids: list[int]) -> None:
    for pid in pids:
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), f"process {pid} to end", 120)


def test_sigkill_leaves_nothing_the_reaper_removes_it(tracefs: Path, threads_exe: Path) -> None:
    run, children = _sigkill_mid_run(threads_exe)
    assert len(reapers_of(run.pid)) == 1
    run.kill()
    run.wait()
    deadline = time.monotonic() + 120
    while our_group_lines(run.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert our_group_lines(run.pid) == [], "the reaper did not remove the group"
    while reapers_of(run.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reapers_of(run.pid) == []  # and it exited
    _wait_gone(children)  # the orphaned command finishes on its own


def test_sigkill_of_uprobes_and_its_reaper_then_cleanup(tracefs: Path, threads_exe: Path) -> None:
    run, children = _sigkill_mid_run(threads_exe)
    for reaper in reapers_of(run.pid):
        os.kill(reaper, signal.SIGKILL)
    run.kill()
    run.wait()
    wait_until(lambda: not reapers_of(run.pid), "the killed reaper to be gone")
    assert our_group_lines(run.pid), "with the reaper killed too, the group stays"
    _wait_gone(children)
    done = subprocess.run([*UPROBES, "cleanup"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert our_group_lines(run.pid) == []


def test_two_runs_on_one_binary_at_once(tracefs: Path, threads_exe: Path) -> None:
    runs = [subprocess.Popen([*UPROBES, "count", "--json", f"{threads_exe}:work", "--",
                              str(threads_exe), str(LOOPS)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr.decode()
        lines = stdout.decode().splitlines()
        assert lines[0] == EXPECTED.decode().strip()
        assert lines[-1] == f'{{"uprobes/work":{4 * LOOPS}}}'  # each counts its own exactly


def test_target_that_ends_while_probes_are_placed(tracefs: Path) -> None:
    """A glob of many probes takes a while to place; the process exits meanwhile."""
    for delay in (0.0, 0.05, 0.2):
        target = subprocess.Popen(["/bin/sleep", str(delay)])
        done = subprocess.run([*UPROBES, "count", "-p", str(target.pid), "libc:str*"],
                              capture_output=True, text=True, timeout=120)
        target.wait(60)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode in (0, 2), done.stderr
        if done.returncode == 2:
            assert done.stderr.startswith("uprobes: error: "), done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uprobes: error: "), err
    return err


def test_bad_targets_are_one_clear_line(tracefs: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo, tmp_path / "missing", Path("/etc/passwd")):
        for cmd in ("trace", "count", "resolve"):
            tail = ["--", "/bin/true"] if cmd != "resolve" else []
            _one_error_line([cmd, f"{path}:main", *tail], capsys)
        _one_error_line(["list", str(path)], capsys)
    for cmd in ("trace", "count"):
        _one_error_line([cmd, "-p", "999999999", "libc:malloc"], capsys)


@pytest.mark.root  # drops root's capability to read any file
def test_a_file_we_cannot_read(tmp_path: Path, compile_c: Compiler) -> None:
    """Root reads everything; without CAP_DAC_OVERRIDE/READ_SEARCH it reads
    only what the modes allow, as any user does."""
    exe = compile_c("target.c")
    secret = tmp_path / "secret"
    secret.write_bytes(exe.read_bytes())
    os.chown(secret, 65534, 65534)
    secret.chmod(0o700)
    done = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                           *UPROBES, "resolve", f"{secret}:add"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("uprobes: error: ") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "ermission" in done.stderr or "cannot read" in done.stderr, done.stderr
