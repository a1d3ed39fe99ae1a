"""What the fault tests share: the program they trace and how they see a
run's probes in tracefs (test_faults.py, test_stop_signals.py)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from conftest import Compiler

UPROBES = [sys.executable, "-m", "uprobes"]
LOOPS = 20000
EXPECTED = f"calls work={4 * LOOPS}\n".encode()


@pytest.fixture(scope="module")
def threads_exe(compile_c: Compiler) -> Path:
    return compile_c("threads.c", "-pthread")


def our_group_lines(pid: int) -> list[str]:
    text = Path("/sys/kernel/tracing/uprobe_events").read_text()
    return [ln for ln in text.splitlines() if re.match(rf"[pr]:uprobes_{pid}/", ln)]


def wait_placed(pid: int) -> None:
    """Until run `pid` has its probes in tracefs (it is mid-run from then on)."""
    deadline = time.monotonic() + 120
    while not our_group_lines(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert our_group_lines(pid), "the run never placed its probes"
