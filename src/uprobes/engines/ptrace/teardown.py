"""Teardown: every thread stopped, put back in the original code, every probe
and change of ours undone, and all detached.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from uprobes.engines.ptrace import breakpoints, retprobes
from uprobes.engines.ptrace.state import TracerState
from uprobes.engines.ptrace.tasks import AddressSpace, Feature, Thread
from uprobes.engines.tracee.xol import remote_syscall
from uprobes.errors import KernelError, UprobesError
from uprobes.sys import procfs, ptrace

_REAP_S = 2.0  # how long detach waits for dying threads to become collectable


class Teardown(TracerState):
    """Undoing a session.

    Each feature that changes an address space pushes its undo onto that
    space's stack (`AddressSpace.undo`) the first time it is taken there
    (`_taken`): detach closes each stack, so the features of a space are
    undone in the reverse order they came, by construction, and a new
    feature adds its undo beside its do. A fork child's space takes the
    parent's features, in the parent's order: it inherits their changes."""

    def _taken(self, mm: AddressSpace, feature: Feature) -> None:
        """`feature` now changes `mm`: the first time, push its undo."""
        if feature in mm.undo_taken:
            return
        mm.undo_taken.append(feature)
        steps: dict[Feature, Callable[[AddressSpace], None]] = {
            "orphan handler": self._uninstall_orphan_handler,
            "int3s": self._remove_int3s,
            "jumps": self._remove_jumps,
            "semaphores": self._lower_semaphores,
            "returns": self._restore_returns,
        }
        mm.undo.callback(steps[feature], mm)

    def _taken_by_fork(self, parent: AddressSpace, child: AddressSpace) -> None:
        """A fork child's space has every change the parent's had."""
        for feature in parent.undo_taken:
            self._taken(child, feature)

    def _detach_all(self) -> None:
        if not self.threads:
            self._time_snapshot()
            self._orphans.close()
            self._close_rings()
            return
        self._quiesce()
        spaces = {id(t.mm): t.mm for t in self.threads.values()}
        for mm in spaces.values():
            mm.undo.close()
        self._undo.close()  # the run's own steps (the rings' reader going)
        dead: list[int] = []
        for t in list(self.threads.values()):
            if self._by is not None:  # its rows are read (and keyed) after `threads` is emptied
                self._former_tasks[t.ns_tid] = (t.pid, t.comm, t.tid)
            try:
                ptrace.detach(t.tid, t.resume_sig)
            except KernelError:
                if t.tid != t.pid:
                    dead.append(t.tid)
            for sig in t.pending:  # as `_resume` does: after the thread goes on
                try:
                    ptrace.tgkill(t.pid, t.tid, sig)
                except KernelError:
                    pass
            t.pending.clear()
            t.close()
        for tid in self._pending_new:
            try:
                ptrace.detach(tid, 0)
            except KernelError:
                pass
        for mm in spaces.values():
            mm.mem.close()
        self._reap(dead)
        self.threads.clear()
        self._pending_new.clear()
        if self._jumps is not None:
            self._jumps.fold_into(self.counts)
        self._time_snapshot()
        self._orphans.close()  # every int3 is gone: nothing for the reaper
        self._close_rings()

    @staticmethod
    def _reap(tids: list[int]) -> None:
        """Collect threads that could not be detached because they are dying
        (killed in their stop: the process exited meanwhile). A traced
        thread's exit waits for its tracer's wait(__WALL), and the leader's
        exit waits for all of them: left alone, they would hold the
        command's exit from the shell (or our launcher's waitpid) until we
        exit. Leaders are left to their parent."""
        deadline = time.monotonic() + _REAP_S
        for tid in tids:
            ptrace.wait_task_until(tid, deadline, lambda t: procfs.state(t) is None)

    def _close_rings(self) -> None:
        """Our views of the rings (the programs keep theirs)."""
        if self._jumps is not None:
            self._jumps.close_rings()

    def _threads_of(self, mm: AddressSpace) -> list[Thread]:
        return [t for t in self.threads.values() if t.mm is mm]

    def _restore_returns(self, mm: AddressSpace) -> None:
        """Hijacked return addresses back on the stacks (retprobes.py); a
        thread stopped at the trampoline goes on at its real return address."""
        for t in self._threads_of(mm):
            try:
                regs = ptrace.getregs(t.tid, t.regs)
                done: list[retprobes.ReturnInstance] = []
                if regs.rip in mm.trampolines:
                    done = retprobes.complete(t.returns, regs.rsp, mm.ret_table)
                    if done:
                        regs.rip = done[0].orig_ret
                        ptrace.setregs(t.tid, regs)
                retprobes.release(done, mm.ret_table)
                retprobes.restore(t.returns, mm.mem, mm.ret_table)
            except UprobesError:
                pass

    def _remove_int3s(self, mm: AddressSpace) -> None:
        """Threads inside a slot back in the original code, then every int3
        of ours removed (the slots stay: a signal frame may point into one)."""
        for t in self._threads_of(mm):
            try:
                regs = ptrace.getregs(t.tid, t.regs)
                site = next((s for s in mm.sites.values() if s.in_slot(regs.rip)), None)
                back = None if site is None else site.plan.original_rip(regs.rip)
                if back is not None:
                    regs.rip = back
                    ptrace.setregs(t.tid, regs)
            except UprobesError:
                pass
        for site in mm.sites.values():
            breakpoints.remove(mm.mem, site)
        mm.sites.clear()

    def _remove_jumps(self, mm: AddressSpace) -> None:
        """The original bytes back where our jumps are (jumppatch.py), and the
        kernel's words retired, through a thread that can lend itself."""
        if self._jumps is None:
            return
        lender = next((t for t in self._threads_of(mm) if t.can_lend), None)
        syscall_addr = mm.syscall_addr
        if lender is None or syscall_addr is None:
            self._jumps.remove(mm, mm.mem)
            return
        tid, held = lender.tid, lender.pending

        def call(nr: int, args: tuple[int, ...]) -> int:
            regs = ptrace.getregs(tid, ptrace.UserRegs())
            return remote_syscall(tid, regs, syscall_addr, nr, args, held)
        self._jumps.remove(mm, mm.mem, call)

    def _lower_semaphores(self, mm: AddressSpace) -> None:
        """Each USDT semaphore we raised lowered by what we added."""
        for addr, n in mm.semaphores.items():
            try:
                value = int.from_bytes(mm.mem.read(addr, 2), "little")
                mm.mem.write(addr, max(0, value - n).to_bytes(2, "little"))
            except UprobesError:
                pass
        mm.semaphores.clear()

    def _uninstall_orphan_handler(self, mm: AddressSpace) -> None:
        """SIGTRAP's own action back (orphan.py), every int3 gone by now."""
        lender = next((t for t in self._threads_of(mm) if t.can_lend), None)
        if lender is not None:
            self._orphans.uninstall(lender, lender.pending)

    def _abandon_rings(self) -> None:
        """No reader from now on: a hit in a trampoline drops its record at
        once if its ring is full (recording.py)."""
        if self._jumps is not None:
            for ring in self._jumps.rings:
                ring.abandon()
