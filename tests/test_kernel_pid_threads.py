"""`-p PID` on a multi-threaded process: threads that were running before we
attached and threads created after (one by a thread itself created after),
every hit of every thread recorded exactly, by `trace` and by `count`.
tests/fixtures/mt_attach.c prints each thread's tid, tag and calls."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import IO

import pytest
from conftest import Compiler, read_fd_until, without_clocks

UPROBES = [sys.executable, "-m", "uprobes"]
OLD_TAGS = {1, 2, 3}  # threads running before the attach
NEW_TAGS = {20, 21, 30}  # created after it; 30 by 20


@pytest.fixture(scope="module")
def mt(compile_c: Compiler) -> Path:
    return compile_c("mt_attach.c", "-pthread")


def _line(stream: IO[str], pattern: str) -> str:
    for line in stream:
        if re.search(pattern, line):
            return line
    raise AssertionError(f"stream ended before a line matching {pattern!r}")


def _attached_run(mt: Path, loops: int, *uprobes_argv: str) -> tuple[dict[int, tuple[int, int]],
                                                                    str]:
    """Start the fixture, attach `uprobes ... -p PID` once its old threads
    run, let it go; its report {tid: (tag, calls)} and uprobes' stdout."""
    app = subprocess.Popen([str(mt), str(loops)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    up = None
    try:
        assert app.stdout and app.stdin
        pid = int(_line(app.stdout, r"^ready \d+").split()[1])
        assert len(os.listdir(f"/proc/{pid}/task")) == 4  # main + the old threads
        up = subprocess.Popen([*UPROBES, *uprobes_argv, "-p", str(pid)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        assert up.stderr
        said = read_fd_until(up.stderr.fileno(), "Ctrl-C to stop")
        assert f"probes in process {pid}; Ctrl-C to stop" in said, said
        app.stdin.write("go\n")
        app.stdin.flush()
        report = {int(m[0]): (int(m[1]), int(m[2])) for m in
                  re.findall(r"^thread (\d+) tag (\d+) calls (\d+)$", app.stdout.read(), re.M)}
        assert app.wait(60) == 0
        stdout, stderr = up.communicate(timeout=120)
        assert up.returncode == 0, stderr
        assert {tag for tag, _ in report.values()} == {0} | OLD_TAGS | NEW_TAGS
        return report, stdout
    finally:
        for p in (app, up):
            if p is not None:
                p.kill()
                p.wait()


def test_trace_records_every_hit_of_old_and_new_threads(mt: Path, tracefs: Path) -> None:
    loops = 2000
    # Rings big enough for every record even if we are not scheduled while
    # the threads run (throughput is bench/'s business; this is about threads).
    report, stdout = _attached_run(mt, loops, "trace", "--json", "--ring-pages", "1024",
                                   f"{mt}:hit tag=%di:s64 i=%si:s64")
    *hits, summary = [json.loads(line) for line in stdout.splitlines()]
    assert without_clocks(summary) == {"summary": {"events": 7 * loops, "lost": 0}}
    seen: dict[int, list[int]] = defaultdict(list)
    for h in hits:
        tag, calls = report[h["tid"]]
        assert h["args"]["tag"] == tag and h["comm"] == mt.name[:15]
        seen[h["tid"]].append(h["args"]["i"])
    assert {tid: sorted(i) for tid, i in seen.items()} == {
        tid: list(range(calls)) for tid, (_, calls) in report.items()}


def test_count_is_exact_for_old_and_new_threads(mt: Path, tracefs: Path) -> None:
    loops = 50000
    report, stdout = _attached_run(mt, loops, "count", "--json", f"{mt}:hit")
    assert json.loads(stdout.splitlines()[-1]) == {"uprobes/hit": 7 * loops}
    assert sum(calls for _, calls in report.values()) == 7 * loops
