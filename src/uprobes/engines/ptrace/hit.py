"""What a synchronous handler sees: the stopped thread at one probe hit.

Registry consumers of the ptrace engine are called with a `PtraceHit` while the
thread that hit the probe is stopped (a `TaskLike`: pid, tid, comm):

    hit.regs                 # uprobes.sys.ptrace.UserRegs, live (rip = the probe's address
                             # on entry, the real return address on return)
    hit.read(addr, n)        # bytes of the tracee's memory (MemoryFault if unreadable)
    hit.write(addr, data)    # write the tracee's memory
    hit.set(rax=0, rdi=...)  # change registers; written back before the thread resumes
    hit.kind, hit.ip, hit.func, hit.probe, hit.ts_ns, hit.cpu

On an entry probe, a handler that sets `rip` elsewhere skips the probed
instruction: the thread resumes at the new `rip` (what the kernel does
since 2025 when a consumer changes the IP). On a return probe, `rax` is the
return value; setting it changes what the caller gets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from uprobes.sys.ptrace import UserRegs

if TYPE_CHECKING:
    from uprobes.engines.ptrace.tasks import Thread
    from uprobes.model.registry import Probe
    from uprobes.sys.procmem import ProcessMemory


class PtraceHit:
    """One probe hit of one stopped thread."""

    __slots__ = ("thread", "regs", "probe", "kind", "ip", "func", "file_base", "ts_ns",
                 "changed", "renames", "_comm")

    def __init__(self, thread: Thread, regs: UserRegs, probe: Probe, kind: str, ip: int,
                 func: int | None, file_base: int,
                 renames: Callable[[], int | None] | None = None) -> None:
        """`renames`: the kernel's rename word now, or None (`Thread.comm_now`)."""
        self.thread = thread
        self.renames = renames
        self._comm: str | None = None
        self.regs = regs
        self.probe = probe
        self.kind = kind
        self.ip = ip
        self.func = func
        self.file_base = file_base
        self.ts_ns = time.monotonic_ns()
        self.changed = False

    @property
    def pid(self) -> int:
        return self.thread.pid

    @property
    def tid(self) -> int:
        return self.thread.tid

    @property
    def comm(self) -> str:
        """The thread's name at this hit (not a name kept from before it),
        asked once a hit."""
        if self._comm is None:
            self._comm = self.thread.comm_now(None if self.renames is None else self.renames())
        return self._comm

    @property
    def cpu(self) -> int:
        return self.thread.cpu()

    @property
    def mem(self) -> ProcessMemory:
        """The process's memory (what fetchargs read)."""
        return self.thread.mm.mem

    def read(self, runtime_addr: int, n: int) -> bytes:
        return self.thread.mm.mem.read(runtime_addr, n)

    def write(self, runtime_addr: int, data: bytes) -> None:
        self.thread.mm.mem.write(runtime_addr, data)

    def set(self, **regs: int) -> None:
        """Change registers by name (`rax=0`); they take effect on resume."""
        for name, value in regs.items():
            if not hasattr(self.regs, name):
                raise AttributeError(f"no register {name!r}")
            setattr(self.regs, name, value & (2**64 - 1))
        self.changed = True
