"""Thread life: clone, fork, vfork and exec followed, exits recorded, and every
thread brought to a stop (before placing into a running process and at the
end of a run).
"""

from __future__ import annotations

import mmap
import signal
import struct
import time

from uprobes.engines.ptrace import retprobes
from uprobes.engines.ptrace.state import SIGTRAP, TracerState
from uprobes.engines.ptrace.tasks import AddressSpace, Thread, admit, dismiss
from uprobes.engines.tracee import killpoint
from uprobes.engines.trapfree.reader import FINAL_S
from uprobes.errors import KernelError, UprobesError
from uprobes.sys import procfs, ptrace, tsc
from uprobes.sys.procmem import ProcessMemory

# How long stopping every thread may take (a PTRACE_INTERRUPT is answered as
# soon as the thread is scheduled; a vfork parent answers when its child
# execs): past it, the threads that never stopped are left running.
_QUIESCE_S = 5.0
_SIGTRAP_BIT = 1 << (SIGTRAP - 1)
_SIGSEGV_BIT = 1 << (signal.SIGSEGV - 1)
_POLL_MIN_S, _POLL_MAX_S = 0.00005, 0.005  # polling back-off while waiting for stops


class ThreadLife(TracerState):
    """Tasks coming, changing and going."""

    # ------------------------------------------------------------ tasks

    def _task_event(self, t: Thread, event: int) -> None:
        if event in (ptrace.EVENT_CLONE, ptrace.EVENT_FORK, ptrace.EVENT_VFORK):
            self._new_task(t, ptrace.geteventmsg(t.tid), event)
        elif event == ptrace.EVENT_EXEC:
            self._exec(t, ptrace.geteventmsg(t.tid))
        elif event == ptrace.EVENT_VFORK_DONE and self._recorder is not None:
            self._recorder.vforks.returned(t.ns_tid, tsc.read())

    def _new_task(self, parent: Thread, tid: int, event: int) -> None:
        try:
            tgid = procfs.status(tid).tgid
        except UprobesError:
            tgid = parent.pid if event == ptrace.EVENT_CLONE else tid
        if tgid == parent.pid:
            new = Thread(tid, parent.pid, parent.mm)
            # A thread is in its process's pid namespace.
            ns_tid = tid if parent.ns_tid == parent.tid else procfs.ns_pid(tid)
            if self._jumps is not None:
                stack = _clone_stack(parent.tid, parent.mm.mem)
                if stack is not None:
                    self._jumps.thread_born(parent.mm, parent.mm.mem, parent.pid, tid, *stack)
                    self._jumps.report(self._note)
        else:
            if event == ptrace.EVENT_VFORK:
                mm = parent.mm  # shared until the child execs or exits
                mm.users += 1
            else:
                mm = parent.mm.fork_copy(tid)
                if self._jumps is not None:
                    self._jumps.fork(parent.mm, mm)  # the child has the jumps too
                    # A fork-like clone() given a stack of its own runs on none
                    # of the stacks in the table it copied: its own goes in.
                    stack = _clone_stack(parent.tid, parent.mm.mem, given_only=True)
                    if stack is not None:
                        self._jumps.thread_born(mm, mm.mem, tid, tid, *stack)
                        self._jumps.report(self._note)
                    if self._symbolizer is not None and self._recorder is not None:
                        self._symbolizer.spaces.reread(tid)  # (recorded stacks: walked later)
                self._orphans.forked(parent.mm, mm)
                self._taken_by_fork(parent.mm, mm)
            if self._jumps is not None:
                self._jumps.forked(tid)  # (its seccomp calls guard the code it shares)
            new = Thread(tid, tid, mm)
            ns_tid = new.ns_tid  # (a child of unshare(CLONE_NEWPID): a namespace of its own)
            if self._jumps is not None and self._jumps.span_pid_namespaces(mm, tid, parent.pid):
                self._note(f"process {tid} is in a pid namespace of its own, where its tids may "
                           f"be another process's: process {parent.pid}'s family asks the kernel "
                           "for the thread's name at each --comm test from now on")
            if event == ptrace.EVENT_VFORK and self._recorder is not None:
                # (The child is held before its first instruction, its parent at the event.)
                self._recorder.vforks.lent(parent.ns_tid, ns_tid, tsc.read())
            if self._pystacks is not None:
                self._pystacks.forked(parent.pid, tid)
            # Its stack holds the same trampolines.
            new.returns = retprobes.inherit(parent.returns, mm.ret_table, new.ns_tid, mm.mem)
        new.comm_cached, new.comm_at = parent.comm_cached, parent.comm_at
        # A fork child, and a thread too: one made by clone() without
        # CLONE_SETTLS shares its parent's thread block (and tid there).
        new.tls_check = self._jumps is not None
        admit(self.threads, self._nested, new, ns_tid)
        status = self._pending_new.pop(tid, None)
        if status is not None:  # its first stop came before this event
            new.stopped = True
            self._check_fork_tls(new)
            if not self._quiescing:
                self._resume(new)

    def _check_fork_tls(self, t: Thread) -> None:
        """At a new task's first stop (before its first instruction; the
        kernel has written the tid glibc's fork and pthread_create ask for
        by then): whether its thread block holds its own tid
        (jumppatch.check_fork_tls)."""
        if not t.tls_check or self._jumps is None:
            return
        t.tls_check = False
        try:
            fs_base = ptrace.getregs(t.tid, t.regs).fs_base
        except UprobesError:
            return  # gone meanwhile
        if not self._jumps.check_fork_tls(t.mm, t.mm.mem, fs_base, t.ns_tid):
            return
        if t.tid != t.pid:
            self._note(f"thread {t.tid} of process {t.pid} was made by a clone system call "
                       "that leaves its parent's tid in its thread block (no CLONE_SETTLS): "
                       "its family's in-program code asks the kernel for the tid from now on")
        else:
            self._note(f"process {t.pid} was forked by a system call that leaves its parent's "
                       "tid in its thread block: its family's in-program code asks the kernel "
                       "for the tid from now on")

    def _exec(self, t: Thread, former: int) -> None:
        if t.comm_cached:
            # /proc has the new image's comm already: what the old image left
            # under `t`'s tid is keyed by the comm read before (read anew below).
            t.comm_at = time.monotonic_ns()
        if self._jumps is not None and self._recorder is not None:
            # What the old image recorded is its: its hits named by that comm,
            # its stacks walked and named by the maps known of it, before they
            # give way to the new image's.
            until = time.monotonic() + FINAL_S  # (its other processes write on meanwhile)
            while self._drain(self._jumps.rings) and time.monotonic() < until:
                pass
        # The exec ended every other thread of the process. A thread other
        # than the leader that exec'd took the leader's tid (`t`): no exit is
        # reported for its former tid; the others' exits came before this
        # event, but any still listed is gone too. Each goes as an exited
        # thread does, and the old image's rows under `t`'s tid are released.
        if former != t.tid and former in self.threads:
            self._release(self.threads[former])
        for other in [o for o in self.threads.values() if o.pid == t.pid and o is not t]:
            self._release(other)
        if self._jumps is not None:
            self._thread_done(t)
        retprobes.release(t.returns, t.mm.ret_table)
        t.mm.release()
        self._orphans.released(t.mm)
        t.mm = AddressSpace(t.pid, ProcessMemory(t.pid))
        t.returns.clear()
        t.forget_comm()
        self._settle(t)
        # A fork child that the caller no longer wants followed for what it
        # runs now: nothing placed, detached at its resume (a tracer would
        # only cost it a stop at each clone and signal).
        if self._let_go is not None and t.pid not in (self.pid, self.child) \
                and self._let_go(t.pid):
            t.let_go = True
            return
        self._place_all(t)
        killpoint.reached("exec-placed")

    def _settle(self, t: Thread) -> None:
        """Take a thread stopped inside a system call (an exec event) to the
        call's exit: a single-step reports there, before any instruction
        runs, with the call's result set. Registers saved and restored
        around a remote call are then final (execve's return value
        would otherwise overwrite the injected call's number)."""
        rip = ptrace.getregs(t.tid, t.regs).rip
        while True:
            stop = self._single_step(t)
            if stop is None:
                return
            sig, event = stop
            if event == 0 and sig == SIGTRAP:
                if ptrace.getregs(t.tid, t.regs).rip != rip:
                    self._note(f"process {t.pid}: its first instruction ran before the "
                               "probes were placed")
                return
            if event == 0:
                t.pending.append(sig)

    def _single_step(self, t: Thread) -> tuple[int, int] | None:
        """One single-step of `t`: its stop's (signal, ptrace event), or None
        if the thread is gone (exited or killed) instead."""
        ptrace.singlestep(t.tid)
        status = ptrace.decode(ptrace.wait_task(t.tid))
        if not status.stopped:
            self._gone(t, status)
            return None
        return status.signal, status.event

    def _forget(self, t: Thread) -> None:
        """A thread that is gone: its return table entries too (a fork family shares one)."""
        retprobes.release(t.returns, t.mm.ret_table)
        t.close()

    def _release(self, t: Thread) -> None:
        """A thread that is gone (exited, ended by an exec, or collected by
        another wait): out of `threads`, what it left keyed as its own, its
        timing rows free for a new thread."""
        if self._by is not None:
            # Its keys are shown by pid or comm at the end; and known before
            # it leaves `threads`, since a read in another thread keys its
            # row (still owned until _thread_done) by what it finds here.
            self._former_tasks[t.ns_tid] = (t.pid, t.comm, t.tid)
        self.threads.pop(t.tid, None)
        dismiss(self._nested, t)
        if self._recorder is not None:  # its last records may still be in a ring
            self._recorder.former(t.ns_tid, (t.pid, t.comm, t.tid))
            self._recorder.vforks.returned(t.ns_tid, tsc.read())
        self._forget(t)
        if self._jumps is not None:
            self._thread_done(t)
            self._jumps.thread_gone(t.mm, t.mm.mem, t.tid)

    def _gone(self, t: Thread, status: ptrace.WaitStatus) -> None:
        self._release(t)
        if t.tid == t.pid:
            t.mm.release()
            self._orphans.released(t.mm)
        target = self.child if self.child is not None else self.pid
        if t.tid == target:
            if not self.target_exited and self.child is None:
                self._note(f"process {target} exited")
            self.target_exited = True
            self._done = True
            if self.child is not None:
                self.child_status = status.code

    # ------------------------------------------------------------ stopping

    def _quiesce(self, interrupt: bool = True) -> None:
        """Until every traced thread is in a ptrace stop (interrupting the
        running ones), recording what each stop means for its resume."""
        self._quiescing = True
        try:
            self._quiesce_all(interrupt)
        finally:
            self._quiescing = False

    def _quiesce_all(self, interrupt: bool) -> None:
        if interrupt:
            for t in list(self.threads.values()):
                if not t.stopped:
                    try:
                        ptrace.interrupt(t.tid)
                    except KernelError:
                        pass
        deadline = time.monotonic() + _QUIESCE_S
        pause = _POLL_MIN_S
        while any(not t.stopped for t in self.threads.values()):
            tid, raw = ptrace.wait_any(nohang=True)
            if tid == 0:  # nothing yet: a signal to us does not end the wait, the bound does
                running = self._running()
                if not running:
                    break
                if time.monotonic() >= deadline:
                    self._note("threads " + ", ".join(str(t.tid) for t in running)
                               + f" did not stop within {_QUIESCE_S:g} s; left running")
                    break
                time.sleep(pause)
                pause = min(pause * 2, _POLL_MAX_S)
                continue
            pause = _POLL_MIN_S
            if tid < 0:  # none left to wait for: the threads not stopped were collected elsewhere
                for gone in list(self.threads.values()):
                    if not gone.stopped:
                        self._release(gone)
                break
            status = ptrace.decode(raw)
            found = self.threads.get(tid)
            if found is None:
                if status.stopped:
                    self._pending_new[tid] = status
                continue
            t = found
            if not status.stopped:
                self._gone(t, status)
                continue
            t.stopped = True
            sig, event = status.signal, status.event
            t.stop_event = event
            if event == ptrace.EVENT_STOP:
                t.group_stop = status.group_stop
                if (not t.group_stop
                        and procfs.thread_pending(t.tid) & (_SIGTRAP_BIT | _SIGSEGV_BIT)):
                    # The same for a SIGSEGV queued by our own rdtsc(p) in a
                    # program that turned its TSC off: taken now, it is
                    # emulated below; a fault of the program's own is kept
                    # for it (resume_sig), as untraced.
                    # Our interrupt is reported before a SIGTRAP the thread
                    # already has queued (an int3 it hit: the kernel reports
                    # job-control traps first). Left queued, it would be
                    # delivered after we detach, to a program whose SIGTRAP
                    # action is its own again: killed by SIGTRAP. Let the
                    # thread take it now, in a stop the SIGTRAP branch below
                    # handles; no instruction of the program runs first.
                    try:
                        ptrace.cont(t.tid, 0)
                        t.stopped = False
                        continue
                    except KernelError:
                        pass  # gone meanwhile: its exit is reported next
            elif event:
                self._task_event(t, event)
            elif sig == SIGTRAP:
                regs = ptrace.getregs(t.tid, t.regs)
                if regs.rip - 1 in t.mm.sites:  # a hit we will not handle: rewind
                    regs.rip -= 1
                    ptrace.setregs(t.tid, regs)
                elif regs.rip - 1 in t.mm.guard_traps:
                    # A hit we will not handle now: back to its int3, taken
                    # again if the run goes on (a nop once detached).
                    regs.rip -= 1
                    ptrace.setregs(t.tid, regs)
                elif regs.rip - 1 not in t.mm.trampolines:
                    t.resume_sig = sig
                else:
                    regs.rip -= 1  # at the trampoline: _unwind puts it right
                    ptrace.setregs(t.tid, regs)
            elif sig == signal.SIGSEGV and self._emulate_tsc(t):
                pass  # our own rdtsc(p) with the TSC off, done: the thread stays stopped
            else:
                t.resume_sig = sig

    def _running(self) -> list[Thread]:
        """Traced threads not in a ptrace stop that may still report one: a
        zombie never will (a leader's exit waits for its other threads)."""
        return [t for t in self.threads.values()
                if not t.stopped and procfs.state(t.tid) not in (None, "Z", "X")]


_NR_CLONE, _NR_CLONE3 = 56, 435
_CLONE_ARGS_STACK = struct.Struct("<QQ")
_PAGE = mmap.PAGESIZE  # struct clone_args: stack, stack_size at 40


def _clone_stack(tid: int, mem: ProcessMemory, given_only: bool = False
                 ) -> tuple[int, int | None] | None:
    """The stack pointer the task just made by thread `tid`'s clone (stopped
    at its clone or fork event) starts with, the call's stack argument (the
    caller's own stack pointer if it gave none), and the stack's base where
    the call says it (clone3); None if it cannot be read, or (`given_only`)
    if the call gave no stack (fork, vfork: the caller's is copied)."""
    try:
        regs = ptrace.getregs(tid, ptrace.UserRegs())
        if regs.orig_rax == _NR_CLONE and regs.rsi:
            # glibc's clone() stores the function and its argument at the top
            # of the stack it was given and passes what is below them: the
            # stack reaches up to the end of that page (which is its own).
            return -(-regs.rsi // _PAGE) * _PAGE, None
        if regs.orig_rax == _NR_CLONE and not given_only:
            return regs.rsp, None
        if regs.orig_rax == _NR_CLONE3:
            stack, size = _CLONE_ARGS_STACK.unpack(mem.read(regs.rdi + 40, 16))
            if stack:
                return stack + size, stack
            return None if given_only else (regs.rsp, None)
    except UprobesError:
        pass
    return None
