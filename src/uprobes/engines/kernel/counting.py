"""Counting hits per probe in the kernel, with no records at all.

Two ways, chosen by what is counted:

- System-wide: the `uprobe` perf PMU, one counter per probe per CPU, summed.
  Nothing appears in tracefs; the probes live as long as our fds, so even a
  SIGKILLed run leaves nothing behind.
- A process (`-p PID`) or a launched command (children and threads
  included): a PMU counter bound to a pid counts one *thread*, and the PMU
  with `inherit` breaks the target's pthread_create/fork (see
  `uprobes.sys.pmu`). So each probe becomes a tracefs event of our run's
  group, counted by a perf tracepoint *counting* event (no sampling, no
  ring) per task with `inherit`: the kernel copies it into every thread and
  child the task creates after the open, and reading the parent's counter
  sums theirs (perf_event_read_value() walks the child list, and exited
  children are folded in). Inherit does not reach threads that already
  exist, so for `-p` every existing thread gets its own counter, re-listing
  /proc/PID/task until no new thread appears. Measured exact for 4 threads
  x 100k calls and for forked children (tests/test_kernel_count.py).

With a filter (`--if`, `--comm`, `--tid`), counting takes tracepoint
counting events everywhere, system-wide too (one per CPU, pid -1): the
PMU's events have no record to test, so they cannot be filtered, while a
tracepoint event's filter is tested before it counts (perf_tp_event()).
The probe then fetches what the filter names (the fetchargs it uses and
the hidden `__uprobes_comm`), and nothing else.

The pid given to perf is also the kernel's prefilter (uprobe_perf_filter):
other processes never get the breakpoints.

The kernel refuses some probe sites (ENOTSUPP, 524: an instruction it
cannot single-step or emulate, e.g. some AVX-512 entry points of libc). A
refused probe is left out and named in `refused`; only when every probe is
refused is that an error.

Detaching is the slow part, and it is the kernel's: closing the last perf
event of a uprobe runs uprobe_unregister_sync() and
tracepoint_synchronize_unregister() (RCU-tasks-trace grace periods) under
event_mutex, so probes are detached one after the other whatever we do
(closing from many threads measured no faster). Removing unused tracefs
events afterwards is fast, and we do it in one write.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import TracebackType

from uprobes.engines.filters import HitFilter
from uprobes.engines.kernel.groups import open_run_group, remove_run_group
from uprobes.engines.kernel.records import COMM_FIELD
from uprobes.engines.kernel.insn_guard import unsafe_sites
from uprobes.errors import EngineError, KernelError
from uprobes.probe import InodeKey, ResolvedProbe, VdsoKey
from uprobes.spec import kernel_line
from uprobes.spec.ast import ProbeKind
from uprobes.sys import procfs
from uprobes.sys.perf import ATTR_DISABLED, ATTR_INHERIT, PERF_TYPE_TRACEPOINT, PerfEvent, \
    PerfEventAttr, online_cpus
from uprobes.sys.pmu import UprobeCounter, UprobePmu
from uprobes.sys.tracefs import ProbeGroup, Tracefs

ENOTSUPP = 524  # kernel-internal, what uprobe registration answers for unprobeable insns
MAX_EVENT_NAME = 63


@dataclass(frozen=True)
class Refusal:
    """A probe the kernel would not place, and why."""

    name: str
    errno: int | None
    reason: str


def refusal_reason(probe: ResolvedProbe, err: KernelError) -> str:
    """Why the kernel refused `probe`, in words a user can act on."""
    if err.errno == ENOTSUPP:
        where = "the first instruction" if probe.symbol and not probe.symbol_offset \
            else "the instruction there"
        return f"cannot probe {where}"
    return str(err)


def refusal_note(refused: Sequence[Refusal], total: int, shown: int = 8) -> str:
    """One line naming the refused probes, grouped by reason: the kernel's
    refusals first, then the sites we left out ourselves (insn_guard)."""
    by_reason: dict[tuple[bool, str], list[str]] = {}
    for r in refused:
        by_reason.setdefault((r.errno is None, r.reason), []).append(r.name.rsplit("/", 1)[-1])
    parts = []
    for (ours, reason), names in sorted(by_reason.items()):
        listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
        head = (f"left out {len(names)} of {total} probes" if ours
                else f"the kernel refused {len(names)} of {total} probes")
        parts.append(f"{head} ({reason}): {listed}")
    return "; ".join(parts)


def display_names(probes: Sequence[ResolvedProbe]) -> list[str]:
    """`GRP/EVENT` as the user named each probe, made unique (`_2`, `_3`...)."""
    seen: dict[str, int] = {}
    names = []
    for p in probes:
        n = seen.get(p.name, 0) + 1
        seen[p.name] = n
        names.append(p.name if n == 1 else f"{p.name}_{n}")
    return names


class KernelCounter:
    """Counts hits of `probes`: system-wide (`pids` None) or in tasks `pids`
    and everything they start afterwards. A context manager owning every
    perf fd and tracefs event it makes; `counts()` reads the totals.

    With `all_threads` each pid is a process whose existing threads are all
    counted (for `-p`); without, each pid is one task (a launched command
    held before exec has just one). `hit_filter` counts only the hits it
    keeps, in the kernel (it must be one the kernel can say).
    """

    def __init__(self, probes: Sequence[ResolvedProbe], *, pids: Sequence[int] | None = None,
                 all_threads: bool = True, tracefs: Tracefs | None = None,
                 force: bool = False, hit_filter: HitFilter | None = None) -> None:
        self.filter_text: str | None = None
        if hit_filter is not None:
            self.filter_text = hit_filter.kernel_filter()
            if self.filter_text is None:
                raise EngineError("count filters in the kernel, and here it cannot: "
                                  f"{hit_filter.why_not_kernel()}; `uprobes trace` can")
        self.hit_filter = hit_filter
        for p in probes:
            if isinstance(p.key, VdsoKey):
                raise EngineError(f"{p.name}: vDSO probes cannot be placed by the kernel "
                                  "engine (the vDSO has no file); use -e ptrace")
        self.refused: list[Refusal] = []
        names = display_names(probes)
        self.total = len(names)
        self.probes: list[ResolvedProbe] = []
        self.names: list[str] = []
        self._lines: list[tuple[ResolvedProbe, int | None]] = []  # what a line is made of
        sites = [(name, probe, p, site) for name, probe in zip(names, probes)
                 for p, site in _sites(probe)]
        unsafe = {} if force else unsafe_sites((p.path, p.file_offset) for _, _, p, _ in sites)
        for name, probe, p, site in sites:
            why = unsafe.get((p.path, p.file_offset))
            if why:
                self.refused.append(Refusal(name, None, why))
            else:
                self.probes.append(p)
                self.names.append(name)
                self._lines.append((probe, site))
        self.pids = list(pids) if pids is not None else None
        self.all_threads = all_threads
        self._tracefs = tracefs
        self.group: ProbeGroup | None = None
        # Per placed probe: its display name and the perf events whose counts sum to it.
        self._placed: list[tuple[str, list[PerfEvent] | UprobeCounter]] = []
        self._tasks: set[int] = set()

    # ------------------------------------------------------------ placing

    def __enter__(self) -> KernelCounter:
        try:
            if self.pids is None and self.filter_text is None:
                self._place_pmu()
            else:
                self._place_tracepoints(self.pids)
            if not self._placed:
                self._all_refused()
            for _, ev in self._placed:
                for e in ev.events if isinstance(ev, UprobeCounter) else ev:
                    e.enable()
        except BaseException:
            self.close()
            raise
        return self

    def _all_refused(self) -> None:
        if not self.refused:
            raise EngineError("no probes to count")
        first = self.refused[0]
        more = f" (and the other {len(self.refused) - 1})" if len(self.refused) > 1 else ""
        raise KernelError(f"no probe could be placed: {first.name}: {first.reason}{more}",
                          first.errno)

    def _refuse(self, name: str, probe: ResolvedProbe, err: KernelError) -> None:
        self.refused.append(Refusal(name, err.errno, refusal_reason(probe, err)))

    def _place_pmu(self) -> None:
        pmu = UprobePmu.load()
        for name, p in zip(self.names, self.probes):
            try:
                counter = UprobeCounter(p.path, p.file_offset, retprobe=p.is_return,
                                        ref_ctr_offset=p.ref_ctr_offset or 0, pmu=pmu)
            except KernelError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.EACCES, errno.EPERM):
                    raise
                self._refuse(name, p, e)
                continue
            self._placed.append((name, counter))

    def _event_names(self) -> list[str]:
        """Our event name per probe: the user's event name, unique in our group."""
        used: set[str] = set()
        out = []
        for p in self.probes:
            base = p.event[:MAX_EVENT_NAME]
            name, n = base, 1
            while name in used:
                n += 1
                suffix = f"_{n}"
                name = base[:MAX_EVENT_NAME - len(suffix)] + suffix
            used.add(name)
            out.append(name)
        return out

    def _line(self, i: int, event: str) -> str:
        """Counting fetches nothing but what the filter tests: the line carries
        the place (and the USDT semaphore, `(0xREF)`, so the kernel sets it)."""
        assert self.group is not None
        p = self.probes[i]
        flt = self.hit_filter
        if flt is None or not (flt.arg_fields or flt.needs_comm):
            return kernel_line(replace(p, group=self.group.name, event=event, args=()))
        probe, site = self._lines[i]
        kept = tuple(a for a in probe.args if a.name in flt.arg_fields)
        line = kernel_line(replace(probe, group=self.group.name, event=event, args=kept),
                           ret_site=site)
        return line + (f" {COMM_FIELD}=$comm" if flt.needs_comm else "")

    def _place_tracepoints(self, pids: Sequence[int] | None) -> None:
        """Counting tracepoint events on `pids`, or on every CPU for None."""
        tracefs = self._tracefs or Tracefs()
        self.group = open_run_group(tracefs)
        events = self._event_names()
        for i, event in enumerate(events):
            self.group.add(self._line(i, event))
        ids = [tracefs.event_id(self.group.name, e) for e in events]
        live = list(zip(self.names, self.probes, ids))
        slots: list[list[PerfEvent]] = [[] for _ in live]
        dead: set[int] = set()
        # (task, cpu) pairs: every task on any CPU, or system-wide every CPU.
        pending = [(tid, -1) for tid in pids] if pids is not None \
            else [(-1, cpu) for cpu in online_cpus()]
        while pending:
            for tid, cpu in pending:
                self._tasks.add(tid)
                for i, (name, p, event_id) in enumerate(live):
                    if i in dead:
                        continue
                    try:
                        slots[i].append(self._counting(event_id, tid, cpu))
                    except KernelError as e:
                        if e.errno == errno.ESRCH:
                            break  # the thread ended before we reached it
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.EACCES, errno.EPERM):
                            raise
                        self._refuse(name, p, e)
                        dead.add(i)
                        for ev in slots[i]:
                            ev.close()
                        slots[i].clear()
            pending = [(tid, -1) for tid in self._new_threads(pids)] \
                if self.all_threads and pids is not None else []
        self._placed = [(name, slots[i]) for i, (name, _, _) in enumerate(live) if i not in dead]

    def _counting(self, event_id: int, task: int, cpu: int) -> PerfEvent:
        ev = _open_counting(event_id, task, cpu)
        if self.filter_text is not None:
            try:
                ev.set_filter(self.filter_text)
            except KernelError as e:
                ev.close()
                raise EngineError(f"the kernel refused the filter {self.filter_text!r}: "
                                  f"{e}") from e
        return ev

    def _new_threads(self, pids: Sequence[int]) -> list[int]:
        """Threads of `pids` we have no counter on yet. A thread created by one
        we already count inherits the counter; listing again until nothing is
        new closes the race with threads created by the others meanwhile."""
        new: list[int] = []
        for pid in pids:
            try:
                tids = procfs.tids(pid)
            except Exception:
                continue
            new.extend(t for t in tids if t not in self._tasks)
        return new

    # ------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        """Hits per probe (display name) so far, every placed probe listed."""
        out: dict[str, int] = {}
        for name, ev in self._placed:  # a return probe on its rets: one entry per ret
            if isinstance(ev, UprobeCounter):
                out[name] = out.get(name, 0) + ev.read()
            else:
                out[name] = out.get(name, 0) + sum(e.read_count() for e in ev)
        return out

    def disable(self) -> None:
        """Stop counting now (cheap); the probes stay until `close()`."""
        for _, ev in self._placed:
            for e in ev.events if isinstance(ev, UprobeCounter) else ev:
                if e.fd >= 0:
                    e.disable()

    # ------------------------------------------------------------ removing

    def close(self) -> None:
        """Close every perf fd (the kernel unregisters each uprobe), then remove
        our tracefs events. Safe to call twice."""
        first: BaseException | None = None
        for _, ev in self._placed:
            try:
                if isinstance(ev, UprobeCounter):
                    ev.close()
                else:
                    for e in ev:
                        e.close()
            except OSError as e:
                first = first or e
        self._placed = []
        if self.group is not None:
            try:
                _remove_group_at_once(self.group)
            except KernelError as e:
                first = first or e
            self.group = None
        if first is not None:
            raise first

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except BaseException:
            if exc is None:
                raise


def _sites(p: ResolvedProbe) -> list[tuple[ResolvedProbe, int | None]]:
    """What is placed for `p`: itself, or a return probe with `ret_sites` as
    one entry probe on each `ret` (their hits sum to its returns), each with
    its `ret` site. The copies carry no fetchargs (a filter's come from `p`)."""
    if not p.ret_sites:
        return [(p, None)]
    return [(replace(p, kind=ProbeKind.ENTRY, file_offset=site, args=(), ret_sites=None,
                     link_addr=None, key=replace(p.key, file_offset=site)
                     if isinstance(p.key, InodeKey) else p.key), site)
            for site in p.ret_sites]


def _open_counting(event_id: int, tid: int, cpu: int = -1) -> PerfEvent:
    """A counting (not sampling) tracepoint event on task `tid` and the tasks
    it creates, on any CPU; or (`tid` -1) on every task of CPU `cpu`."""
    attr = PerfEventAttr()
    attr.size = ctypes.sizeof(attr)
    attr.type = PERF_TYPE_TRACEPOINT
    attr.config = event_id
    attr.sample_period = 0
    attr.sample_type = 0
    attr.flags = ATTR_DISABLED | (ATTR_INHERIT if tid != -1 else 0)
    return PerfEvent.open(attr, pid=tid, cpu=cpu,
                          what=f"counting tracepoint {event_id} on task {tid} cpu {cpu}")


def _remove_group_at_once(group: ProbeGroup) -> None:
    """Remove all of `group`'s events with one write to uprobe_events.

    The kernel runs the `-:` lines one by one, but an event no perf fd uses
    any more is gone without a grace period, so one write is about 10 us per
    event; on any failure fall back to the group's own one-by-one removal,
    which names the event that failed.
    """
    if not group.events:
        return
    lines = "".join(f"-:{group.name}/{ev}\n" for ev in group.events)
    path = group.tracefs.root / "uprobe_events"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            data = lines.encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    except OSError:
        pass  # the group's own removal below names what failed
    group.events.clear()
    if group.tracefs.events_of_group(group.name):
        remove_run_group(group)
