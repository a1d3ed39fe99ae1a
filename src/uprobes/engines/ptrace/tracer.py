"""`PtraceTracer`: the ptrace engine's tracing session (the kernel engine's interface).

It traces a launched command (`child`: seized while held before exec,
probes placed at its exec stop) or a running process (`pid`: every
thread seized and interrupted, probes placed, threads resumed), follows
clone, fork, vfork and exec, and places int3s in every traced address
space that maps a probed file, also when libraries come later (the
dynamic linker's rendezvous). Each hit runs the registry's consumers
synchronously (see hit.py), then the displaced instruction out of line
(relocate.py), never in place. Signals reach the program as they would
untraced; group-stops are kept with PTRACE_LISTEN.

The hit path is one waitpid, PTRACE_GETREGS, PTRACE_SETREGS and
PTRACE_CONT (boosted or emulated instructions); a return probe adds one
read and one write of the stack at entry. The `cpu` of an event costs one
more pread (/proc/TID/stat), only when events are built (`trace`).

Every ptrace request must come from the thread that attached: enter, run
and exit a tracer in one thread. Exit undoes everything, at any moment:
every thread stopped, threads inside a slot moved back to the original
code, hijacked return addresses restored, int3s removed, all detached
(the XOL areas stay mapped: a signal frame may still point into one).
"""

from __future__ import annotations

import errno
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from types import TracebackType
from typing import cast

from uprobes.engines.ptrace import breakpoints, rendezvous, retprobes
from uprobes.engines.ptrace.breakpoints import PlacementRefused, Site
from uprobes.engines.ptrace.hit import PtraceHit
from uprobes.engines.ptrace.orphan import OrphanGuard
from uprobes.engines.ptrace.permissions import check_attach, explain_refusal, tracer_of
from uprobes.engines.ptrace.tasks import AddressSpace, Thread
from uprobes.engines.signals import StopSignals
from uprobes.engines.tracee import relocate
from uprobes.engines.tracee.fetch import ArgFetcher, FetchContext
from uprobes.engines.tracee.xol import XolArea, find_syscall_insn, map_area
from uprobes.engines.trapfree.jumppatch import NotTrapFree, Record, TrapFree, plan_for
from uprobes.engines.trapfree.recording import (
    Direct,
    RecordedSite,
    Recorder,
    Ring,
    ShapedLines,
    direct_hit,
    recipe_for,
    waits,
)
from uprobes.errors import EngineError, KernelError, ProcessError, UprobesError, UsageError
from uprobes.model.event import ArgValue, Event, Hit, ProbeInfo, display_names, hit_event
from uprobes.model.filters import HitFilter, TaskView
from uprobes.model.probe import InodeKey, ResolvedProbe, VdsoKey
from uprobes.model.refusal import Refusals
from uprobes.model.registry import Consumer, Probe, Registry, TaskLike, prepare_dispatch
from uprobes.render.protocol import HitRenderer, LineRenderer
from uprobes.resolve.abi import probe_info
from uprobes.sys import procfs, ptrace
from uprobes.sys.procmem import MemoryFault, ProcessMemory
from uprobes.sys.ptrace import UserRegs
from uprobes.unwind.capture import StackCapture, Symbolizer, stack_delivery
from uprobes.unwind.stack import StackCopy

_SIGTRAP = int(signal.SIGTRAP)
_FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})
_WAKE_S = 0.05  # the run loop's wake-up period (stop flag, deadline)
# How long stopping every thread may take (a PTRACE_INTERRUPT is answered as
# soon as the thread is scheduled; a vfork parent answers when its child
# execs): past it, the threads that never stopped are left running.
_QUIESCE_S = 5.0
_REAP_S = 2.0  # how long detach waits for dying threads to become collectable
_POLL_MIN_S, _POLL_MAX_S = 0.00005, 0.005  # polling back-off while waiting for stops
_RING_WAKE_S = 0.01  # with trap-free probes: also how often their rings are read
_NO_HANDLER = prepare_dispatch([])  # a probe's dispatch when no consumer wants that side


class PtraceTracer:
    """A tracing session on the ptrace engine; use as a context manager.

    `pid`: an existing process (all its threads, and what they start later).
    `child`: a launched command's pid, held before exec (it and its
    children). `note` receives one line per probe skipped. `registry`
    holds the probes and their consumers: add consumers (handlers getting a
    `PtraceHit`) before entering; the tracer adds one per probe for its events.
    `stack_bytes`: `run()` gives each event its user stack, walked from the
    registers and up to that many bytes read from the stack pointer at the
    hit (0: no stacks).
    `hit_filter`: only the hits it keeps are counted and delivered; its
    `--tid`/`--comm` part is tested before anything is fetched, the
    condition as soon as what it names is fetched.
    `trapfree`: probes whose only consumer is the tracer's own (not on a
    return, no `stack_bytes`) are placed as jumps to in-process code where
    that is safe (jumppatch.py), no stop per hit. "count" (or True): such a
    tracer only counts (`run(None)`); a probe with no filter then adds to a
    counter, one with a filter records into a ring (recording.py) and is
    counted as its records are read. "record": every such probe records,
    and its events are read from the rings at the run loop's wake-ups
    (every `_RING_WAKE_S`), at an int3 hit and at the end of `run`.
    """

    def __init__(self, probes: list[ResolvedProbe], *, pid: int | None = None,
                 child: int | None = None, force: bool = False,
                 note: Callable[[str], object] | None = None, stack_bytes: int = 0,
                 hit_filter: HitFilter | None = None, trapfree: bool | str = False) -> None:
        ptrace.ensure_x86_64()
        if trapfree not in (False, True, "count", "record"):
            raise ValueError(f"trapfree must be False, 'count' or 'record', not {trapfree!r}")
        self._trapfree = "count" if trapfree is True else trapfree or None
        self._jumps = TrapFree() if trapfree else None
        self._recorder: Recorder | None = None  # made by the first recording probe
        self._shaped: ShapedLines | None = None  # run_render's writer of recorded hits
        self._held: tuple[AddressSpace, list[int]] | None = None  # stopped to place jumps
        self.hit_filter = hit_filter
        task_filter = hit_filter.task_filter() if hit_filter else None
        if pid is None and child is None:
            raise UsageError("the ptrace engine traces a process (-p PID) or a command "
                             "(-- CMD), not the whole system")
        self.probes = probes
        self.pid = pid
        self.child = child
        self.force = force
        self.stack_bytes = stack_bytes
        self._capturing = False
        self._note = note or (lambda _: None)
        self.registry = Registry()
        self.counts: dict[str, int] = {}
        # Our handlers that, when no events are built, only count (no filter):
        # a hit whose dispatch is one of them just counts, with no PtraceHit.
        self._count_only: dict[Callable[[TaskLike], None], str] = {}
        self._counting: dict[Callable[[TaskLike], None], str] = {}
        # Every event handler of ours, and the probe line it serves.
        self._ours: dict[Callable[[TaskLike], object], ResolvedProbe] = {}
        self._infos: dict[str, ProbeInfo] = {}
        self._refusals = Refusals(probes, self._note)
        self._ret_sites: dict[InodeKey, int] = {}  # a ret's key -> its offset in the function
        self._refused_early = False  # a precheck failed because the process had ended
        for name, p in zip(display_names(probes), probes):
            reason = None if isinstance(p.key, VdsoKey) else _precheck(p)
            if reason is not None:
                if pid is not None and _ended(pid, within=0):
                    self._refused_early = True
                    break
                self._refusals.refuse(p, p.name, reason)
                continue
            info = probe_info(p)
            self._infos[info.name] = info
            self.counts[name] = 0
            handler = self._event_handler(name, info, p)
            self._ours[handler] = p
            if hit_filter is None:
                self._count_only[handler] = name
            if not p.is_return:
                self.registry.add(p, Consumer(handler=handler, filter=task_filter, tag=name))
                continue
            consumer = Consumer(ret_handler=handler, filter=task_filter, tag=name)
            if p.ret_sites and isinstance(p.key, InodeKey):
                # On the function's own rets (resolve/retsites.py): nothing on the stack.
                for off in p.ret_sites:
                    key = InodeKey(p.key.dev, p.key.ino, off)
                    self._ret_sites[key] = off - p.file_offset
                    self.registry.add(replace(p, key=key, file_offset=off), consumer)
            else:
                self.registry.add(p, consumer)
        # Prechecks read the files through /proc/PID/root: a process that ended
        # meanwhile fails them all, which is its exit, not a refusal.
        self._vanished = self._refused_early
        if not self.counts and not self._vanished:
            raise EngineError("no probe can be placed")
        self.threads: dict[int, Thread] = {}
        self.events = 0
        self.lost = 0
        self._corrupt_rings = 0  # ring words put back (Ring.corrupt), at the last read
        self._faulted: set[int] = set()  # processes told of a fault in our code
        self.signal: int | None = None
        self.target_exited = False
        self.child_status: int | None = None
        self.current_hit: PtraceHit | None = None
        self._on_hits: Callable[[list[Hit]], None] | None = None
        self._pending_new: dict[int, ptrace.WaitStatus] = {}
        self._done = False
        self._placed_once = False
        self._quiescing = False
        self._stack = ExitStack()
        self._signals: StopSignals | None = None
        self._orphans = OrphanGuard(self._note)  # kill -9 of uprobes: see orphan.py

    @property
    def infos(self) -> dict[str, ProbeInfo]:
        """Display name -> ProbeInfo, for the renderers."""
        return dict(self._infos)

    # ------------------------------------------------------------ consumers

    def _event_handler(self, name: str, info: ProbeInfo,
                       p: ResolvedProbe) -> Callable[[TaskLike], None]:
        counts = self.counts
        fetcher = None
        # The condition (`--tid`/`--comm` are the consumer's TaskFilter, tested
        # before this runs): before the fetch when it names no fetcharg.
        cond = self.hit_filter.condition if self.hit_filter else None
        keep = cond.predicate() if cond else None
        keep_after_fetch = keep is not None and bool(self.hit_filter and
                                                     self.hit_filter.arg_fields)

        def on_hit(task: TaskLike) -> None:
            # `task` is a PtraceHit (an int3) or a RecordedHit (read from a ring).
            nonlocal fetcher
            hit = cast(PtraceHit, task)
            if keep is not None and not keep_after_fetch \
                    and not keep(TaskView(hit.pid, hit.tid, hit.comm, {})):
                return
            emit = self._on_hits
            if emit is None and not keep_after_fetch:
                counts[name] += 1
                return
            args: tuple[ArgValue, ...] = ()
            if p.args:
                if fetcher is None:
                    fetcher = ArgFetcher(p)
                got = fetcher.fetch(hit.regs, hit.mem, FetchContext(hit.comm, hit.file_base))
                if keep_after_fetch and keep and not keep(TaskView(hit.pid, hit.tid, hit.comm,
                                                                   got)):
                    return
                args = tuple(got.get(n) for n, _ in info.args)
            counts[name] += 1
            if emit is None:
                return
            self.events += 1
            self.current_hit = hit  # the stopped thread, for a Session handler
            try:
                if self._capturing:  # run() with stacks: the capture rides along
                    emit([(hit.ts_ns, hit.pid, hit.tid, hit.cpu, info.name, hit.comm, hit.ip,
                           hit.func, args, self._capture(hit))])  # type: ignore[list-item]
                    return
                emit([(hit.ts_ns, hit.pid, hit.tid, hit.cpu, info.name, hit.comm, hit.ip,
                       hit.func, args)])
            finally:
                self.current_hit = None
        return on_hit

    def _capture(self, hit: PtraceHit) -> StackCapture:
        """Registers and the top of the stack of the stopped thread (a return
        hit's registers are already the caller's: rip the return address)."""
        r = hit.regs
        regs = {0: r.rax, 1: r.rdx, 2: r.rcx, 3: r.rbx, 4: r.rsi, 5: r.rdi, 6: r.rbp,
                7: r.rsp, 8: r.r8, 9: r.r9, 10: r.r10, 11: r.r11, 12: r.r12, 13: r.r13,
                14: r.r14, 15: r.r15, 16: hit.ip}
        data = hit.thread.mm.mem.read_upto(r.rsp, self.stack_bytes)
        return StackCapture(regs, StackCopy(r.rsp, data))

    # ------------------------------------------------------------ set-up

    def __enter__(self) -> PtraceTracer:
        try:
            self._signals = self._stack.enter_context(StopSignals())
            self._stack.callback(self._report_corrupt)  # after the detach's last reads
            self._stack.callback(self._detach_all)
            if self.child is not None:
                self._seize_child(self.child)
            elif self._vanished:
                self._exited_while("its probes were resolved")
            else:
                assert self.pid is not None
                try:
                    self._attach(self.pid)
                except UprobesError:
                    if not _ended(self.pid):
                        raise
                    self._exited_while("its probes were placed")
        except BaseException:
            self._stack.close()
            raise
        return self

    def _exited_while(self, what: str) -> None:
        """The -p process ended before the run began: not our error; the run
        is over (what was placed is removed at exit, as after any run)."""
        self._note(f"process {self.pid} exited while {what}")
        self.target_exited = True
        self._done = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    def _seize_child(self, pid: int) -> None:
        try:
            ptrace.seize(pid)
        except KernelError as e:
            raise ProcessError(f"cannot trace the command: {e}") from None
        mm = AddressSpace(pid, ProcessMemory(pid), held=True)
        self.threads[pid] = Thread(pid, pid, mm)

    def _attach(self, pid: int) -> None:
        check_attach(pid)
        mm = AddressSpace(pid, ProcessMemory(pid))
        followed: set[int] = set()  # born of a clone of a thread seized here: ours already
        while True:
            try:
                new = [t for t in procfs.tids(pid) if t not in self.threads
                       and t not in followed]
            except UprobesError:
                raise ProcessError(f"process {pid} ended while attaching") from None
            if not new:
                break
            for tid in new:
                try:
                    ptrace.seize(tid)
                    ptrace.interrupt(tid)
                except KernelError as e:
                    if e.errno == errno.ESRCH:
                        continue  # the thread ended meanwhile
                    if e.errno == errno.EPERM:
                        if tracer_of(tid) == threading.get_native_id():
                            # PTRACE_O_TRACECLONE attached it to us: its parent's
                            # clone event and its first stop come in the quiesce.
                            followed.add(tid)
                            continue
                        raise ProcessError(explain_refusal(pid)) from None
                    raise
                self.threads[tid] = Thread(tid, pid, mm)
        self._quiesce(interrupt=False)
        if not self.threads:
            raise ProcessError(f"process {pid} ended while attaching")
        if all(t.group_stop for t in self.threads.values()):
            self._note(f"process {pid} is stopped (SIGSTOP or job control): its probes "
                       "count once it is continued (SIGCONT); uprobes leaves it as it is")
        lenders = [t for t in self.threads.values() if t.pid == pid and t.can_lend]
        leader = self.threads.get(pid)
        if leader is None or not leader.can_lend:
            leader = lenders[0] if lenders else None
        if leader is None:
            raise ProcessError(f"process {pid} was in the middle of a vfork while attaching "
                               "(its call waits for the child's exec); try again")
        self._place_all(leader)
        for t in list(self.threads.values()):
            self._resume(t)

    # ------------------------------------------------------------ placing

    def _place_all(self, t: Thread) -> None:
        """Place every probe the mappings of `t`'s address space call for
        (and the rendezvous breakpoint); `t` is stopped and lends itself to
        the remote mmap of an XOL area. A process killed meanwhile is no
        error: its exit is reported next, and ends its part of the run."""
        try:
            self._place_mappings(t)
        except UprobesError:
            if not _ended(t.mm.pid):
                raise

    def _place_mappings(self, t: Thread) -> None:
        mm = t.mm
        if mm.held:
            return
        try:
            maps = procfs.maps(mm.pid)
        except UprobesError:
            return
        regs = ptrace.getregs(t.tid, UserRegs())
        vdso = [p for p in self.registry if isinstance(p.key, VdsoKey)]
        unknown: set[str] = set()
        for m in breakpoints.executable_file_mappings(maps):
            key = (m.start, m.end)
            if key in mm.scanned:
                continue
            ident = self._identity(mm.pid, m)
            mm.scanned[key] = ident
            if ident is None and m.path != "[vdso]":
                unknown.add(m.path)
            if m.path == "[vdso]":
                for probe in vdso:
                    assert isinstance(probe.key, VdsoKey)
                    self._place(t, regs, probe, m, probe.key.offset, None)
            elif ident is not None:
                for probe in self.registry.in_inode(*ident):
                    if m.contains_file_offset(probe.point.file_offset):
                        self._place(t, regs, probe, m, probe.point.file_offset, ident)
                        if probe.point.ref_ctr_offset is not None:
                            self._semaphore(mm, maps, m, probe.point.ref_ctr_offset)
        if unknown:
            self._note(f"process {mm.pid}: cannot tell which file {len(unknown)} of its "
                       f"mappings hold ({', '.join(sorted(unknown))}): their names lead to "
                       f"other files from here and /proc/{mm.pid}/map_files needs "
                       "CAP_SYS_ADMIN; probes in them are not placed")
        if mm.rendezvous is None:
            rv = rendezvous.find(mm.pid, maps)
            if rv is not None and rv.runtime_addr not in mm.sites:
                mm.rendezvous = rv.runtime_addr
                try:
                    original = breakpoints.original_bytes(rv.path, rv.dev, rv.ino, rv.file_offset)
                    self._insert(t, regs, rv.runtime_addr, None, original,
                                 rv.runtime_addr - rv.file_offset, "rendezvous")
                except UprobesError as e:
                    if not _ended(mm.pid, within=0):  # else its exit is what the run reports
                        self._note(f"libraries loaded later in process {mm.pid} will not be "
                                   f"probed: {e}")
        self._placed_once = True
        if self._jumps is not None:
            self._jumps.report(self._note)
            self._release_held(mm)

    def _semaphore(self, mm: AddressSpace, maps: list[procfs.Mapping], text: procfs.Mapping,
                   ref_ctr_offset: int) -> None:
        """Add one to a USDT probe's semaphore (a short in the file's data),
        as the kernel's update_ref_ctr() does for its uprobes; undone at detach."""
        for m in maps:
            if (m.inode, m.dev_major, m.dev_minor) == (text.inode, text.dev_major,
                                                       text.dev_minor) \
                    and "w" in m.perms and m.contains_file_offset(ref_ctr_offset):
                addr = m.file_to_runtime_addr(ref_ctr_offset)
                if addr in mm.semaphores:
                    return
                try:
                    value = int.from_bytes(mm.mem.read(addr, 2), "little")
                    mm.mem.write(addr, ((value + 1) & 0xFFFF).to_bytes(2, "little"))
                    mm.semaphores[addr] = 1
                    self._orphans.semaphore(mm, addr)
                except UprobesError as e:
                    self._note(f"cannot enable a USDT semaphore in process {mm.pid}: {e}")
                return

    @staticmethod
    def _identity(pid: int, m: procfs.Mapping) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the mapped file, as stat of its path gives it."""
        if m.path == "[vdso]":
            return None
        found = procfs.mapped_file(pid, m)
        return None if found is None else (found.dev, found.ino)

    def _place(self, t: Thread, regs: UserRegs, probe: Probe, m: procfs.Mapping,
               file_offset: int, ident: tuple[int, int] | None) -> None:
        addr = m.file_to_runtime_addr(file_offset)
        if addr in t.mm.sites:
            return
        if self._jumps is not None and ident is not None \
                and self._place_trapfree(t, regs, probe, addr, file_offset, ident):
            return
        point = probe.point
        try:
            if ident is None:  # the vDSO: the original is this process's own copy
                original = t.mm.mem.read_upto(addr, breakpoints.INSN_MAX)
            else:
                original = breakpoints.original_bytes(point.path, ident[0], ident[1],
                                                      file_offset)
            site = self._insert(t, regs, addr, probe, original, addr - file_offset, "")
            delta = self._ret_sites.get(probe.key)  # type: ignore[arg-type]
            if delta is not None:
                site.ret_func = addr - delta
        except (PlacementRefused, relocate.UnsupportedInstruction, MemoryFault) as e:
            self._refuse(probe, str(e))

    def _place_trapfree(self, t: Thread, regs: UserRegs, probe: Probe, addr: int,
                        file_offset: int, ident: tuple[int, int]) -> bool:
        """Place `probe` as a jump to a counter or a recording (jumppatch.py,
        recording.py) if only our handler consumes it and that is safe
        here; False: it takes the int3 path."""
        jumps = self._jumps
        assert jumps is not None
        at_ret = self._ret_sites.get(probe.key)  # type: ignore[arg-type]
        name = self._count_only.get(probe.dispatch if at_ret is None else probe.ret_dispatch)
        point = probe.point
        record: Record | None = None
        why = self._why_not_trapfree(probe, at_ret is not None)
        if why is None and (self._trapfree == "record" or name is None):
            why, record = self._recording(probe, name, addr, addr - file_offset,
                                          None if at_ret is None else addr - at_ret)
        if why is None:
            others = [p.point.file_offset for p in self.registry.in_inode(*ident)]
            plan = plan_for(point.path, ident[0], ident[1], file_offset, others,
                            at_return=at_ret is not None)
            why = plan if isinstance(plan, str) else None
        if why is None:
            assert not isinstance(plan, str)
            mm = t.mm
            if any(not o.stopped for o in self.threads.values() if o.mm is mm):
                self._hold_all(mm)  # a library loaded while other threads run
            threads = [(o.tid, o.stopped) for o in self.threads.values() if o.mm is mm]
            threads += [(tid, True) for tid in self._pending_new]

            def syscall_addr() -> int:
                if mm.syscall_addr is None:
                    mm.syscall_addr = find_syscall_insn(mm.pid, mm.mem)
                return mm.syscall_addr
            try:
                start = addr - (file_offset - plan.file_offset)  # before a ret: its insns
                jumps.place(mm, mm.mem, mm.pid, t.tid, regs, plan, name or point.name, start,
                            mm.sites, threads,
                            lambda near, need: self._area_for(t, regs, near, need),
                            syscall_addr, t.pending, record)
                if record is not None:  # names read now: a thread may be gone when
                    for o in self.threads.values():  # its records are read
                        if o.mm is mm:
                            o.comm  # noqa: B018 (cached for COMM_TTL_NS)
            except NotTrapFree as e:
                why = str(e)
            except UprobesError as e:  # a remote call or a write failed: the int3 path says
                why = f"cannot place the jump: {e}"
        jumps.decide(point.name, why)
        return why is None

    def _why_not_trapfree(self, probe: Probe, at_ret: bool) -> str | None:
        """Why `probe` needs a stop at each hit whatever its instructions, or
        None. `at_ret`: it is a return probe's `ret` (resolve/retsites.py)."""
        if at_ret:
            if probe.dispatch is not _NO_HANDLER:
                return "an entry probe on a ret that a return probe uses"
            handlers = [c.ret_handler for c in probe.consumers]
        else:
            if probe.ret_dispatch is not _NO_HANDLER:
                return "a return probe by its return address (--uretprobe)"
            handlers = [c.handler for c in probe.consumers]
        if not handlers or any(h not in self._ours for h in handlers):
            return "a handler runs at each hit"
        if self.stack_bytes:
            return "its stack is copied at each hit"
        return None

    def _recording(self, probe: Probe, name: str | None, addr: int, file_base: int,
                   func: int | None) -> tuple[str | None, Record | None]:
        """(None, how) for a probe that records into a ring, else (why not, None).
        `name`: what its count goes under when its only consumer is ours and
        unfiltered (`_count_only`). `func`: the function's address, for a
        return probe on a ret at `addr`."""
        ret = func is not None
        lines = [self._ours[h] for c in probe.consumers
                 for h in (c.ret_handler if ret else c.handler,) if h is not None]
        recipe = recipe_for(lines, ret)
        if isinstance(recipe, str):
            return recipe, None
        if self._recorder is None:
            from uprobes.sys import tsc
            why = tsc.usable()
            if why is not None:
                return why, None
            self._recorder = Recorder(self.counts)
        direct: Direct | None = None
        if name is not None and self.hit_filter is None:
            make = direct_hit(self._ours[probe.ret_dispatch if ret else probe.dispatch], recipe,
                              addr, func)
            if make is not None:
                direct = (name, make)
        probe_id = self._recorder.site(RecordedSite(probe, recipe, addr, file_base, direct,
                                                    func))
        return None, Record(recipe, probe_id, waits(self._recorder.clock.ticks))

    def _hold_all(self, mm: AddressSpace) -> None:
        """Stop every traced thread, as detach does, so a jump can go into
        `mm` while none of it runs; `_release_held(mm)` resumes them."""
        before = {tid for tid, o in self.threads.items() if o.stopped}
        self._quiesce()
        held = [tid for tid, o in self.threads.items() if o.stopped and tid not in before]
        self._held = (mm, (self._held[1] if self._held else []) + held)

    def _release_held(self, mm: AddressSpace) -> None:
        """Resume the threads `_hold_all` stopped for placing in `mm` (not
        before: an exec seen meanwhile places into another mm)."""
        if self._held is None or self._held[0] is not mm:
            return
        held, self._held = self._held[1], None
        for tid in held:
            o = self.threads.get(tid)
            if o is not None and o.stopped:
                self._resume(o)

    def _insert(self, t: Thread, regs: UserRegs, addr: int, probe: Probe | None,
                original: bytes, file_base: int, internal: str) -> Site:
        mm = t.mm
        what = probe.point.name if probe else internal
        area = self._area_for(t, regs, addr)
        slot = area.alloc()
        assert slot is not None
        plan = relocate.plan(original, addr, slot)
        breakpoints.check_memory(mm.mem, addr, original, plan.insn_len, mm.sites, what)
        site = Site(addr, probe, original, plan, slot, file_base, internal)
        self._orphans.guard(mm, site)
        breakpoints.insert(mm.mem, site)
        mm.sites[addr] = site
        return site

    def _area_for(self, t: Thread, regs: UserRegs, addr: int,
                  need: int = relocate.SLOT_SIZE) -> XolArea:
        """An XOL area within reach of `addr` with `need` bytes free (mapped if none)."""
        mm = t.mm
        for a in mm.areas:
            if a.reaches(addr) and a.room() >= need:
                return a
        if mm.syscall_addr is None:
            mm.syscall_addr = find_syscall_insn(mm.pid, mm.mem)
        held: list[int] = []
        area = map_area(t.tid, regs, mm.pid, mm.syscall_addr, addr, held)
        mm.mem.write(area.trampoline, bytes([breakpoints.INT3]))
        mm.areas.append(area)
        mm.trampolines.add(area.trampoline)
        t.pending.extend(held)
        if len(mm.areas) == 1:
            self._orphans.setup(t, regs, mm.syscall_addr, self._hijacks())
        self._orphans.trampoline(mm, area.trampoline)
        return area

    def _hijacks(self) -> bool:
        """Whether a return probe may hijack return addresses (the trampoline)."""
        return any(p.ret_dispatch is not _NO_HANDLER and p.key not in self._ret_sites
                   for p in self.registry)

    def _refuse(self, probe: Probe, reason: str) -> None:
        if self._placed_once:  # once running, a refusal (a library loaded later) is a note
            self._refusals.skip(probe.point.name, reason)
        else:
            self._refusals.refuse(probe.point, probe.point.name, reason)

    # ------------------------------------------------------------ the loop

    def stop(self) -> None:
        """Stop `run()` at its next wake-up (callable from a handler)."""
        self._done = True

    def run(self, on_event: Callable[[Event], None] | None,
            duration: float | None = None) -> None:
        """Handle hits (and hand `on_event` an Event for each) until the
        target exits, a stop signal, `stop()`, or `duration` seconds.
        Without `on_event` only `counts` are kept (nothing is fetched)."""
        if on_event is None:
            self.run_hits(None, duration)
            return
        infos = self._infos
        if self.stack_bytes > 0:
            # Walked at the hit, while the maps are the ones the stack was built on.
            self._capturing = True
            try:
                self.run_hits(stack_delivery(infos, on_event, Symbolizer()), duration)
            finally:
                self._capturing = False
            return

        def deliver(hits: list[Hit]) -> None:
            for hit in hits:
                on_event(hit_event(hit, infos[hit[4]]))
        self.run_hits(deliver, duration)

    def run_hits(self, on_hits: Callable[[list[Hit]], None] | None,
                 duration: float | None = None) -> None:
        """`run()` handing over `Hit` tuples (here one per call, at the hit,
        while the thread is still stopped)."""
        signals = self._signals
        assert signals is not None, "enter the tracer first"
        if on_hits is not None and self._trapfree == "count":
            raise EngineError("a tracer with trap-free counters only counts: run(None)")
        self._on_hits = on_hits
        self._counting = self._count_only if on_hits is None else {}
        deadline = None if duration is None else time.monotonic() + duration
        main = threading.current_thread() is threading.main_thread()
        old = None
        if main:
            old = signal.signal(signal.SIGALRM, lambda *_: None)
            wake = _RING_WAKE_S if self._trapfree else _WAKE_S
            signal.setitimer(signal.ITIMER_REAL, wake, wake)
        try:
            for thread in list(self.threads.values()):
                if thread.stopped:
                    self._resume(thread)
            if self.child is not None and self.child in self.threads:
                pass  # released by the caller; its exec stop places the probes
            threads = self.threads
            # Reports are peeked, not consumed: a hit's stop stays pending until
            # its thread is resumed, so a kill -9 of uprobes mid-hit delivers the
            # SIGTRAP to the in-tracee handler (orphan.py) instead of resuming
            # the thread past its int3 with no signal.
            wait_any = ptrace.peek_any
            consume = ptrace.wait_task
            trap = self._trap
            nohang = not main
            rings = self._jumps.rings if self._jumps is not None else []
            drained = time.monotonic()
            while not self._done and signals.signum is None:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                behind = False
                if rings and now - drained >= _RING_WAKE_S:  # (each read is a heartbeat)
                    behind = self._drain(rings)  # True: more is waiting, come straight back
                    drained = 0.0 if behind else now
                tid, status = wait_any(nohang or behind)
                if status == ptrace.TRAP_STOP:  # the common stop, a hit: straight to _trap
                    t = threads.get(tid)
                    if t is not None:
                        t.stopped = True
                        if rings:  # what the rings hold happened before this hit
                            self._drain(rings)
                        try:
                            trap(t)
                        except KernelError as e:
                            if e.errno != errno.ESRCH:
                                ptrace.consume_pending(tid)  # else the detach sees it again
                                raise
                            # Killed during its hit (its process died of a signal in
                            # another thread): its exit is reported next.
                        except BaseException:
                            ptrace.consume_pending(tid)
                            raise
                        continue
                if tid == 0:
                    if not main and not behind:
                        time.sleep(0.0005)
                    continue
                if tid < 0:
                    break
                self._handle(tid, consume(tid))
        finally:
            if main:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
                signal.signal(signal.SIGALRM, old)
            self.signal = signals.signum or None
            if self._jumps is not None:
                self._jumps.fold_into(self.counts)  # what the jumps counted meanwhile
                if self._jumps.rings:
                    self._drain_last()

    def _drain(self, rings: list[Ring], final: bool = False) -> bool:
        """Deliver what the rings hold (recording.py) to the probes' dispatch;
        True if it stopped with more to read (to handle stops meanwhile)."""
        recorder = self._recorder
        assert recorder is not None
        threads = self.threads

        def who(tid: int) -> tuple[int, str] | None:
            t = threads.get(tid)
            return None if t is None else (t.pid, t.comm)
        behind = recorder.drain(rings, who, self._deliver_recorded, final)
        self.lost = sum(r.lost for r in rings)
        self._corrupt_rings = sum(r.corrupt for r in rings)
        return behind

    def _report_corrupt(self) -> None:
        """One line if the programs wrote impossible values into the memory
        they share with us (left out of every count and event above)."""
        records = self._recorder.corrupt if self._recorder is not None else 0
        words = self._corrupt_rings + (self._jumps.corrupt if self._jumps is not None else 0)
        if records or words:
            self._note(f"the traced program overwrote the memory it shares with uprobes "
                       f"(memfd:uprobes-counters): {records} records and {words} counter "
                       "values that it cannot have made are left out")

    def _deliver_recorded(self, hits: list[Hit]) -> None:
        """Hits of direct sites (counted by the recorder already)."""
        emit = self._on_hits
        if emit is not None:
            self.events += len(hits)
            if self._shaped is not None:
                self._shaped.write(hits)
            else:
                emit(hits)

    def run_render(self, renderer: HitRenderer, duration: float | None = None) -> None:
        """`run_hits` into a renderer; recorded hits of text and JSON lines
        (renderers with `row_lines`) are written from row templates."""
        self._shaped = ShapedLines(renderer) if isinstance(renderer, LineRenderer) else None
        try:
            self.run_hits(renderer.hits, duration)
        finally:
            self._shaped = None

    def _drain_last(self) -> None:
        """The end of a run: every thread stopped (or gone), so every record
        reserved is committed or never will be; deliver them all. The
        threads stay stopped until `run` resumes them or detach."""
        assert self._jumps is not None
        if self.threads and not self.target_exited:
            self._quiesce()
        self._drain(self._jumps.rings, final=True)

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
        sig = status.signal
        event = t.stop_event = status.event
        if event == 0:
            if sig == _SIGTRAP:
                self._trap(t)
                return
            if sig in _FAULTS:
                self._fault_in_our_code(t, sig)
            t.resume_sig = sig  # delivered exactly as untraced
        elif status.group_stop:
            t.group_stop = True
        elif event != ptrace.EVENT_STOP:
            self._task_event(t, event)
        self._resume(t)

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
            if t.group_stop:
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
            else:
                t.resume_sig = _SIGTRAP  # the program's own trap
                self._resume(t)
            return
        regs.rip = bp
        probe = site.probe
        try:
            if probe is None:
                self._place_all(t)  # the rendezvous: libraries came or went
            else:
                dispatch = probe.dispatch
                if dispatch is not _NO_HANDLER:
                    # One handler of ours that only counts (identity: a second
                    # consumer makes the dispatch a chain): what it would do.
                    name = self._counting.get(dispatch)
                    if name is not None:
                        self.counts[name] += 1
                    else:
                        dispatch(PtraceHit(t, regs, probe, "p", bp, None, site.file_base))
                if site.ret_func is not None and site.plan.emulate(regs, mm.mem):
                    # A probe on a ret: handlers see the state after it, as a uretprobe's.
                    name = self._counting.get(probe.ret_dispatch)
                    if name is not None:
                        self.counts[name] += 1
                    else:
                        probe.ret_dispatch(PtraceHit(t, regs, probe, "r", regs.rip,
                                                     site.ret_func, site.file_base))
                    ptrace.setregs(tid, regs)
                    self._resume(t)
                    return
                if probe.ret_dispatch is not _NO_HANDLER and site.ret_func is None \
                        and mm.areas:
                    area = mm.area_of(site.slot_addr) or mm.areas[0]
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
            if sig == _SIGTRAP:
                break
            if sig in _FAULTS:
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
                                                    ri.func, ri.file_base))
        finally:
            ptrace.setregs(t.tid, regs)
            retprobes.release(done, table)  # rip is off the trampoline: not before
        t.stopped = False
        ptrace.cont(t.tid, 0) if not t.pending else self._resume(t)

    # ------------------------------------------------------------ tasks

    def _task_event(self, t: Thread, event: int) -> None:
        if event in (ptrace.EVENT_CLONE, ptrace.EVENT_FORK, ptrace.EVENT_VFORK):
            self._new_task(t, ptrace.geteventmsg(t.tid), event)
        elif event == ptrace.EVENT_EXEC:
            self._exec(t, ptrace.geteventmsg(t.tid))

    def _new_task(self, parent: Thread, tid: int, event: int) -> None:
        try:
            tgid = procfs.status(tid).tgid
        except UprobesError:
            tgid = parent.pid if event == ptrace.EVENT_CLONE else tid
        if tgid == parent.pid:
            new = Thread(tid, parent.pid, parent.mm)
        else:
            if event == ptrace.EVENT_VFORK:
                mm = parent.mm  # shared until the child execs or exits
                mm.users += 1
            else:
                mm = parent.mm.fork_copy(tid)
                if self._jumps is not None:
                    self._jumps.fork(parent.mm, mm)  # the child has the jumps too
                self._orphans.forked(parent.mm, mm)
            new = Thread(tid, tid, mm)
            # Its stack holds the same trampolines.
            new.returns = retprobes.inherit(parent.returns, mm.ret_table, new.ns_tid, mm.mem)
        new.comm_cached, new.comm_at = parent.comm_cached, parent.comm_at
        self.threads[tid] = new
        status = self._pending_new.pop(tid, None)
        if status is not None:  # its first stop came before this event
            new.stopped = True
            if not self._quiescing:
                self._resume(new)

    def _exec(self, t: Thread, former: int) -> None:
        if former != t.tid and former in self.threads:
            self._forget(self.threads.pop(former))
        for other in [o for o in self.threads.values() if o.pid == t.pid and o is not t]:
            self._forget(self.threads.pop(other.tid))
        retprobes.release(t.returns, t.mm.ret_table)
        t.mm.release()
        self._orphans.released(t.mm)
        t.mm = AddressSpace(t.pid, ProcessMemory(t.pid))
        t.returns.clear()
        t.comm_at = 0
        self._settle(t)
        self._place_all(t)

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
            if event == 0 and sig == _SIGTRAP:
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

    def _gone(self, t: Thread, status: ptrace.WaitStatus) -> None:
        self.threads.pop(t.tid, None)
        if self._recorder is not None:  # its last records may still be in a ring
            self._recorder.former(t.tid, t.pid, t.comm)
        self._forget(t)
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
            if tid < 0:
                for gone in list(self.threads.values()):
                    if not gone.stopped:
                        self.threads.pop(gone.tid)
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
            elif event:
                self._task_event(t, event)
            elif sig == _SIGTRAP:
                regs = ptrace.getregs(t.tid, t.regs)
                if regs.rip - 1 in t.mm.sites:  # a hit we will not handle: rewind
                    regs.rip -= 1
                    ptrace.setregs(t.tid, regs)
                elif regs.rip - 1 not in t.mm.trampolines:
                    t.resume_sig = sig
                else:
                    regs.rip -= 1  # at the trampoline: _unwind puts it right
                    ptrace.setregs(t.tid, regs)
            else:
                t.resume_sig = sig

    def _running(self) -> list[Thread]:
        """Traced threads not in a ptrace stop that may still report one: a
        zombie never will (a leader's exit waits for its other threads)."""
        return [t for t in self.threads.values()
                if not t.stopped and procfs.state(t.tid) not in (None, "Z", "X")]

    def _detach_all(self) -> None:
        if not self.threads:
            self._orphans.close()
            self._close_rings()
            return
        self._quiesce()
        for t in self.threads.values():
            try:
                self._unwind(t)
            except UprobesError:
                pass
        spaces = {id(t.mm): t.mm for t in self.threads.values()}
        for mm in spaces.values():
            for site in mm.sites.values():
                breakpoints.remove(mm.mem, site)
            mm.sites.clear()
            if self._jumps is not None:
                self._jumps.remove(mm, mm.mem)
            for addr, n in mm.semaphores.items():
                try:
                    value = int.from_bytes(mm.mem.read(addr, 2), "little")
                    mm.mem.write(addr, max(0, value - n).to_bytes(2, "little"))
                except UprobesError:
                    pass
            mm.semaphores.clear()
        if self._jumps is not None:  # no reader from now on: a hit in a trampoline
            for ring in self._jumps.rings:  # drops its record at once if the ring is full
                ring.abandon()
        for mm in spaces.values():  # SIGTRAP's own action back (orphan.py)
            lender = next((t for t in self.threads.values() if t.mm is mm and t.can_lend),
                          None)
            if lender is not None:
                self._orphans.uninstall(lender, lender.pending)
        dead: list[int] = []
        for t in list(self.threads.values()):
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
            for ring in self._jumps.rings:
                ring.close()
            self._jumps.rings.clear()

    def _unwind(self, t: Thread) -> None:
        """Put a stopped thread back in the original code: out of a slot,
        off the trampoline; then restore its hijacked return addresses."""
        regs = ptrace.getregs(t.tid, t.regs)
        mm = t.mm
        rip = regs.rip
        done: list[retprobes.ReturnInstance] = []
        if mm.area_of(rip) is not None:
            if rip in mm.trampolines:
                done = retprobes.complete(t.returns, regs.rsp, mm.ret_table)
                if done:
                    regs.rip = done[0].orig_ret
            else:
                for site in mm.sites.values():
                    if site.in_slot(rip):
                        back = site.plan.original_rip(rip)
                        if back is not None:
                            regs.rip = back
                        break
            if regs.rip != rip:
                ptrace.setregs(t.tid, regs)
        retprobes.release(done, mm.ret_table)
        retprobes.restore(t.returns, mm.mem, mm.ret_table)


def _precheck(p: ResolvedProbe) -> str | None:
    """Whether the probed instruction can run out of line at all (decided from
    the file, before anything runs): None, or why not."""
    assert isinstance(p.key, InodeKey)
    try:
        original = breakpoints.original_bytes(p.path, p.key.dev, p.key.ino, p.file_offset)
        probe_addr = 0x10000000 + p.file_offset
        relocate.plan(original, probe_addr, probe_addr + 0x100000)
    except (PlacementRefused, relocate.UnsupportedInstruction) as e:
        return str(e)
    return None


def _ended(pid: int, within: float = 0.5) -> bool:
    """Whether process `pid` has ended (gone or a zombie), waiting up to
    `within` seconds for an exit under way (its memory is released before
    it becomes a zombie: a failure to read it comes first)."""
    deadline = time.monotonic() + within
    while True:
        if procfs.state(pid) in (None, "Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
