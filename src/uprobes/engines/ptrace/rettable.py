"""The return table: hijacked return addresses, readable by the tracee itself.

A trampoline return probe (retprobes.py) swaps a return address on the
stack for the XOL area's trampoline and keeps the real one in the tracer.
If uprobes is killed (-9) while the function is active, the thread later
returns into the trampoline's int3 with no tracer; the in-tracee SIGTRAP
handler (orphan.py) then finds the real address here and jumps there, so
the program goes on as untraced.

The table is a memfd (sharedmem.py) mapped read-only in the tracee and
read-write here, so recording an entry costs three stores in our own
mapping, not a pwrite of /proc/PID/mem. Layout: a 64-byte header whose
first qword is how many entries were ever used (the handler scans that
many), then entries of three qwords: (tid as the tracee sees it, 0: free;
sp, where the return address lives; the real return address). Only a
non-chained instance has an entry: a chained one (a tail call) shares its
frame with the one below it.

The handler's rule is the kernel's for its uretprobes: of its thread's
entries (gettid) with sp >= rsp - 8 (rsp just after the trampoline's
`ret`; entries below are stale, left by a longjmp), the lowest. So the
handler writes nothing, recursion finds one entry per live frame, and a
stale entry is harmless (the tracer still drops them as it pops stale
instances, to reuse the room).

A kill -9 can come between any two stores of ours: an entry is filled
before the return address is swapped on the stack, its tid last; it is
freed (tid 0) only once the thread's rip has left the trampoline. Each
store is an aligned 8-byte store (a memoryview of qwords), never torn.

A fork child inherits the mapping, still shared: parent and child use one
table, told apart by tid, and the tracer copies the parent thread's
entries for the child's tid (its stack holds the same trampolines). When
the table is full a return is not hijacked (that call's return event is
lost, one note says so): never unsafe.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

from uprobes.engines.trapfree.sharedmem import map_shared
from uprobes.sys import ptrace

HEADER = 64
ENTRY_SIZE = 24
ENTRIES = 16384  # 256 threads 64 deep (retprobes.MAX_DEPTH); untouched pages cost nothing
SIZE = (HEADER + ENTRY_SIZE * ENTRIES + 4095) & ~4095
_FIRST, _QWORDS = HEADER // 8, ENTRY_SIZE // 8  # in qwords
NAME = b"uprobes-returns\0"


class ReturnTable:
    """The tracer's side of one table (shared by a fork family's address spaces)."""

    def __init__(self, view: mmap.mmap, runtime_addr: int,
                 note: Callable[[str], object]) -> None:
        self.view = view
        self.runtime_addr = runtime_addr
        self._q = memoryview(view).cast("Q")
        self._free: list[int] = []
        self._used = 0
        self._note = note
        self._full_noted = False

    def add(self, tid: int, sp: int, orig_ret: int) -> int | None:
        """Record a hijack; its entry's index, None if the table is full."""
        if self._free:
            i = self._free.pop()
        elif self._used < ENTRIES:
            i = self._used
        else:
            if not self._full_noted:
                self._full_noted = True
                self._note(f"more than {ENTRIES} return probes pending at once: the "
                           "returns of the calls beyond are not probed")
            return None
        q, at = self._q, _FIRST + _QWORDS * i
        q[at + 1] = sp
        q[at + 2] = orig_ret
        q[at] = tid
        if i == self._used:
            self._used += 1
            q[0] = self._used
        return i

    def free(self, index: int) -> None:
        """The entry's return is done (or undone, or stale)."""
        self._q[_FIRST + _QWORDS * index] = 0
        self._free.append(index)

    def entry(self, index: int) -> tuple[int, int, int]:
        """(tid, sp, real return address) of an entry, as the handler reads it."""
        at = _FIRST + _QWORDS * index
        return self._q[at], self._q[at + 1], self._q[at + 2]


def create(tid: int, regs: ptrace.UserRegs, pid: int, syscall_addr: int, name_addr: int,
           below: int, held: list[int], note: Callable[[str], object]) -> ReturnTable:
    """Make a table in process `pid` (through its stopped thread `tid`),
    mapped right below `below` if that is free (the gap the engine's areas
    use already), else anywhere. EngineError if it cannot."""
    hints = [below - SIZE, 0] if below - SIZE >= 0x10000 else [0]
    view, addr = map_shared(tid, regs, pid, syscall_addr, name_addr, SIZE, mmap.PROT_READ,
                            hints, held)
    return ReturnTable(view, addr, note)
