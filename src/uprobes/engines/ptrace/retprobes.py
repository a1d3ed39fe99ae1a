"""Return probes: the return address swapped for a trampoline, per-thread chains.

At the entry of a return-probed function (the probe is at its first
instruction, so `[rsp]` is the return address) the return address is
replaced by the trampoline of the probe's XOL area, an int3, and a
`ReturnInstance` is pushed on the thread's stack. The trampoline's trap pops
the instances that this return completes and puts `rip` at the real return
address. The rules are the kernel's (prepare_uretprobe(),
uprobe_handle_trampoline(), arch_uretprobe_is_alive() on x86):
- chained: a tail call into another probed function finds the trampoline
  already in `[rsp]`; it keeps the real address from the instance below;
- stale instances (a longjmp or an exception unwound past the frame) are
  dropped by stack pointer, their return handlers never called: at a call
  an instance is alive while `rsp < ri.sp`, at a return while `rsp <= ri.sp`;
- at most MAX_DEPTH pending instances per thread (deeper calls are not
  hijacked, as MAX_URETPROBE_DEPTH).
Where the process has a return table (rettable.py: what the in-tracee
SIGTRAP handler reads after a kill -9 of uprobes), every non-chained
instance has an entry there, made before its return address is swapped
and freed once the instance is done with; a call the table has no room
for is not hijacked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from uprobes.errors import UprobesError
from uprobes.sys.procmem import MemoryFault, ProcessMemory

if TYPE_CHECKING:
    from uprobes.engines.ptrace.rettable import ReturnTable
    from uprobes.model.registry import Probe

MAX_DEPTH = 64
_Q = struct.Struct("<Q")


@dataclass(eq=False)
class ReturnInstance:
    probe: Probe
    func: int       # run-time address of the function's entry (the probe)
    sp: int         # rsp at entry: where the return address lives
    orig_ret: int   # the real return address
    chained: bool
    trampoline: int
    file_base: int
    entry: int = -1  # its index in the return table, -1: none


def hijack(returns: list[ReturnInstance], mem: ProcessMemory, rsp: int, trampoline: int,
           probe: Probe, func: int, file_base: int, table: ReturnTable | None = None,
           tid: int = 0) -> bool:
    """Swap the return address at `rsp` for `trampoline`; False if not done
    (too deep, an unreadable stack, a chain with nothing under it, or no
    room in `table`, where thread `tid`'s hijacks are mirrored)."""
    try:
        orig = _Q.unpack(mem.read(rsp, 8))[0]
    except MemoryFault:
        return False
    chained = orig == trampoline
    # cleanup_return_instances(): a chained call may share the frame (sp <= ri.sp).
    while returns and not (rsp <= returns[-1].sp if chained else rsp < returns[-1].sp):
        release([returns.pop()], table)
    if len(returns) >= MAX_DEPTH:
        return False
    entry = -1
    if chained:
        if not returns:
            return False
        orig = returns[-1].orig_ret
    else:
        if table is not None:
            got = table.add(tid, rsp, orig)
            if got is None:
                return False
            entry = got
        try:
            mem.write(rsp, _Q.pack(trampoline))
        except MemoryFault:
            release([ReturnInstance(probe, func, rsp, orig, chained, trampoline, file_base,
                                    entry)], table)
            return False
    returns.append(ReturnInstance(probe, func, rsp, orig, chained, trampoline, file_base,
                                  entry))
    return True


def complete(returns: list[ReturnInstance], rsp: int,
             table: ReturnTable | None = None) -> list[ReturnInstance]:
    """At the trampoline (after its `ret`, `rsp` is one word above the
    return address slot): the instances this return completes, innermost
    first; empty if there are none (corruption). Stale groups are dropped.
    The caller releases the group once the thread's rip is off the trampoline."""
    while returns:
        group = [returns.pop()]
        while group[-1].chained and returns:
            group.append(returns.pop())
        if not returns or rsp <= returns[-1].sp:
            return group
        release(group, table)
    return []


def release(done: list[ReturnInstance], table: ReturnTable | None) -> None:
    """Free the table entries of instances that are over."""
    if table is None:
        return
    for ri in done:
        if ri.entry >= 0:
            table.free(ri.entry)
            ri.entry = -1


def inherit(returns: list[ReturnInstance], table: ReturnTable | None, tid: int,
            mem: ProcessMemory) -> list[ReturnInstance]:
    """A fork (or vfork) child's copy of its parent thread's instances, its
    stack holding the same trampolines: entries for its thread `tid` in the
    shared `table`. If the table has no room, the child's return addresses
    are put back instead (through its `mem`) and it has none pending."""
    copies = [ReturnInstance(ri.probe, ri.func, ri.sp, ri.orig_ret, ri.chained,
                             ri.trampoline, ri.file_base) for ri in returns]
    if table is None:
        return copies
    for ri in copies:
        if not ri.chained:
            got = table.add(tid, ri.sp, ri.orig_ret)
            if got is None:
                restore(copies, mem, table)
                return []
            ri.entry = got
    return copies


def restore(returns: list[ReturnInstance], mem: ProcessMemory,
            table: ReturnTable | None = None) -> None:
    """Put every hijacked return address back where the trampoline still is."""
    for ri in returns:
        try:
            if _Q.unpack(mem.read(ri.sp, 8))[0] == ri.trampoline:
                mem.write(ri.sp, _Q.pack(ri.orig_ret))
        except UprobesError:
            pass  # the stack is gone (the thread exited)
    release(returns, table)
    returns.clear()
