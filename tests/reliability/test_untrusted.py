"""The traced program is untrusted input: it can write every word of the
memory the trap-free engine shares with it (`memfd:uprobes-counters`:
counters, rings). Whatever it writes there, uprobes prints no traceback,
shows no value the program's hits cannot have made, says in one line that
the memory was overwritten, and its code in the program never keeps a hit
waiting without bound. The fixture (untrusted.c) finds the mappings in its
own /proc/self/maps and overwrites them between two runs of N calls."""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, without_clocks

from uprobes.engines.trapfree import layout
from uprobes.engines.trapfree.recording import GIVE_UP_S
from uprobes.sys import procfs

UPROBES = [sys.executable, "-m", "uprobes"]
CALLS = 1000  # each side of the overwrite: 2 * CALLS calls of work() in all
CORRUPT = re.compile(r"uprobes: note: the traced program overwrote the memory it shares "
                     r"with uprobes \(memfd:uprobes-counters\): (\d+) records and (\d+) "
                     r"counter values that it cannot have made are left out\n")


@pytest.fixture(scope="module")
def exe(compile_c: Compiler) -> Path:
    ring = {"RING_HEADER": layout.DATA_OFFSET, **{name: getattr(layout, name) for name in (
        "RING_BYTES", "SLOT_SIZE", "HEAD", "TAIL", "LOST", "STALLED", "HEARTBEAT", "SLOT_SEQ",
        "SLOT_TSC", "SLOT_TID", "SLOT_PROBE", "SLOT_VALUES", "TIMING_BYTES",
        "TIMING_ROWS_OFFSET", "TIMING_ROWS", "ROW_BYTES", "ROW_OWNER", "ROW_HISTS",
        "TIMED_FUNCS", "HIST_BYTES")}}
    return compile_c("untrusted.c", "-pthread", *(f"-D{k}={v}" for k, v in ring.items()))


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([*UPROBES, *argv], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def _trace(exe: Path, mode: str, out: Path) -> tuple[list[dict[str, Any]], dict[str, int], str]:
    """`trace --json -e ptrace` of the fixture: its events, the summary, stderr."""
    run = _run("trace", "--json", "-e", "ptrace", "-o", str(out), f"{exe}:work a=%di",
               "--", str(exe), mode, str(CALLS))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("done "), run.stdout + run.stderr
    *lines, last = out.read_text().splitlines()
    return [json.loads(line) for line in lines], json.loads(last)["summary"], run.stderr


def test_forged_records_are_left_out_and_counted(exe: Path, tmp_path: Path) -> None:
    events, summary, stderr = _trace(exe, "forge", tmp_path / "events.jsonl")
    # Every call the program made, and nothing it did not.
    assert len(events) == 2 * CALLS, stderr
    assert [e["args"]["a"] for e in events] == [*range(CALLS)] * 2
    assert len({e["pid"] for e in events}) == 1
    assert {e["tid"] for e in events} == {e["pid"] for e in events}
    assert all(0 <= e["cpu"] < (os.cpu_count() or 1) for e in events)
    assert without_clocks(summary) == {"events": 2 * CALLS, "lost": 0}
    found = CORRUPT.findall(stderr)
    assert found == [("1000", "0")], stderr  # one line, the forged records counted apart


@pytest.mark.parametrize("mode", ["words", "counters"])
def test_overwritten_rings_show_no_impossible_values(exe: Path, tmp_path: Path,
                                                     mode: str) -> None:
    events, summary, stderr = _trace(exe, mode, tmp_path / "events.jsonl")
    # What was recorded before the overwrite may be gone with it; never more.
    assert len(events) <= 2 * CALLS and summary["events"] == len(events), stderr
    assert summary["lost"] <= 2 * CALLS - len(events), stderr
    assert len(CORRUPT.findall(stderr)) == 1, stderr


@pytest.mark.parametrize("mode", ["words", "counters"])
def test_overwritten_counters_show_no_impossible_counts(exe: Path, mode: str) -> None:
    run = _run("count", "--json", "-e", "ptrace", f"{exe}:work", "--", str(exe), mode,
               str(CALLS))
    assert run.returncode == 0, run.stderr
    done, traced, counts = run.stdout.splitlines()
    assert done.startswith("done ") and traced == "traced yes"
    assert 0 <= json.loads(counts)["uprobes/work"] <= 2 * CALLS, run.stdout
    found = CORRUPT.findall(run.stderr)
    assert len(found) == 1 and int(found[0][1]) >= 1, run.stderr


@pytest.mark.parametrize("mode", ["words", "counters"])
def test_overwritten_timing_rows_show_no_impossible_latencies(exe: Path, mode: str) -> None:
    """`latency -e ptrace` keeps each thread's open calls and histograms in
    the shared memory (timing.py). Overwritten, the code in the program
    stays within its rows (a depth it cannot have left restarts at 0, a
    bucket is bounded by its arithmetic), and the reader shows no more calls
    than were made: rows with counts no run can have reached are left out
    and said."""
    run = _run("latency", "--json", "-e", "ptrace", f"{exe}:work", "--", str(exe), mode,
               str(CALLS))
    assert run.returncode == 0, run.stderr
    done, traced, hists = run.stdout.splitlines()
    assert done.startswith("done ") and traced == "traced yes"
    assert 0 <= json.loads(hists).get("uprobes/work", {"count": 0})["count"] <= 2 * CALLS
    found = CORRUPT.findall(run.stderr)
    assert len(found) == 1 and int(found[0][1]) >= 1, run.stderr


def test_rows_written_by_the_program_are_no_key_of_latency_by_a_value(exe: Path) -> None:
    """`latency --by ARG` keeps its histograms in the keyed table, never in
    a thread's row: rows the program fills with owners and plausible counts
    are not read as a histogram (they showed as a key `a=?`)."""
    run = _run("latency", "--json", "-e", "ptrace", "--by", "a", f"{exe}:work a=%di:s64",
               "--", str(exe), "rows", "200")
    assert run.returncode == 0, run.stderr
    done, traced, hists = run.stdout.splitlines()
    assert done.startswith("done ") and traced == "traced yes"
    doc = json.loads(hists)
    assert doc and not [name for name in doc if not re.fullmatch(r"uprobes/work a=\d+", name)]
    assert sum(h["count"] for h in doc.values()) <= 2 * 200, doc


@pytest.mark.parametrize("mode", ["words", "counters"])
def test_overwritten_key_tables_show_no_impossible_counts(exe: Path, mode: str) -> None:
    """`count --by` keeps a hash table per probe in the shared memory
    (keyed.py). Overwritten, the program's code only ever finds no place
    (counted as overflow) and the reader takes only entries whose counts
    hits can have reached: no more hits than were made, and one line."""
    run = _run("count", "--json", "-e", "ptrace", "--by", "tid", f"{exe}:work", "--",
               str(exe), mode, str(CALLS))
    assert run.returncode == 0, run.stderr
    done, traced, table = run.stdout.splitlines()
    assert done.startswith("done ") and traced == "traced yes"
    work = json.loads(table)["uprobes/work"]
    assert sum(r["count"] for r in work["keys"]) + work["overflow"] <= 2 * CALLS, work
    found = CORRUPT.findall(run.stderr)
    assert len(found) == 1 and int(found[0][1]) >= 1, run.stderr


def test_forged_reservations_cost_one_wait(exe: Path, tmp_path: Path) -> None:
    """The program moves `head` a ring's worth of slots ahead: reserved, and
    never to be written. The reader gives them up together after one wait
    (STUCK_S), not one slot per wait, and reads every record after them
    (uprobes would stop after --duration, far longer than that wait)."""
    out = tmp_path / "events.jsonl"
    run = _run("trace", "--json", "-e", "ptrace", "-o", str(out), "--duration", "100",
               f"{exe}:work a=%di", "--", str(exe), "head", str(CALLS))
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"done {4 * sum(range(CALLS))}\ntraced yes\n", run.stdout + run.stderr
    *lines, last = out.read_text().splitlines()
    assert [json.loads(line)["args"]["a"] for line in lines] == [*range(CALLS)] * 2
    assert json.loads(last)["summary"]["lost"] <= max(s.slots for s in layout.SHAPES.values()), \
        run.stderr  # the forged slots


class _Lines:
    """Lines of a pipe, each awaited until a deadline (no read blocks past it)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, b""

    def next(self, deadline: float) -> str:
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))
            assert ready, "no line before the deadline"
            got = os.read(self.fd, 4096)
            assert got, "the pipe closed"
            self.buf += got
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode() + "\n"


def _wait_state(pid: int, state: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never reached state {state}")


def test_a_hit_never_waits_without_bound(exe: Path) -> None:
    """The program keeps its ring looking full and its reader alive (a fresh
    heartbeat, `stalled` clear) while uprobes, the real reader, is stopped:
    a hit still comes back out of our code after GIVE_UP_S, dropped and
    counted in `lost`."""
    run = subprocess.Popen([*UPROBES, "trace", "-e", "ptrace", "-o", os.devnull,
                            f"{exe}:work a=%di", "--", str(exe), "spin", str(CALLS)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert run.stdin is not None and run.stdout is not None
    lines = _Lines(run.stdout.fileno())
    try:
        assert lines.next(time.monotonic() + 120) == "ready\n"
        os.kill(run.pid, signal.SIGSTOP)  # no reader: only the program's words say "wait"
        _wait_state(run.pid, "T")
        run.stdin.write("go\n")
        run.stdin.flush()
        deadline = time.monotonic() + GIVE_UP_S + 60  # generous: a loaded machine
        assert lines.next(deadline).startswith("done "), "the hit never came back"
        assert lines.next(deadline) == "traced yes\n"
        os.kill(run.pid, signal.SIGCONT)
        _, stderr = run.communicate("exit\n", timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    m = re.search(r"uprobes: (\d+) events, (\d+) lost\n", stderr)
    assert m is not None and int(m.group(1)) == CALLS and int(m.group(2)) >= 1, stderr


def test_an_unmapped_ring_is_reported(exe: Path) -> None:
    """The program unmaps its ring, then calls a probed function: it dies of
    SIGSEGV in our code, as it must, and uprobes says so."""
    run = _run("trace", "-e", "ptrace", "-o", os.devnull, f"{exe}:work a=%di", "--",
               str(exe), "unmap", str(CALLS))
    assert run.returncode == 128 + signal.SIGSEGV, run.stderr
    assert re.search(r"uprobes: note: process \d+: SIGSEGV in uprobes' trap-free probe code "
                     r"at 0x[0-9a-f]+ \(address 0x[0-9a-f]+\): the program unmapped, "
                     r"protected or truncated the memory it shares with uprobes",
                     run.stderr), run.stderr


def test_shared_memory_cannot_be_truncated(exe: Path) -> None:
    """A program as privileged as uprobes reopens its shared memory through
    /proc/self/map_files and truncates it: refused (the memfd is sealed), so
    neither it nor uprobes, which reads it, dies of SIGBUS."""
    run = _run("trace", "-e", "ptrace", "-o", os.devnull, f"{exe}:work a=%di", "--",
               str(exe), "shrink", str(CALLS))
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"not shrunk\ndone {4 * sum(range(CALLS))}\ntraced yes\n", \
        run.stdout + run.stderr
    assert f"uprobes: {2 * CALLS} events, 0 lost\n" in run.stderr


def _returns_run(proc: subprocess.Popen[bytes], before_go: Callable[[], None]) -> bytes:
    """orphan_returns.c driven to its end (ready, fork, go): its whole output."""
    assert proc.stdin is not None and proc.stdout is not None
    lines = _Lines(proc.stdout.fileno())
    deadline = time.monotonic() + 120
    seen = [lines.next(deadline)]
    assert seen == ["ready\n"]
    proc.stdin.write(b"fork\n")
    proc.stdin.flush()
    seen.append(lines.next(deadline))
    assert seen[-1] == "forked\n"
    before_go()
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    rest = lines.buf + proc.stdout.read()
    return "".join(seen).encode() + rest


@pytest.mark.root  # reads /proc/PID/map_files
def test_an_overwritten_return_table_is_read_within_bounds(compile_c: Compiler) -> None:
    """uprobes killed (-9) with hijacked returns pending: the in-program
    handler finds the real return addresses in the return table. The table's
    count of entries overwritten (as the program can, after an mprotect):
    the handler still scans only the table, and every return lands right."""
    exe = str(compile_c("orphan_returns.c", "-pthread"))
    plain = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    expected = _returns_run(plain, lambda: None)
    expected_status = plain.wait(timeout=60)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER: the command is ours
    try:
        run = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", "--uretprobe", "-o",
                                os.devnull, f"r {exe}:level", "--", exe],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        command: list[int] = []

        def kill_and_overwrite() -> None:
            kids = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
            command.append(next(int(k) for k in kids if procfs.exe(int(k)) == exe))
            run.kill()
            run.wait()
            table = next(m for m in procfs.maps(command[0]) if "uprobes-returns" in m.path)
            # (read-only in the program; its memfd is writable through map_files)
            fd = os.open(f"/proc/{command[0]}/map_files/{table.start:x}-{table.end:x}",
                         os.O_RDWR)
            try:
                os.pwrite(fd, (1 << 63).to_bytes(8, "little"), 0)
            finally:
                os.close(fd)

        transcript = _returns_run(run, kill_and_overwrite)
        deadline = time.monotonic() + 60
        while not (done := os.waitpid(command[0], os.WNOHANG))[0]:
            assert time.monotonic() < deadline, "the command did not end"
            time.sleep(0.01)
        status = os.waitstatus_to_exitcode(done[1])
    finally:
        libc.prctl(36, 0, 0, 0, 0)
    assert (transcript, status) == (expected, expected_status)
