"""The run loop's work: a stop's meaning, hits (int3 traps, single steps of a
displaced instruction, return hits), resuming a thread as it would run
untraced, and the trap-free rings read into hits.
"""

from __future__ import annotations

import errno
import signal

from uprobes.engines.ptrace import retprobes
from uprobes.engines.ptrace.breakpoints import GuardTrap, Site
from uprobes.engines.ptrace.hit import PtraceHit
from uprobes.engines.ptrace.state import FAULTS, NO_HANDLER, SIGTRAP, TracerState
from uprobes.engines.ptrace.tasks import Thread, by_own_tid, roster
from uprobes.engines.trapfree.reader import FINAL_S, Owner
from uprobes.engines.trapfree.ring import Ring
from uprobes.errors import KernelError
from uprobes.model.event import Hit
from uprobes.sys import ptrace, tsc
from uprobes.sys.ptrace import UserRegs

_SI_KERNEL = 0x80  # the si_code of the #GP an rdtsc(p) raises with the TSC off
_RDTSC = b"\x0f\x31"
_RDTSCP = b"\x0f\x01\xf9"


class RunLoop(TracerState):
    """Stops and hits."""

    def _drain(self, rings: list[Ring], final: bool = False) -> bool:
        """Deliver what the rings hold (reader.py) to the probes' dispatch;
        True if it stopped with more to read (to handle stops meanwhile)."""
        recorder = self._recorder
        assert recorder is not None
        threads, nested = self.threads, self._nested

        def who(tid: int) -> Owner | None:
            t = by_own_tid(threads, nested, tid)
            return None if t is None else (t.pid, t.comm, t.tid)
        if self._raw is not None:  # `uprobes record`: the records as they are
            before = recorder.raw_records
            behind = recorder.dump(rings, self._roster, self._raw, final)
            self.events += recorder.raw_records - before
        else:
            behind = recorder.drain(rings, who, self._deliver_recorded, final)
        self.lost = sum(r.lost for r in rings)
        self._corrupt_rings = sum(r.corrupt for r in rings)
        return behind

    def _roster(self) -> list[tuple[int, Owner]]:
        """(own tid, (pid, comm, tid)) of the traced threads (tasks.roster)."""
        out, self._roster_turn = roster(self.threads, self._roster_turn)
        return out

    def _report_corrupt(self) -> None:
        """One line if the programs wrote impossible values into the memory
        they share with us (left out of every count and event above)."""
        records = self._recorder.corrupt if self._recorder is not None else 0
        words = self._corrupt_rings + (self._jumps.corrupt if self._jumps is not None else 0)
        if records or words:
            self._note(f"the traced program overwrote the memory it shares with uprobes "
                       f"(memfd:uprobes-counters): {records} records and {words} counter "
                       "values that it cannot have made are left out")
        sealed, by = self._jumps.sealed if self._jumps is not None else (0, 0)
        if sealed:
            self._note(f"{sealed} hits are recorded without their Python frames: process "
                       f"{by} entered seccomp() or prctl(PR_SET_SECCOMP) after the probes were "
                       "placed, and the in-program code copies the frames by system calls "
                       "(getpid, process_vm_readv) that a new filter could kill it for; "
                       "--no-trapfree reads them at a stop")
        self._report_tsc_traps()
        unnamed = self._jumps.unnamed if self._jumps is not None else 0
        if unnamed:
            self._note(f"{unnamed} hits whose thread name could not be read (a seccomp "
                       "filter failed prctl(PR_GET_NAME), or the program entered seccomp() "
                       "after placement and the name was not asked for) are not counted")

    def _deliver_recorded(self, hits: list[Hit]) -> None:
        """Hits of direct sites (counted by the recorder already)."""
        emit = self._on_hits
        if emit is not None:
            self.events += len(hits)
            if self._shaped is not None:
                self._shaped.write(hits)
            else:
                emit(hits)

    def _drain_last(self) -> None:
        """The end of a run: every thread stopped (or gone), so every record
        reserved is committed or never will be; deliver them all. The
        threads stay stopped until `run` resumes them or detach."""
        assert self._jumps is not None
        if self.threads and not self.target_exited:
            self._quiesce()
        if self._drain(self._jumps.rings, final=True):
            self._note(f"the rings were still filling after {FINAL_S:g} s of reading with "
                       "every traced thread stopped (a process uprobes does not trace writes "
                       "into them); what they held then is counted lost")

    def _handle(self, tid: int, raw: int) -> None:
        status = ptrace.decode(raw)
        t = self.threads.get(tid)
        if t is None:
            if status.stopped:
                self._pending_new[tid] = status  # a new task, before its parent's event
            return
        if not status.stopped:
            self._gone(t, status)
            return
        t.stopped = True
        if t.tls_check:
            self._check_fork_tls(t)
        sig = status.signal
        event = t.stop_event = status.event
        if event == 0:
            if sig == SIGTRAP:
                self._trap(t)
                return
            if sig == signal.SIGSEGV and self._emulate_tsc(t):
                self._resume(t)
                return
            if sig in FAULTS:
                self._fault_in_our_code(t, sig)
            t.resume_sig = sig  # delivered exactly as untraced
        elif status.group_stop:
            t.group_stop = True
        elif event != ptrace.EVENT_STOP:
            self._task_event(t, event)
        self._resume(t)

    def _emulate_tsc(self, t: Thread) -> bool:
        """A SIGSEGV at one of our own `rdtsc`/`rdtscp` (the program turned
        the time-stamp counter off: prctl(PR_SET_TSC, PR_TSC_SIGSEGV), or
        seccomp strict mode): do what the instruction would have done, with
        our own reading of the counter (one counter for every process of an
        invariant TSC), and the program never sees the signal. True if so."""
        try:
            regs = ptrace.getregs(t.tid, t.regs)
            if ptrace.getsiginfo(t.tid).si_code != _SI_KERNEL:  # a kill(), not the fault
                return False
        except KernelError:
            return False
        rip = regs.rip
        if not any(a.contains(rip) for a in t.mm.areas):
            return False
        code = t.mm.mem.read_upto(rip, 3)
        if code[:2] == _RDTSC:
            size = 2
        elif code == _RDTSCP:
            size = 3
        else:
            return False
        now, aux = tsc.read_aux()
        regs.rax, regs.rdx = now & 0xFFFF_FFFF, now >> 32
        if size == 3:
            regs.rcx = aux
        regs.rip = rip + size
        try:
            ptrace.setregs(t.tid, regs)
        except KernelError:
            return False
        self._tsc_traps[t.pid] = self._tsc_traps.get(t.pid, 0) + 1
        return True

    def _report_tsc_traps(self) -> None:
        """One line per process whose trap-free hits took a trap each for
        reading a time-stamp counter it had turned off."""
        for pid, n in sorted(self._tsc_traps.items()):
            self._note(f"process {pid} turned the time-stamp counter off "
                       "(prctl(PR_SET_TSC) or seccomp strict mode): uprobes read it for "
                       f"the program's trap-free probe code {n} times, each a trap (which "
                       "latency's durations include: tens of microseconds)")

    def _fault_in_our_code(self, t: Thread, sig: int) -> None:
        """A fault about to be delivered: if it is in our trap-free code (the
        program unmapped or protected what it shares with us), say so once
        per process; the program gets the signal as it would untraced."""
        if t.pid in self._faulted:
            return
        try:
            rip = ptrace.getregs(t.tid, t.regs).rip
            addr = ptrace.getsiginfo(t.tid).si_addr
        except KernelError:
            return
        if not any(a.contains(rip) for a in t.mm.areas):
            return
        self._faulted.add(t.pid)
        self._note(f"process {t.pid}: {signal.Signals(sig).name} in uprobes' trap-free probe "
                   f"code at {rip:#x} (address {addr:#x}): the program unmapped, protected or "
                   "truncated the memory it shares with uprobes; it gets the signal as it "
                   "would untraced")

    def _resume(self, t: Thread) -> None:
        sig, t.resume_sig = t.resume_sig, 0
        if not sig and t.pending:
            sig = t.pending.pop(0)
        for more in t.pending:
            ptrace.tgkill(t.pid, t.tid, more)
        t.pending.clear()
        try:
            if t.let_go:  # its exec left no other thread, and nothing of ours in it
                ptrace.detach(t.tid, sig)
                self.threads.pop(t.tid, None)
                t.close()
                t.mm.release()
            elif t.group_stop:
                t.group_stop = False
                self._listen(t)
            else:
                ptrace.cont(t.tid, sig)
        except KernelError as e:
            if e.errno != errno.ESRCH:
                raise
        t.stopped = False  # not before: a thread we failed to resume is still ours to stop
        t.stop_event = 0

    @staticmethod
    def _listen(t: Thread) -> None:
        """Leave `t` in its group-stop (the process was stopped by a signal)."""
        try:
            ptrace.listen(t.tid)
        except KernelError as e:
            if e.errno != errno.EIO:
                raise
            # PTRACE_LISTEN is refused unless the last stop was a
            # PTRACE_EVENT_STOP: the thread has lent itself to an injected call
            # or a step since. A SIGSTOP queued now is taken before it returns
            # to user mode, so it runs no instruction and stops again (its
            # delivery and the group-stop are reported like any other).
            ptrace.tgkill(t.pid, t.tid, signal.SIGSTOP)
            ptrace.cont(t.tid, 0)

    # ------------------------------------------------------------ hits

    def _trap(self, t: Thread) -> None:
        tid = t.tid
        regs = ptrace.getregs(tid, t.regs)
        bp = regs.rip - 1
        mm = t.mm
        site = mm.sites.get(bp)
        if site is None:
            if bp in mm.trampolines:
                self._return_hit(t, regs)
            elif bp in mm.guard_traps:
                self._guard_trap_hit(t, regs, mm.guard_traps[bp])
            else:
                t.resume_sig = SIGTRAP  # the program's own trap
                self._resume(t)
            return
        regs.rip = bp
        probe = site.probe
        try:
            if probe is None:
                self._place_all(t)  # the rendezvous: libraries came or went
            else:
                dispatch = probe.dispatch
                if dispatch is not NO_HANDLER:
                    # One handler of ours that only counts (identity: a second
                    # consumer makes the dispatch a chain): what it would do.
                    name = self._counting.get(dispatch)
                    if name is not None:
                        self.counts[name] += 1
                    else:
                        dispatch(PtraceHit(t, regs, probe, "p", bp, None, site.file_base,
                                           self._rename_word))
                if site.ret_func is not None and not site.ret_in_place \
                        and site.plan.emulate(regs, mm.mem):
                    # A probe on a ret: handlers see the state after it, as a uretprobe's.
                    name = self._counting.get(probe.ret_dispatch)
                    if name is not None:
                        self.counts[name] += 1
                    else:
                        probe.ret_dispatch(PtraceHit(t, regs, probe, "r", regs.rip,
                                                     site.ret_func, site.file_base,
                                                     self._rename_word))
                    ptrace.setregs(tid, regs)
                    self._resume(t)
                    return
                if site.ret_in_place:
                    # A return site that is no `ret` (a py: function's return in
                    # the eval loop): handlers see the state before it, as the
                    # kernel engine's probe there does.
                    name = self._counting.get(probe.ret_dispatch)
                    if name is not None:
                        self.counts[name] += 1
                    else:
                        probe.ret_dispatch(PtraceHit(t, regs, probe, "r", bp, site.ret_func,
                                                     site.file_base, self._rename_word))
                elif probe.ret_dispatch is not NO_HANDLER and site.ret_func is None \
                        and mm.areas:
                    area = mm.area_of(site.slot_addr) or mm.areas[0]
                    self._taken(mm, "returns")
                    retprobes.hijack(t.returns, mm.mem, regs.rsp, area.trampoline, probe, bp,
                                     site.file_base, mm.ret_table, t.ns_tid)
        except BaseException:
            ptrace.getregs(tid, regs)  # as trapped: a handler's changes are dropped
            regs.rip = bp
            ptrace.setregs(tid, regs)
            raise
        if regs.rip != bp:  # a handler moved rip: the probed instruction is skipped
            ptrace.setregs(tid, regs)
            self._resume(t)
            return
        # The probed instruction: emulated, or boosted from its slot (one trap), or stepped.
        plan = site.plan
        emulation = plan.emulation
        if emulation is not None and emulation(regs, mm.mem):
            if regs.rip == bp + 1:
                # A 1-byte instruction (push reg): done, it looks like the trap
                # itself, which the in-tracee handler would redo if we died
                # before resuming (orphan.py). Resume at the slot's way out.
                regs.rip = plan.slot_rip(bp + 1) or regs.rip
            ptrace.setregs(tid, regs)
        elif plan.boosted:
            regs.rip = site.slot_addr
            ptrace.setregs(tid, regs)
        else:
            self._step(t, regs, site)
            return
        t.stopped = False
        if t.pending:
            self._resume(t)
        else:
            ptrace.cont(tid, 0)

    def _guard_trap_hit(self, t: Thread, regs: UserRegs, trap: GuardTrap) -> None:
        """A hit from the int3 in a jump's code (trapfree/pyguard.py): every
        register is the program's at the probed instruction, which handlers
        see as `rip`; the thread goes on after the int3 (the displaced
        instructions, then back), or where a handler moved rip."""
        after = regs.rip
        regs.rip = at = trap.runtime_addr
        probe = trap.probe
        try:
            if trap.ret:
                probe.ret_dispatch(PtraceHit(t, regs, probe, "r", at, at, trap.file_base,
                                             self._rename_word))
            else:
                probe.dispatch(PtraceHit(t, regs, probe, "p", at, None, trap.file_base,
                                         self._rename_word))
        except BaseException:
            ptrace.getregs(t.tid, regs)  # as trapped: a handler's changes are dropped
            raise
        if regs.rip == at:
            regs.rip = after
        ptrace.setregs(t.tid, regs)
        self._resume(t)

    def _step(self, t: Thread, regs: UserRegs, site: Site) -> None:
        """Single-step the slot; asynchronous signals wait until it is done, a
        fault of the copy is delivered as a fault of the original."""
        regs.rip = site.slot_addr
        ptrace.setregs(t.tid, regs)
        while True:
            stop = self._single_step(t)
            if stop is None:
                return
            sig, event = stop
            if event:
                continue
            if sig == SIGTRAP:
                break
            if sig in FAULTS:
                ptrace.getregs(t.tid, regs)
                if site.in_slot(regs.rip):  # the copy faulted: as if the original did
                    regs.rip = site.runtime_addr
                    ptrace.setregs(t.tid, regs)
                    t.resume_sig = sig
                    self._resume(t)
                    return
            t.pending.append(sig)
        ptrace.getregs(t.tid, regs)
        site.plan.after_step(regs)
        ptrace.setregs(t.tid, regs)
        self._resume(t)

    def _return_hit(self, t: Thread, regs: UserRegs) -> None:
        table = t.mm.ret_table
        done = retprobes.complete(t.returns, regs.rsp, table)
        if not done:  # nothing pending: someone jumped here (the kernel sends SIGILL)
            t.resume_sig = signal.SIGILL
            self._resume(t)
            return
        regs.rip = done[0].orig_ret
        try:
            for ri in done:
                name = self._counting.get(ri.probe.ret_dispatch)
                if name is not None:
                    self.counts[name] += 1
                else:
                    ri.probe.ret_dispatch(PtraceHit(t, regs, ri.probe, "r", ri.orig_ret,
                                                    ri.func, ri.file_base, self._rename_word))
        finally:
            ptrace.setregs(t.tid, regs)
            retprobes.release(done, table)  # rip is off the trampoline: not before
        t.stopped = False
        ptrace.cont(t.tid, 0) if not t.pending else self._resume(t)
