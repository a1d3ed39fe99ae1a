"""Traced threads and the address spaces they run in.

An `AddressSpace` is the engine's view of one mm: its memory, the
breakpoint sites placed in it (by run-time address) and its XOL areas.
Threads of a process share one; a vfork child shares its parent's until it
execs; a fork child gets a copy (the kernel's dup_mmap copied the int3s,
the slots and the areas along with everything else).
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

from uprobes.engines.ptrace.breakpoints import GuardTrap, Site
from uprobes.engines.ptrace.retprobes import ReturnInstance
from uprobes.engines.ptrace.rettable import ReturnTable
from uprobes.engines.tracee.xol import XolArea
from uprobes.engines.trapfree.reader import Owner
from uprobes.sys import procfs, ptrace
from uprobes.sys.procmem import ProcessMemory

Feature = Literal["orphan handler", "int3s", "jumps", "semaphores", "returns"]
"""What a session changes an address space by, each undone at detach (teardown.py)."""

COMM_TTL_NS = 100_000_000  # a cached comm is re-read after 100 ms (records read later)
RENAMES_PENDING = 0xFFFF_FFFF  # the rename word's low half: renames under way (renames.py)
COMM_READS = 16  # comms `roster` re-reads a call, at most (threads read for the first time aside)


@dataclass(eq=False)
class AddressSpace:
    """One traced mm. `held`: a launched command not yet exec'd (our own
    image still runs there; nothing is placed until exec)."""

    pid: int
    mem: ProcessMemory
    sites: dict[int, Site] = field(default_factory=dict)
    areas: list[XolArea] = field(default_factory=list)
    trampolines: set[int] = field(default_factory=set)
    guard_traps: dict[int, GuardTrap] = field(default_factory=dict)  # by the int3's address
    syscall_addr: int | None = None
    scanned: dict[tuple[int, int], tuple[int, int] | None] = field(default_factory=dict)
    rendezvous: int | None = None
    semaphores: dict[int, int] = field(default_factory=dict)  # USDT: address -> our adds
    held: bool = False
    users: int = 1
    ret_table: ReturnTable | None = None  # shared with fork children: the mapping is
    # Detach's steps for this space, latest first, and the features they undo (teardown.py).
    undo: ExitStack = field(default_factory=ExitStack)
    undo_taken: list[Feature] = field(default_factory=list)

    def fork_copy(self, pid: int) -> AddressSpace:
        """The child's copy after fork: same addresses, its own memory."""
        return AddressSpace(pid, ProcessMemory(pid), dict(self.sites),
                            [XolArea(a.start, a.size, a.used) for a in self.areas],
                            set(self.trampolines), dict(self.guard_traps), self.syscall_addr,
                            dict(self.scanned),
                            self.rendezvous, dict(self.semaphores),
                            ret_table=self.ret_table)

    def area_of(self, runtime_addr: int) -> XolArea | None:
        for a in self.areas:
            if a.contains(runtime_addr):
                return a
        return None

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.mem.close()


@dataclass(eq=False)
class Thread:
    """One traced task. `stopped`: in a ptrace stop we have not resumed;
    `stop_event`: that stop's PTRACE_EVENT_* (0: none); `resume_sig`: the
    signal to deliver when it is resumed; `group_stop`: resume with
    PTRACE_LISTEN, not CONT."""

    tid: int
    pid: int
    mm: AddressSpace
    comm_cached: str = ""
    comm_at: int = 0
    comm_word: int = -1  # the rename word `comm_cached` was read under (-1: none, re-read)
    stopped: bool = False
    stop_event: int = 0
    resume_sig: int = 0
    group_stop: bool = False
    let_go: bool = False  # nothing of ours in its process: detach at its resume
    tls_check: bool = False  # a new task: its thread block's tid checked at its first stop
    returns: list[ReturnInstance] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # signals held back, to deliver
    regs: ptrace.UserRegs = field(default_factory=ptrace.UserRegs)
    _stat_fd: int = -1
    _comm_fd: int = -1
    _ns_tid: int = 0

    @property
    def ns_tid(self) -> int:
        """The tid as the thread itself sees it (gettid in its pid namespace)."""
        if not self._ns_tid:
            self._ns_tid = procfs.ns_pid(self.tid)
        return self._ns_tid

    @ns_tid.setter
    def ns_tid(self, value: int) -> None:
        self._ns_tid = value

    @property
    def comm(self) -> str:
        """The name as read at most COMM_TTL_NS ago: what names the records
        read from rings, later than their hits (`comm_now` at a stop)."""
        now = time.monotonic_ns()
        if now - self.comm_at > COMM_TTL_NS:
            self._read_comm(now)
        return self.comm_cached

    def comm_now(self, word: int | None) -> str:
        """The name now, at a stop of this thread (an int3 hit): any thread
        may rename any other at any time (prctl, /proc, pthread_setname_np),
        so a kept name is only used while the kernel's rename word (`word`,
        read now from our own mapping of it: trapfree/renames.py) is the one
        it was read under, with no rename under way; else, and without a
        word, it is read again (one pread of its /proc comm)."""
        if word is not None and word == self.comm_word:
            return self.comm_cached
        self._read_comm(time.monotonic_ns(), keep_open=True)
        # The word read before the name: a rename after it moves the word.
        self.comm_word = -1 if word is None or word & RENAMES_PENDING else word
        return self.comm_cached

    def _read_comm(self, now: int, keep_open: bool = False) -> None:
        """`keep_open`: through a file kept open (a thread stopped at a hit
        is alive; `close` closes it), else opened for this read."""
        fd = self._comm_fd
        try:
            if fd < 0:
                fd = os.open(f"/proc/{self.pid}/task/{self.tid}/comm",
                             os.O_RDONLY | os.O_CLOEXEC)
                if keep_open:
                    self._comm_fd = fd
            self.comm_cached = os.pread(fd, 64, 0).rstrip(b"\n").decode(errors="replace")
        except OSError:
            pass
        finally:
            if fd >= 0 and fd != self._comm_fd:
                os.close(fd)
        self.comm_at = now

    def forget_comm(self) -> None:
        """An exec: the image's name is another, its /proc file may be too."""
        self.close()
        self.comm_at = 0
        self.comm_word = -1

    def cpu(self) -> int:
        """The CPU the (stopped) thread last ran on, i.e. where it trapped:
        field 39 of /proc/TID/stat, one pread on a kept-open fd."""
        try:
            if self._stat_fd < 0:
                self._stat_fd = os.open(f"/proc/{self.pid}/task/{self.tid}/stat",
                                        os.O_RDONLY | os.O_CLOEXEC)
            text = os.pread(self._stat_fd, 1024, 0)
            return int(text[text.rindex(b")") + 2:].split()[36])
        except (OSError, ValueError, IndexError):
            return -1

    @property
    def can_lend(self) -> bool:
        """Whether this stopped thread may run an injected system call: not
        at its vfork's event stop, whose call goes on to wait for the child
        (which we hold) before a single instruction of ours could run."""
        return self.stopped and self.stop_event != ptrace.EVENT_VFORK

    def close(self) -> None:
        if self._stat_fd >= 0:
            os.close(self._stat_fd)
            self._stat_fd = -1
        if self._comm_fd >= 0:
            os.close(self._comm_fd)
            self._comm_fd = -1


def admit(threads: dict[int, Thread], nested: dict[int, Thread], t: Thread, ns_tid: int) -> None:
    """`t` traced from now on; `ns_tid`: its tid in its own pid namespace,
    what the program's own code reads (gettid, glibc's cached tid) and so
    what trap-free code records. `nested` keeps, by that tid, the threads
    where it is not the host's (a process in a PID namespace: a container,
    `unshare -p`)."""
    t.ns_tid = ns_tid
    threads[t.tid] = t
    if ns_tid != t.tid:
        nested[ns_tid] = t


def dismiss(nested: dict[int, Thread], t: Thread) -> None:
    """`t` is gone: out of `nested` (the host's `threads` are the caller's)."""
    if nested.get(t.ns_tid) is t:
        del nested[t.ns_tid]


def by_own_tid(threads: dict[int, Thread], nested: dict[int, Thread], tid: int) -> Thread | None:
    """The traced thread that calls itself `tid` (the tid a record of
    trap-free code holds: see `admit`), if any."""
    t = threads.get(tid)
    if t is not None and t.ns_tid == tid:
        return t
    return nested.get(tid)


def owner_of(threads: dict[int, Thread], nested: dict[int, Thread],
             former: dict[int, Owner], tid: int) -> Owner:
    """The `Owner` of the thread that calls itself `tid` (`by_own_tid`), or
    of one gone (`former`, by that tid); (0, "?", tid) if neither."""
    t = by_own_tid(threads, nested, tid)
    return (t.pid, t.comm, t.tid) if t is not None else former.get(tid, (0, "?", tid))


def roster(threads: dict[int, Thread], turn: int) -> tuple[list[tuple[int, Owner]], int]:
    """(own tid, (pid, comm, tid)) of every thread of `threads` (own tid:
    `Thread.ns_tid`, what its records hold), and the next `turn`.
    A comm never read is read; of the others, at most COMM_READS whose
    cached comm is COMM_TTL_NS old are read again (/proc), the threads
    taking turns from `turn` on: a program of thousands of threads costs a
    few file reads a call, not one per thread (`uprobes record` tells the
    owners of all threads at each read of the rings)."""
    items = list(threads.items())
    if not items:
        return [], 0
    start = turn % len(items)
    now = time.monotonic_ns()
    reads = COMM_READS
    out = []
    for tid, t in items[start:] + items[:start]:
        if not t.comm_at:
            comm = t.comm
        elif reads and now - t.comm_at > COMM_TTL_NS:
            reads -= 1
            comm = t.comm
        else:
            comm = t.comm_cached
        out.append((t.ns_tid, (t.pid, comm, tid)))
    return out, start + COMM_READS
