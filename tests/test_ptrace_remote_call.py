"""An injected system call (xol.remote_syscall) through a thread stopped
inside a system call of its own: the program's call keeps its result."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Compiler

from uprobes.engines.tracee.xol import find_syscall_insn, remote_syscall
from uprobes.errors import EngineError
from uprobes.sys import ptrace
from uprobes.sys.procmem import ProcessMemory

_NR_GETPID = 39
LOOPS = 200


@pytest.fixture(scope="module")
def churn_exe(compile_c: Compiler) -> Path:
    return compile_c("thread_churn.c", "-pthread")


def test_a_call_through_a_thread_stopped_in_clone(churn_exe: Path) -> None:
    """At its clone event stop the main thread is inside clone3: our call's
    first step finishes that call. The thread it made must be the only one,
    and pthread_create must see it: the program's arithmetic holds."""
    proc = subprocess.Popen([str(churn_exe), str(LOOPS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == f"ready {proc.pid}\n"
        pid = proc.pid
        mem = ProcessMemory(pid)
        ptrace.seize(pid, ptrace.O_TRACECLONE)  # the main thread only; it clones all the time
        born = 0
        try:
            status = ptrace.wait_task(pid)
            while ptrace.stop_event(status) != ptrace.EVENT_CLONE:  # a signal meanwhile
                ptrace.cont(pid, 0 if ptrace.stop_event(status) else ptrace.stop_signal(status))
                status = ptrace.wait_task(pid)
            born = ptrace.geteventmsg(pid)
            regs = ptrace.getregs(pid, ptrace.UserRegs())
            held: list[int] = []
            got: int | str
            try:
                got = remote_syscall(pid, regs, find_syscall_insn(pid, mem), _NR_GETPID, (),
                                     held)
            except EngineError as e:
                got = str(e)
            resumes_with = ptrace.getregs(pid, ptrace.UserRegs()).rax
        finally:
            if born:  # traced from its birth: its first stop, then let go
                ptrace.wait_task(born)
                ptrace.detach(born)
            mem.close()
            ptrace.detach(pid)
        assert got == pid
        assert regs.rax == born  # clone3's own result, what the program resumes with
        assert resumes_with == born
        assert "TracerPid:\t0\n" in Path(f"/proc/{pid}/status").read_text()
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        out = proc.stdout.read()
        assert proc.wait(60) == 0, out  # 4 threads a round, each counted once
        assert out.startswith("rounds=") and "calls work=" in out, out
    finally:
        proc.kill()
        proc.wait()


def test_a_sigtrap_of_the_program_pending_is_not_taken_for_a_finished_call() -> None:
    """A thread stopped in an interrupted nanosleep (orig_rax set) with a
    SIGTRAP of its own queued: the first step reports that signal before
    anything runs, at our `syscall`, as a finished call would. Its si_code
    (SI_TKILL, not a step report's TRAP_BRKPT) tells them apart: the
    registers the thread resumes with are the ones it stopped with."""
    proc = subprocess.Popen(["/bin/sleep", "30"])
    try:
        pid = proc.pid
        deadline = time.monotonic() + 120
        while not Path(f"/proc/{pid}/syscall").read_text().startswith("230 "):
            assert time.monotonic() < deadline, "sleep never reached clock_nanosleep"
            time.sleep(0.01)
        mem = ProcessMemory(pid)
        ptrace.seize(pid, 0)
        try:
            ptrace.interrupt(pid)
            assert ptrace.stop_event(ptrace.wait_task(pid)) == ptrace.EVENT_STOP
            regs = ptrace.getregs(pid, ptrace.UserRegs())
            assert regs.orig_rax < 2**63  # inside a system call, to be restarted
            before = regs.copy()
            ptrace.tgkill(pid, pid, signal.SIGTRAP)  # queued while stopped
            with pytest.raises(EngineError, match="stopped at"):
                remote_syscall(pid, regs, find_syscall_insn(pid, mem), _NR_GETPID, (), [])
            after = ptrace.getregs(pid, ptrace.UserRegs())
            assert (regs.rax, after.rax, after.rip) == (before.rax, before.rax, before.rip)
        finally:
            mem.close()
            ptrace.detach(pid)
    finally:
        proc.kill()
        proc.wait()
