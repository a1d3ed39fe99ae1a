"""Where a trap-free stack copy may read: each thread's stack, with no system call.

A stack-copying probe's code (recording.py) copies `--stack-bytes` from the
stack pointer up into its ring slot. Copied by the kernel (getpid and
process_vm_readv at each hit) it was a system call of the program's, which
a seccomp filter installed after the probe went in could kill the program
for (SIGSYS), unseen at placement. The code copies by itself instead, never
past the end of the stack the stack pointer is in, so the copy cannot
fault: the tracer keeps the threads' stack ranges in a table of each
address space, which the code scans for the range holding its stack
pointer. A stack pointer in none (a thread the table has no room for, a
stack of the program's own making: a coroutine's, a signal stack) copies
nothing, and the record says so (its count is 0).

The table is private anonymous memory, read-only in the program, written by
the tracer through /proc/PID/mem: a fork child gets its own copy (its
thread runs on the copy of the forking thread's stack, whose range is
there), not the parent's later changes; a fork-like clone() given a stack
of its own (glibc's clone(fn, stack, SIGCHLD, arg)) runs on none of those,
and its stack goes into its copy at its fork event. Each entry is (seq, start, end), a
sequence lock: the tracer makes seq odd, writes the range, makes seq even
again; the code takes a range only if it read the same even seq before and
after it (each word is one aligned store, and x86 keeps loads in order and
stores in order).

A thread's range lies in its stack mapping (the one holding its stack
pointer when it is first seen: at placement, or at its clone, from the stack
the call gave it). The process's main stack grows down: its range starts
where the stack may grow to (its limit, at most 8 MiB, and never within the
kernel's guard gap above the mapping below it). Any other thread's mapping
may be more than its stack: the kernel merges neighbouring anonymous
mappings of the same flags (stacks of `pthread_attr_setstack`, glibc's
stacks without a guard page), and a neighbour can be unmapped while the
thread lives. So its range ends at the thread's own top (the stack its
clone was given; at placement, glibc's thread block, which sits at the top
of the thread's stack: its thread pointer) and starts at its clone's stack
base where the call says it (clone3), at placement above the next thread's
top below it (stacks do not overlap), and at most 8 MiB below its top; a
thread whose top is not known copies nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from uprobes.errors import UprobesError
from uprobes.sys import procfs
from uprobes.sys.procmem import ProcessMemory

SLOTS = 64                # threads of one address space whose stacks are copied
ENTRY = 24                # seq, start, end
SIZE = 4096               # the table's mapping (SLOTS * ENTRY fit)
_MAIN_GROWTH = 8 << 20    # how far below its mapping the main stack is taken to reach
_GUARD_GAP = 256 * 4096   # the kernel's stack_guard_gap: a stack never grows into it
_WORD = struct.Struct("<Q")
_RANGE = struct.Struct("<QQ")


@dataclass
class StackBounds:
    """The tracer's side of one address space's table at `addr`."""

    addr: int
    slots: dict[int, int] = field(default_factory=dict)   # tid -> its entry
    seqs: list[int] = field(default_factory=lambda: [0] * SLOTS)
    full_noted: bool = False

    def set(self, mem: ProcessMemory, tid: int, span: tuple[int, int]) -> bool:
        """Thread `tid`'s stack is `span`; False if the table is full."""
        slot = self.slots.get(tid)
        if slot is None:
            taken = set(self.slots.values())
            slot = next((i for i in range(SLOTS) if i not in taken), None)
            if slot is None:
                return False
            self.slots[tid] = slot
        self._write(mem, slot, span)
        return True

    def drop(self, mem: ProcessMemory, tid: int) -> None:
        """Thread `tid` is gone: its entry is free (and matches no stack)."""
        slot = self.slots.pop(tid, None)
        if slot is not None:
            self._write(mem, slot, (0, 0))

    def _write(self, mem: ProcessMemory, slot: int, span: tuple[int, int]) -> None:
        at = self.addr + ENTRY * slot
        self.seqs[slot] += 1
        mem.write(at, _WORD.pack(self.seqs[slot]))  # odd: being written
        mem.write(at + 8, _RANGE.pack(*span))
        self.seqs[slot] += 1
        mem.write(at, _WORD.pack(self.seqs[slot]))

    def copy(self) -> StackBounds:
        """A fork child's: the same entries, in its own copy of the table."""
        return StackBounds(self.addr, dict(self.slots), list(self.seqs), self.full_noted)


def stack_span(pid: int, tid: int, sp: int, maps: list[procfs.Mapping] | None = None, *,
               top: int | None = None, base: int | None = None,
               ) -> tuple[int, int] | None:
    """The range thread `tid` of process `pid` with stack pointer `sp` may copy
    from: the main stack's mapping, down to where it may grow; for another
    thread, from `base` (at most 8 MiB below its top) up to `top`, its stack's
    top (a clone's stack argument, or its thread pointer), within the
    mapping holding `sp`. None if that is no anonymous read-write mapping or
    the main stack (a signal stack in the heap may shrink with it: not
    taken), or if a thread's top is not in it."""
    try:
        maps = procfs.maps(pid) if maps is None else maps
    except UprobesError:
        return None
    ordered = sorted(maps, key=lambda m: m.start)
    for i, m in enumerate(ordered):
        if m.start < sp <= m.end:
            if not m.perms.startswith("rw") or m.path not in ("", "[stack]"):
                return None  # not a stack: the heap (a signal stack there), a file
            if m.path == "[stack]":
                below = ordered[i - 1].end if i else 0
                return min(m.start, max(below + _GUARD_GAP, m.end - _stack_limit(pid))), m.end
            if top is None or not sp <= top <= m.end:
                return None  # the mapping's end may be a neighbour's, freed any time
            low = max(top - _MAIN_GROWTH, base if base is not None and base < top else 0)
            return max(m.start, low), top
    return None


def _stack_limit(pid: int) -> int:
    """The soft RLIMIT_STACK of `pid`, at most _MAIN_GROWTH."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max stack size"):
                    soft = line[len("Max stack size"):].split()[0]
                    return _MAIN_GROWTH if soft == "unlimited" else min(int(soft), _MAIN_GROWTH)
    except (OSError, ValueError, IndexError):
        pass
    return 0
