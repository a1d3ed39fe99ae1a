"""Trap-free recording probes (engines/trapfree/recording.py): `trace -e ptrace`
on a probe that fetches registers and the stack only writes each hit into a
ring in the program's memory, no stop. The kernel engine is the oracle: the
same probe lines give the same values; and nothing is lost, whatever the
threads, forks and speed of the program (a full ring makes the hit wait)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import Compiler, wait_until, without_clocks

UPROBES = [sys.executable, "-m", "uprobes"]
NOTE_FREE = re.compile(r"uprobes: note: (\d+) of (\d+) probes trap-free \(a jump to "
                       r"in-process code recording")
WORK_ARGS = ("a=%di:s64 b=%si:s32 c=%dx:s16 d=%cx:s8 e=%r8:x64 f=%r9:u32 g=$stack1:s64 "
             "h=$stack2:u64 ret=$stack0:x64 sp=$stack:x64 ip=%ip bits=%si:b4@2/32 "
             "imm=\\42:u16 cs=%cs:x16 ss=%ss orig=%orig_ax:s64 lo=+8(%sp):u8 "
             "e32=%r8d:u32 cl=%cl:s8")
OTHER_ARGS = ("ax=%ax bx=%bx:x64 bp=%bp:x64 r12=%r12 r13=%r13 r14=%r14 r15=%r15 "
              "fl=%flags:x64 r10=%r10 r11=%r11 comm=$comm")


@pytest.fixture(scope="module")
def exe(compile_c: Compiler) -> Path:
    return compile_c("recording.c", "-pthread")


def trace(engine: str, exe: Path, *argv: str, extra: tuple[str, ...] = (),
          specs: tuple[str, ...] = (f"work {WORK_ARGS}", f"other {OTHER_ARGS}"),
          ) -> tuple[list[dict[str, Any]], str, str]:
    """`uprobes trace --json` of the fixture (no ASLR): events, program output, stderr."""
    with tempfile.NamedTemporaryFile("r") as events_file:
        run = subprocess.run([*UPROBES, "trace", "--json", "-e", engine, "-o", events_file.name,
                              *extra, *(_at(exe, spec) for spec in specs), "--", "setarch",
                              "-R", str(exe), *argv],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        *lines, last = events_file.read().split("\n")[:-1]
    events = [json.loads(line) for line in lines]
    summary = without_clocks(json.loads(last))
    assert summary == {"summary": {"events": len(events), "lost": 0}}, run.stderr
    return events, run.stdout, run.stderr


def _at(exe: Path, spec: str) -> str:
    """`[r ]FUNC ARGS` of the fixture -> a probe line."""
    return f"r {exe}:{spec[2:]}" if spec.startswith("r ") else f"{exe}:{spec}"


def values(events: list[dict[str, Any]], drop: tuple[str, ...] = ()
           ) -> list[tuple[str, dict[str, Any]]]:
    return [(e["probe"], {k: v for k, v in e["args"].items() if k not in drop})
            for e in events]


LAYOUT_DEPENDENT = ("r10", "r11")
"""Scratch registers holding addresses in ld.so and libc, which the ptrace
engine's XOL area (mapped at exec) moves (see test_engines_differential.py)."""


@pytest.mark.kernel
def test_recorded_values_are_the_kernel_engines(tracefs: Path, exe: Path) -> None:
    """Every register (whole and parts), `$stack`, `$stackN`, `+OFF(%sp)`,
    bitfields, immediates, `%ip`, `%cs`, `%orig_ax`, `$comm`: the ring's
    values equal the kernel engine's, and the int3 path's."""
    kernel, out_k, _ = trace("kernel", exe, "loop", "50")
    start = time.monotonic_ns()
    free, out_f, err = trace("ptrace", exe, "loop", "50")
    elapsed = time.monotonic_ns() - start
    traps, out_t, err_t = trace("ptrace", exe, "loop", "50", extra=("--no-trapfree",))
    assert NOTE_FREE.search(err).groups() == ("2", "2"), err  # type: ignore[union-attr]
    assert "trap-free" not in err_t
    assert out_k == out_f == out_t
    assert len(kernel) == 100
    assert values(free, LAYOUT_DEPENDENT) == values(kernel, LAYOUT_DEPENDENT)
    assert values(free) == values(traps)
    assert {e["comm"] for e in free} == {exe.name[:15]}  # TASK_COMM_LEN
    assert [e["ip"] for e in free] == [e["ip"] for e in kernel]
    stamps = [e["ts_ns"] for e in free]
    # in nanoseconds: the hits' span is within the traced run's (a wrong TSC scale is not)
    assert stamps == sorted(stamps) and 0 < stamps[-1] - stamps[0] < elapsed


def test_threads_and_a_fork_lose_nothing(exe: Path) -> None:
    """4 threads x 12k calls of two probes (more than a ring holds: hits wait for room), and
    a forked child sharing its parent's ring: every hit once, with its own
    tid, pid and values."""
    events, out, err = trace("ptrace", exe, "threads", "12000")
    assert NOTE_FREE.search(err), err
    work = [e for e in events if e["probe"] == "uprobes/work"]
    per_tid = Counter(e["tid"] for e in work)
    assert sorted(per_tid.values()) == [12000] * 4
    bases = {e["args"]["a"] // 1000000 for e in work}
    assert bases == {1, 2, 3, 4}
    for e in work[:1000]:
        assert e["args"]["g"] == -e["args"]["a"] and e["args"]["h"] == e["args"]["a"] << 20
    events, out, err = trace("ptrace", exe, "fork", "3000")
    work = [e for e in events if e["probe"] == "uprobes/work"]
    by_pid = Counter(e["pid"] for e in work)
    assert sorted(by_pid.values()) == [3000, 3000], by_pid
    child = [e for e in work if e["args"]["a"] >= 5000000]
    assert len(child) == 3000 and len({e["pid"] for e in child}) == 1
    assert "child " in out and "parent " in out


def test_filters_apply_to_recorded_hits(exe: Path) -> None:
    """`--if` on an argument, on the recorded path, keeps what the int3 path keeps."""
    cond = ("--if", "a > 140 && b < -20000")
    specs = (f"work {WORK_ARGS}",)
    free, _, err = trace("ptrace", exe, "loop", "100", extra=cond, specs=specs)
    traps, _, _ = trace("ptrace", exe, "loop", "100", extra=(*cond, "--no-trapfree"),
                        specs=specs)
    assert NOTE_FREE.search(err), err
    assert values(free) == values(traps)
    assert [e["args"]["a"] for e in free] == list(range(141, 200))


def test_memory_reads_keep_the_int3(exe: Path) -> None:
    """A fetcharg that dereferences a pointer cannot run in the program
    (a fault would be its crash): that probe keeps its trap, says why, and
    the others are recorded."""
    run = subprocess.run([*UPROBES, "trace", "--json", "-e", "ptrace", f"{exe}:work a=%di",
                          f"{exe}:other x=+0(%di):u64", "--", str(exe), "loop", "3"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "1 of 2 probes trap-free" in run.stderr
    assert "x: it reads memory that may fault" in run.stderr
    events = [json.loads(line) for line in run.stdout.split("\n") if line.startswith('{"pro')]
    assert Counter(e["probe"] for e in events) == {"uprobes/work": 3, "uprobes/other": 3}


def test_kill_9_of_uprobes_leaves_the_program_running(exe: Path, tmp_path: Path) -> None:
    """uprobes killed while the program fills its ring: the program waits for
    room a while (recording.WAIT_S), then drops hits and finishes with the
    same output as untraced."""
    plain = subprocess.run([str(exe), "loop", "3000000"], capture_output=True, text=True,
                           check=True, timeout=60)
    proc = subprocess.Popen([*UPROBES, "trace", "-e", "ptrace", f"{exe}:work a=%di",
                             "-o", str(tmp_path / "events"), "--", str(exe), "loop", "3000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "trap-free" in line, line
    events = tmp_path / "events"

    def written() -> bool:
        assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
        return events.exists() and events.stat().st_size >= 100000
    wait_until(written, "100 kB of events")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The program is now an orphan: wait for it by its output on the pipe.
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert out == plain.stdout


RETURNS = ("r work rv=$retval:s64 e=%r8:x64 ip=%ip", "r other rv=$retval ax=%ax:x32 r12=%r12 "
           "comm=$comm", "other a=%di")


@pytest.mark.kernel
def test_return_probes_on_rets_record_too(tracefs: Path, exe: Path) -> None:
    """A return probe on the function's rets: the jump covers the
    instructions up to the ret and the record is made right before it, with
    what a return probe sees after it ($retval, the return address as %ip):
    the kernel engine's values, and the int3 path's."""
    kernel, out_k, _ = trace("kernel", exe, "loop", "20", specs=RETURNS)
    free, out_f, err = trace("ptrace", exe, "loop", "20", specs=RETURNS)
    traps, out_t, _ = trace("ptrace", exe, "loop", "20", extra=("--no-trapfree",),
                            specs=RETURNS)
    assert NOTE_FREE.search(err).groups() == ("3", "3"), err  # type: ignore[union-attr]
    assert out_k == out_f == out_t
    assert Counter(e["probe"] for e in free) == {"uprobes/work__return": 20,
                                                 "uprobes/other__return": 20,
                                                 "uprobes/other": 20}
    assert values(free) == values(kernel) == values(traps)
    assert [(e["ip"], e.get("func")) for e in free] == [(e["ip"], e.get("func")) for e in kernel]
    assert all(e.get("func") for e in free if e["probe"].endswith("__return"))


def test_return_probes_on_rets_count_without_traps(exe: Path) -> None:
    """`count` puts a counter before the ret: exact over threads, no trap."""
    run = subprocess.run([*UPROBES, "count", "-e", "ptrace", "--json", f"r {exe}:other",
                          f"{exe}:work", "--", str(exe), "threads", "20000"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "2 of 2 probes trap-free" in run.stderr
    assert json.loads(run.stdout.split("\n")[-2]) == {"uprobes/other__return": 80000,
                                                       "uprobes/work": 80000}


def test_latency_is_the_calls_not_the_traps(exe: Path) -> None:
    """`latency -e ptrace` times entry and return in the program, stamped
    by the TSC there, with no trap and no record (tests/test_latency_inprog.py
    holds its figures against the program's own). How small the times are
    is the bench's to say (python -m bench.claims), not a test's."""
    run = subprocess.run([*UPROBES, "latency", "-e", "ptrace", "--json", f"{exe}:work", "--",
                          str(exe), "loop", "2000"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "not timed" not in run.stderr and "trap" not in run.stderr
    stats = json.loads(next(line for line in run.stdout.split("\n") if line.startswith("{")))
    work = stats["uprobes/work"]
    assert work["count"] == 2000
    assert 0 <= work["p50_ns"] <= work["max_ns"], work  # how fast: python -m bench.claims


@pytest.mark.parametrize("renderer", ["jsonl", "text"])
def test_shaped_lines_are_the_renderers_lines(renderer: str) -> None:
    """Recorded hits written from row templates (ShapedLines) give byte for
    byte the lines the renderer writes hit by hit: across changes of
    thread, CPU, probe and return address, comms with quotes, `%` and
    backslashes, signed and hex values."""
    import io

    from uprobes.engines.trapfree.reader import ShapedLines
    from uprobes.lang.types import make_type
    from uprobes.model.event import ProbeInfo
    from uprobes.render.jsonl import JsonLinesRenderer
    from uprobes.render.trace_text import TraceTextRenderer

    s64, x32 = make_type("s64", None, None), make_type("x32", None, None)
    infos = {"uprobes/f": ProbeInfo("uprobes/f", "p", (("a", s64), ("b", x32))),
             "uprobes/f__return": ProbeInfo("uprobes/f__return", "r", (("rv", s64),))}
    comms = ['plain', 'a"q%d\\x', '100%']
    hits = []
    for i in range(300):
        tid, cpu, comm = 7 + i // 50, i // 70, comms[i // 100]
        if i % 3 == 2:
            hits.append((10**9 + 1234 * i, 7, tid, cpu, "uprobes/f__return", comm,
                         0x401000 + i // 40, 0x400000, (-i,)))
        else:
            hits.append((10**9 + 1234 * i, 7, tid, cpu, "uprobes/f", comm, 0x400000, None,
                         (i - 150, 0xFFFF0000 + i)))
    cls = JsonLinesRenderer if renderer == "jsonl" else TraceTextRenderer
    direct, shaped = io.StringIO(), io.StringIO()
    cls(direct, infos).hits(hits)
    ShapedLines(cls(shaped, infos)).write(hits)  # type: ignore[arg-type]
    assert shaped.getvalue() == direct.getvalue()
    assert direct.getvalue().count("\n") == 300


@pytest.mark.kernel
def test_a_recorded_hit_makes_no_system_call(tracefs: Path, exe: Path,
                                             tmp_path: Path) -> None:
    """A command's probes go in at its exec, before the dynamic linker sets
    the thread pointer up: once the tracer has seen the tid there (RING_TLS),
    a hit reads it there instead of calling gettid (hundreds of ns in a VM).
    The kernel's syscall events of the traced program are the oracle."""
    out = tmp_path / "t.jsonl"
    run = subprocess.run([*UPROBES, "trace", "-e", "ptrace", "--json", "--kernel", "syscalls",
                          "-o", str(out), f"{exe}:work a=%di", "--", str(exe), "loop", "2000"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert NOTE_FREE.search(run.stderr), run.stderr
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    calls = Counter(d["name"] for d in docs if str(d.get("kernel")).startswith("syscall"))
    assert sum(1 for d in docs if "probe" in d) == 2000
    assert calls["gettid"] == 0 and sum(calls.values()) < 200, calls
