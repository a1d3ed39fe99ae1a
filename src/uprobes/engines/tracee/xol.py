"""The execute-out-of-line area: anonymous r-x memory mapped inside a tracee.

It is mapped by making a stopped thread of the tracee run one `mmap`
system call (a remote syscall): its registers are saved, pointed at a
`syscall` instruction found in the vDSO or the program's text, stepped once,
and restored, `orig_rax` included, so a thread stopped inside an
interrupted system call still restarts it afterwards (the kernel's
restart logic reads the restored `rax`/`orig_rax` on resume).

Each area lies within +-2 GiB of the code it serves (MAP_FIXED_NOREPLACE in
a free gap near it), so relocated RIP-relative displacements and the jmp
back from a boosted slot fit in 32 bits. Offset 0 holds the return-probe
trampoline (one int3); every probe then owns a fixed slot, so any number of
threads can run it at once. Areas are never unmapped while attached (a
thread may be inside one) and are left behind at detach (a few KiB).
"""

from __future__ import annotations

import itertools
import mmap
import signal
import struct
import time
from dataclasses import dataclass, field

from uprobes.engines.tracee import killpoint
from uprobes.engines.tracee.relocate import SLOT_SIZE
from uprobes.errors import EngineError, UprobesError
from uprobes.sys import procfs, ptrace, seccomp
from uprobes.sys.procmem import ProcessMemory

AREA_SIZE = 64 * 1024
# The bound of one injected call: ours (mmap, memfd_create, close,
# rt_sigaction) never block, so past it the thread is stuck elsewhere.
_CALL_S = 10.0
_NR_MMAP = 9
_MAP_FIXED_NOREPLACE = 0x100000
_REACH = 2**31 - AREA_SIZE - 2 * 1024 * 1024  # keep rel32 targets comfortably in range
_MMAP_MIN = 0x10000
_INJECTED = itertools.count(1)  # the calls injected so far (killpoint.py's points)


@dataclass
class XolArea:
    """One mapped area: trampoline at `start`, then fixed slots."""

    start: int
    size: int = AREA_SIZE
    used: int = SLOT_SIZE  # slot 0 is the trampoline

    @property
    def trampoline(self) -> int:
        return self.start

    def reaches(self, runtime_addr: int) -> bool:
        return abs(runtime_addr - self.start) < _REACH

    def alloc(self, size: int = SLOT_SIZE) -> int | None:
        """The address of `size` fresh bytes (a slot by default; a trampoline or
        other code may need more), 16-byte aligned; None when the area is full."""
        size = (size + 15) & ~15
        if self.used + size > self.size:
            return None
        addr = self.start + self.used
        self.used += size
        return addr

    def room(self) -> int:
        """Bytes still free."""
        return self.size - self.used

    def contains(self, runtime_addr: int) -> bool:
        return self.start <= runtime_addr < self.start + self.size


# A landing (see LandedSyscall): the registers a thread resumes with, in this order.
LANDING_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
                "r12", "r13", "r14", "r15", "rsp", "rip", "eflags")
LANDING_SIZE = 8 * len(LANDING_REGS)
_LANDING = struct.Struct(f"<{len(LANDING_REGS)}Q")
# A thread stopped inside an interrupted system call resumes by restarting
# it (the kernel's restart logic, with no signal to deliver): these results.
_ERESTARTSYS, _ERESTARTNOINTR, _ERESTARTNOHAND, _ERESTART_RESTARTBLOCK = 512, 513, 514, 516


class LandedSyscall(int):
    """The address of a `syscall` instruction of ours (the orphan area's,
    engines/ptrace/orphan.py) whose next instructions load the registers
    saved at `landing` and jump to the saved rip. `remote_syscall` saves
    there the registers the thread resumes with before each call, so a
    thread whose tracer is killed inside the call (the kernel then resumes
    it with the call's registers) runs on where it was, not from the call's
    `syscall` onwards with the call's registers."""

    landing: int

    def __new__(cls, addr: int, landing: int) -> LandedSyscall:
        self = super().__new__(cls, addr)
        self.landing = landing
        return self


def _land(tid: int, regs: ptrace.UserRegs, landing: int) -> None:
    """Save at `landing` the registers thread `tid` resumes with from `regs`:
    those of a restarted system call where its resume would restart one.

    The kernel resumes a call interrupted with -ERESTART_RESTARTBLOCK (a
    relative sleep, a timed futex wait) by `restart_syscall`, which goes on
    from a record in the task. Here the call is made anew with its own
    arguments instead (its timeout counted again from now: a later return,
    never an early one or an error): a thread whose tracer died inside an
    injected call is still single-stepped once, and that step's SIGTRAP runs
    our handler (orphan.py), whose rt_sigreturn clears the record, so
    `restart_syscall` would fail the call with EINTR."""
    resume = regs.copy()
    if regs.orig_rax < 2**63:  # stopped inside a system call of its own
        err = 2**64 - regs.rax
        if err in (_ERESTARTSYS, _ERESTARTNOINTR, _ERESTARTNOHAND, _ERESTART_RESTARTBLOCK):
            resume.rax = regs.orig_rax
            resume.rip = regs.rip - 2
    with ProcessMemory(tid) as mem:
        mem.write(landing, _LANDING.pack(*(getattr(resume, name) for name in LANDING_REGS)))


class InjectionRefused(EngineError):
    """A system call we would inject would kill or signal the program (seccomp)."""


def _dead(tid: int) -> bool:
    """The thread is gone or a zombie: it will report no stop (a killed
    leader's exit is reported only once its other threads are gone)."""
    return procfs.state(tid) in (None, "Z", "X")


def _tgid(tid: int) -> int:
    try:
        return procfs.status(tid).tgid
    except UprobesError:
        return tid


@dataclass
class RemoteCall:
    """Signals that arrived while a thread ran an injected call: re-deliver them."""

    held: list[int] = field(default_factory=list)


def find_syscall_insn(pid: int, mem: ProcessMemory) -> int:
    """The address of a `syscall` (0f 05) in executable memory of `pid`:
    the vDSO first (small, always there), then executable file mappings."""
    maps = procfs.maps(pid)
    order = sorted((m for m in maps if m.executable and m.path != "[vsyscall]"),
                   key=lambda m: (m.path != "[vdso]", m.start))
    for m in order:
        at = m.start
        while at < m.end:
            chunk = mem.read_upto(at, min(1 << 20, m.end - at) + 1)
            i = chunk.find(b"\x0f\x05")
            if i >= 0 and at + i + 2 <= m.end:
                return at + i
            if len(chunk) <= 1:
                break
            at += len(chunk) - 1
    raise EngineError(f"process {pid}: no syscall instruction found to map the XOL area")


def remote_syscall(tid: int, regs: ptrace.UserRegs, syscall_addr: int, nr: int,
                   args: tuple[int, ...], held: list[int]) -> int:
    """Run syscall `nr(*args)` in stopped thread `tid` (whose current registers
    are `regs`, restored afterwards); signals that arrive meanwhile go to `held`.
    InjectionRefused, before anything runs, if the thread's seccomp state
    would not let the call return (sys/seccomp.py).

    A thread may be stopped inside a system call of its own: a ptrace event
    stop (clone, fork, exec) comes from the middle of the call, before it
    returns. Its first resume finishes that call, writes the call's result
    into rax, and, single-stepped, stops at the call's exit before any
    instruction runs (rip still at our `syscall`). That result belongs to the
    program: it is put into `regs.rax` (what the thread resumes with), and
    our call is made on the next step. Restoring the registers read at the
    event stop instead would hand the program rax as it was inside the call
    (-ENOSYS): a clone3 that did create a thread would report failure, and
    glibc would clone again onto the same stack. (A vfork event stop must not
    lend itself at all: its call waits for the child, see `wait_for_vfork_done`.)
    """
    why = seccomp.refusal(tid, nr, args, syscall_addr + 2)
    if why is not None:
        raise InjectionRefused(f"process {_tgid(tid)}: {why}")
    call = regs.copy()
    call.rip = syscall_addr
    call.rax = nr
    call.orig_rax = 2**64 - 1  # not in a syscall: no restart logic on this resume
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(call, name, value & (2**64 - 1))
    landing = syscall_addr.landing if isinstance(syscall_addr, LandedSyscall) else 0
    if landing:
        _land(tid, regs, landing)
    ptrace.setregs(tid, call)
    n = next(_INJECTED)
    killpoint.reached(f"injecting-{n}")
    finished_own = False
    try:
        while True:
            ptrace.singlestep(tid)
            # An exit stays pending: the tracer's wait accounts for it.
            raw = ptrace.wait_task_until(tid, time.monotonic() + _CALL_S, _dead, keep_exit=True)
            if raw is None:
                raise EngineError(f"thread {tid} was killed during an injected system call"
                                  if _dead(tid) else f"thread {tid} did not come back from "
                                  f"an injected system call within {_CALL_S:g} s")
            status = ptrace.decode(raw)
            if not status.stopped:
                raise EngineError(f"thread {tid} ended during an injected system call")
            sig = status.signal
            if status.event or sig != signal.SIGTRAP:
                if not status.event:
                    held.append(sig)  # an asynchronous signal: after the call
                continue
            done = ptrace.getregs(tid, ptrace.UserRegs())
            if done.rip == syscall_addr + 2:
                killpoint.reached(f"injected-{n}")
                result = done.rax
                return result - 2**64 if result >= 2**63 else result
            if done.rip == syscall_addr and not finished_own and regs.orig_rax < 2**63 \
                    and ptrace.getsiginfo(tid).si_code == ptrace.TRAP_BRKPT:
                # The program's own call returned (see above): a syscall-exit
                # step report is TRAP_BRKPT (user_single_step_report); a SIGTRAP
                # of its own that was pending would not be, and rax is then ours.
                finished_own = True
                regs.rax = done.rax
                if landing:
                    _land(tid, regs, landing)
                ptrace.setregs(tid, call)
                continue
            raise EngineError(f"thread {tid}: the injected system call stopped at "
                              f"{done.rip:#x}, not after {syscall_addr:#x}")
    finally:
        ptrace.setregs(tid, regs)


def map_area(tid: int, regs: ptrace.UserRegs, pid: int, syscall_addr: int, near: int,
             held: list[int]) -> XolArea:
    """Map a new area within reach of `near` in process `pid`, through thread `tid`."""
    for hint in candidates(procfs.maps(pid), near):
        try:
            got = remote_syscall(tid, regs, syscall_addr, _NR_MMAP, (
                hint, AREA_SIZE, mmap.PROT_READ | mmap.PROT_EXEC,
                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE, -1, 0), held)
        except InjectionRefused as e:
            raise InjectionRefused(f"{e}; the ptrace engine cannot place probes there "
                                   "(the kernel engine, -e kernel, can)") from None
        if got == hint:
            return XolArea(hint)
        if got < 0 and got not in (-17, -12):  # EEXIST, ENOMEM: try another gap
            raise EngineError(f"process {pid}: cannot map the XOL area: mmap failed "
                              f"with errno {-got} (a seccomp or W^X policy?)")
    raise EngineError(f"process {pid}: no free address range within 2 GiB of {near:#x} "
                      "for the XOL area")


def candidates(maps: list[procfs.Mapping], near: int, size: int = AREA_SIZE) -> list[int]:
    """Page-aligned starts of `size` bytes in free gaps, all of them within
    reach of `near`: below it first (the gap above a program is where its
    brk heap grows), nearest first. A guard of 16 pages is left to the
    mapping above each candidate."""
    spans = sorted((m.start, m.end) for m in maps)
    guard = 16 * 4096
    out: list[int] = []
    prev_end = _MMAP_MIN
    for start, end in spans + [(0x7FFFFFFFF000, 0x7FFFFFFFF000)]:
        lo, top = prev_end + guard, start - guard - size
        if top >= lo:
            best = max(lo, min(top, near - size)) & ~0xFFF
            if best >= lo and abs(best - near) + size < _REACH:
                out.append(best)
        prev_end = max(prev_end, end)
    return sorted(out, key=lambda a: (a > near, abs(a - near)))[:8]
