"""The thin ptrace layer on a real process: seize, interrupt, registers, detach."""

from __future__ import annotations

import signal
import subprocess

import pytest

from uprobes.errors import KernelError
from uprobes.sys import ptrace


@pytest.fixture
def sleeper() -> object:
    proc = subprocess.Popen(["/bin/sleep", "30"])
    yield proc
    proc.kill()
    proc.wait()


def test_seize_interrupt_regs_detach(sleeper: subprocess.Popen[bytes]) -> None:
    tid = sleeper.pid
    ptrace.seize(tid)
    ptrace.interrupt(tid)
    status = ptrace.wait_task(tid)
    assert ptrace.stopped(status)
    assert ptrace.stop_event(status) == ptrace.EVENT_STOP
    assert ptrace.stop_signal(status) == signal.SIGTRAP
    regs = ptrace.getregs(tid, ptrace.UserRegs())
    assert regs.rip and regs.rsp
    saved = regs.copy()
    regs.r12 = 0x1234
    ptrace.setregs(tid, regs)
    assert ptrace.getregs(tid, ptrace.UserRegs()).r12 == 0x1234
    ptrace.setregs(tid, saved)
    ptrace.detach(tid)
    assert sleeper.poll() is None  # runs on, untraced
    with open(f"/proc/{tid}/status") as f:
        assert "TracerPid:\t0" in f.read()


def test_errors_are_kernel_errors() -> None:
    with pytest.raises(KernelError, match="PTRACE_CONT"):
        ptrace.cont(2**22 + 12345)


def test_exit_status_decoding(sleeper: subprocess.Popen[bytes]) -> None:
    ptrace.seize(sleeper.pid)
    sleeper.send_signal(signal.SIGTERM)
    status = ptrace.wait_task(sleeper.pid)  # the signal-delivery-stop first
    assert ptrace.stopped(status) and ptrace.stop_event(status) == 0
    assert ptrace.stop_signal(status) == signal.SIGTERM
    ptrace.cont(sleeper.pid, signal.SIGTERM)
    status = ptrace.wait_task(sleeper.pid)
    assert ptrace.exited(status) and ptrace.exit_code(status) == 128 + signal.SIGTERM
    sleeper.returncode = -signal.SIGTERM
