"""sys/proc_events.py: the kernel's process events over netlink, for real."""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest

from uprobes.sys.proc_events import EXEC, EXIT, FORK, ProcEvent, ProcEvents


@pytest.mark.root
def test_a_started_process_is_seen_forking_execing_and_exiting() -> None:
    if os.geteuid() != 0:
        pytest.skip("the process connector needs CAP_NET_ADMIN")
    seen: list[ProcEvent] = []
    with ProcEvents() as events:
        child = subprocess.Popen(["/bin/true"])
        child.wait(timeout=60)
        deadline = time.monotonic() + 60
        while not any(e.what == EXIT and e.pid == child.pid for e in seen):
            assert time.monotonic() < deadline, f"no exit event of {child.pid}: {seen}"
            select.select([events], [], [], 1.0)
            seen += events.read()
    mine = [e.what for e in seen if e.pid == child.pid and e.tid == child.pid]
    assert mine == [FORK, EXEC, EXIT], seen
