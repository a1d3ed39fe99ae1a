"""Why we may not trace a process, in one line, before anything is placed.

The kernel's rules (ptrace(2) "Ptrace access mode checking", Yama): one
tracer per task; another user's process needs CAP_SYS_PTRACE; Yama's
ptrace_scope 1 allows only descendants (or a process that named us with
PR_SET_PTRACER), 2 only CAP_SYS_PTRACE, 3 nobody.
"""

from __future__ import annotations

import os

from uprobes.errors import ProcessError, UprobesError
from uprobes.sys import procfs


def ptrace_scope() -> int | None:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def tracer_of(pid: int) -> int:
    """TracerPid from /proc/PID/status (0: not traced)."""
    try:
        with open(f"/proc/{pid}/status", errors="surrogateescape") as f:  # Name: bytes
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        return procfs.comm(pid)
    except UprobesError:
        return "?"


def check_attach(pid: int) -> None:
    """Raise ProcessError naming the reason if attaching to `pid` must fail."""
    try:
        st = procfs.status(pid)
    except UprobesError:
        raise ProcessError(f"no process {pid}") from None
    if st.tgid != pid:
        raise ProcessError(f"{pid} is a thread of process {st.tgid}; give the process id")
    procfs.check_live(pid)
    if pid == os.getpid():
        raise ProcessError("uprobes cannot trace itself")
    tracer = tracer_of(pid)
    if tracer:
        raise ProcessError(f"cannot attach to process {pid}: it is already traced by process "
                           f"{tracer} ({_comm(tracer)}); one tracer per process")
    if os.geteuid() != 0 and st.uid != os.getuid():
        raise ProcessError(f"cannot attach to process {pid}: it belongs to uid {st.uid}, "
                           "not you (need root or CAP_SYS_PTRACE)")


def explain_refusal(pid: int) -> str:
    """The reason an attach failed with EPERM, as best we can tell."""
    tracer = tracer_of(pid)
    if tracer:
        return (f"cannot attach to process {pid}: it is already traced by process {tracer} "
                f"({_comm(tracer)}); one tracer per process")
    scope = ptrace_scope()
    if os.geteuid() != 0 and scope == 1:
        return (f"cannot attach to process {pid}: kernel.yama.ptrace_scope is 1 (only "
                "descendants may be traced); run as root or `sysctl kernel.yama.ptrace_scope=0`")
    if scope == 2 and os.geteuid() != 0:
        return (f"cannot attach to process {pid}: kernel.yama.ptrace_scope is 2 "
                "(CAP_SYS_PTRACE needed); run as root")
    if scope == 3:
        return (f"cannot attach to process {pid}: kernel.yama.ptrace_scope is 3 "
                "(ptrace is disabled until reboot)")
    return (f"cannot attach to process {pid}: not permitted (another user's process, "
            "a setuid program, or a security module)")
