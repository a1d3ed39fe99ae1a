"""Trap-free counting probes (engines/trapfree/jumppatch.py): exact counts, the
moved instructions still do what they did in place, and where a jump is not
safe the probe keeps its int3 and still counts exactly."""

from __future__ import annotations

import io
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

import pytest
from conftest import Compiler, killed_after, read_fd_until
from test_kernel_trace import symbol_link_addr

from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.engines.ptrace.tracer import PtraceTracer
from uprobes.errors import EngineError
from uprobes.resolve.resolver import Resolver
from uprobes.sys.procmem import ProcessMemory

UPROBES = [sys.executable, "-m", "uprobes"]
NOTE_FREE = re.compile(r"uprobes: note: (\d+) of (\d+) probes trap-free")


@pytest.fixture(scope="module")
def threads_exe(compile_c: Compiler) -> Path:
    return compile_c("threads.c", "-pthread")


@pytest.fixture(scope="module")
def trapfree_exe(compile_c: Compiler) -> Path:
    return compile_c("trapfree.c")


def count(*argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str],
                                                                  dict[str, int]]:
    run = subprocess.run([*UPROBES, "count", "-e", "ptrace", "--json", *argv],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, **(env or {})))
    assert run.returncode == 0, run.stderr
    return run, json.loads(run.stdout.splitlines()[-1])


def test_threads_and_a_fork_count_exactly(threads_exe: Path) -> None:
    """4 threads x 100k hits and a forked child's 100k, on one counter shared
    by parent and child: exact, and no stop per hit (the note says so)."""
    run, counts = count(f"{threads_exe}:work", "--", str(threads_exe), "100000",
                        env={"TARGET_FORK": "1"})
    assert "calls work=500000" in run.stdout
    assert counts == {"uprobes/work": 500000}
    assert NOTE_FREE.search(run.stderr).groups() == ("1", "1"), run.stderr  # type: ignore[union-attr]


def test_moved_instructions_behave_and_unsafe_ones_keep_int3(trapfree_exe: Path) -> None:
    """RIP-relative load and store, a probe between a cmp and the setccs
    reading its flags (OF SF ZF PF CF), a call and a jmp as the displaced
    instruction: the program's results are unchanged and counts exact.
    loop_head, whose first bytes hold a branch target, falls back to int3
    (and counts exactly too)."""
    plain = subprocess.run([str(trapfree_exe), "1000"], capture_output=True, text=True,
                           check=True)
    exe = str(trapfree_exe)
    specs = [f"{exe}:loop_head", f"{exe}:riprel", f"{exe}:flags_mid+3", f"{exe}:call_first",
             f"{exe}:jmp_first", f"{exe}:helper"]
    run, counts = count(*specs, "--", exe, "1000")
    assert run.stdout.splitlines()[0] == plain.stdout.strip()
    expected = {"uprobes/loop_head": 1000, "uprobes/riprel": 1000, "uprobes/flags_mid": 4000,
                "uprobes/call_first": 1000, "uprobes/jmp_first": 1000, "uprobes/helper": 2000}
    assert counts == expected
    assert NOTE_FREE.search(run.stderr).groups() == ("5", "6"), run.stderr  # type: ignore[union-attr]
    assert "uprobes/loop_head: a branch targets loop_head+0x2" in run.stderr
    traps, trap_counts = count("--no-trapfree", *specs, "--", exe, "1000")
    assert trap_counts == expected and "trap-free" not in traps.stderr


def test_kill_9_of_uprobes_leaves_the_program_running(threads_exe: Path) -> None:
    """Nothing traps: with uprobes killed mid-run the program finishes with
    its output and exit status unchanged (an int3 probe would kill it)."""
    proc = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", f"{threads_exe}:work", "--",
                             "/bin/sh", "-c", f"{threads_exe} 300000; echo status=$?"],
                            env=dict(os.environ, TARGET_WAIT="1"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        notes = []
        while not (notes and NOTE_FREE.search(notes[-1])):  # placed: the jump is in
            notes.append(proc.stderr.readline())
            assert notes[-1] and len(notes) < 20, notes
        ready = proc.stdout.readline()  # the program's libraries are all loaded
        assert ready.startswith("ready ")
        pid = int(ready.split()[1])
        assert "memfd:uprobes-counters" in Path(f"/proc/{pid}/maps").read_text()
        proc.kill()
        assert proc.wait(120) == -signal.SIGKILL
        proc.stdin.write("go\n")
        proc.stdin.close()
        rest = proc.stdout.read()  # until the shell and the program are gone
    finally:
        proc.kill()
        proc.wait()
    assert rest.splitlines() == ["calls work=1200000", "status=0"]


class Held:
    """threads.c attached with -p semantics: waits for "go" before its work and
    for one more line after it (TARGET_WAIT, TARGET_HOLD), so it is alive at
    detach whatever the timing."""

    def __init__(self, exe: Path, loops: int) -> None:
        self.proc = subprocess.Popen([str(exe), str(loops)],
                                     env=dict(os.environ, TARGET_WAIT="1", TARGET_HOLD="1"),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        assert self.stdout.readline() == f"ready {self.proc.pid}\n"
        image = ElfImage.open(exe)
        work = SymbolTable.load(image).lookup("work")[0]
        offset = image.link_to_file_offset(work.link_addr)
        self.original = image.read_file(offset, 8)
        base = next(int(ln.split("-")[0], 16) for ln in
                    Path(f"/proc/{self.proc.pid}/maps").read_text().splitlines()
                    if ln.endswith(str(exe)) and " 00000000 " in ln)
        self.work_addr = base + offset
        self.probes = Resolver(pid=self.proc.pid).resolve_all(parse_specs([f"{exe}:work"]))

    def send(self, line: str) -> None:
        self.stdin.write(line + "\n")
        self.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_attached_counts_exactly_and_detach_puts_the_bytes_back(threads_exe: Path) -> None:
    held = Held(threads_exe, 100000)
    try:
        with ProcessMemory(held.proc.pid) as mem:
            with PtraceTracer(held.probes, pid=held.proc.pid, trapfree=True) as tracer:
                assert mem.read(held.work_addr, 1) == b"\xe9"  # the jump, every thread stopped
                with pytest.raises(EngineError, match="only counts"):
                    tracer.run(lambda ev: None, duration=0.1)
                held.send("go")
                assert held.stdout.readline() == "calls work=400000\n"  # the work is done
                tracer.run(None, duration=0.01)
                assert tracer.counts == {"uprobes/work": 400000}
            assert mem.read(held.work_addr, 8) == held.original
        held.send("end")
        assert held.proc.wait(60) == 0
    finally:
        held.close()


def test_detach_while_threads_run_through_the_jump(threads_exe: Path) -> None:
    """Detached once hits came in, mid-run (or after: the program decides): the
    bytes are back, the count is of hits made, and the program's own check of
    work()'s values passes."""
    held = Held(threads_exe, 3000000)
    try:
        with ProcessMemory(held.proc.pid) as mem:
            with PtraceTracer(held.probes, pid=held.proc.pid, trapfree=True) as tracer:
                held.send("go")
                deadline = time.monotonic() + 60
                while not tracer.counts.get("uprobes/work"):
                    assert time.monotonic() < deadline, "no hit in 60 s"
                    tracer.run(None, duration=0.05)
            assert mem.read(held.work_addr, 8) == held.original
            assert 0 < tracer.counts["uprobes/work"] <= 12000000
        assert held.stdout.readline() == "calls work=12000000\n"
        held.send("end")
        assert held.proc.wait(60) == 0
    finally:
        held.close()


def test_live_counts_see_the_jumps_before_a_fold(threads_exe: Path) -> None:
    """`counts` take what the jumps counted when `count` returns (a fold);
    `live_counts()` gives it as it stands and changes nothing: an
    exporter's view, read while another thread drives the tracer."""
    held = Held(threads_exe, 100000)
    try:
        with PtraceTracer(held.probes, pid=held.proc.pid, trapfree=True) as tracer:
            held.send("go")
            assert held.stdout.readline() == "calls work=400000\n"  # run with no count()
            assert tracer.counts == {"uprobes/work": 0}
            assert tracer.live_counts() == tracer.live_counts() == {"uprobes/work": 400000}
            assert tracer.counts == {"uprobes/work": 0}
            tracer.count(0.01)
            assert tracer.counts == tracer.live_counts() == {"uprobes/work": 400000}
        held.send("end")
        assert held.proc.wait(60) == 0
    finally:
        held.close()


def test_live_counts_in_another_thread_only_grow(compile_c: Compiler) -> None:
    """A reader thread takes `live_counts()` without pause while the tracer
    counts in short slices, folding the jumps' counts into `counts` at the
    end of each, and threads come and go (timed.c: rounds of 20 waves of 4
    threads of 500 calls): no read is below the one before (a fold is never
    seen half done), none passes the calls made, and the last read is the
    program's own count."""
    exe = compile_c("timed.c", "-pthread")
    proc = subprocess.Popen([str(exe), "rounds", "500", "4", "20"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    seen: list[tuple[int, int]] = []  # a read, and the most calls made by then
    made = [0]
    done = threading.Event()
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == f"ready {proc.pid}\n"
        probes = Resolver(pid=proc.pid).resolve_all(parse_specs([f"{exe}:tiny"]))
        with killed_after(proc, 240), \
                PtraceTracer(probes, pid=proc.pid, trapfree=True) as tracer:

            def read() -> None:
                # (a pause between reads: a reader spinning on the GIL starved
                # the tracer under a loaded CI run past the program's bound)
                while not done.wait(0.0005):
                    seen.append((tracer.live_counts()["uprobes/tiny"], made[0] + 40000))

            reader = threading.Thread(target=read, name="reader")
            reader.start()
            try:
                deadline = time.monotonic() + 200
                for round_ in range(4):
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                    while not select.select([proc.stdout], [], [], 0)[0]:
                        assert time.monotonic() < deadline, "the round did not end"
                        tracer.count(0.005)
                    line = proc.stdout.readline()
                    assert line.startswith("calls="), (line, proc.poll())
                    made[0] = int(line.removeprefix("calls="))
                    # The reader's share of the run, made sure of: a loaded
                    # machine may give it few turns in a round. The tracer
                    # counts (and folds) on meanwhile, as the reads race.
                    while len(seen) <= 26 * (round_ + 1) and reader.is_alive():
                        assert time.monotonic() < deadline, f"{len(seen)} reads in 200 s"
                        tracer.count(0.005)
                proc.stdin.close()
                while not tracer.target_exited:
                    assert time.monotonic() < deadline, "the program did not end"
                    tracer.count(0.05)
            finally:
                done.set()
                reader.join(60)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert made[0] == 4 * 20 * 4 * 500
    assert tracer.counts == tracer.live_counts() == {"uprobes/tiny": made[0]}
    reads = [n for n, _ in seen]
    assert len(reads) > 100 and reads == sorted(reads)
    assert all(n <= most for n, most in seen)


CYCLES = 8


def test_attach_detach_cycles_while_threads_are_born(compile_c: Compiler,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A program whose main thread creates and joins threads without pause is
    often inside clone when detach stops it; detach then injects a call
    through it (orphan.py gives SIGTRAP its action back). Attached and
    detached again and again, by recording (`trace`) and counting (`count`)
    jumps: it runs on, and its own arithmetic and exit status are right."""
    exe = compile_c("thread_churn.c", "-pthread")
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == f"ready {proc.pid}\n"
        pid = str(proc.pid)
        for cycle in range(CYCLES):
            if cycle % 2:
                argv = ["count", "-e", "ptrace", "-p", pid, f"{exe}:work"]
            else:
                argv = ["trace", "-e", "ptrace", "-o", os.devnull, "-p", pid,
                        f"{exe}:work a=%di"]
            status = main([*argv, "--duration", "0.3"], out=io.StringIO())
            err = capsys.readouterr().err
            assert status == 0 and "1 of 1 probes trap-free" in err, err
            assert proc.poll() is None, f"cycle {cycle}: the program died ({proc.returncode})"
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        out = proc.stdout.read()
        assert proc.wait(60) == 0, out  # every thread made once, each counted once
        assert re.fullmatch(r"rounds=\d+ calls work=\d+\n", out), out
    finally:
        proc.kill()
        proc.wait()


def test_exec_and_vfork_children_count_exactly(target: Path) -> None:
    """A shell that forks one run and execs another, and python spawning three
    (vfork): each image gets its jumps; the counts of images gone stay."""
    t = str(target)
    run, counts = count(f"{t}:add", f"{t}:fib", "--", "/bin/sh", "-c",
                        f"{t} 4 >/dev/null; exec {t} 6 >/dev/null")
    assert counts == {"uprobes/add": 10, "uprobes/fib": 30}
    assert NOTE_FREE.search(run.stderr).groups() == ("2", "2"), run.stderr  # type: ignore[union-attr]
    spawn = (f"import subprocess; [subprocess.run(['{t}', '3'], stdout=subprocess.DEVNULL) "
             "for _ in range(3)]")
    _, counts = count(f"{t}:add", "--", "/usr/bin/python3.11", "-c", spawn)
    assert counts == {"uprobes/add": 9}


def test_library_loaded_while_a_thread_runs(compile_c: Compiler) -> None:
    """dlopen while a second thread spins through a trap-free probe: every
    thread is stopped for the jump into the library, then resumed."""
    lib = compile_c("ptrace_plugin.c", "-shared", "-fPIC", name="libtrapfree_plugin.so")
    exe = compile_c("ptrace_dlopen.c", "-pthread", "-ldl")
    # On one CPU (as on a loaded machine) a new thread often does not run at all
    # before main is done; the program's handshake makes sure it does.
    run, counts = count(f"{lib}:plugin_work", f"{exe}:spin_work", "--", "taskset", "-c", "0",
                        str(exe), str(lib), "20000", env={"DLOPEN_SPIN": "1"})
    m = re.search(r"calls plugin=20000 total=399980000 spins=(\d+)\n", run.stdout)
    assert m, run.stdout
    # the thread's calls, as it counted them (the program makes sure it ran meanwhile)
    assert counts == {"uprobes/plugin_work": 20000, "uprobes/spin_work": int(m.group(1))}
    notes = [m.groups() for m in NOTE_FREE.finditer(run.stderr)]
    assert notes == [("1", "1"), ("1", "1")], run.stderr  # the program's probe, the library's


def test_a_signal_handler_interrupted_inside_the_bytes_keeps_its_int3(compile_c: Compiler) -> None:
    """A thread whose signal handler runs while the jump would go in, and
    whose interrupted instruction lies inside the bytes (the frame's saved
    rip, poke_fault, is poke_at+2): the probe keeps its int3 and says why,
    and the handler returns to the original code (with the jump it would
    return into the middle of the jump and fault again)."""
    exe = compile_c("sigframe.c")
    offset = symbol_link_addr(exe, "poke_at") - symbol_link_addr(exe, "poke")
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    tracer = None
    try:
        assert proc.stdout.readline() == "in handler\n"
        tracer = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", "--json", "-p",
                                   str(proc.pid), f"{exe}:poke+{offset:#x}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        notes = read_fd_until(tracer.stderr.fileno(), "counting")
        assert "counting" in notes, notes
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.read() == "done 168 handled 1\n"
        assert proc.wait(timeout=60) == 0
        out, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 0, err
        assert json.loads(out.split("\n")[-2]) == {"uprobes/poke": 3}
        assert "a signal handler of thread" in notes, notes
    finally:
        proc.kill()
        if tracer is not None:
            tracer.kill()
            tracer.wait()
        proc.wait()


@pytest.mark.parametrize("how", ["vfork", "fork", "clone"])
def test_a_childs_recorded_hits_are_its_own(compile_c: Compiler, how: str) -> None:
    """child_hits.c: a child that reads its parent's tid where glibc caches
    it (a vfork child runs on its parent's thread pointer; one made by the
    fork or clone system call has a copy of it, never updated) calls
    target() 3 times between the parent's 2 and 2. `trace` gives each hit
    to the process that made it, as the program's own getpid says (before:
    all 7 to the parent)."""
    exe = compile_c("child_hits.c")
    run = subprocess.run([*UPROBES, "trace", "-e", "ptrace", "--json", f"{exe}:target", "--",
                          str(exe), how], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert NOTE_FREE.search(run.stderr).groups() == ("1", "1"), run.stderr  # type: ignore[union-attr]
    said = re.search(r"parent (\d+) child (\d+)", run.stdout)
    assert said is not None, run.stdout
    parent, child = int(said[1]), int(said[2])
    hits = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"probe"')]
    assert [(h["pid"], h["tid"]) for h in hits] == \
        [(parent, parent)] * 2 + [(child, child)] * 3 + [(parent, parent)] * 2, hits
