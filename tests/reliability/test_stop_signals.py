"""Faults: a stop signal (SIGINT, SIGTERM, SIGHUP) sent to uprobes alone at
a random moment of a run, on both engines: the command runs on unharmed and
nothing is left behind. Split from test_faults.py so each file runs well
within a 30 s check."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_faults_support import (  # noqa: F401 (threads_exe: a fixture)
    LOOPS,
    UPROBES,
    our_group_lines,
    threads_exe,
    wait_placed,
)


def _wait_traced(pid: int) -> None:
    """Until run `pid` (the ptrace engine) traces its command."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            for kid in kids:
                status = Path(f"/proc/{kid}/status").read_text()
                if f"TracerPid:\t{pid}\n" in status and "threads" in status.split("\n")[0]:
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError("the run never traced its command")


@pytest.mark.parametrize("engine", ["kernel", "ptrace"])
@pytest.mark.parametrize("seed", range(6))
def test_stop_signal_at_a_random_moment(seed: int, engine: str, tracefs: Path,
                                        threads_exe: Path, tmp_path: Path) -> None:
    rng = random.Random(seed)
    sig = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)[seed % 3]
    mode = ("trace", "count")[seed % 2]
    out = ["-o", str(tmp_path / "out.txt")]
    loops = LOOPS if engine == "kernel" else LOOPS // 20  # ptrace: ~50 us a hit
    run = subprocess.Popen([*UPROBES, mode, "-e", engine, *out, f"{threads_exe}:work",
                            f"r {threads_exe}:work", "--", str(threads_exe), str(loops)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if engine == "kernel":
        wait_placed(run.pid)
    else:
        _wait_traced(run.pid)
    time.sleep(rng.uniform(0.0, 0.5))
    run.send_signal(sig)  # to uprobes alone, as `kill` would
    stdout, stderr = run.communicate(timeout=120)
    assert b"Traceback" not in stderr, stderr.decode()
    # ran on, unharmed (uprobes exits with the command's status: 128+N if signal N killed it)
    assert (run.returncode, stdout) == (0, f"calls work={4 * loops}\n".encode()), \
        stderr.decode()
    assert our_group_lines(run.pid) == []
