"""The reader of `trace --kernel`'s rings: a run of one system call, decoded by
columns (engines/kevents/runs.py), makes the rows that the record by record
walk makes, in the same order, and every sample is counted."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import astuple
from pathlib import Path

import pytest
from conftest import Compiler, run_in_session

from uprobes.engines.kevents import runs
from uprobes.engines.kevents.source import KernelEvents
from uprobes.errors import KernelError
from uprobes.model.kevent import KernelRow, shape_of

CALLS = ["raw_syscalls:sys_enter", "raw_syscalls:sys_exit"]
MIN_PAIRS = runs.MIN_PAIRS


Row = tuple[object, ...]


def walk(events: KernelEvents, chunks: list[bytes], by_runs: bool,
         monkeypatch: pytest.MonkeyPatch) -> tuple[list[Row], dict[int, int]]:
    """The rows and sample counts of `chunks` read by a fresh reader of
    `events`' tracepoints, with runs decoded by columns or not (a
    row here has its shape's fields in place of its number)."""
    monkeypatch.setattr(runs, "MIN_PAIRS", MIN_PAIRS if by_runs else 1 << 62)
    fresh = KernelEvents([tp.name for tp in events.points])
    fresh.records.own_pid = events.records.own_pid
    fresh._comms.update(events._comms)
    rows: list[KernelRow] = []

    def corrupt(size: int) -> KernelError:
        return KernelError(f"corrupt record of size {size}")
    for data in chunks:
        fresh.records.read(data, rows, corrupt)
    return [(*r[:5], *astuple(shape_of(r[5])), r[6]) for r in rows], dict(fresh.records.samples)


class Records:
    """Perf samples of raw_syscalls as the kernel lays them out."""

    def __init__(self, events: KernelEvents) -> None:
        ids = {tp.name: tp.format.id for tp in events.points}
        self.enter_id, self.exit_id = ids[CALLS[0]], ids[CALLS[1]]
        self.ts = 1_000_000

    def _sample(self, pid: int, tid: int, event_id: int, raw_tail: bytes) -> bytes:
        self.ts += 997
        raw = struct.pack("<HBBi", event_id, 0, 0, pid) + raw_tail
        raw += bytes(-(len(raw) + 4) % 8)  # RAW's size and record end on 8 bytes
        body = struct.pack("<IIQIII", pid, tid, self.ts, 1, 0, len(raw)) + raw
        return struct.pack("<IHH", 9, 1, 8 + len(body)) + body

    def call(self, pid: int, tid: int, nr: int, ret: int, exit_nr: int | None = None,
             enter_id: int | None = None, exit_id: int | None = None) -> bytes:
        enter = self._sample(pid, tid, self.enter_id if enter_id is None else enter_id,
                             struct.pack("<q6Q", nr, 11, 22, 33, 44, 55, 2**64 - 1))
        return enter + self._sample(pid, tid, self.exit_id if exit_id is None else exit_id,
                                    struct.pack("<qq", nr if exit_nr is None else exit_nr, ret))


def test_runs_make_the_rows_the_walk_makes(tracefs: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs broken every way: another thread, another system call, an exit
    of another call than the entry's (or of none: -1, the one entered),
    uprobes' own thread, a run too short, a record that is not a sample."""
    events = KernelEvents(CALLS)
    make = Records(events)
    own = events.records.own_pid
    lost = struct.pack("<IHHQQ", 2, 0, 24, 7, 3)  # PERF_RECORD_LOST: id, 3 lost
    blocks = [  # each a run of its own: a record that is not a sample between them
        [make.call(100, 100, 110, 99) for _ in range(40)]  # getppid
        + [make.call(100, 101, 110, 99) for _ in range(20)],  # the same, another thread
        [make.call(100, 100, 110, 99) for _ in range(20)] + [make.call(100, 100, 39, 100)],
        [make.call(100, 101, 110, 99, exit_nr=-1 if i == 10 else None) for i in range(30)],
        [make.call(100, 101, 110, 99, exit_nr=39) for i in range(20)],
        [make.call(own, own, 110, 1) for _ in range(20)],
        [make.call(100, 100, 110, 99) for _ in range(20)]  # then a like-sized other tracepoint
        + [make.call(100, 100, 110, 99, enter_id=9999) for _ in range(5)],
        [make.call(100, 100, 110, 99) for _ in range(20)]
        + [make.call(100, 100, 110, 99, exit_id=9999) for _ in range(5)],
        [make.call(100, 100, 0, 5) for _ in range(MIN_PAIRS - 1)],  # read(): arguments
        [make.call(100, 100, 0, 5) for _ in range(50)]]
    data = lost.join(b"".join(block) for block in blocks)
    tail = b"".join(make.call(100, 100, 110, 99) for _ in range(MIN_PAIRS))
    walked, walked_counts = walk(events, [data, tail], False, monkeypatch)
    by_runs, run_counts = walk(events, [data, tail], True, monkeypatch)
    assert by_runs == walked
    assert run_counts == walked_counts
    made = sum(map(len, blocks)) + MIN_PAIRS
    assert walked_counts == {make.enter_id: made - 5, make.exit_id: made - 5}
    assert len(walked) == 2 * (made - 20 - 5)  # all but uprobes' own and the other's
    assert walked[0][5:] == ("syscall_enter", "getppid", (), True, ())
    assert walked[1][5:] == ("syscall_exit", "getppid", ("ret",), True, (99,))
    reads = [r for r in walked if r[6] == "read"]
    assert reads[0][7:] == (("fd", "buf", "count"), True, (11, 22, 33))
    assert all(r[1] != own for r in walked)


def test_a_busy_threads_events_are_the_same_either_way(
        tracefs: Path, compile_c: Compiler, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the kernel recorded of a program making getppid() in bursts
    (bench/syscall_rate.c), read both ways: the same rows, every call's
    entry and exit among them."""
    from uprobes.engines.launch import launch
    exe = compile_c("../../bench/syscall_rate.c")
    with KernelEvents(CALLS) as events:
        child = launch([str(exe), "20000", "0.1"])
        events.open(child=child.pid)
        child.release()
        assert child.wait() == 0
        events.disable()
        chunks = [ring.take() for ring in events.rings.values()]
        walked, counts = walk(events, chunks, False, monkeypatch)
        by_runs, run_counts = walk(events, chunks, True, monkeypatch)
        assert by_runs == walked and run_counts == counts
        made = sum(1 for r in walked if r[6] == "getppid") // 2
        assert made == 2000, made
        assert counts[events.records.decoders.syscalls.enter_id] + events.lost >= 2000
        assert os.getpid() not in {r[1] for r in walked}


def test_a_ring_read_in_pieces_gives_the_same_rows(tracefs: Path) -> None:
    """What a ring holds is decoded a piece at a time when there is much of
    it: a piece may end inside a record, its header too, which the next
    piece has whole."""
    events = KernelEvents(CALLS)
    make = Records(events)
    data = b"".join(make.call(100, 100 + i // 50, i % 3, i) for i in range(300))

    def corrupt(size: int) -> KernelError:
        return KernelError(f"corrupt record of size {size}")
    whole: list[KernelRow] = []
    assert events.records.read(data, whole, corrupt) == len(data)
    # (a call is 168 bytes: 169 to 175 cut the next one inside its 8-byte header)
    for piece in (104, 1000, 4096, 7777, *range(169, 176)):
        pieces = KernelEvents(CALLS)
        rows: list[KernelRow] = []
        done = 0
        while done < len(data):
            chunk = data[done:done + piece]
            done += pieces.records.read(chunk, rows, corrupt, whole=done + piece >= len(data))
        assert rows == whole, piece
        assert pieces.records.samples == events.records.samples
    with pytest.raises(KernelError, match="corrupt"):
        events.records.read(data[:1000], [], corrupt)  # cut where it should be whole


def test_the_readers_bench_runs(tracefs: Path) -> None:
    """bench/kernel_reader.py, run small so it keeps working (no figure checked)."""
    import sys
    run = run_in_session([sys.executable, "-m", "bench.kernel_reader", "--calls", "2000",
                          "--repeats", "1"], 300, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr
    assert " us of CPU an event, " in run.stdout and "events a CPU-second" in run.stdout


def test_a_burst_read_in_small_pieces_is_all_accounted_for(
        tracefs: Path, compile_c: Compiler, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of system calls through `trace --kernel syscalls --json`, the
    rings read 64 KiB at a time (records cut at every piece's end, and far
    behind: what is left at the end comes in many pieces): every call's
    entry and exit is a line (the rings, 16 MiB a CPU at least, hold the
    burst's 7 MB whatever the load), in time order with the probes' hits
    (the last hit comes while most of the burst is still in the rings), and
    the summary counts the lines it wrote."""
    import io
    import json

    from uprobes.commands import main
    from uprobes.engines.kevents import source
    monkeypatch.setattr(source, "_READ_BYTES", 64 << 10)
    exe = compile_c("../../bench/syscall_rate.c")
    out = io.StringIO()
    assert main(["trace", "--json", "--kernel", "syscalls", f"{exe}:mark n=%di:s32", "--",
                 str(exe), "200000", "0.2"], out=out) == 0
    *docs, summary = [json.loads(line) for line in out.getvalue().splitlines()]
    kernel = [d for d in docs if "kernel" in d]
    calls = sum(1 for d in kernel if d["name"] == "getppid")
    counts = summary["summary"]["kernel"]
    assert counts["events"] == len(kernel)
    assert (calls, counts["lost"]) == (2 * 40_000, 0)
    assert [d["ts_ns"] for d in docs] == sorted(d["ts_ns"] for d in docs)  # hits too
    marks = [d["args"]["n"] for d in docs if d.get("probe") == "uprobes/mark"]
    assert marks == [1, 2]


def test_a_backlog_in_pieces_comes_in_time_order_across_cpus(
        tracefs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CPUs' rings, one far longer than a read takes: each read hands
    over only what is older than the last event read from the cut ring, so
    no event of a later read is older than one of an earlier read."""
    from bench.kernel_reader import Recorded
    from uprobes.engines.kevents import source
    monkeypatch.setattr(source, "_READ_BYTES", 4096)
    events = KernelEvents(CALLS)
    make = Records(events)
    calls = [make.call(100, 100 + i % 2, 110, i) for i in range(400)]  # stamps rising
    busy = b"".join(calls[0::2])  # ~34 KB: cut into pieces
    quiet = b"".join(calls[1::2][:40]) + b"".join(calls[1::2][190:])  # two bursts
    events.rings = {0: Recorded(busy), 1: Recorded(quiet)}  # type: ignore[dict-item]
    reads = []
    for _ in range(100):
        reads.append([r[0] for r in events.read_rows()])
        if events.drained:
            break
    stamps = [ts for read in reads for ts in read]
    assert len(reads) > 5 and stamps == sorted(stamps)
    assert len(stamps) == 2 * (200 + 40 + 10)


def test_rings_shrink_under_a_locked_memory_limit(tracefs: Path, compile_c: Compiler,
                                                   tmp_path: Path) -> None:
    """Without CAP_IPC_LOCK (which lets root past it) the rings count against
    RLIMIT_MEMLOCK: a limit with no room for the rings asked for halves them
    until they fit, says so in a note, and the run goes on with every call.
    (The limit here can only be lowered, below two rings of the real floor
    of 16 MiB: the child lowers the floor too.)"""
    import sys

    exe = compile_c("../../bench/syscall_rate.c")
    script = (
        "import sys\n"
        "from uprobes.engines.kevents import source\n"
        "source.MIN_RING_PAGES = 32\n"
        "from uprobes.commands import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    limit, out = 4 << 20, tmp_path / "t.jsonl"
    argv = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--",
            "prlimit", f"--memlock={limit}:{limit}", "--", sys.executable, "-c", script,
            "trace", "--json", "-o", str(out), "-e", "ptrace", "--kernel", "syscalls",
            f"{exe}:mark n=%di:s32", "--", str(exe), "2000", "0.1"]
    run = run_in_session(argv, 300)
    assert run.returncode == 0, run.stderr
    assert "uprobes: note: the kernel's events get rings of " in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    calls = sum(1 for d in docs if d.get("name") == "getppid")
    assert calls == 2 * 200, run.stderr
    assert [d["args"]["n"] for d in docs if d.get("probe") == "uprobes/mark"] == [1, 2]


RENAMES = """
import ctypes, os, sys, time
prctl = ctypes.CDLL(None).prctl
prctl(15, b"alpha", 0, 0, 0)  # PR_SET_NAME
end = time.monotonic() + 1.0
while time.monotonic() < end:
    time.sleep(0.001)
prctl(15, b"beta", 0, 0, 0)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
"""


def test_a_thread_that_renames_itself_is_named_anew(tracefs: Path, tmp_path: Path) -> None:
    """A program that names itself "alpha" for a second, then "beta": its
    system calls read while it is "beta" are named so (a comm is read again
    once 100 ms old; before, the first one read stayed for the thread's
    life)."""
    from conftest import wait_until

    from uprobes.engines.launch import launch
    stop = tmp_path / "stop"
    with KernelEvents(CALLS) as events:
        child = launch(["/usr/bin/python3.11", "-c", RENAMES, str(stop)])
        try:
            events.open(child=child.pid)
            child.release()
            names: set[str] = set()

            def renamed() -> bool:
                names.update(str(row[4]) for row in events.read_rows() if row[1] == child.pid)
                return "beta" in names
            wait_until(renamed, "a system call named beta", timeout=120)
        finally:
            stop.touch()
            assert child.wait() == 0
