"""`--if`, `--comm` and `--tid` on `trace` and `count`, on both engines.

Differential: a filtered trace holds exactly the hits of an unfiltered
trace of the same round of calls that pass the same predicate in Python.
Counts are checked against the calls the fixture makes (known by
construction: three threads, step(i, names[i % 3]) for i < N). The
kernel engine's filter really is in the kernel: hits it drops are neither
records nor counted, so nothing is read and nothing is lost.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Compiler, FiltersTarget

from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.engines.kernel.tracer import KernelTracer
from uprobes.engines.launch import launch
from uprobes.model.filters import HitFilter
from uprobes.resolve.resolver import Resolver

UPROBES = [sys.executable, "-m", "uprobes"]
NAMES = ("alpha", "beta", "gamma")
COMMS = ("filters", "worker-a", "worker-b")


@pytest.fixture(scope="module")
def exe(compile_c: Compiler) -> Path:
    return compile_c("filters.c", "-pthread")


def spec(exe: Path) -> str:
    return f"{exe}:step i=%di:s64 name=+0(%si):string"


class Rounds(FiltersTarget):
    """The fixture in TARGET_WAIT mode: one round of calls per tracer run."""

    def trace(self, engine: str, *filters: str, spec: str) -> tuple[list[dict[str, Any]], str]:
        """Trace one round with -p; the hit objects and stderr."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        tracer = subprocess.Popen([*UPROBES, "trace", "--json", "-e", engine, "-p",
                                   str(self.pid), *filters, spec],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        err = ""
        while "uprobes: tracing" not in err:
            line = tracer.stderr.readline()
            assert line, f"tracer ended: {err}"
            err += line
        self.go()
        self.done()
        tracer.send_signal(signal.SIGINT)
        out, rest = tracer.communicate(timeout=60)
        docs = [json.loads(ln) for ln in out.splitlines()]
        assert "summary" in docs[-1], out[-500:]
        return [d for d in docs if "summary" not in d], err + rest

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=120) == 0


def key(doc: dict[str, Any]) -> tuple[object, ...]:
    return (doc["probe"], doc["tid"], doc["comm"], doc["args"]["i"], doc["args"]["name"])


def kept(docs: list[dict[str, Any]], flt: HitFilter) -> Counter[tuple[object, ...]]:
    test = flt.predicate()
    return Counter(key(d) for d in docs if test(SimpleNamespace(**d)))


@pytest.mark.parametrize("engine", ["kernel", "ptrace"])
def test_a_filtered_trace_is_the_unfiltered_trace_filtered(engine: str, exe: Path,
                                                           tracefs: Path) -> None:
    rounds = Rounds(exe, 60)
    t0, t1, t2 = rounds.tids
    cases: list[tuple[list[str], HitFilter | None]] = []

    def case(condition: str | None, comms: tuple[str, ...] = (), tids: tuple[int, ...] = ()
             ) -> None:
        argv = ([] if condition is None else ["--if", condition]) \
            + [a for c in comms for a in ("--comm", c)] \
            + [a for t in tids for a in ("--tid", str(t))]
        cases.append((argv, HitFilter.parse(condition, comms, tids)))

    case("i > 40 && i <= 50")
    case('name == "beta"')
    case('name ~ "g*"')
    case(None, comms=("worker-a", "filters"))
    case(None, tids=(t2,))
    case('(name ~ "*ta" || i < 5) && !(i & 1)', comms=("worker-b", "filters"), tids=(t1, t2))
    case(f"pid == {rounds.pid} && i < 10")  # no kernel field for pid: tested in Python
    try:
        everything, _ = rounds.trace(engine, spec=spec(exe))
        assert len(everything) == 3 * 60
        assert {d["comm"] for d in everything} == set(COMMS)
        for argv, flt in cases:
            assert flt is not None
            got, err = rounds.trace(engine, *argv, spec=spec(exe))
            want = kept(everything, flt)
            assert 0 < sum(want.values()) < len(everything), argv
            assert Counter(key(d) for d in got) == want, argv
            python_note = engine == "kernel" and "pid" in flt.combined.fields
            assert ("tested per hit here, not in the kernel" in err) is python_note, err
            assert "0 lost" in err
    finally:
        rounds.close()


def expected(n: int, test: Any) -> int:
    """Hits of one run of the fixture (no TARGET_WAIT) that pass `test(i, name, comm)`."""
    return sum(1 for comm in COMMS for i in range(n) if test(i, NAMES[i % 3], comm))


@pytest.mark.parametrize("engine", ["kernel", "ptrace"])
def test_count_with_a_filter_counts_the_matching_hits(engine: str, exe: Path,
                                                       tracefs: Path) -> None:
    n = 300
    runs = [
        (["--if", 'name == "beta" && i >= 10', "--comm", "worker-a"],
         lambda i, name, comm: name == "beta" and i >= 10 and comm == "worker-a"),
        (["--if", 'name ~ "[ab]*" || i > 290'],
         lambda i, name, comm: name[0] in "ab" or i > 290),
    ]
    for argv, test in runs:
        proc = subprocess.run([*UPROBES, "count", "--json", "-e", engine, *argv, spec(exe),
                               "--", str(exe), str(n)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        counts = json.loads(proc.stdout.splitlines()[-1])
        assert counts == {"uprobes/step": expected(n, test)}, argv


def test_count_of_a_return_probe_filters_on_its_return_value(exe: Path, tracefs: Path) -> None:
    # On the function's rets: the filtered value is fetched there, as a uretprobe would.
    proc = subprocess.run([*UPROBES, "count", "--json", "--if", "v > 100",
                           f"r {exe}:step v=$retval", "--", str(exe), "200"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = expected(200, lambda i, name, comm: i + len(name) > 100)
    assert json.loads(proc.stdout.splitlines()[-1]) == {"uprobes/step__return": want}


def test_system_wide_count_with_a_filter(exe: Path, tracefs: Path) -> None:
    counter = subprocess.Popen([*UPROBES, "count", "--json", "--if", "i >= 250",
                                "--comm", "worker-b", spec(exe)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert counter.stderr is not None
    err = counter.stderr.readline()
    assert "counting 1 probes system-wide" in err, err
    subprocess.run([str(exe), "300"], check=True, stdout=subprocess.DEVNULL, timeout=60)
    counter.send_signal(signal.SIGINT)
    out, _ = counter.communicate(timeout=60)
    assert json.loads(out.splitlines()[-1]) == {"uprobes/step": 50}


def test_the_kernel_drops_what_the_filter_rejects(exe: Path, tracefs: Path) -> None:
    """300k hits: no record for a hit the filter rejects, and none counted as lost."""
    probes = Resolver().resolve_all(parse_specs([spec(exe)]))
    for condition, want in (("i < 0", 0), ("i < 1000 && name == \"beta\"", 3 * 333)):
        child = launch([str(exe), "100000"])
        got: list[int] = []
        tracer = KernelTracer(probes, child=child.pid,
                              hit_filter=HitFilter.parse(condition))
        with tracer:
            child.release()
            tracer.run_hits(lambda hits, got=got: got.extend(h[8][0] for h in hits))  # type: ignore[misc]
            streams = tracer._streams
            assert streams is not None
            read, counted = streams.samples, streams.hits()
        assert child.wait() == 0
        assert (len(got), read, counted, tracer.lost) == (want, want, want, 0), condition


@pytest.mark.parametrize("argv,message,caret", [
    (["--if", "i >"], "uprobes: error: the condition ends too early", "     ^"),
    (["--if", "i > 1 && nope == 2"],
     "uprobes: error: uprobes/step has no field 'nope' (it has: i, name, comm, pid, tid)",
     "           ^"),
    (["--if", "name > 3"], "uprobes: error: name is a string", "  ^"),
])
def test_a_bad_condition_is_one_clear_error(argv: list[str], message: str, caret: str,
                                            exe: Path) -> None:
    for command in ("trace", "count"):
        out, err = io.StringIO(), io.StringIO()
        assert main([command, *argv, spec(exe), "--", str(exe), "3"], out=out, err=err) == 2
        lines = err.getvalue().splitlines()
        assert lines[0].startswith(message) and lines[2] == caret, err.getvalue()
        assert out.getvalue() == ""


@pytest.mark.parametrize("condition, why", [
    ("""name == "it's \\"x\\"" """, "a string holds both quote characters"),
    ("pid < 5", "takes pid == N and pid != N only"),
    ("pid != 1", "holds for processes other than the one counted"),
])
def test_count_says_when_the_kernel_cannot_filter(condition: str, why: str, exe: Path,
                                                  tracefs: Path) -> None:
    proc = subprocess.run([*UPROBES, "count", "-e", "kernel", "--if", condition, spec(exe),
                           "--", str(exe), "3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and why in proc.stderr, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr  # the command never ran


@pytest.mark.root
@pytest.mark.parametrize("how", [("kernel",), ("ptrace",), ("ptrace", "--no-trapfree")],
                         ids=["kernel", "ptrace", "ptrace-no-trapfree"])
def test_the_name_at_each_int3_hit(how: tuple[str, ...], compile_c: Compiler) -> None:
    """short4 is 4 bytes: no jump fits, every hit of it is an int3 (the
    ptrace engine's trap-free run falls back to one). The calling thread is
    named "even" or "odd" every 25 calls, in turn by itself (prctl) and by
    another thread (pthread_setname_np: a /proc write), between two hits.
    `--comm even`, `--comm odd` and `comm != "even"` count exactly the calls
    the program made under each name, as the kernel engine does: short4
    alone (the name read at each hit), and beside pad, a jump whose code
    keeps its verdict under the kernel's rename word, which short4's int3
    hits then read too. (A name kept for 100 ms judged most hits by a
    former name: 2000 or 772 of the 1000 calls as "even".)"""
    exe = compile_c("renamed_short.c", "-pthread")
    for flt, want in ((("--comm", "even"), "even"), (("--comm", "odd"), "odd"),
                      (("--if", 'comm != "even"'), "odd")):
        for funcs in (("short4",), ("short4", "pad")):
            proc = subprocess.run([*UPROBES, "count", "-e", *how, "--json", *flt,
                                   *(f"{exe}:{f}" for f in funcs), "--", str(exe), "2000", "25"],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            said = dict(kv.split("=") for kv in proc.stdout.splitlines()[0].split())
            assert said["calls"] == "2000"
            doc = json.loads(proc.stdout.splitlines()[-1])
            assert doc == {f"uprobes/{f}": int(said[want]) for f in funcs}, \
                (flt, doc, said, proc.stderr)
            if how == ("ptrace",):
                assert "with an int3 trap per hit: uprobes/short4" in proc.stderr, proc.stderr


def test_a_stopped_threads_name_is_read_again_after_a_rename() -> None:
    """`Thread.comm_now` (the name at an int3 hit): without a rename word
    it reads the name at each ask; with one, it keeps the name while the
    word is the one it was read under, and reads it again when the word
    moves or has a rename under way (the low half)."""
    from uprobes.engines.ptrace.tasks import AddressSpace, Thread
    from uprobes.sys.procmem import ProcessMemory

    pid = os.getpid()
    done = threading.Event()
    tids: list[int] = []
    ready = threading.Barrier(2)

    def park() -> None:
        tids.append(threading.get_native_id())
        ready.wait(timeout=60)
        done.wait(timeout=120)
    worker = threading.Thread(target=park)
    worker.start()
    mm = AddressSpace(pid, ProcessMemory(pid))
    try:
        ready.wait(timeout=60)
        comm = Path(f"/proc/{pid}/task/{tids[0]}/comm")
        t = Thread(tids[0], pid, mm)
        for name in ("first", "second"):
            comm.write_text(name)
            assert t.comm_now(None) == name  # no word: read at each ask
        gen = 7 << 32
        assert t.comm_now(gen) == "second"
        comm.write_text("third")
        assert t.comm_now(gen) == "second"  # (the word did not move: kept)
        assert t.comm_now(gen + (1 << 32)) == "third"  # it moved: read again
        comm.write_text("fourth")
        assert t.comm_now(gen + (2 << 32) + 1) == "fourth"  # a rename under way: read,
        comm.write_text("fifth")
        assert t.comm_now(gen + (2 << 32) + 1) == "fifth"  # and not kept under it
        t.close()
    finally:
        done.set()
        worker.join(timeout=60)
        mm.mem.close()
