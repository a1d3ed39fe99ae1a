"""Stacks with no stop per hit (engines/trapfree/recording.py, `copy`): on
`-e ptrace`, `stacks` and `trace --stack` record each hit's registers and a
copy of its stack into the ring, by the jump's code. The int3 path is the
oracle: the same program gives the same stacks, counted the same; and the
program's output is its own, also when uprobes is killed mid-run."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import Compiler, wait_until
from gdb_support import gdb_batch

from uprobes.engines.trapfree.layout import HEAD, LOST

UPROBES = [sys.executable, "-m", "uprobes"]
TRAPFREE = re.compile(r"uprobes: note: (\d+) of (\d+) probes trap-free")
PYTHON = "/usr/bin/python3.11"
GETPIDS = """
import os, sys
def leaf(n):
    for _ in range(n):
        os.getpid()
def mid(n):
    leaf(n)
mid(int(sys.argv[1]))
print("done")
"""


@pytest.fixture(scope="module")
def callers(compile_c: Compiler) -> Path:
    return compile_c("callers.c", "-O2", "-fomit-frame-pointer")


@pytest.fixture(scope="module")
def recording(compile_c: Compiler) -> Path:
    return compile_c("recording.c", "-pthread")


def stacks(*argv: str, status: int = 0) -> tuple[Counter[str], str, str]:
    """`uprobes stacks --folded -e ptrace ARGV`: (the folded stacks, the
    program's output, uprobes' stderr)."""
    run = subprocess.run([*UPROBES, "stacks", "--folded", "-e", "ptrace", *argv],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == status, run.stderr
    # The folded lines follow the program's own output on the same stdout.
    folded: Counter[str] = Counter()
    own = []
    for line in run.stdout.splitlines():
        path, _, count = line.rpartition(" ")
        if ";" in path and count.isdigit():
            folded[path] += int(count)
        else:
            own.append(line)
    return folded, "\n".join(own), run.stderr


def trapfree(stderr: str) -> tuple[int, int]:
    found = TRAPFREE.search(stderr)
    return (0, 0) if found is None else (int(found[1]), int(found[2]))


def test_recorded_stacks_are_the_int3_stacks(callers: Path) -> None:
    free, out, err = stacks(f"{callers}:hot", "--", str(callers), status=7)
    assert trapfree(err) == (1, 1), err
    int3, out3, err3 = stacks("--no-trapfree", f"{callers}:hot", "--", str(callers), status=7)
    assert "trap-free" not in err3
    assert out == out3 == "sink 36"
    assert free == int3
    assert sorted(free.values()) == [3, 5]
    assert all(";main;" in p and p.split(";")[1] == "_start" for p in free)


def test_one_place_two_paths(compile_c: Compiler) -> None:
    """Hits at one ip and stack pointer by two paths: a walk remembered for
    one (the reader's memo) does not stand for the other."""
    exe = compile_c("same_sp.c", "-O2", "-fomit-frame-pointer")
    free, out, err = stacks(f"{exe}:hot", "--", str(exe))
    assert trapfree(err) == (1, 1), err
    tails = {p.rsplit(";main;", 1)[1]: n for p, n in free.items()}
    assert tails == {"left;hot": 3, "right;hot": 5}


@pytest.mark.parametrize("mode", ["threads", "fork"])
def test_threads_and_forks_record_their_own_stacks(recording: Path, mode: str) -> None:
    """Threads (their stacks are not the main one's) and a forked child (its
    own pid, the same ring): every call counted, on the int3 path's stacks."""
    argv = ("--", str(recording), mode, "300")
    free, out, err = stacks(f"{recording}:work", *argv)
    assert trapfree(err) == (1, 1), err
    int3, out3, _ = stacks("--no-trapfree", f"{recording}:work", *argv)
    assert out == out3
    assert free == int3
    assert sum(free.values()) == (1200 if mode == "threads" else 600)
    if mode == "threads":
        assert all(";thread_main;run;work" in p for p in free)


def test_python_native_stacks_without_stops(tmp_path: Path) -> None:
    """A Python program's native stacks (the interpreter's C frames), every
    call counted; `--python` still reads the Python frames at an int3."""
    if not os.path.exists(PYTHON):
        pytest.skip(f"{PYTHON} is not installed")
    script = tmp_path / "getpids.py"
    script.write_text(GETPIDS)
    argv = ("libc:getpid", "--", PYTHON, str(script), "500")
    free, out, err = stacks(*argv)
    assert trapfree(err) == (1, 1), err
    int3, out3, _ = stacks("--no-trapfree", *argv)
    assert out == out3 == "done"
    assert free == int3
    ((path, n),) = free.items()
    assert n == 500 and "_PyEval_EvalFrameDefault" in path and path.endswith("getpid")
    py, out_py, err_py = stacks("--python", *argv)
    assert trapfree(err_py)[0] == 0 and out_py == "done"
    ((path, n),) = py.items()
    assert n == 500 and "mid (getpids.py:7);leaf (getpids.py:5);" in path


def test_a_copy_bigger_than_a_record_keeps_the_int3(callers: Path) -> None:
    free, out, err = stacks("--stack-bytes", "32768", f"{callers}:hot", "--", str(callers),
                            status=7)
    assert trapfree(err)[0] == 0
    assert sorted(free.values()) == [3, 5] and out == "sink 36"
    # No jump: the note says why, and says of no jump what it would be (it
    # called the stack probe "a jump to an in-process counter").
    assert "0 of 1 probes trap-free; with an int3 trap per hit" in err, err
    assert "counter" not in err, err


def recorded(parent: int, word: int = HEAD) -> int:
    """The hits recorded so far by the program uprobes (`parent`) runs: its
    ring's `head` (layout.HEAD; or another `word` of its ring), 0 before
    there is one."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return 0
    for child in children:  # (the program, and uprobes' own helpers)
        try:
            maps = Path(f"/proc/{child}/maps").read_text().splitlines()
            start = next((int(m.split("-")[0], 16) for m in maps if "uprobes-counters" in m
                          and m.split()[1].startswith("rw")), None)
            if start is None:
                continue
            with open(f"/proc/{child}/mem", "rb") as mem:
                mem.seek(start + word)
                return int.from_bytes(mem.read(8), "little")
        except OSError:
            continue
    return 0


def test_kill_9_of_uprobes_leaves_the_program_running(recording: Path) -> None:
    """uprobes killed while the program records stacks: its hits wait for room
    a while, then are dropped, and the program ends as it does untraced."""
    plain = subprocess.run([str(recording), "loop", "1000000"], capture_output=True, text=True,
                           check=True, timeout=120)
    proc = subprocess.Popen([*UPROBES, "stacks", "-e", "ptrace", f"{recording}:work", "--",
                             str(recording), "loop", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    try:
        line = proc.stderr.readline()
        assert "trap-free" in line, line
        wait_until(lambda: recorded(proc.pid) >= 1000, "1000 hits recorded")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The program is now an orphan: wait for it by its output on the pipe.
    assert proc.stdout.read() == plain.stdout


def test_a_raw_fork_childs_stack_is_its_own(compile_c: Compiler) -> None:
    """rawfork_stacks.c: a child of syscall(SYS_fork), where glibc's cached
    tid is still the parent's, hits target() while the parent waits at the
    same depth. The copy is of the child's own stack (the process asked of
    the kernel at the hit), as the int3 path reads it (before: the parent's
    frames, copied from the parent's memory at the child's stack pointer)."""
    exe = compile_c("rawfork_stacks.c", "-O2")
    free, _, _ = stacks(f"{exe}:target", "--", str(exe))
    int3s, _, _ = stacks("--no-trapfree", f"{exe}:target", "--", str(exe))
    assert free == int3s, (free, int3s)
    assert sum(free.values()) == 5 and all(";child_b;child_a;target" in p for p in free), free


def test_a_raw_clone_childs_own_stack_is_copied(compile_c: Compiler) -> None:
    """rawclone_stacks.c: a fork-like child of glibc's clone(fn, stack,
    SIGCHLD) runs on a stack the parent mmap'd, which is in none of the
    ranges of the table it copied. Its stack goes in the table at the fork
    event (the call's stack argument), so its five hits copy their frames,
    the same as the int3 path reads them and as gdb (following the child)
    walks them: clone, child_main, child_b, child_a, target (before: the
    probed function alone, nothing copied)."""
    exe = compile_c("rawclone_stacks.c", "-O2")
    free, out, _ = stacks(f"{exe}:target", "--", str(exe))
    int3s, _, _ = stacks("--no-trapfree", f"{exe}:target", "--", str(exe))
    assert out.splitlines() == ["child 71", "parent 15"], out
    assert free == int3s, (free, int3s)
    child = [p for p in free if ";child_main;" in p]
    assert len(child) == 1 and free[child[0]] == 5, free
    frames = gdb_batch(exe, ["set follow-fork-mode child", "break target", "run", "bt"])
    walked = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+) \(", frames, re.M)
    ours = child[0].split(";")[1:]  # (after the comm)
    assert walked[-1] in ("clone", "__clone") and ours[0] in ("clone", "__clone"), frames
    assert ours[1:] == list(reversed(walked[:-1])), (child, frames)


def test_more_threads_than_the_stack_table_holds(tracefs: Path, compile_c: Compiler) -> None:
    """The table of stacks holds 64 (trapfree/stackbounds.py): with 80 threads
    alive at once, the main thread and 63 others copy their stacks, the
    other 17 copy none (a hit with its probed function alone), and one note
    says so; every hit is counted and the program's output is its own."""
    exe = compile_c("many_threads.c", "-O2", "-pthread")
    run = subprocess.run([*UPROBES, "stacks", "--folded", "-e", "ptrace", f"{exe}:target",
                          "--", str(exe), "80"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("has more than 64 threads: the trap-free stack copies") == 1, \
        run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "calls target=80"
    # Each folded line: the comm (15 bytes of the name), frames, count.
    counts = {line.rpartition(" ")[0].partition(";")[2]: int(line.rpartition(" ")[2])
              for line in lines[1:]}
    assert counts == {"clone3;start_thread;worker;outer;target": 63, "target": 17}, run.stdout


def test_stacks_recorded_before_an_exec_keep_their_frames(compile_c: Compiler) -> None:
    """timed.c execs: three threads call tiny() 3000 times each, then the
    program execs itself for 3000 more. The records still in the ring at
    the exec are walked by the old image's maps, read before (before: by
    the new image's, which map nothing there: `timed;[unknown]`)."""
    exe = compile_c("timed.c", "-pthread", "-O2")
    free, out, err = stacks(f"{exe}:tiny", "--", str(exe), "execs", "3000", "2", "0")
    assert "before_exec=9000" in out and "calls=3000" in out, out
    assert trapfree(err) == (1, 1), err
    assert sum(free.values()) == 12000, free
    assert all(path.endswith(";tiny") and "[unknown]" not in path for path in free), free


def test_records_lost_while_uprobes_stood_still_are_said(recording: Path,
                                                         tmp_path: Path) -> None:
    """uprobes stopped (SIGSTOP) while recording.c calls work() in a loop:
    the ring fills, its hits wait WAIT_S, then are dropped. At the end the note
    says how many stacks that lost, with advice for this engine (it named
    --ring-pages, the kernel engine's perf rings)."""
    said = tmp_path / "stderr"
    with open(said, "w") as err_file:  # (the program, left running, keeps a pipe open)
        proc = subprocess.Popen([*UPROBES, "stacks", "--folded", "-e", "ptrace",
                                 f"{recording}:work", "--", str(recording), "loop",
                                 "1000000000"],
                                stdout=subprocess.DEVNULL, stderr=err_file)
    program = 0
    try:
        wait_until(lambda: recorded(proc.pid) > 0, "the first hits recorded")
        program = next(int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                       .read_text().split()
                       if "uprobes-counters" in Path(f"/proc/{c}/maps").read_text())
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: recorded(proc.pid, LOST) > 0, "hits dropped (after WAIT_S)")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, signal.SIGINT)  # as Ctrl-C: the program gets it too
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
        if program:
            with contextlib.suppress(ProcessLookupError):
                os.kill(program, signal.SIGKILL)
    err = said.read_text()
    lost = re.search(r"uprobes: (\d+) records lost \(their stacks are not counted\); (.*)", err)
    assert lost is not None and int(lost[1]) > 0, err
    assert lost[2] == "a smaller --stack-bytes loses fewer", err


@pytest.mark.parametrize("mode", ["setstack", "guard0"])
def test_a_freed_neighbour_of_a_threads_stack_is_not_copied(compile_c: Compiler,
                                                            mode: str) -> None:
    """stack_neighbours.c: a thread's stack mapping, merged by the kernel with
    a neighbour (another pthread_attr_setstack stack; glibc's stacks without
    a guard page) that is unmapped while the thread lives. The copy ends at
    the thread's own top, from its clone (before: at the mapping's end, in
    the freed pages: the program died of SIGSEGV)."""
    exe = compile_c("stack_neighbours.c", "-O1", "-pthread")
    free, out, err = stacks(f"{exe}:probed", "--", str(exe), mode)
    assert trapfree(err) == (1, 1), err
    int3, out3, _ = stacks("--no-trapfree", f"{exe}:probed", "--", str(exe), mode)
    assert out == out3
    if mode == "setstack":
        assert out == "adjacent=1\nsum=504450"  # side by side: one mapping
    assert free == int3
    assert sum(n for p, n in free.items() if p.endswith(";start_thread;second;probed")) == 1000


def test_a_freed_neighbour_of_a_threads_stack_is_not_copied_with_p(compile_c: Compiler,
                                                                   tmp_path: Path) -> None:
    """The same with -p: both threads exist when the probe is placed, and the
    range of each ends at its thread pointer (glibc's thread block, at the
    top of its stack), not at the merged mapping's end."""
    exe = compile_c("stack_neighbours.c", "-O1", "-pthread", "-no-pie")
    nm = subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True).stdout
    probed = int(next(ln.split()[0] for ln in nm.splitlines() if ln.endswith(" probed")), 16)
    go = tmp_path / "go"
    prog = subprocess.Popen([str(exe), "attach", str(go)], stdout=subprocess.PIPE, text=True)
    try:
        assert prog.stdout is not None
        assert prog.stdout.readline() == "adjacent=1\n"
        assert prog.stdout.readline() == "ready\n"
        up = subprocess.Popen([*UPROBES, "stacks", "--folded", "-e", "ptrace", "-p",
                               str(prog.pid), f"{exe}:probed"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        with open(f"/proc/{prog.pid}/mem", "rb", buffering=0) as mem:
            def placed() -> bool:
                mem.seek(probed)
                return mem.read(1) == b"\xe9"
            wait_until(placed, "the probe's jump")
        go.touch()
        assert prog.wait(timeout=120) == 0
        assert prog.stdout.read() == "sum=504450\n"
        out, err = up.communicate(timeout=120)
    finally:
        prog.kill()
        prog.wait()
    assert up.returncode == 0, err
    assert trapfree(err) == (1, 1), err
    folded = {ln.rpartition(" ")[0]: int(ln.rpartition(" ")[2]) for ln in out.splitlines()}
    assert folded == {f"{exe.name[:15]};clone3;start_thread;{fn};probed": n
                      for fn, n in (("first", 100), ("second", 1000))}, out
