"""Faults, continued: kill -9 of the ptrace engine mid-run (the int3s it
leaves behind are sent to their slots by the in-tracee SIGTRAP handler and
written back by the reaper), and the program's own SIGTRAP disposition kept
through a run. Split from test_faults.py so each file runs in well under 30 s."""
from __future__ import annotations

import ctypes
import os
import re
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Compiler

from uprobes.engines.ptrace import rettable
from uprobes.sys import procfs
from uprobes.sys.procmem import ProcessMemory

UPROBES = [sys.executable, "-m", "uprobes"]


# ---------------------------------------------------------------- kill -9 of the ptrace engine
# Its int3s stay in the tracees' text when it dies: the in-tracee SIGTRAP
# handler sends them to their slots, and the reaper writes the original bytes
# back (engines/ptrace/orphan.py). The fixture's worker calls the probed
# functions without pause, checking every result; "go N" returns once it has
# made N more rounds, so a transcript does not depend on timing.

ORPHAN_PROBES = {
    "entry": ["f_mov"],                          # boosted: runs from its slot
    "emulated": ["f_call", "f_jmp", "f_push"],   # the tracer emulates them
    "return": ["r f_ret"],                       # on the function's ret (emulated)
    "trampoline": ["--uretprobe", "r f_ret"],    # the return address hijacked
    "all": ["f_mov", "f_call", "f_jmp", "f_push", "r f_ret"],
}
_UNTRACED = b"done\ndone\nerrors=0\n"


@pytest.fixture(scope="module")
def orphan_exe(compile_c: Compiler) -> Path:
    return compile_c("orphan.c", "-pthread")


def _read_line(fd: int, timeout: float = 60.0) -> bytes:
    """One line from `fd`, waiting for it (a generous timeout, no sleeps)."""
    got = b""
    deadline = time.monotonic() + timeout
    while not got.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], \
            f"no line came (so far {got!r})"
        byte = os.read(fd, 1)
        assert byte, f"closed before a line (so far {got!r})"
        got += byte
    return got


class _Driven:
    """The fixture's stdin and stdout, one command and its answer at a time."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc, self.out, self.transcript = proc, proc.stdout.fileno(), b""

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def line(self) -> bytes:
        got = _read_line(self.out)
        self.transcript += got
        return got

    def ask(self, command: str) -> bytes:
        self.send(command)
        return self.line()


def _subreaper(on: bool) -> None:
    """Orphans of our children (the command, once uprobes is killed) become ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, int(on), 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def _waitpid(pid: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not end")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _probe_bytes(exe: Path, specs: list[str], pid: int) -> dict[int, int]:
    """Run-time address -> original byte of every int3 those specs place in `pid`."""
    done = subprocess.run([*UPROBES, "resolve", *specs], capture_output=True, text=True,
                          timeout=60, check=True)
    offsets = [int(ln.split()[1].rsplit(":", 1)[1], 16) for ln in done.stdout.splitlines()]
    assert offsets, done.stdout
    data = exe.read_bytes()
    text = [m for m in procfs.maps(pid) if m.path == str(exe) and m.executable]
    return {next(m for m in text if m.contains_file_offset(off)).file_to_runtime_addr(off):
            data[off] for off in offsets}


def _memory(pid: int, addrs: dict[int, int]) -> dict[int, int]:
    with ProcessMemory(pid) as mem:
        return {a: mem.read(a, 1)[0] for a in addrs}


@pytest.mark.parametrize("probes, kill_reaper", [
    ("entry", False), ("emulated", False), ("return", False), ("trampoline", False),
    ("all", True)], ids=["entry", "emulated", "return", "trampoline", "handler-alone"])
def test_sigkill_of_the_ptrace_engine_mid_run(probes: str, kill_reaper: bool, tracefs: Path,
                                              orphan_exe: Path) -> None:
    """SIGKILL to uprobes while its probes are hot: the command runs on unharmed
    (its transcript and status are the untraced run's); the reaper puts every
    original byte back, and with the reaper killed too the handler alone
    carries the command through its orphaned int3s."""
    specs = [f"{s.rsplit(' ', 1)[0]} {orphan_exe}:{s.split()[-1]}" if " " in s
             else s if s.startswith("--") else f"{orphan_exe}:{s}"
             for s in ORPHAN_PROBES[probes]]
    _subreaper(True)
    try:
        run = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", "--no-trapfree", "-o",
                                os.devnull, *specs, "--", str(orphan_exe)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        target = _Driven(run)
        assert target.ask("go 300") == b"done\n"  # probes placed and hit
        kids = _children(run.pid)
        command = next(k for k in kids if procfs.exe(k) == str(orphan_exe))
        reapers = [k for k in kids if b"uprobes.engines.ptrace.orphan"
                   in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert len(reapers) == 1, "no reaper"
        original = _probe_bytes(orphan_exe, specs, command)
        assert set(_memory(command, original).values()) == {0xCC}
        if kill_reaper:
            os.kill(reapers[0], signal.SIGKILL)
        run.kill()  # mid-run: the worker is calling the probed functions
        run.wait()
        assert target.ask("go 3000") == b"done\n"  # on through the orphaned probes
        deadline = time.monotonic() + 60
        while not kill_reaper and _memory(command, original) != original:
            assert time.monotonic() < deadline, "the reaper did not restore the code"
            time.sleep(0.01)
        if kill_reaper:
            assert set(_memory(command, original).values()) == {0xCC}  # the handler's work
        target.send("quit")
        target.line()
        assert run.stderr is not None
        assert _waitpid(command) == 0, run.stderr.read().decode()
        assert target.transcript == _UNTRACED
        try:
            _waitpid(reapers[0])  # it exits once done (then it is ours: a subreaper's)
        except ChildProcessError:
            assert kill_reaper  # killed early, it was uprobes' to reap (waitpid(-1))
    finally:
        _subreaper(False)


def test_untraced_transcript(orphan_exe: Path) -> None:
    """What the traced runs above are compared with."""
    proc = subprocess.Popen([str(orphan_exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    target = _Driven(proc)
    target.ask("go 300")
    target.ask("go 3000")
    target.ask("quit")
    assert proc.wait(timeout=60) == 0
    assert target.transcript == _UNTRACED


def _raise_sigtrap(argv: list[str], cwd: Path) -> tuple[int, bytes, list[str]]:
    """Run the fixture (under `argv`), make it raise(SIGTRAP): status, output, core files."""
    def core_limit() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, preexec_fn=core_limit)
    target = _Driven(proc)
    target.ask("go 100")
    if argv[0] != str(argv[-1]):  # traced: our handler is installed
        command = next(k for k in _children(proc.pid) if procfs.exe(k) == argv[-1])
        sigcgt = next(ln for ln in Path(f"/proc/{command}/status").read_text().splitlines()
                      if ln.startswith("SigCgt:"))
        assert int(sigcgt.split()[1], 16) & (1 << (signal.SIGTRAP - 1)), sigcgt
    target.send("trap")
    assert proc.stdout is not None
    rest = proc.stdout.read()
    status = proc.wait(timeout=60)
    return status, target.transcript + rest, sorted(p.name for p in cwd.iterdir()
                                                    if p.name.startswith("core"))


def test_traced_raise_sigtrap_is_the_default_action(tracefs: Path, orphan_exe: Path,
                                                    tmp_path: Path) -> None:
    """The program's own SIGTRAP goes through our handler while traced (the
    tracer passes it on): SIG_DFL and the same signal again, so it dies of
    SIGTRAP with a core, as untraced."""
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    (tmp_path / "plain").mkdir()
    (tmp_path / "traced").mkdir()
    plain = _raise_sigtrap([str(orphan_exe)], tmp_path / "plain")
    traced = _raise_sigtrap([*UPROBES, "trace", "-e", "ptrace", "-o", os.devnull,
                             f"{orphan_exe}:f_mov", "--", str(orphan_exe)], tmp_path / "traced")
    assert plain[0] == -signal.SIGTRAP
    assert traced[0] == 128 + signal.SIGTRAP  # uprobes exits with its command's status
    assert traced[1] == plain[1] == b"done\n"  # no "survived SIGTRAP"
    if not pattern.startswith("|"):
        assert plain[2] and len(traced[2]) == len(plain[2])  # a core dump, both times



def test_a_program_with_its_own_sigtrap_handler_keeps_it(tracefs: Path, orphan_exe: Path,
                                                         tmp_path: Path) -> None:
    """The program's own SIGTRAP handler gets its raise(SIGTRAP), traced or
    not: launched, its sigaction replaces ours; attached to (-p) when it
    already has one, we install none, and one note says so."""
    env = {**os.environ, "ORPHAN_OWN_HANDLER": "1"}
    expected = b"done\ncaught\nsurvived SIGTRAP\nerrors=0\n"
    for how in ("untraced", "launched", "attached"):
        argv = [str(orphan_exe)]
        if how == "launched":
            argv = [*UPROBES, "trace", "-e", "ptrace", "-o", os.devnull,
                    f"{orphan_exe}:f_mov", "--", str(orphan_exe)]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        target = _Driven(proc)
        target.ask("go 100")  # its handler is in place
        tracer = None
        if how == "attached":
            tracer = subprocess.Popen([*UPROBES, "trace", "-e", "ptrace", "-o", os.devnull,
                                       "-p", str(proc.pid), f"{orphan_exe}:f_mov"],
                                      stderr=subprocess.PIPE)
            assert tracer.stderr is not None
            note = _read_line(tracer.stderr.fileno())
            assert b"catches SIGTRAP itself" in note, note
        target.ask("trap")
        target.line()
        target.ask("quit")
        assert proc.wait(timeout=60) == 0
        assert target.transcript == expected, how
        if tracer is not None:
            tracer.wait(timeout=60)


def _catches_sigtrap(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return bool(caught & 1 << (signal.SIGTRAP - 1))


def test_a_clean_detach_gives_sigtrap_its_default_action_back(running_process: object) -> None:
    """The kill -9 handler is ours only while we trace: after a clean detach
    the process's SIGTRAP disposition is SIG_DFL again, as before."""
    import uprobes
    proc = running_process
    pid = proc.pid  # type: ignore[attr-defined]
    assert not _catches_sigtrap(pid)
    during: list[bool] = []
    s = uprobes.Session("ptrace")
    s.probe("libc:getppid", lambda ev: None)
    s.attach(pid, duration=0.3, ready=lambda: during.append(_catches_sigtrap(pid)))
    assert during == [True]  # installed while traced
    assert not _catches_sigtrap(pid)
    proc.stdin.write("still here\n")  # type: ignore[attr-defined]
    proc.stdin.close()  # type: ignore[attr-defined]
    assert proc.wait(timeout=120) == 0  # type: ignore[attr-defined]


# ---------------------------------------------------------------- kill -9, returns pending
# With --uretprobe the return address of every active probed frame is the
# trampoline's; the real ones are mirrored in the process's return table
# (engines/ptrace/rettable.py), where the in-tracee handler finds them once
# uprobes is gone. The fixture's threads wait at the bottom of recursions
# through the probed `level` (one after a longjmp out of probed frames, and a
# forked child on the same stack) while uprobes is killed.

@pytest.fixture(scope="module")
def orphan_returns_exe(compile_c: Compiler) -> Path:
    return compile_c("orphan_returns.c", "-pthread")


def _returns_transcript(proc: subprocess.Popen[bytes], before_go: Callable[[], None]) -> bytes:
    """Drive the fixture to its end: its whole output."""
    target = _Driven(proc)
    assert target.line() == b"ready\n"  # every thread at the bottom of its recursion
    assert target.ask("fork") == b"forked\n"
    before_go()
    target.send("go")
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdin.close()
    return target.transcript + proc.stdout.read()


def _table_entries(pid: int) -> dict[int, int]:
    """tid -> live entries in the return table process `pid` maps."""
    table = next(m for m in procfs.maps(pid) if "uprobes-returns" in m.path)
    with ProcessMemory(pid) as mem:
        used = int.from_bytes(mem.read(table.start, 8), "little")
        data = mem.read(table.start + rettable.HEADER, rettable.ENTRY_SIZE * used)
    tids: dict[int, int] = {}
    for at in range(0, len(data), rettable.ENTRY_SIZE):
        tid = int.from_bytes(data[at:at + 8], "little")
        if tid:
            tids[tid] = tids.get(tid, 0) + 1
    return tids


def test_sigkill_with_trampoline_returns_pending(tracefs: Path,
                                                 orphan_returns_exe: Path) -> None:
    """SIGKILL to uprobes while 33 hijacked returns are pending in four
    threads and a forked child (recursion, a chain by tail call, and stale
    instances below the live ones after a longjmp): every thread returns through them to the
    right places; output and exit statuses are the untraced run's."""
    exe = str(orphan_returns_exe)
    plain = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    expected = _returns_transcript(plain, lambda: None)
    expected_status = plain.wait(timeout=60)
    assert expected_status == 31 and b"child status=7\n" in expected, expected

    _subreaper(True)
    try:
        run = subprocess.Popen([*UPROBES, "count", "-e", "ptrace", "--uretprobe", "-o",
                                os.devnull, f"r {exe}:level", f"r {exe}:dive", f"r {exe}:hop",
                                "--", exe],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        command: list[int] = []

        def kill_uprobes() -> None:
            command.append(next(k for k in _children(run.pid) if procfs.exe(k) == exe))
            forked = _children(command[0])
            assert len(forked) == 1
            pending = _table_entries(command[0])
            workers = sorted(n for t, n in pending.items() if t not in (command[0], forked[0]))
            # a frame each (level's first under hop is chained: hop's entry serves both)
            assert workers == [4, 7, 10], pending
            # the main thread's 6 frames and, below them, dive's 8 left by the
            # longjmp (stale: the handler must pass them over); the child's copies
            assert pending[command[0]] == pending[forked[0]] == 6 + 8, pending
            run.kill()
            run.wait()

        transcript = _returns_transcript(run, kill_uprobes)
        status = os.waitstatus_to_exitcode(_waitpid(command[0]))
        assert run.stderr is not None
        assert (transcript, status) == (expected, expected_status), run.stderr.read().decode()
    finally:
        _subreaper(False)
