"""Attaching: the command or every thread of a process seized, and the probes
placed in each address space (int3 sites, trap-free jumps, USDT semaphores,
the XOL areas they need, the dynamic linker's rendezvous).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Container, Sequence
from dataclasses import replace
from typing import Any

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.engines.ptrace import breakpoints, rendezvous
from uprobes.engines.ptrace.breakpoints import GuardTrap, PlacementRefused, Site
from uprobes.engines.ptrace.permissions import check_attach, explain_refusal, tracer_of
from uprobes.engines.ptrace.state import NO_HANDLER, TracerState, ended
from uprobes.engines.ptrace.tasks import AddressSpace, Thread, admit
from uprobes.engines.tracee import relocate
from uprobes.engines.tracee.xol import XolArea, find_syscall_insn, map_area
from uprobes.engines.trapfree.fileplan import FilePlan, NotTrapFree, plan_for
from uprobes.engines.trapfree.filtercode import Check, compile_check, seccomp_refusal
from uprobes.engines.trapfree.jumppatch import Keyed, Record, Timed
from uprobes.engines.trapfree.keyed import source_of
from uprobes.engines.trapfree.layout import PY_STACKS
from uprobes.engines.trapfree.pywalk import (
    CALLED,
    NR_GETPID,
    NR_PROCESS_VM_READV,
    PyWalk,
    copied,
    copied_key,
    py_walk,
)
from uprobes.engines.trapfree.reach import Span, holds, reach
from uprobes.engines.trapfree.reader import Direct, RecordedSite, Recorder, direct_hit, stack_hit
from uprobes.engines.trapfree.recording import (
    Recipe,
    recipe_for,
    shape_for,
    waits,
)
from uprobes.errors import KernelError, ProcessError, UprobesError
from uprobes.model.probe import VdsoKey
from uprobes.model.pyguard import PyGuard
from uprobes.model.registry import Probe
from uprobes.sys import procfs, ptrace, seccomp
from uprobes.sys.procmem import MemoryFault, ProcessMemory
from uprobes.sys.ptrace import UserRegs
from uprobes.unwind.cpython.reader import PyGroups

_PY_MEMO_MAX = 4096  # distinct Python areas whose frames are remembered


class Attach(TracerState):
    """Seizing threads and placing probes."""

    def _seize_child(self, pid: int) -> None:
        try:
            ptrace.seize(pid)
        except KernelError as e:
            raise ProcessError(f"cannot trace the command: {e}") from None
        mm = AddressSpace(pid, ProcessMemory(pid), held=True)
        admit(self.threads, self._nested, Thread(pid, pid, mm), procfs.ns_pid(pid))

    def _attach(self, pid: int) -> None:
        check_attach(pid)
        for other in procfs.mm_sharers(pid):
            # Its tasks would run into our int3s and jumps untraced (SIGTRAP
            # kills them) and write into our ring as writers we do not know.
            raise ProcessError(
                f"process {other} shares process {pid}'s memory (clone CLONE_VM, or a vfork "
                "child before its exec); the ptrace engine cannot place probes in memory a "
                "process it does not trace runs: start the program under uprobes (`-- CMD`) "
                "or use `-e kernel`")
        mm = AddressSpace(pid, ProcessMemory(pid))
        nested = procfs.ns_pid(pid) != pid  # (its threads: in its pid namespace)
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
                admit(self.threads, self._nested, Thread(tid, pid, mm),
                      procfs.ns_pid(tid) if nested else tid)
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
            if not ended(t.mm.pid):
                raise

    def _place_mappings(self, t: Thread) -> None:
        mm = t.mm
        if mm.held:
            return
        try:
            maps = procfs.maps(mm.pid)
        except UprobesError:
            return
        if self._symbolizer is not None and self._trapfree == "record":
            # Stacks recorded in a ring are walked later, maybe once the
            # process is gone: its maps as they are at each change.
            self._symbolizer.spaces.reread(mm.pid)
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
                    if not ended(mm.pid, within=0):  # else its exit is what the run reports
                        self._note(f"libraries loaded later in process {mm.pid} will not be "
                                   f"probed: {e}")
        self._placed_once = True
        if self._jumps is not None:
            self._jumps.confirm_tls(mm, mm.mem, regs.fs_base, t.ns_tid)
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
                self._taken(mm, "semaphores")
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
        if (self._trapfree == "time" or self._by is not None) and _guarded(probe):
            self._refuse(probe, "its hits are told apart by strings (a py: function's): "
                         "they are not timed or keyed in the program")
            return
        if self._trapfree == "time" and not self._counted_here(probe):
            self._place_timed(t, regs, probe, addr, file_offset, ident)  # or not at all
            return
        if self._by is not None:  # counted by key in the program, or not at all
            self._place_keyed(t, regs, probe, addr, file_offset, ident)
            return
        if self._jumps is not None and ident is not None \
                and self._place_trapfree(t, regs, probe, addr, file_offset, ident):
            return
        point = probe.point
        if not self._int3s:
            why = self._jumps.decisions.get(point.name) if self._jumps is not None else None
            self._refusals.skip(point.name, f"not counted: {why or 'not in a file'} (no int3s "
                                "here: each hit would stop the program)")
            return
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
                site.ret_in_place = _guarded(probe)
        except (PlacementRefused, relocate.UnsupportedInstruction, MemoryFault) as e:
            self._refuse(probe, str(e))

    def _counted_here(self, probe: Probe) -> bool:
        """Whether a "time" tracer counts `probe` (`counted`) rather than timing it."""
        if not self._counted:
            return False
        handlers = [h for c in probe.consumers for h in (c.handler, c.ret_handler)]
        return any(id(self._ours.get(h)) in self._counted for h in handlers if h is not None)

    def _place_trapfree(self, t: Thread, regs: UserRegs, probe: Probe, addr: int,
                        file_offset: int, ident: tuple[int, int]) -> bool:
        """Place `probe` as a jump to a counter or a recording (jumppatch.py,
        recording.py) if only our handler consumes it and that is safe
        here; False: it takes the int3 path."""
        jumps = self._jumps
        assert jumps is not None
        at_ret = self._ret_sites.get(probe.key)  # type: ignore[arg-type]
        dispatch = probe.dispatch if at_ret is None else probe.ret_dispatch
        name = self._count_only.get(dispatch)
        point = probe.point
        record: Record | None = None
        check: Check | None = None
        py = self._py_counted(probe, at_ret is not None)
        if py:  # py: functions counted by their guards in the jump's code
            name = py[0][0]
        else:
            guards = self._trap_guards(probe, at_ret is not None)
            if guards:
                return self._place_guard_trap(t, regs, probe, addr, file_offset, ident,
                                              guards, at_ret is not None)
        if self._trapfree == "guards":  # every other hit stops at an int3
            return False
        why = self._why_not_trapfree(probe, at_ret is not None, guarded=bool(py))
        if why is None and not py and self._trapfree == "count" and name is None:
            check, name = self._compiled_filter(t, probe, at_ret is not None)
        if why is None and not py and check is None \
                and (self._trapfree == "record" or name is None):
            why, record = self._recording(t.tid, probe, name, addr, addr - file_offset,
                                          None if at_ret is None else addr - at_ret)
        if why is None:
            others = [p.point.file_offset for p in self.registry.in_inode(*ident)]
            # (a py: return is the start of the eval loop's RETURN_VALUE, not a ret)
            plan = plan_for(point.path, ident[0], ident[1], file_offset, others,
                            at_return=at_ret is not None and not py,
                            tables=point.computed_gotos)
            why = plan if isinstance(plan, str) else None
        if why is None:
            assert not isinstance(plan, str)
            start = addr - (file_offset - plan.file_offset)  # before a ret: its insns
            why = self._patch(t, regs, plan, name or point.name, start, record, check=check,
                              py=py)
        for decided in [n for n, _ in py] or [point.name]:
            jumps.decide(decided, why)
        return why is None

    def _trap_guards(self, probe: Probe, ret: bool) -> list[PyGuard]:
        """The compiled guards of `probe`'s consumers when each is a `py:`
        function's (of ours) and they can share code: a call none of them
        keeps need not stop."""
        return [g for _, g in self._consumer_guards(probe, ret, self._ours)]

    def _consumer_guards(self, probe: Probe, ret: bool, among: Container[object],
                         ) -> list[tuple[Any, PyGuard]]:
        """(handler, compiled guard) of each consumer of `probe`, when every
        handler is in `among` and has one, and one piece of code can test them
        all (the same registers and offsets); else none."""
        out: list[tuple[Any, PyGuard]] = []
        for c in probe.consumers:
            h = c.ret_handler if ret else c.handler
            guard = self._ours[h].py_guard if h is not None and h in among else None
            if guard is None:
                return []
            out.append((h, guard))
        return out if len({replace(g, alternatives=()) for _, g in out}) == 1 else []

    def _place_guard_trap(self, t: Thread, regs: UserRegs, probe: Probe, addr: int,
                          file_offset: int, ident: tuple[int, int], guards: list[PyGuard],
                          ret: bool) -> bool:
        """Place `probe` as a jump whose code stops, at an int3 of its own,
        only the calls its guards keep (trapfree/pyguard.py); False: it
        takes the int3 path (a stop at every call)."""
        jumps = self._jumps
        assert jumps is not None
        point = probe.point
        mm = t.mm
        others = [p.point.file_offset for p in self.registry.in_inode(*ident)]
        plan = plan_for(point.path, ident[0], ident[1], file_offset, others,
                        tables=point.computed_gotos)
        why = plan if isinstance(plan, str) else None
        if not isinstance(plan, str):
            def stops_at(trap: int) -> None:
                mm.guard_traps[trap] = GuardTrap(probe, addr, addr - file_offset, ret)
                self._orphans.guard_trap(mm, trap)
            why = self._patch(t, regs, plan, point.name, addr, trap=guards, on_trap=stops_at)
        if why is not None:  # (the run's note lists it among the probes that stop)
            jumps.decide(point.name, why)
        return why is None

    def _compiled_filter(self, t: Thread, probe: Probe, ret: bool
                         ) -> tuple[Check | None, str | None]:
        """(the run's filter as the counting code can test it, the display
        name it counts under), or (None, None): the probe records instead."""
        handlers = [c.ret_handler if ret else c.handler for c in probe.consumers]
        lines = [self._ours[h] for h in handlers if h in self._ours]
        if self.hit_filter is None or len(lines) != 1:
            return None, None
        line = lines[0]
        check = compile_check(self.hit_filter.combined.root,
                              lambda field: source_of(line, field, ret))
        if isinstance(check, str):
            return None, None
        why = self._comm_refused(t, check)
        if why is not None:
            return None, None
        return check, next(n for n, p in zip(self._names_by_line, self.probes) if p is line)

    def _comm_refused(self, t: Thread, check: Check | None) -> str | None:
        """Why `check`, which may ask for the thread's name (None: code keyed
        by the name, which always asks), must not run in `t`'s process (its
        seccomp state would not let the call come back); the first time, a
        note says so."""
        mm = t.mm
        if self._jumps is not None:  # its calls after placement: the seccomp word
            self._jumps.guard_syscalls(mm.pid)  # (none: unguarded, as the notes say)
        mine = [o for o in self.threads.values() if o.mm is mm]
        if any(not o.stopped and seccomp.mode(o.tid) != 0 for o in mine):
            self._hold_all(mm)  # a filter is read only in a stop (released once placed)
            mine = [o for o in self.threads.values() if o.mm is mm]
        why = seccomp_refusal(check, [o.tid for o in mine])
        if why is not None and mm.pid not in self._comm_refused_in:
            self._comm_refused_in.add(mm.pid)
            self._note(f"process {mm.pid}: the thread's name is not asked for in the "
                       f"program's code: {why}")
        return why

    def _patch(self, t: Thread, regs: UserRegs, plan: FilePlan, name: str, start: int,
               record: Record | None = None, timed: Timed | None = None,
               by: Keyed | None = None, check: Check | None = None,
               py: Sequence[tuple[str, PyGuard]] = (), trap: Sequence[PyGuard] = (),
               on_trap: Callable[[int], None] | None = None) -> str | None:
        """Place the jump patch `plan` at `start` in `t`'s address space (every
        thread of it stopped meanwhile); None, or why it could not go in."""
        jumps = self._jumps
        assert jumps is not None
        mm = t.mm
        if any(not o.stopped for o in self.threads.values() if o.mm is mm):
            self._hold_all(mm)  # a library loaded while other threads run
        threads = [(o.tid, o.stopped, o.ns_tid) for o in self.threads.values() if o.mm is mm]
        threads += [(tid, True, tid) for tid in self._pending_new]  # (its own tid: unknown yet)

        def syscall_addr() -> int:
            if mm.syscall_addr is None:
                mm.syscall_addr = find_syscall_insn(mm.pid, mm.mem)
            return mm.syscall_addr
        try:
            jumps.place(mm, mm.mem, mm.pid, t.tid, regs, plan, name, start, mm.sites, threads,
                        lambda near, need: self._area_for(t, regs, near, need),
                        syscall_addr, t.pending, record, timed, by, check, py, trap, on_trap)
            if record is not None:  # names read now: a thread may be gone when
                for o in self.threads.values():  # its records are read
                    if o.mm is mm:
                        o.comm  # noqa: B018 (cached for COMM_TTL_NS)
        except NotTrapFree as e:
            return str(e)
        except UprobesError as e:  # a remote call or a write failed: the int3 path says
            return f"cannot place the jump: {e}"
        finally:  # after the area (and its orphan handler) the jump may have mapped
            self._taken(mm, "jumps")
        return None

    def _py_counted(self, probe: Probe, ret: bool) -> list[tuple[str, PyGuard]]:
        """(name, compiled guard) of each consumer of `probe`, when every one
        is a `py:` function that only counts: counted in the jump's code
        (trapfree/pyguard.py); else none."""
        if self._trapfree != "count":
            return []
        return [(self._py_count_only[h], g)
                for h, g in self._consumer_guards(probe, ret, self._py_count_only)]

    def _why_not_trapfree(self, probe: Probe, at_ret: bool, guarded: bool = False) -> str | None:
        """Why `probe` needs a stop at each hit whatever its instructions, or
        None. `at_ret`: it is a return probe's `ret` (resolve/retsites.py).
        `guarded`: its guard is tested in the jump's code."""
        if at_ret:
            if probe.dispatch is not NO_HANDLER:
                return "an entry probe on a ret that a return probe uses"
            handlers = [c.ret_handler for c in probe.consumers]
        else:
            if probe.ret_dispatch is not NO_HANDLER:
                return "a return probe by its return address (--uretprobe)"
            handlers = [c.handler for c in probe.consumers]
        if not handlers or any(h not in self._ours for h in handlers):
            return "a handler runs at each hit"
        if not guarded and any(h is not None and self._ours[h].guard for h in handlers):
            return "its hits are told apart by strings (a py: function's)"
        if self.stack_bytes and self._trapfree != "record":
            return "its stack is copied at each hit"
        return None

    def _recording(self, tid: int, probe: Probe, name: str | None, addr: int, file_base: int,
                   func: int | None) -> tuple[str | None, Record | None]:
        """(None, how) for a probe that records into a ring, else (why not, None).
        `tid`: the thread placing it, stopped. `name`: what its count goes
        under when its only consumer is ours and unfiltered (`_count_only`).
        `func`: the function's address, for a return probe on a ret at `addr`."""
        ret = func is not None
        lines = [self._ours[h] for c in probe.consumers
                 for h in (c.ret_handler if ret else c.handler,) if h is not None]
        recipe = recipe_for(lines, ret, self.stack_bytes)
        if isinstance(recipe, str):
            return recipe, None
        python = None
        if self._pystacks is not None:
            walk = self._py_walk(tid, probe, recipe)
            if isinstance(walk, str):
                return walk, None
            why = self._walk_refused(tid)
            if why is not None:
                return why, None
            recipe = replace(recipe, py=walk)
            python = self._py_groups(walk)
        if self._recorder is None:
            from uprobes.sys import tsc
            why = tsc.usable()
            if why is not None:
                return why, None
            self._recorder = Recorder(self.counts)
            self._ring_shape = shape_for(self._recipes(), self._pystacks is not None)
            self._undo.callback(self._abandon_rings)
        direct: Direct | None = None
        if name is not None and self.hit_filter is None:
            make = direct_hit(self._ours[probe.ret_dispatch if ret else probe.dispatch], recipe,
                              addr, func)
            if make is not None and recipe.copy:
                make = stack_hit(make, recipe, addr, python)
            if make is not None:
                direct = (name, make)
        if recipe.words > self._ring_shape.words:  # (a probe added after the run began)
            return f"it fetches {recipe.words} words; the run's rings hold " \
                   f"{self._ring_shape.words}", None
        if recipe.py is not None and recipe.py.end > self._ring_shape.copy:
            return "its Python frames are more than the run's records hold", None
        probe_id = self._recorder.site(RecordedSite(probe, recipe, addr, file_base, direct,
                                                    func, python))
        return None, Record(recipe, probe_id, waits(self._recorder.clock.ticks),
                            self._ring_shape)

    def _py_walk(self, tid: int, probe: Probe, recipe: Recipe) -> PyWalk | str:
        """How the probe's code copies the Python frames of `tid`'s process
        (pywalk.py), or why it cannot (its hits then stop at an int3, where
        they are read)."""
        assert self._pystacks is not None
        t = self.threads[tid]
        why = "its Python frames are read at each hit"
        if self.child is not None:
            # The reader names a code object some milliseconds after the hit;
            # a command frees its own as it ends (its `<module>` first), so
            # its last hits would lose them: only a running process (-p).
            return f"{why} (a command's code objects are freed as it ends: the trap-free " \
                   "Python frames are for -p)"
        interp = self._pystacks.interpreter(t.pid, t.mm.mem.read)
        if interp is None:
            return f"{why} (no interpreter whose layout is known in process {t.pid} yet)"
        try:
            image = ElfImage.open(interp.path)
            symbols = SymbolTable.load(image)
            runtime, func = (symbols.lookup(n) for n in ("_PyRuntime", CALLED))
        except UprobesError:
            return why
        if not runtime or not func:
            return f"{why} ({interp.path} has no {CALLED})"
        spans = self._walk_reach(t.pid, interp.path, func[0].link_addr)
        if isinstance(spans, str):
            return f"{why} ({spans})"
        if holds(spans, probe.point.path, probe.point.file_offset):
            return f"{why} (the probe is in the code its call to {CALLED} runs)"
        walk = py_walk(interp.runtime_addr - runtime[0].link_addr + func[0].link_addr,
                       interp.layout, recipe.copy, PY_STACKS.copy, interp.runtime_addr)
        return walk if walk is not None else f"{why} (its stack copy leaves no room for them)"

    def _walk_reach(self, pid: int, path: str, func: int) -> list[Span] | str:
        """The code the walk's call runs in `pid` (reach.py), found once per
        process and interpreter (another after an exec)."""
        known = self._walk_spans.get((pid, path, func))
        if known is None:
            try:
                loaded = list(dict.fromkeys(m.path for m in procfs.maps(pid)
                                            if m.executable and m.path.startswith("/")))
            except ProcessError as e:
                return str(e)
            linker = next((p for p in loaded if os.path.basename(p).startswith("ld-")), None)
            known = self._walk_spans[(pid, path, func)] = reach(path, func, loaded, linker)
        return known

    def _py_groups(self, walk: PyWalk) -> Callable[[int, bytes], PyGroups]:
        """(pid, a record's copy area) -> the Python frames the walk copied."""
        stacks = self._pystacks
        assert stacks is not None

        # A record copied as an earlier one (the same frames at the same
        # instructions, the same code objects) has its frames: named once.
        memo: dict[tuple[int, bytes], PyGroups] = {}

        def groups(pid: int, area: bytes) -> PyGroups:
            key = (pid, copied_key(walk, area))
            known = memo.get(key)
            if known is not None:
                return known
            got = copied(walk, area)
            found = () if got is None else stacks.recorded(pid, got.first, got.blobs, got.heads,
                                                           self._live_read(pid), got.names)
            if len(memo) >= _PY_MEMO_MAX:
                del memo[next(iter(memo))]
            memo[key] = found
            return found
        return groups

    def _live_read(self, pid: int) -> Callable[[int, int], bytes]:
        """Reads `pid`'s memory now (its code objects, seen first); a fork
        child that has ended, its parent's (the fingerprints tell)."""
        parents = {} if self._pystacks is None else self._pystacks.parents
        reads: list[Callable[[int, int], bytes]] = []
        seen = set()
        while pid not in seen:  # (a child ending as it is read: its parent's too)
            seen.add(pid)
            reads += [t.mm.mem.read for t in self.threads.values() if t.pid == pid][:1]
            pid = parents.get(pid, pid)

        def read(addr: int, n: int) -> bytes:
            for r in reads:
                try:
                    return r(addr, n)
                except UprobesError:
                    continue
            raise ProcessError(f"process {pid} is not traced")
        return read

    def _walk_refused(self, tid: int) -> str | None:
        """Why the Python walk's system calls (getpid, process_vm_readv, made
        by the program at each hit: pywalk.py) must not be placed in `tid`'s
        process: a thread's seccomp filter would kill, trap or fail them
        (each thread has its own filters; a thread born later inherits its
        creator's). A filter that reads their arguments or address cannot
        be judged ahead of the hit: refused too. Asked once per process. A
        filter installed later is seen by the seccomp word the walk reads
        before each call (sandboxes.py), which follows the process first:
        where there can be none, the walk is refused."""
        pid = self.threads[tid].pid
        if pid not in self._walk_checked:
            assert self._jumps is not None
            why = self._jumps.guard_syscalls(pid)
            for t in [t for t in self.threads.values() if t.pid == pid]:
                for nr in (NR_GETPID, NR_PROCESS_VM_READV):
                    why = why or seccomp.refusal_anywhere(t.tid, nr, (), must_succeed=True)
            self._walk_checked[pid] = None if why is None else f"its Python frames are " \
                f"copied by system calls in the program, and {why}"
        return self._walk_checked[pid]

    def _recipes(self) -> list[Recipe]:
        """What each probed instruction of the run would record, if it records."""
        out = []
        for probe in self.registry:
            for ret in (False, True):
                lines = [self._ours[h] for c in probe.consumers
                         for h in (c.ret_handler if ret else c.handler,) if h in self._ours]
                recipe = recipe_for(lines, ret, self.stack_bytes) if lines else None
                if isinstance(recipe, Recipe):
                    out.append(recipe)
        return out

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
        self._taken(mm, "int3s")
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
            self._taken(mm, "orphan handler")
            self._orphans.setup(t, regs, mm.syscall_addr, self._hijacks())
        self._orphans.trampoline(mm, area.trampoline)
        return area

    def _hijacks(self) -> bool:
        """Whether a return probe may hijack return addresses (the trampoline)."""
        return any(p.ret_dispatch is not NO_HANDLER and p.key not in self._ret_sites
                   for p in self.registry)

    def _refuse(self, probe: Probe, reason: str) -> None:
        if self._placed_once:  # once running, a refusal (a library loaded later) is a note
            self._refusals.skip(probe.point.name, reason)
        else:
            self._refusals.refuse(probe.point, probe.point.name, reason)


def _guarded(probe: Probe) -> bool:
    """Whether the probe at this place has a guard (model/probe.py): a `py:`
    function's, whose places are the eval loop's, where no other probe is."""
    return probe.point.guard is not None
