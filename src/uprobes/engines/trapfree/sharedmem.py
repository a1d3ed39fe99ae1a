"""Memory that a tracee and the tracer both map: a memfd, MAP_SHARED in each.

What the tracer writes there costs a store in its own mapping, not a
`pwrite` of /proc/PID/mem (a system call each), and what the tracee writes
there the tracer reads without a system call. The memfd is made in the
tracee (injected memfd_create, mmap and close, xol.remote_syscall), opened
here through /proc/PID/fd, sized and mapped, and its fd closed again in the
tracee, so the program sees no new file descriptor, only a mapping. A fork
child inherits the mapping, still shared: parent, child and tracer see the
same bytes.

The program can write every word of it (it is its memory, and a buggy or
hostile program may): what the tracer reads there is checked before it
is believed. `most_hits` bounds what an in-program counter can gain: each
hit costs a CPU more than a nanosecond of our code.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterable

from uprobes.engines.tracee.xol import remote_syscall
from uprobes.errors import EngineError, UprobesError
from uprobes.sys import ptrace
from uprobes.sys.perf import possible_cpus

_NR_CLOSE, _NR_MMAP, _NR_MEMFD_CREATE = 3, 9, 319
_MFD_CLOEXEC, _MFD_ALLOW_SEALING = 1, 2
_MAP_FIXED_NOREPLACE = 0x100000
_MAP_POPULATE = 0x8000
_EEXIST, _ENOMEM = 17, 12


def _cpus() -> int:
    """How many CPU numbers a hit can run on (TSC_AUX's cpu part is below it)."""
    try:
        return max(possible_cpus()) + 1
    except (UprobesError, ValueError):
        return os.sysconf("SC_NPROCESSORS_CONF")


CPUS = _cpus()
_HITS_PER_CPU_S = 1_000_000_000
_HITS_SLACK = 10_000


def most_hits(seconds: float) -> int:
    """The most hits all CPUs together can make in `seconds` (with room for
    the clocks' jitter): an in-program counter that gained more was written
    by the program."""
    return int(max(seconds, 0.0) * CPUS * _HITS_PER_CPU_S) + _HITS_SLACK


def map_shared(tid: int, regs: ptrace.UserRegs, pid: int, syscall_addr: int, name_addr: int,
               size: int, prot: int, hints: Iterable[int], held: list[int],
               populate: bool = False) -> tuple[mmap.mmap, int]:
    """A new memfd of `size` bytes, mapped read-write here and with `prot`
    in process `pid` (through its stopped thread `tid`, registers `regs`),
    at the first free address of `hints` (0: anywhere the kernel likes).
    `name_addr`: the memfd's name, a C string in the process's memory.
    Signals that arrive during the injected calls go to `held`. `populate`:
    every page is allocated and mapped in both processes now (MAP_POPULATE),
    not at the program's first touch of each (a fault per page).
    (our view, the run-time address of the process's mapping);
    EngineError if it cannot be made."""
    fd = remote_syscall(tid, regs, syscall_addr, _NR_MEMFD_CREATE,
                        (name_addr, _MFD_CLOEXEC | _MFD_ALLOW_SEALING), held)
    if fd < 0:
        raise EngineError(f"process {pid}: memfd_create failed (errno {-fd})")
    try:
        try:
            local = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise EngineError(f"process {pid}: cannot open its memfd: {e.strerror}") from None
        try:
            os.ftruncate(local, size)
            # Its size for good: a program that reopens it (/proc/self/map_files)
            # and truncates it would make our reads of it fault (SIGBUS).
            fcntl.fcntl(local, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            view = mmap.mmap(local, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(local)
        for hint in hints:
            flags = mmap.MAP_SHARED | (_MAP_FIXED_NOREPLACE if hint else 0) \
                | (_MAP_POPULATE if populate else 0)
            got = remote_syscall(tid, regs, syscall_addr, _NR_MMAP,
                                 (hint, size, prot, flags, fd, 0), held)
            if got > 0 and (got == hint or not hint):
                return view, got
            if got < 0 and got not in (-_EEXIST, -_ENOMEM):
                break
        view.close()
        raise EngineError(f"process {pid}: cannot map its memfd")
    finally:
        remote_syscall(tid, regs, syscall_addr, _NR_CLOSE, (fd,), held)
