"""An injected system call (xol.remote_syscall) through a thread stopped
inside a system call of its own: the program's call keeps its result."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import Compiler
from uprobes.engines.ptrace.xol import find_syscall_insn, remote_syscall
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
