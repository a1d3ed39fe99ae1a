"""`latency -e ptrace`: calls timed in the program (engines/trapfree/timing.py),
no record per call, the probes' own cost measured on the spot and taken off.

Fixture timed.c makes calls of known shape and says how many it made; for
the spin it times each call itself with clock_gettime and prints the median,
which uprobes' figure is held against (never a figure written here)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, killed_after, read_fd_until

from uprobes.analysis.histogram import Histogram, Latencies
from uprobes.commands.resolve import parse_specs
from uprobes.engines.base import Request, open_timer
from uprobes.resolve.resolver import Resolver

UPROBES = [sys.executable, "-m", "uprobes"]
SUBTRACTED = re.compile(r"probe cost subtracted: (\d+\.\d) ns a call \(the mean of the fastest "
                        r"90% of (\d+) calls of an empty function timed by the same probe code, "
                        r"on the spot\); the clock's step here: \d+\.\d ns\n")


@pytest.fixture(scope="module")
def timed(compile_c: Compiler) -> Path:
    return compile_c("timed.c", "-pthread")


def _latency(*argv: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([*UPROBES, "latency", "-e", "ptrace", *argv], capture_output=True,
                         text=True, timeout=300)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def _json(run: subprocess.CompletedProcess[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The histograms' line and the program's `key=value` lines."""
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    doc = json.loads(next(ln for ln in lines if ln.startswith("{")))
    said = dict(ln.split("=", 1) for ln in lines if "=" in ln and not ln.startswith("{"))
    return doc, said


def test_a_few_instructions_measure_a_few_nanoseconds(timed: Path) -> None:
    """tiny() is three instructions (a couple of ns unprobed). The probes
    around it cost more than that; measured on the spot and taken off, the
    median left is under 10 ns, and the output says what was taken off."""
    run = _latency(f"{timed}:tiny", "--", str(timed), "tiny", "200000")
    assert run.returncode == 0, run.stderr
    assert "calls=200000" in run.stdout
    found = SUBTRACTED.search(run.stdout)
    assert found and float(found[1]) > 0 and found[2] == "20000", run.stdout
    stats = re.search(r"count (\d+) .* p50 (\d+) ns", run.stdout)
    assert stats and int(stats[1]) == 200000, run.stdout
    assert int(stats[2]) < 10, run.stdout


def test_a_spin_measures_what_the_program_measures(timed: Path) -> None:
    """spin() runs ~10 us; the program times each call with clock_gettime
    around it and prints the median. uprobes' median must be within 10% of
    it: its buckets are within 3% (1/32 of a power of two, then our 1/64),
    and the program's own figure also holds the probes' cost and two
    clock_gettime calls (~0.1 us together, 1%). Load cannot widen this: a
    preempted call is slow for both, in the same calls."""
    doc, said = _json(_latency("--json", f"{timed}:spin", "--", str(timed), "spin", "2000",
                               "20000"))
    own = int(said["own_p50_ns"])
    spin = doc["uprobes/spin"]
    assert spin["count"] == 2000
    assert abs(spin["p50_ns"] - own) <= 0.10 * own, (spin, own)
    assert spin["subtracted_ns"] > 0


def test_every_call_of_every_thread_and_nothing_recorded(timed: Path) -> None:
    """4 threads, 100,000 calls each: each thread has its own row, no call
    lost, none paired with another thread's, no ring in between."""
    run = _latency("--json", f"{timed}:tiny", "--", str(timed), "threads", "4", "100000")
    doc, said = _json(run)
    assert said["calls"] == "400000"
    assert doc["uprobes/tiny"]["count"] == 400000
    assert sum(n for _, _, n in doc["uprobes/tiny"]["buckets"]) == 400000
    assert "returns without an entry" not in run.stderr and "not timed" not in run.stderr


def test_histograms_by_thread_outlive_their_rows(timed: Path) -> None:
    """60 waves of 4 threads, 500 calls each: 240 threads, more than the 128
    rows, each row freed when its thread exits and taken by a later one.
    `--by tid` gives each thread its own histogram of exactly its calls;
    `--by pid` one of all 120,000. The event path (-e kernel is root's; its
    pairing is the same Python on any engine) keys the same way: see
    tests/test_latency.py."""
    from uprobes.engines.trapfree.layout import TIMING_ROWS
    waves = ("waves", "60", "4", "500")
    assert 60 * 4 > TIMING_ROWS
    run = _latency("--json", "--by", "tid", f"{timed}:tiny", "--", str(timed), *waves)
    doc, said = _json(run)
    assert said["calls"] == "120000"
    # A row is freed when uprobes handles its thread's exit; under load that
    # can come after later threads looked for a row, and their calls are
    # then not timed, said in one line: never mixed into another's.
    untimed = _untimed_calls(run.stderr)
    assert sum(h["count"] for h in doc.values()) + untimed == 120000, run.stderr
    assert all(h["count"] <= 500 if untimed else h["count"] == 500 for h in doc.values())
    assert all(name.startswith("uprobes/tiny tid=") for name in doc)
    run = _latency("--json", "--by", "pid", f"{timed}:tiny", "--", str(timed), *waves)
    doc, _ = _json(run)
    assert [h["count"] for h in doc.values()] == [120000 - _untimed_calls(run.stderr)]


def _untimed_calls(stderr: str) -> int:
    found = re.search(r"and (\d+) calls of threads beyond the \d+ timing rows were not timed",
                      stderr)
    return int(found[1]) if found else 0


def test_calls_of_threads_without_a_row_are_counted_once(timed: Path) -> None:
    """200 threads alive at once, one call each, 128 rows: the calls of the
    threads left without a row are said once (their return code found no
    row either, and counted them again before)."""
    from uprobes.engines.trapfree.layout import TIMING_ROWS
    run = _latency("--json", f"{timed}:tiny", "--", str(timed), "crowd", "200")
    doc, said = _json(run)
    assert said["calls"] == "200"
    untimed = _untimed_calls(run.stderr)
    assert untimed >= 200 - TIMING_ROWS, run.stderr
    assert doc["uprobes/tiny"]["count"] + untimed == 200, run.stderr


def test_a_static_program_is_timed_by_its_tids_from_the_kernel(compile_c: Compiler) -> None:
    """A static program never runs the dynamic linker's rendezvous, where
    uprobes checks that the tid sits in glibc's thread descriptor: its
    probes ask the kernel (gettid) and still keep each thread apart."""
    exe = compile_c("timed.c", "-pthread", "-static")
    doc, said = _json(_latency("--json", f"{exe}:tiny", "--", str(exe), "threads", "4",
                               "20000"))
    assert said["calls"] == "80000" and doc["uprobes/tiny"]["count"] == 80000


def test_recursion_and_longjmp_pair_as_the_program_counts(compile_c: Compiler) -> None:
    """latency.c: fib(10) is 177 recursive calls; leap() is left by longjmp
    3 times, then returns 4 times. Counts are the program's own."""
    exe = compile_c("latency.c")
    run = _latency("--json", f"{exe}:fib", f"{exe}:leap", "--", str(exe))
    doc, _ = _json(run)
    printed = re.search(r"fib=(\d+) .* leap=(\d+)\+(\d+)", run.stdout)
    assert printed, run.stdout
    assert doc["uprobes/fib"]["count"] == int(printed[1])
    assert doc["uprobes/leap"]["count"] == int(printed[2])
    # the 3 calls longjmp left, dropped by the next entry below them
    assert "0 returns without an entry, 3 calls never returned" in run.stderr


def test_a_deeper_chain_than_a_row_holds_is_said(timed: Path) -> None:
    """100 nested calls, a row keeps 60 open: the innermost 40 are not
    timed, and the run says so rather than pairing them wrongly."""
    from uprobes.engines.trapfree.layout import STACK_DEPTH
    run = _latency("--json", f"{timed}:nest", "--", str(timed), "deep", "100")
    doc, _ = _json(run)
    assert doc["uprobes/nest"]["count"] == STACK_DEPTH
    assert f"{100 - STACK_DEPTH} calls deeper than a thread's {STACK_DEPTH} open calls" \
        in run.stderr
    # their returns are those calls': not said again as returns without an entry
    assert not re.search(r"[1-9]\d* returns without an entry", run.stderr), run.stderr


def test_a_function_that_cannot_be_timed_is_paired_from_events(compile_c: Compiler) -> None:
    """nap() ends with `call nanosleep; leave; ret`: no 5 bytes of whole
    instructions before its ret can move. The run is left to events, said in
    one note naming it, and every call of both functions is in the answer
    (nap was left untimed before, said in one line)."""
    exe = compile_c("latency.c")
    run = _latency("--json", f"{exe}:nap", f"{exe}:fib", "--", str(exe))
    doc, said = _json(run)
    naps, quick = map(int, said["nap"].split()[0].split("+"))
    fibs = int(said["nap"].split("fib=")[1].split()[0])
    assert {name: h["count"] for name, h in doc.items()} == \
        {"uprobes/nap": naps + quick, "uprobes/fib": fibs}
    notes = [ln for ln in run.stderr.splitlines() if "can be no jump" in ln]
    assert notes == ["uprobes: note: calls are paired from events, not timed in the program "
                     "(uprobes/nap__return can be no jump)"], run.stderr
    assert "is not timed" not in run.stderr, run.stderr


def test_calibration_times_every_call() -> None:
    """The null function's calls, timed by the same code in this process,
    all land in the histogram (the code and the reader agree on the layout)."""
    from uprobes.engines.trapfree import timing
    null = timing.calibrate(5000)
    assert sum(null) == 5000
    assert 0 < timing.typical_ticks(null) < 100_000
    assert timing.tsc_step() >= 1


class Rounds:
    """timed.c in `rounds` mode, attached (-p) and timed by `tiny`'s entry
    and return: a round of calls per `round()`, while the timer runs."""

    def __init__(self, exe: Path, *argv: str, by: str | None = None) -> None:
        self.proc = subprocess.Popen([str(exe), "rounds", *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        # Read from the fd, not the text wrapper: nothing else is written
        # before a `go`, so the wrapper's buffer stays empty for round().
        said = read_fd_until(self.stdout.fileno(), "\n", timeout=120)
        if said != f"ready {self.proc.pid}\n":
            self.close()
            raise AssertionError(f"no `ready` within 120 s: {said!r}")
        probes = Resolver(pid=self.proc.pid, uretprobe=False).resolve_all(
            parse_specs([f"{exe}:tiny", f"r {exe}:tiny"]))
        timer = open_timer(Request(probes, "ptrace", pid=self.proc.pid, trapfree=True, by=by))
        assert timer is not None
        self.timer = timer

    def round(self) -> int:
        """One round, the timer counting until the program says it is done:
        the calls it made so far."""
        self.stdin.write("go\n")
        self.stdin.flush()
        deadline = time.monotonic() + 120
        while not select.select([self.stdout], [], [], 0)[0]:
            assert time.monotonic() < deadline, "the round did not end within 120 s"
            self.timer.count(0.02)
        said = self.stdout.readline()
        assert said.startswith("calls="), said
        return int(said.removeprefix("calls="))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _never_fewer(before: Histogram, after: Histogram) -> None:
    """No bucket of `after` holds fewer calls than it did in `before`: the
    fine buckets (1/64 of a power of two) and the log2 ones drawn."""
    fine = after._fine  # the finest buckets a histogram keeps
    assert all(fine.get(i, 0) >= n for i, n in before._fine.items()), (before, after)
    drawn = {lo: n for lo, _, n in after.log2_buckets()}
    assert all(drawn.get(lo, 0) >= n for lo, _, n in before.log2_buckets()), (before, after)
    assert after.count >= before.count


def test_live_reads_repeat_and_only_grow(timed: Path) -> None:
    """A timer read during the run, as an exporter reads it again and again:
    two reads with no call between are the same histograms, the same cost
    taken off; from one round of calls to the next no bucket has fewer
    calls; and the count is the program's calls so far. (Were the probes'
    cost measured anew at each read, calls would move between buckets.)"""
    rounds = Rounds(timed, "20000")
    try:
        with killed_after(rounds.proc), rounds.timer as timer:
            before: Histogram | None = None
            for _ in range(4):
                calls = rounds.round()
                first, again = timer.latencies(), timer.latencies()
                assert again == first
                tiny = first.histograms["uprobes/tiny"]
                assert tiny.count == calls and first.subtracted_ns > 0
                if before is not None:
                    _never_fewer(before, tiny)
                before = tiny
    finally:
        rounds.close()


def test_reads_in_another_thread_while_threads_come_and_go(timed: Path) -> None:
    """Rounds of 10 waves of 4 threads that exit once they made their calls:
    320 threads, more than the rows. A thread's row is taken out and added
    to the timer's sum when the tracer sees it exit, while another thread
    reads the timer again and again. No read counts a row in both places or
    in neither: the count (and every bucket) only grows from one read to
    the next and never passes the calls made; the last read is the
    program's count; and what the timer keeps of the threads gone does not
    grow with their number."""
    rounds = Rounds(timed, "500", "4", "10")
    done = threading.Event()
    made = [0]
    reads = [0]
    failed: list[str] = []  # the first read that broke a rule, and why

    def read() -> None:
        before: Latencies | None = None
        while not done.is_set():
            got = rounds.timer.latencies()
            most = made[0] + 20000  # (the round under way: 20,000 calls)
            try:
                tiny = got.histograms["uprobes/tiny"]
                assert tiny.count <= most, (tiny.count, most)
                if before is not None:
                    assert got.no_row >= before.no_row, (before.no_row, got.no_row)
                    _never_fewer(before.histograms["uprobes/tiny"], tiny)
            except AssertionError as e:
                failed.append(f"read {reads[0] + 1}: {e}")
                return
            before = got
            reads[0] += 1
            # A pause between reads: the tracer in the main thread (which
            # sees the exits) keeps most of the GIL, and exits and reads
            # still interleave many times a round.
            time.sleep(0.001)

    reader = threading.Thread(target=read, name="reader")
    try:
        with killed_after(rounds.proc), rounds.timer as timer:
            reader.start()
            try:
                deadline = time.monotonic() + 120
                for round_ in range(8):
                    made[0] = rounds.round()
                    # Reads in every round, made sure of (a loaded machine
                    # may give the reader few turns): the tracer handles
                    # exits on meanwhile, as the reads race with them.
                    while reads[0] <= 2 * (round_ + 1) and not failed and reader.is_alive():
                        assert time.monotonic() < deadline, f"{reads[0]} reads in 120 s"
                        rounds.timer.count(0.02)
            finally:
                done.set()
                reader.join(120)
            last = timer.latencies()
            assert last.histograms["uprobes/tiny"].count + last.no_row == made[0] == 160000
            assert len(vars(timer)["_released"]) <= 1  # one sum (by function), not per thread
    finally:
        rounds.close()
    assert not reader.is_alive() and not failed, failed
    assert reads[0] > 8


@pytest.mark.parametrize("by", ["pid", "comm"])
def test_by_pid_or_comm_keys_threads_still_alive_at_detach(timed: Path, by: str) -> None:
    """`latency -p PID --by pid|comm`: the program's main thread makes the
    calls and is still alive when the run ends. Its calls are shown under
    its pid (its comm), as read at detach: never under a pid or comm the
    tracer no longer knows (`pid=0`, `comm=?`)."""
    rounds = Rounds(timed, "1000", by=by)
    try:
        with killed_after(rounds.proc):
            comm = Path(f"/proc/{rounds.proc.pid}/comm").read_text().strip()
            with rounds.timer as timer:
                calls = rounds.round()
            got = timer.latencies()
    finally:
        rounds.close()
    assert calls == 1000
    key = rounds.proc.pid if by == "pid" else comm
    assert {name: h.count for name, h in got.histograms.items()} \
        == {f"uprobes/tiny {by}={key}": 1000}


def test_a_read_while_a_thread_exits_keys_its_row_by_its_pid(timed: Path) -> None:
    """`--by pid`, read in another thread: a read can come while the tracer
    handles a thread's exit, after the thread left the tracer's list of
    threads and before its row is released. That row is still the thread's
    and must be keyed by its pid (else that read drops the pid's calls and
    the next has them again). The read is made at that very point, from the
    tracer's own step between the two (a thread left alone could miss it)."""
    rounds = Rounds(timed, "500", "2", "1", by="pid")
    timer = rounds.timer
    tracer: Any = timer  # the engine's own class, under the Timer role
    forget = tracer._forget  # called between the two steps of an exit
    seen: list[Latencies] = []

    def forget_and_read(t: object) -> None:
        forget(t)
        seen.append(timer.latencies())

    tracer._forget = forget_and_read
    try:
        with killed_after(rounds.proc), timer:
            assert rounds.round() == 1000
    finally:
        rounds.close()
    assert len(seen) >= 2  # the two threads' exits
    for got in seen:
        assert list(got.histograms) == [f"uprobes/tiny pid={rounds.proc.pid}"], got
        assert got.histograms[f"uprobes/tiny pid={rounds.proc.pid}"].count >= 500


@pytest.mark.parametrize(("by", "who"), [("pid", "1"), ("comm", "0"), ("comm", "1")])
def test_calls_before_an_exec_keep_their_key(timed: Path, by: str, who: str) -> None:
    """The main thread and 3 threads make 1000 calls each; then, all alive,
    one of them execs the program again (`tiny 1000`: 1000 calls more): the
    main thread (who=0) or another (who=1). The exec ends the other threads
    and the kernel reports no exit for the thread that exec'd under its
    former tid: its calls (and the main thread's) are still keyed as they
    were made, under the pid and the comm before the exec (never pid=0 or
    comm=?, nor the comm of the new image for the calls of the old)."""
    run = _latency("--json", "--by", by, f"{timed}:tiny", "--", str(timed), "execs", "1000",
                   "3", who)
    doc, said = _json(run)
    assert said["before_exec"] == "4000" and said["calls"] == "1000", run.stdout
    got = {name: h["count"] for name, h in doc.items()}
    if by == "pid":
        assert got == {f"uprobes/tiny pid={said['pid']}": 5000}, got
    else:  # executed as /proc/self/exe: the new image's comm is `exe`
        assert got == {f"uprobes/tiny comm={timed.name[:15]}": 4000, "uprobes/tiny comm=exe": 1000}


def test_a_thread_collected_by_another_wait_releases_its_row(timed: Path) -> None:
    """`--by pid`: the traced program is also our child, and a wait of ours
    outside the tracer collects its exit (here: killed and waited for just
    as the timer detaches), while the tracer's thread has no other child
    left (its orphan reaper, a child for the whole run, was killed). The
    tracer then finds nothing to wait for: the thread it still lists is
    gone as if its exit had been seen, its 1000 calls keyed by its pid (not
    pid=0) and its timing row free. The timer runs in a thread of its own,
    whose only children are the reapers it starts."""
    rounds = Rounds(timed, "1000", by="pid")
    timer = rounds.timer
    tracer: Any = timer  # the engine's own class, under the Timer role
    quiesce = tracer._quiesce  # the detach's first step
    collected: list[int] = []
    got: list[Latencies] = []
    failed: list[BaseException] = []

    def collect_then_quiesce(interrupt: bool = True) -> None:
        if not collected:
            me = threading.get_native_id()
            for child in Path(f"/proc/self/task/{me}/children").read_text().split():
                collected.append(int(child))
                os.kill(int(child), signal.SIGKILL)
                _collect(int(child))
            rounds.proc.kill()
            rounds.proc.wait(timeout=60)  # collects its exit before the tracer can
            collected.append(rounds.proc.pid)
        quiesce(interrupt)

    def run() -> None:
        try:
            with timer:
                assert rounds.round() == 1000
                tracer._quiesce = collect_then_quiesce
            got.append(timer.latencies())
        except BaseException as e:
            failed.append(e)

    runner = threading.Thread(target=run, name="tracer")
    try:
        with killed_after(rounds.proc):
            runner.start()
            runner.join(timeout=300)
    finally:
        rounds.close()
    assert not runner.is_alive() and not failed, failed
    assert len(collected) >= 2, collected  # a reaper and the program
    assert {name: h.count for name, h in got[0].histograms.items()} \
        == {f"uprobes/tiny pid={rounds.proc.pid}": 1000}
    blocks = vars(timer)["_jumps"].timing
    assert blocks and all(not block.by_owner([0]) for block in blocks)  # no row still owned


def _collect(pid: int) -> None:
    """Wait (60 s at most) for our child `pid`, killed, to exit; collect it."""
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        assert time.monotonic() < deadline, f"{pid} did not exit within 60 s"
        time.sleep(0.01)


def test_a_timer_counts_the_lines_it_is_told_to_count(compile_c: Compiler) -> None:
    """One tracer per process: a timer that also counts other lines
    (`Request.counted`, trap-free counters, no int3: `int3s=False`), as the
    agent's on the ptrace engine. agent_calls.c's handle() sleeps once per
    call: every call timed, and every nanosleep counted, exactly."""
    exe = compile_c("agent_calls.c")
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    with killed_after(proc):
        assert proc.stdin is not None and proc.stdout is not None
        assert read_fd_until(proc.stdout.fileno(), "\n", timeout=120) == "ready\n"
        probes = Resolver(pid=proc.pid, uretprobe=False).resolve_all(
            parse_specs([f"{exe}:handle", f"r {exe}:handle", "libc:nanosleep"]))
        timer = open_timer(Request(probes, "ptrace", pid=proc.pid, trapfree=True,
                                   counted=frozenset({"uprobes/nanosleep"}), int3s=False))
        assert timer is not None
        with timer:
            for calls in (20, 40):
                proc.stdin.write("go\n")
                proc.stdin.flush()
                deadline = time.monotonic() + 120
                while not select.select([proc.stdout], [], [], 0)[0]:
                    assert time.monotonic() < deadline, "the round did not end within 120 s"
                    timer.count(0.02)
                assert os.read(proc.stdout.fileno(), 64) == f"done {calls}\n".encode()
                assert timer.live_counts()["uprobes/nanosleep"] == calls
                got = timer.latencies()
                assert got.histograms["uprobes/handle"].count == calls
                assert "uprobes/nanosleep" not in got.histograms  # counted, not timed
        proc.stdin.close()
        assert proc.wait(60) == 0


def test_a_signal_handlers_timed_call_in_the_middle_of_anothers_probe(
        compile_c: Compiler) -> None:
    """sigtimed.c: a timer's handler calls f(99) every 100 us while the main
    loop calls f(1), so handler calls land inside the instructions of the
    main call's entry and return code. Each call keeps its own slot: every
    call is under its own key, none unpaired (the return read its entry's
    key and stamp after freeing the slot, and a handler's call took them)."""
    exe = compile_c("sigtimed.c")
    doc, said = _json(_latency("--json", "--by", "k", f"{exe}:f k=%di:s64", "--", str(exe),
                               "3000"))
    counts = {name: h["count"] for name, h in doc.items()}
    assert counts == {"uprobes/f k=1": int(said["k1"]), "uprobes/f k=99": int(said["k99"])}, \
        (counts, said)


@pytest.mark.parametrize(("flt", "expect"), [
    (("--comm", "even"), "evens"), (("--comm", "odd"), "odds"),
    (("--if", 'comm != "even"'), "odds"), (("--if", "tid == 1"), "none"),
    (("--if", "tid > 0"), "all")])
def test_filters_are_decided_at_the_entry_in_the_program(timed: Path, flt: tuple[str, str],
                                                         expect: str) -> None:
    """`--comm`, `--if` on the comm or the tid: decided by the entry's code
    (no records: `subtracted_ns` says the calls were timed in the program),
    while the thread renames itself every 70 calls (by prctl and by
    /proc in turn). The counts are the program's own, exactly; a rejected
    call's return is neither timed nor counted as a return without an
    entry."""
    run = _latency("--json", *flt, f"{timed}:tiny", "--", str(timed), "renames", "3000", "70")
    doc, said = _json(run)
    evens = int(said["even"])
    want = {"evens": evens, "odds": 3000 - evens, "none": 0, "all": 3000}[expect]
    assert said["calls"] == "3000"
    assert doc["uprobes/tiny"]["count"] == want, (doc, run.stderr)
    assert "subtracted_ns" in doc["uprobes/tiny"], doc
    assert "returns without an entry" not in run.stderr and "not timed" not in run.stderr, \
        run.stderr


def test_a_filter_on_the_key_is_decided_in_the_program(timed: Path) -> None:
    """`--by k --if 'k < 3'` over tiny(i % 10): only keys 0, 1 and 2, each
    with its 100 calls, timed in the program."""
    doc, said = _json(_latency("--json", "--by", "k", "--if", "k < 3", f"{timed}:tiny k=%di:s64",
                               "--", str(timed), "keys", "1000", "10"))
    assert said["calls"] == "1000"
    assert {k: h["count"] for k, h in doc.items()} == {
        f"uprobes/tiny k={k}": 100 for k in range(3)}, doc
    assert all("subtracted_ns" in h for h in doc.values()), doc


def test_a_filter_the_program_cannot_test_pairs_events(timed: Path) -> None:
    """`--if 'pid > 0'` (the pid is not known to the probe's code): one
    note says why, and the calls are paired from events, all of them."""
    run = _latency("--json", "--if", "pid > 0", f"{timed}:tiny", "--", str(timed), "tiny",
                   "500")
    doc, said = _json(run)
    assert "the filter is tested on events, not in the program (pid is not known" in \
        run.stderr, run.stderr
    assert doc["uprobes/tiny"]["count"] == 500 and "subtracted_ns" not in doc["uprobes/tiny"]


def test_rejected_calls_take_no_place_on_the_stack_of_open_calls(timed: Path) -> None:
    """nest(100) down to nest(1), `--if 'n < 4'`: the 97 rejected calls
    above are not kept open (the 60-deep stack would be full before the
    three accepted ones), nor said as deeper, nor as never returned."""
    run = _latency("--json", "--by", "n", "--if", "n < 4", f"{timed}:nest n=%di:s64", "--",
                   str(timed), "deep", "100")
    doc, _ = _json(run)
    assert {k: h["count"] for k, h in doc.items()} == {
        f"uprobes/nest n={n}": 1 for n in (1, 2, 3)}, (doc, run.stderr)
    assert "not timed" not in run.stderr and "never returned" not in run.stderr, run.stderr


def test_a_filter_that_rejects_every_call_says_nothing_was_lost(timed: Path) -> None:
    """`--tid 1` on a chain of 100 nested calls: none is timed, and none is
    said to be deeper than a row holds or to have never returned."""
    run = _latency("--json", "--tid", "1", f"{timed}:nest", "--", str(timed), "deep", "100")
    doc, _ = _json(run)
    assert doc["uprobes/nest"]["count"] == 0, doc
    assert "not timed" not in run.stderr and "never returned" not in run.stderr \
        and "returns without an entry" not in run.stderr, run.stderr


def test_threads_the_filter_rejects_claim_no_timing_row(timed: Path) -> None:
    """200 threads alive at once, one call each (tiny(i), thread i), 128
    rows: with `--if 'k >= 190'` the 190 rejected threads claim no row, so
    each of the 10 selected ones is timed."""
    doc, said = _json(_latency("--json", "--by", "k", "--if", "k >= 190",
                               f"{timed}:tiny k=%di:s64", "--", str(timed), "crowd", "200"))
    assert said["calls"] == "200"
    assert {k: h["count"] for k, h in doc.items()} == {
        f"uprobes/tiny k={k}": 1 for k in range(190, 200)}, doc


@pytest.mark.root
@pytest.mark.parametrize("by", [None, "x"])
def test_a_function_no_jump_can_cover_is_paired_from_its_int3s(
        compile_c: Compiler, by: str | None) -> None:
    """short4 is 4 bytes, too short for a jump: its calls are paired from
    events (an int3 at its entry and its ret), beside longer's, in one
    answer with the calls the program made and the kernel engine's counts;
    a note says why. (Its calls were left untimed: `no calls seen`.)"""
    exe = compile_c("short_func.c")
    fetch = "" if by is None else " x=%di:s32"
    argv = ["--json", *(["--by", by] if by else []), f"{exe}:short4{fetch}",
            f"{exe}:longer{fetch}", "--", str(exe), "12"]
    counts = {}
    for engine in ("kernel", "ptrace"):
        run = subprocess.run([*UPROBES, "latency", "-e", engine, *argv], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        assert run.stdout.startswith("short4=12 longer=6 "), run.stdout
        doc = json.loads(run.stdout.splitlines()[-1])
        counts[engine] = {name: h["count"] for name, h in doc.items()}
        if engine == "ptrace":
            assert "is not timed" not in run.stderr, run.stderr
            assert "calls are paired from events, not timed in the program " \
                "(uprobes/short4 can be no jump)" in run.stderr, run.stderr
    assert counts["ptrace"] == counts["kernel"]
    if by is None:
        assert counts["ptrace"] == {"uprobes/short4": 12, "uprobes/longer": 6}
    else:
        assert counts["ptrace"] == {"uprobes/short4 x=0": 4, "uprobes/short4 x=1": 4,
                                    "uprobes/short4 x=2": 4, "uprobes/longer x=0": 3,
                                    "uprobes/longer x=2": 3}
