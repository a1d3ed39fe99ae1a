"""ptrace(2) and waitpid(2), thin: requests, options, registers, stop decoding.

One module for the whole interface (x86-64). Every request turns errno
into `KernelError`. The hit path's requests (`getregs`, `setregs`, `cont`)
and `wait_any` call libc through function objects without argtypes (their
arguments are C ints, NULL or pointers), over a preallocated `UserRegs`:
ctypes' argument converters cost about as much as the system call
itself, so a hit costs its syscalls and little Python.

`wait_any()` calls libc's waitpid directly (not `os.waitpid`), so a signal
to the tracer interrupts it (EINTR, returned as pid 0) instead of being
retried by PEP 475: the tracer's loop sees its stop flag at once.

Every wait here is the calling thread's alone (__WNOTHREAD): without it
the kernel's do_wait also reports the tracees (and children) of every
other thread of the process, so a tracer in one thread would take the
stops of another thread's tracer, whose tracee then stays stopped. The
thread that attached is the one that waits (tracer.py), and the status
buffers the waits fill are per thread too: the calls release the GIL.

Stops are decoded the way ptrace(2) "Stopped states" describes them, for a
tracee attached with PTRACE_SEIZE:
- `status >> 16 == PTRACE_EVENT_*`: an event stop (clone, fork, exec...);
  PTRACE_EVENT_STOP is a group-stop when the signal is a stop signal, else
  an interrupt stop (our PTRACE_INTERRUPT, or a new child's first stop);
- otherwise a signal-delivery-stop for WSTOPSIG (to re-inject on resume).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from uprobes.errors import KernelError
from uprobes.sys.libc import kernel_error, libc

# Requests (include/uapi/linux/ptrace.h).
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETFPREGS = 14
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_SECCOMP_GET_FILTER = 0x420C

# Options. No PTRACE_O_EXITKILL: the traced program must outlive us (a
# dead tracer's breakpoints are a risk we remove on every exit path; a
# killed program is a certainty).
O_TRACESYSGOOD = 0x01
O_TRACEFORK = 0x02
O_TRACEVFORK = 0x04
O_TRACECLONE = 0x08
O_TRACEEXEC = 0x10
O_TRACEVFORKDONE = 0x20
FOLLOW = O_TRACEFORK | O_TRACEVFORK | O_TRACECLONE | O_TRACEEXEC | O_TRACEVFORKDONE

# Events (status >> 16).
EVENT_FORK = 1
EVENT_VFORK = 2
EVENT_CLONE = 3
EVENT_EXEC = 4
EVENT_VFORK_DONE = 5
EVENT_EXIT = 6
EVENT_STOP = 128

WALL = 0x40000000  # __WALL: threads and processes alike
WNOTHREAD = 0x20000000  # __WNOTHREAD: this thread's tracees and children only
_WAIT = WALL | WNOTHREAD
WNOHANG = 1
STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})

# si_code values of SIGTRAP (include/uapi/asm-generic/siginfo.h).
SI_KERNEL = 0x80
TRAP_BRKPT = 1
TRAP_TRACE = 2

_HINTS: Mapping[int, str] = {
    _errno.ESRCH: "the task is gone or not stopped",
    _errno.EPERM: "not permitted (another tracer, another user, or ptrace_scope)",
}


class UserRegs(ctypes.Structure):
    """x86-64 `struct user_regs_struct`, glibc's field names, in order."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs")]

    r15: int
    r14: int
    r13: int
    r12: int
    rbp: int
    rbx: int
    r11: int
    r10: int
    r9: int
    r8: int
    rax: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int
    cs: int
    eflags: int
    rsp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int

    def copy(self) -> UserRegs:
        out = UserRegs()
        ctypes.pointer(out)[0] = self
        return out


class SigInfo(ctypes.Structure):
    """The head of `siginfo_t` (128 bytes): number, errno, code, then the union."""

    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int),
                ("si_code", ctypes.c_int), ("_pad", ctypes.c_int),
                ("si_addr", ctypes.c_ulonglong), ("_rest", ctypes.c_byte * 104)]

    si_signo: int
    si_errno: int
    si_code: int
    si_addr: int


def _function(name: str, restype: object, argtypes: list[object]) -> Callable[..., int]:
    """libc's `name` with its C types set: it returns a Python int (every
    restype here is an integer type)."""
    fn = libc().function(name)
    fn.restype = restype
    fn.argtypes = argtypes
    typed: Callable[..., int] = fn
    return typed


_raw_ptrace = _function("ptrace", ctypes.c_long,
                        [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p])
_raw_waitpid = _function("waitpid", ctypes.c_int,
                         [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int])
_raw_tgkill = _function("tgkill", ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int])
# The hit path's calls, without argtypes: request, tid and options are C ints
# here, addr is NULL, data a pointer (byref) or, for a signal, a c_long.
_bare_ptrace = libc().bare_function("ptrace", ctypes.c_long)
_bare_waitpid = libc().bare_function("waitpid", ctypes.c_int)
_byref = ctypes.byref
_get_errno = ctypes.get_errno


def _failed(what: str, tid: int) -> None:
    err = _get_errno()
    if err:
        raise kernel_error(f"{what} (task {tid})", err, _HINTS)


def _ptrace(request: int, tid: int, addr: int, data: int, what: str) -> int:
    res = _raw_ptrace(request, tid, addr, data)
    if res == -1:
        err = ctypes.get_errno()
        if err:
            raise kernel_error(f"{what} (task {tid})", err, _HINTS)
    return res


def seize(tid: int, options: int = FOLLOW) -> None:
    """Attach without stopping the task (PTRACE_SEIZE), with `options`."""
    _ptrace(PTRACE_SEIZE, tid, 0, options, "PTRACE_SEIZE")


def interrupt(tid: int) -> None:
    """Make a seized task stop (it reports a PTRACE_EVENT_STOP)."""
    _ptrace(PTRACE_INTERRUPT, tid, 0, 0, "PTRACE_INTERRUPT")


def cont(tid: int, sig: int = 0) -> None:
    """Resume a stopped task, delivering `sig` (0: none)."""
    if _bare_ptrace(PTRACE_CONT, tid, None, ctypes.c_long(sig) if sig else None) == -1:
        _failed("PTRACE_CONT", tid)


def singlestep(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_SINGLESTEP, tid, 0, sig, "PTRACE_SINGLESTEP")


def listen(tid: int) -> None:
    """Leave a task in its group-stop, still traced (PTRACE_LISTEN)."""
    _ptrace(PTRACE_LISTEN, tid, 0, 0, "PTRACE_LISTEN")


def detach(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_DETACH, tid, 0, sig, "PTRACE_DETACH")


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """Send `sig` to one thread (a signal held back during a step, re-raised)."""
    if _raw_tgkill(tgid, tid, sig) == -1:
        err = ctypes.get_errno()
        if err != _errno.ESRCH:
            raise kernel_error(f"tgkill({tid}, {sig})", err)


def getregs(tid: int, regs: UserRegs) -> UserRegs:
    """Fill `regs` with the stopped task's registers; returns it."""
    if _bare_ptrace(PTRACE_GETREGS, tid, None, _byref(regs)) == -1:
        _failed("PTRACE_GETREGS", tid)
    return regs


FPREGS_SIZE = 512
"""sizeof(struct user_fpregs_struct) on x86-64 (the FXSAVE area)."""
XMM_OFFSET = 160
"""Where xmm_space, the 16 SSE registers of 16 bytes each, starts in it."""


def xmm_registers(tid: int) -> bytes:
    """The stopped task's 16 SSE registers, 16 bytes each (PTRACE_GETFPREGS)."""
    area = ctypes.create_string_buffer(FPREGS_SIZE)
    if _bare_ptrace(PTRACE_GETFPREGS, tid, None, _byref(area)) == -1:
        _failed("PTRACE_GETFPREGS", tid)
    return area.raw[XMM_OFFSET:XMM_OFFSET + 256]


def setregs(tid: int, regs: UserRegs) -> None:
    if _bare_ptrace(PTRACE_SETREGS, tid, None, _byref(regs)) == -1:
        _failed("PTRACE_SETREGS", tid)


def geteventmsg(tid: int) -> int:
    """The event's message: the new task's id (clone/fork), the former tid (exec)."""
    msg = ctypes.c_ulong(0)
    _ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg), "PTRACE_GETEVENTMSG")
    return msg.value


def seccomp_filter(tid: int, index: int, addr: int = 0) -> int:
    """The instruction count of the stopped task's seccomp filter `index` (0:
    the newest), its `struct sock_filter`s copied to `addr` unless 0."""
    return _ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, addr, "PTRACE_SECCOMP_GET_FILTER")


def getsiginfo(tid: int) -> SigInfo:
    info = SigInfo()
    _ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(info), "PTRACE_GETSIGINFO")
    return info


def wait_any(nohang: bool = False) -> tuple[int, int]:
    """waitpid(-1, __WALL), for this thread's tracees: (tid, raw status);
    (0, 0) when interrupted by a signal, or when `nohang` and nothing is
    pending; (-1, 0) when there is no child left (ECHILD)."""
    out = _out
    tid: int = _bare_waitpid(-1, out.status_ref, _WAIT | WNOHANG if nohang else _WAIT)
    if tid > 0:
        return tid, out.status.value
    if tid == 0:
        return 0, 0
    return _wait_failed("waitpid")


def _wait_failed(what: str) -> tuple[int, int]:
    """A wait that returned -1: (0, 0) if interrupted, (-1, 0) if no child is left."""
    err = ctypes.get_errno()
    if err == _errno.EINTR:
        return 0, 0
    if err == _errno.ECHILD:
        return -1, 0
    raise kernel_error(what, err)


class _WaitInfo(ctypes.Structure):
    """The SIGCHLD layout of `siginfo_t` that waitid() fills (128 bytes)."""

    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int),
                ("si_code", ctypes.c_int), ("_pad", ctypes.c_int),
                ("si_pid", ctypes.c_int), ("si_uid", ctypes.c_int),
                ("si_status", ctypes.c_int), ("_rest", ctypes.c_byte * 100)]


_CLD_EXITED, _CLD_KILLED, _CLD_DUMPED, _CLD_TRAPPED = 1, 2, 3, 4
_WEXITED, _WSTOPPED, _WNOWAIT = 4, 2, 0x01000000
_P_ALL, _P_PID = 0, 1
_bare_waitid = libc().bare_function("waitid", ctypes.c_int)


class _WaitOut(threading.local):
    """What the waits fill, one set per thread (made on a thread's first wait)."""

    def __init__(self) -> None:
        self.status = ctypes.c_int(0)
        self.status_ref = ctypes.byref(self.status)
        self.info = _WaitInfo()
        self.info_ref = ctypes.byref(self.info)


_out = _WaitOut()


def peek_any(nohang: bool = False) -> tuple[int, int]:
    """wait_any() that leaves the report in place (waitid with WNOWAIT): a
    ptrace stop stays unconsumed until the task is resumed, so if we die
    before resuming it the kernel delivers the stop's signal at the detach
    (a consumed stop is resumed with no signal at all, wherever rip is). The
    status is waitpid's for a ptrace stop (signal and event), else 0: then
    consume the report with wait_task(tid) for its exact status."""
    options = _WAIT | _WEXITED | _WSTOPPED | _WNOWAIT | (WNOHANG if nohang else 0)
    info = _out.info
    info.si_pid = 0
    got: int = _bare_waitid(_P_ALL, 0, _out.info_ref, options)
    if got == 0:
        tid = info.si_pid
        if tid == 0:
            return 0, 0
        if info.si_code == _CLD_TRAPPED:
            return tid, (info.si_status & 0xFFFF) << 8 | 0x7F
        return tid, 0
    return _wait_failed("waitid")


def consume_pending(tid: int) -> None:
    """Consume `tid`'s report if one is pending (waitpid WNOHANG): a stop
    peeked at (peek_any) that will not be resumed by a ptrace request."""
    _raw_waitpid(tid, _out.status_ref, _WAIT | WNOHANG)


def wait_task(tid: int) -> int:
    """waitpid(tid, __WALL), retried on EINTR: the raw status."""
    out = _out
    while True:
        got = _raw_waitpid(tid, out.status_ref, _WAIT)
        if got == tid:
            return out.status.value
        err = ctypes.get_errno()
        if got == -1 and err != _errno.EINTR:
            raise kernel_error(f"waitpid({tid})", err)


def poll_task(tid: int, keep_exit: bool = False) -> int | None:
    """waitpid(tid, __WALL | WNOHANG): the raw status, or None if nothing
    is pending (or `tid` is no child of ours any more). `keep_exit`: an
    exit is reported but left pending (waitid WNOWAIT), for the run loop's
    wait to see and account (the command's exit status comes from there)."""
    out = _out
    if keep_exit:
        info = out.info
        info.si_pid = 0
        got = _bare_waitid(_P_PID, tid, out.info_ref,
                           _WAIT | _WEXITED | _WSTOPPED | _WNOWAIT | WNOHANG)
        if got != 0 or info.si_pid == 0:
            return None
        code: int = info.si_code
        value: int = info.si_status
        if code == _CLD_EXITED:
            return (value & 0xFF) << 8
        if code in (_CLD_KILLED, _CLD_DUMPED):
            return (value & 0x7F) | (0x80 if code == _CLD_DUMPED else 0)
    got = _raw_waitpid(tid, out.status_ref, _WAIT | WNOHANG)
    return out.status.value if got == tid else None


def wait_task_until(tid: int, deadline: float, gone: Callable[[int], bool] | None = None,
                    keep_exit: bool = False) -> int | None:
    """wait_task() that gives up at `deadline` (time.monotonic()) or as soon
    as `gone(tid)` says the task will never report (a zombie leader whose
    exit waits for its other threads): the raw status, or None. It polls,
    backing off from 50 us to 5 ms: a stop after a step or an injected call
    comes within microseconds, so the first polls find it. `keep_exit`: see
    poll_task."""
    pause = 0.00005
    while True:
        status = poll_task(tid, keep_exit)
        if status is not None:
            return status
        if time.monotonic() >= deadline or (gone is not None and gone(tid)):
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.005)


# Status decoding, as <sys/wait.h> macros do.

@dataclass(frozen=True)
class WaitStatus:
    """A waitpid status, decoded once. `stopped`: a ptrace stop, with its
    `signal` and ptrace `event` (0: a signal-delivery-stop); else the task
    is gone, with `code` as a shell reports it (the exit code, or 128+N
    for signal N) and `signal` the one that killed it (0: it exited)."""

    stopped: bool
    signal: int
    event: int = 0
    code: int = 0

    @property
    def group_stop(self) -> bool:
        """A PTRACE_EVENT_STOP for a stop signal: the task is in a group-stop."""
        return self.event == EVENT_STOP and self.signal in STOP_SIGNALS


TRAP_STOP = int(signal.SIGTRAP) << 8 | 0x7F
"""The raw status of a SIGTRAP stop with no ptrace event (an int3 hit or a
finished single-step): the run loop compares a raw status to it before
decoding anything, one comparison for the common stop."""


def decode(status: int) -> WaitStatus:
    """The typed meaning of a raw waitpid status."""
    if stopped(status):
        return WaitStatus(True, stop_signal(status), stop_event(status))
    return WaitStatus(False, status & 0x7F, 0, exit_code(status))


def exited(status: int) -> bool:
    """The task is gone: exited or killed."""
    return (status & 0xFF) != 0x7F and status != 0xFFFF


def stopped(status: int) -> bool:
    return (status & 0xFF) == 0x7F


def stop_signal(status: int) -> int:
    return (status >> 8) & 0xFF


def stop_event(status: int) -> int:
    return status >> 16


def exit_code(status: int) -> int:
    """The status as a shell reports it: the exit code, or 128+N for signal N."""
    if (status & 0x7F) == 0:
        return (status >> 8) & 0xFF
    return 128 + (status & 0x7F)


def ensure_x86_64() -> None:
    import platform
    if platform.machine() != "x86_64":
        raise KernelError(f"the ptrace engine supports x86-64 only, not {platform.machine()}")
