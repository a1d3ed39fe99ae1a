"""Counting hits per probe in the kernel, with no records at all.

Probes are tracefs events of the run's group, and they share events the way
`trace`'s do (`records.shared_events`): the kernel appends probe points to an
event with the same file, kind and fetchargs, and tears a whole event down
with one set of grace periods. That is what makes detaching fast: closing
the last perf event of an event (or of a uprobe PMU counter, one per probe
per CPU, what `count` used before) runs uprobe_unregister_sync() and
tracepoint_synchronize_unregister() under event_mutex, tens of milliseconds
each, so probes counted one event each took seconds per hundred to detach;
shared, 1,000 libc probes are ~9 events. The events are then removed in one
write. Probes with the same line (one place, the same fetchargs) are one
probe point counted under each name, and a run needing more events than
`groups.MAX_EVENTS` is refused before anything is placed.

A shared event is one tracepoint: its perf counter sums every probe point in
it. Each probe's own count comes from one of two places:

- System-wide with no filter: `uprobe_profile`, the hits the kernel counts
  per probe point (trace_uprobe's `nhits`, bumped for every hit before any
  perf filtering). Its lines name no group and no offset, only the file and
  the event, in the order of `uprobe_events`; so our events carry names no
  one else uses (`n<pid>_<k>`) and a probe is found by its place among its
  event's lines. One counting perf event on one CPU keeps the event
  registered (a CPU-wide event makes the uprobe system-wide); hits on the
  other CPUs skip the perf side altogether. Return probes through the
  kernel's uretprobe count on the other way: `nhits` counts their entries.
- A process (`-p PID`), a launched command, or a filter: one counting perf
  event per probe and task (or CPU), whose filter keeps only its own probe's
  hits: the low 12 bits of the hit's address (`__probe_ip`, `__probe_func`
  for a uretprobe) equal its file offset's (a file is mapped page by page),
  and they differ between the probe points of one event. The filter tests
  the few bits that tell a probe from its event's others (a binary split),
  then the user's filter. A filtered-out hit is not counted (perf_tp_event()
  tests the filter first).

Per task, counting events are inherited (`inherit`): the kernel copies them
into every thread and child the task creates after the open, and reading
the parent's counter sums theirs (exited children are folded in). Inherit
does not reach threads that already exist, so for `-p` every existing
thread gets its own counters, re-listing /proc/PID/task until no new thread
appears. The uprobe PMU is not used with a pid: with `inherit` it made the
target's pthread_create fail with EFAULT (see `uprobes.sys.pmu`).

`pid` in a filter: the kernel's filter has no field for the process, but a
counter bound to a process knows it. A condition on `pid` (with `==`/`!=`)
is bound per process (`spec.condition.bind`): each process counted gets
what is left of the condition; system-wide, the processes counted are those
the condition names, and it must reject every other one. Such counters are
inherited by threads only (`inherit_thread`): a child is another process.

The pid given to perf is also the kernel's prefilter (uprobe_perf_filter):
other processes never get the breakpoints.

The kernel refuses some probe sites (ENOTSUPP, 524: an instruction it
cannot single-step or emulate, e.g. some AVX-512 entry points of libc); one
refused probe point fails its whole event, which is then placed in halves
down to the probe it refused. A refused probe is left out and named in
`refused`; only when every probe is refused is that an error.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import select
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from types import TracebackType

from uprobes.engines.kernel.groups import check_event_count, open_run_group, remove_run_group
from uprobes.engines.kernel.insn_guard import screen_sites
from uprobes.engines.kernel.probe_line import kernel_line
from uprobes.engines.kernel.records import PAGE_MASK
from uprobes.engines.signals import StopSignals
from uprobes.errors import EngineError, KernelError, ProcessError, UprobesError, UsageError
from uprobes.lang.ast import ProbeKind
from uprobes.lang.condition import Condition, bind, values_of
from uprobes.model.event import COMM_FIELD, display_names
from uprobes.model.filters import HitFilter
from uprobes.model.probe import InodeKey, ResolvedProbe, VdsoKey
from uprobes.sys import procfs
from uprobes.sys.perf import (
    ATTR_DISABLED,
    ATTR_INHERIT,
    ATTR_INHERIT_THREAD,
    PERF_TYPE_TRACEPOINT,
    PerfEvent,
    PerfEventAttr,
    online_cpus,
)
from uprobes.sys.pidfd import has_ended, watch_process
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


@dataclass
class _Site:
    """One probe point counted: a placed probe (or one `ret` of a return
    probe) and the display name its count adds to."""

    name: str
    probe: ResolvedProbe  # as placed: its own file offset
    whole: ResolvedProbe  # as the user gave it (a filter fetches its fetchargs)
    ret_site: int | None
    line: str = ""  # the uprobe_events line, event name left out (`_in_event`)
    fds: list[PerfEvent] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)  # names of sites identical to this one

    @property
    def names(self) -> list[str]:
        """Every display name this site's count adds to."""
        return [self.name, *self.aliases]


@dataclass
class _Event:
    """A kernel event holding `sites` (one probe point each)."""

    name: str
    sites: list[_Site]
    by_profile: bool  # counted through uprobe_profile (else per-site perf counters)
    enablers: list[PerfEvent] = field(default_factory=list)  # by_profile: keep it registered
    profile_at: list[int] = field(default_factory=list)  # per site: its line among the event's

    @property
    def kind(self) -> str:
        return self.sites[0].line.partition(":")[0]

    def lines(self, group: str) -> list[str]:
        return [_in_event(s.line, group, self.name) for s in self.sites]

    def fds(self) -> list[PerfEvent]:
        return [*self.enablers, *(e for s in self.sites for e in s.fds)]

    def close(self) -> None:
        for e in self.fds():
            e.close()
        self.enablers.clear()
        for s in self.sites:
            s.fds.clear()


@dataclass(frozen=True)
class _Task:
    """Where counters go: task `tid` (inherited by what it creates) of
    process `pid`, or (`tid` -1) every task on CPU `cpu`."""

    tid: int
    cpu: int
    pid: int | None


MAX_SHARED = 64
"""Most sites in one event counted per site (a pid or a filter). Every hit
of the event runs each site's counter filter (perf_tp_event() walks them
all), tens of nanoseconds a site, so a hit's cost grows with the event; 64
keeps that to microseconds while 1,000 probes still detach as a few dozen
events (`python -m bench.kernel --only shared,attach` measures both;
docs/benchmarks.md). Counted through
uprobe_profile (system-wide), an event has no per-site cost and no cap."""

_names = itertools.count()  # event names unique in this process (two counters, one group)


class KernelCounter:
    """Counts hits of `probes`: system-wide (`pids` None) or in tasks `pids`
    and everything they start afterwards. A context manager owning every
    perf fd and tracefs event it makes; `counts` reads the totals, `count()`
    waits while the kernel counts (the engine's `Counter`, engines/base.py).

    With `all_threads` each pid is a process whose existing threads are all
    counted (for `-p`); without, each pid is one task (a launched command
    held before exec has just one). The first pid is the target: its end
    ends `count()`. `hit_filter` counts only the hits it keeps, in the
    kernel (it must be one the kernel can say, `pid` bound per process; see
    the module's docstring). `note` gets a line naming the probes refused.
    """

    child_status: int | None = None  # a launched command is its launcher's to reap

    def __init__(self, probes: Sequence[ResolvedProbe], *, pids: Sequence[int] | None = None,
                 all_threads: bool = True, tracefs: Tracefs | None = None,
                 force: bool = False, hit_filter: HitFilter | None = None,
                 max_shared: int = MAX_SHARED,
                 note: Callable[[str], object] | None = None) -> None:
        for p in probes:
            if isinstance(p.key, VdsoKey):
                raise EngineError(f"{p.name}: vDSO probes cannot be placed by the kernel "
                                  "engine (the vDSO has no file); use -e ptrace")
        self.hit_filter = hit_filter
        self.max_shared = max_shared
        self.pids = list(pids) if pids is not None else None
        self._target = self.pids[0] if self.pids else None
        self.all_threads = all_threads
        self._note = note or (lambda _: None)
        self._by_pid = False  # counters bound per process for a `pid` condition
        self._filters: dict[int | None, str | bool] = {}
        if hit_filter is not None:
            self._plan_filter(hit_filter)
        self.refused: list[Refusal] = []
        names = display_names(probes)
        self.total = len(names)
        self.names: list[str] = []
        self._sites: list[_Site] = []
        sites = [(name, probe, p, site) for name, probe in zip(names, probes)
                 for p, site in _sites(probe)]
        unsafe, self._alone = screen_sites((p.path, p.file_offset) for _, _, p, _ in sites)
        if force:
            unsafe = {}
        for name, probe, p, site in sites:
            why = unsafe.get((p.path, p.file_offset))
            if why:
                self.refused.append(Refusal(name, None, why))
            else:
                self._sites.append(_Site(name, p, probe, site))
                self.names.append(name)
        self._tracefs = tracefs
        self.group: ProbeGroup | None = None
        self._events: list[_Event] = []  # placed
        self._tasks: list[_Task] = []
        self._seen: set[int] = set()
        self._base: dict[str, list[int]] = {}  # uprobe_profile hits per event at the start
        self._frozen: dict[str, int] | None = None
        self._watched: list[int] = []  # pidfds of the processes of -p
        self.exited: int | None = None
        """The process that ended while its probes were placed: placing
        stopped there (what the ending made fail is no refusal)."""
        self.target_exited = False
        self._stack = ExitStack()  # the stop signals, the target's pidfd
        self._signals: StopSignals | None = None
        self._watch = -1

    # ------------------------------------------------------------ the filter

    def _plan_filter(self, flt: HitFilter) -> None:
        plan = plan_filter(flt, self.pids)
        self._filters, self._by_pid = plan.filters, plan.by_pid
        if plan.pids is not None and self.pids is None:
            self.pids, self.all_threads = plan.pids, True

    def _filter_for(self, pid: int | None) -> str | bool:
        """The user's filter for a task of process `pid`: its kernel text, or
        True (keep every hit) / False (count nothing there)."""
        if self.hit_filter is None:
            return True
        return self._filters.get(pid if self._by_pid else None, True)

    # ------------------------------------------------------------ placing

    def __enter__(self) -> KernelCounter:
        try:
            # From here a stop signal ends the counting, not us.
            self._signals = self._stack.enter_context(StopSignals())
            if self._target is not None:
                self._watch = watch_process(self._target)
                if self._watch < 0:
                    raise ProcessError(f"no process {self._target}")
                self._stack.callback(os.close, self._watch)
            tracefs = self._tracefs or Tracefs()
            self.group = open_run_group(tracefs)
            if self.pids is None:
                self._tasks = [_Task(-1, cpu, None) for cpu in online_cpus()]
            else:
                self._tasks = [_Task(pid, -1, pid) for pid in self.pids
                               if self._filter_for(pid) is not False]
            self._seen = {t.tid for t in self._tasks}
            events = self._share()
            check_event_count(len(events), len(self.names))
            if self.all_threads and self.pids is not None:
                self._watched = [watch_process(pid) for pid in self.pids]
            for event in events:
                self._place(event)
                if self.exited is not None:
                    break
            if self.all_threads and self.pids is not None and self.exited is None:
                self._follow_threads()
            if not self._events and self.exited is None:
                self._all_refused()
            if any(e.by_profile for e in self._events):
                self._map_profile(tracefs)
                self._base = self._profile()
            for e in self._events:
                for fd in e.fds():
                    fd.enable()
        except BaseException:
            self.close()
            raise
        if self.refused:
            self._note(refusal_note(self.refused, self.total))
        if self.exited is not None:
            self._note(f"process {self.exited} exited while its probes were placed")
            self.target_exited = True
        return self

    def _all_refused(self) -> None:
        if not self.refused:
            if self._sites and not self._tasks:  # a filter no task can pass: count zeros
                return
            raise EngineError("no probes to count")
        first = self.refused[0]
        more = f" (and the other {len(self.refused) - 1})" if len(self.refused) > 1 else ""
        raise KernelError(f"no probe could be placed: {first.name}: {first.reason}{more}",
                          first.errno)

    def _site_line(self, site: _Site) -> str:
        """Counting fetches nothing but what the filter tests: the line carries
        the place (and the USDT semaphore, `(0xREF)`, so the kernel sets it)."""
        assert self.group is not None
        flt = self.hit_filter
        if flt is None or not (flt.arg_fields or flt.needs_comm):
            return kernel_line(replace(site.probe, group=self.group.name, event="e", args=()))
        kept = tuple(a for a in site.whole.args if a.name in flt.arg_fields)
        line = kernel_line(replace(site.whole, group=self.group.name, event="e", args=kept),
                           ret_site=site.ret_site)
        return line + (f" {COMM_FIELD}=$comm" if flt.needs_comm else "")

    def _share(self) -> list[_Event]:
        """Sites grouped into events (see `records.shared_events`): one file,
        kind and fetchargs, distinct low 12 bits. A USDT probe with a
        semaphore, and a site the kernel will likely refuse, keep one each.
        Sites with the same line (one place, the same fetchargs) are one
        site counted under each name: they would count the same hits, and
        at one place they could share no event."""
        profile = self.pids is None and self.hit_filter is None
        events: list[_Event] = []
        Key = tuple[str, str, str]
        slots: dict[Key, list[tuple[set[int], _Event]]] = {}
        # Where to look first for a site with these low bits: every earlier
        # event holds them or is full, and stays so (each is looked past once).
        start: dict[tuple[Key, int], int] = {}
        same: dict[str, _Site] = {}
        for site in self._sites:
            site.line = self._site_line(site)
            first = same.setdefault(site.line, site)
            if first is not site:
                first.aliases.append(site.name)
                continue
            kind, _, rest = site.line.partition(":")
            place, _, args = rest.partition(" ")[2].partition(" ")
            by_profile = profile and kind == "p"
            if "(" in place or (site.probe.path, site.probe.file_offset) in self._alone:
                events.append(_Event(self._event_name(), [site], by_profile))
                continue
            low = site.probe.file_offset & PAGE_MASK
            key = (kind, site.probe.path, args)
            of_key = slots.setdefault(key, [])
            at = start.get((key, low), 0)
            while at < len(of_key) and (low in of_key[at][0] or not (
                    by_profile or len(of_key[at][1].sites) < self.max_shared)):
                at += 1
            start[(key, low)] = at + 1
            if at < len(of_key):
                of_key[at][0].add(low)
                of_key[at][1].sites.append(site)
            else:
                event = _Event(self._event_name(), [site], by_profile)
                of_key.append(({low}, event))
                events.append(event)
        return events

    @staticmethod
    def _event_name() -> str:
        return f"n{os.getpid()}_{next(_names)}"

    def _place(self, event: _Event) -> None:
        """Add `event` and open its counters on every task so far. When the
        kernel refuses it (one probe point it cannot take fails them all),
        its halves are placed apart, down to the probe it refused."""
        assert self.group is not None
        try:
            self.group.add_event(event.name, event.lines(self.group.name))
            try:
                if event.by_profile:
                    event.enablers.append(_open_counting(self._event_id(event), -1,
                                                         self._tasks[0].cpu))
                else:
                    for task in self._tasks:
                        self._open(event, task)
            except BaseException:
                event.close()
                self.group.remove(event.name)
                raise
        except KernelError as e:
            if e.errno in FATAL:
                raise
            if self._watched and all(has_ended(fd) for fd in self._watched):
                # The process ended: its files under /proc/PID/root went with it.
                assert self.pids is not None
                self.exited = self.pids[0]
                return
            if len(event.sites) == 1:
                site = event.sites[0]
                why = refusal_reason(site.probe, e)
                self.refused.extend(Refusal(name, e.errno, why) for name in site.names)
                return
            half = len(event.sites) // 2
            for part in (event.sites[:half], event.sites[half:]):
                if self.exited is None:
                    self._place(_Event(self._event_name(), part, event.by_profile))
            return
        self._events.append(event)

    def _event_id(self, event: _Event) -> int:
        assert self.group is not None
        return self.group.tracefs.event_id(self.group.name, event.name)

    def _open(self, event: _Event, task: _Task) -> None:
        """A counter per site of `event` on `task`, each keeping its own
        site's hits (and the user's filter's). A task that has ended is
        skipped."""
        user = self._filter_for(task.pid)
        if user is False:
            return
        event_id = self._event_id(event)
        field_name = "__probe_func" if event.kind == "r" else "__probe_ip"
        pick = _selectors(field_name, [s.probe.file_offset & PAGE_MASK for s in event.sites])
        flags = ATTR_INHERIT | (ATTR_INHERIT_THREAD if self._by_pid else 0) \
            if task.tid != -1 else 0
        for site, selector in zip(event.sites, pick):
            try:
                fd = _open_counting(event_id, task.tid, task.cpu, flags)
            except KernelError as e:
                if e.errno == errno.ESRCH:
                    return  # the thread ended before we reached it
                raise
            site.fds.append(fd)
            text = " && ".join(f"({t})" for t in (selector, user) if isinstance(t, str) and t)
            if text:
                try:
                    fd.set_filter(text)
                except KernelError as e:
                    raise EngineError(f"the kernel refused the filter {text!r}: {e}") from e

    def _follow_threads(self) -> None:
        """Counters on every thread of the processes: a thread created by one
        we already count inherits its counters; listing again until nothing
        is new closes the race with threads created by the others meanwhile."""
        assert self.pids is not None
        while True:
            new: list[_Task] = []
            for pid in self.pids:
                if self._filter_for(pid) is False:
                    continue
                try:
                    tids = procfs.tids(pid)
                except UprobesError:
                    continue
                new.extend(_Task(t, -1, pid) for t in tids if t not in self._seen)
            if not new:
                return
            for task in new:
                self._seen.add(task.tid)
                self._tasks.append(task)
                for event in self._events:
                    self._open(event, task)

    # ------------------------------------------------------------ uprobe_profile

    def _map_profile(self, tracefs: Tracefs) -> None:
        """Where each site of a profile-counted event is among its event's
        `uprobe_profile` lines: those lines come in `uprobe_events` order,
        and that file names the offset of each."""
        assert self.group is not None
        prefix = f"p:{self.group.name}/"
        for _ in range(READ_TRIES):
            order: dict[str, list[int]] = {}
            for line in tracefs.list_events():
                if line.startswith(prefix):
                    name, _, place = line[len(prefix):].partition(" ")
                    offset = place.split("(")[0].rpartition(":")[2]
                    order.setdefault(name, []).append(int(offset, 16))
            try:
                for event in self._events:
                    if event.by_profile:
                        at = order.get(event.name, [])
                        event.profile_at = [at.index(s.probe.file_offset) for s in event.sites]
                return
            except ValueError:
                continue  # a line skipped by the read (see _profile): read again
        raise KernelError(f"{self.group.name}: our probes are not in uprobe_events as placed")

    def _profile(self) -> dict[str, list[int]]:
        """uprobe_profile's hits of our profile-counted events, in line order.

        Like every tracefs list, the file is read a page at a time, each page
        found again by its index in the kernel's list: an event removed
        meanwhile (anyone's) shifts the list, and one line after it is
        skipped. A skipped line of ours shows as an event short of lines;
        then it is read again."""
        assert self.group is not None
        ours = {e.name: len(e.sites) for e in self._events if e.by_profile}
        for _ in range(READ_TRIES):
            hits: dict[str, list[int]] = {}
            for entry in self.group.tracefs.profile():
                if entry.event in ours:
                    hits.setdefault(entry.event, []).append(entry.hits)
            if all(len(hits.get(name, ())) == n for name, n in ours.items()):
                return hits
        short = next(name for name, n in ours.items() if len(hits.get(name, ())) != n)
        raise KernelError(f"uprobe_profile lists {len(hits.get(short, ()))} probe points of "
                          f"{self.group.name}/{short}, not {ours[short]}")

    @property
    def where(self) -> str:
        """Where the probes count, in words."""
        if self._target is not None:
            return f"in process {self._target}"
        if self.pids is not None:
            return (f"in process{'es' if len(self.pids) > 1 else ''} "
                    f"{', '.join(map(str, self.pids))} (named by the filter)")
        return "system-wide"

    @property
    def placed(self) -> list[str]:
        """Display names of the probes placed (each once)."""
        return list(dict.fromkeys(n for e in self._events for s in e.sites for n in s.names))

    # ------------------------------------------------------------ reading

    @property
    def counts(self) -> dict[str, int]:
        """Hits per probe (display name) so far, every placed probe listed
        (a return probe on its rets: the sum of its sites); read from the
        kernel at each use."""
        if self._frozen is not None:
            return dict(self._frozen)
        out: dict[str, int] = {}
        hits = self._profile() if self._base else {}
        for event in self._events:
            for site, at in zip(event.sites, event.profile_at or itertools.repeat(0)):
                n = hits[event.name][at] - self._base[event.name][at] if event.by_profile \
                    else sum(e.read_count() for e in site.fds)
                for name in site.names:
                    out[name] = out.get(name, 0) + n
        for site in self._sites:  # placed on no task (a filter rejecting them all)
            if site.name not in out and not any(r.name == site.name for r in self.refused):
                out[site.name] = 0
        return out

    def disable(self) -> None:
        """Stop counting now (cheap): the counts are read and kept; the probes
        stay until `close()`."""
        for event in self._events:
            for e in event.fds():
                if e.fd >= 0:
                    e.disable()
        self._frozen = self.counts

    def stop(self) -> None:
        """Stop counting: `counts` no longer changes (see `disable`)."""
        self.disable()

    @property
    def signal(self) -> int | None:
        """The stop signal that ended the counting, if one did."""
        return self._signals.signum if self._signals is not None else None

    def count(self, seconds: float | None) -> None:
        """Let the kernel count for `seconds` (None: until the end); return
        early when the target ends or a stop signal arrives."""
        signals = self._signals
        assert signals is not None, "enter the counter first"
        if self.target_exited or signals.stopped:
            return
        fds = [signals.fileno()] + ([self._watch] if self._watch >= 0 else [])
        if self._watch in select.select(fds, [], [], seconds)[0]:
            self.target_exited = True

    # ------------------------------------------------------------ removing

    def close(self) -> None:
        """Close every perf fd (the kernel unregisters each event's uprobes,
        one set of grace periods per event), then remove our tracefs events
        in one write. Safe to call twice."""
        first: BaseException | None = None
        for event in self._events:
            try:
                event.close()
            except OSError as e:
                first = first or e
        self._events = []
        for fd in self._watched:
            if fd >= 0:
                os.close(fd)
        self._watched = []
        if self.group is not None:
            try:
                _remove_group_at_once(self.group)
            except KernelError as e:
                first = first or e
            self.group = None
        self._stack.close()
        if first is not None:
            raise first

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except BaseException:
            if exc is None:
                raise


@dataclass(frozen=True)
class FilterPlan:
    """How a filter is counted in the kernel: `filters` is the kernel filter
    text for every task (key None) or, `by_pid`, per process (True: every
    hit, False: none); `pids`, the processes a `pid` condition names when no
    process was given."""

    filters: dict[int | None, str | bool]
    by_pid: bool = False
    pids: list[int] | None = None


def plan_filter(flt: HitFilter, pids: Sequence[int] | None) -> FilterPlan:
    """The kernel's part of counting with `flt` in processes `pids` (None:
    system-wide). UsageError when the kernel cannot count it: a string it
    cannot spell, `pid` compared otherwise than by == and !=, or a `pid`
    condition that holds for processes it does not name."""
    combined = flt.combined
    if "pid" not in combined.fields:
        text = flt.kernel_filter()
        if text is None:
            raise UsageError("count filters in the kernel, and here it cannot: "
                             f"{flt.why_not_kernel()}; `uprobes trace` or -e ptrace can")
        return FilterPlan({None: text})
    why = "count tests pid in the kernel by counting per process"
    try:
        others = bind(combined.root, "pid", None)
    except ValueError as e:
        raise UsageError(f"{why}, so it takes pid == N and pid != N only (not {e}); "
                         "`uprobes trace` or -e ptrace can") from None
    if others is not False:
        what = "processes it does not name" if pids is None else \
            "processes other than the one counted (its children)"
        raise UsageError(f"{why}, and this condition holds for {what}; name the processes "
                         "(pid == N), or use `uprobes trace` or -e ptrace")
    named = None
    if pids is None:
        named = [v for v in values_of(combined.root, "pid")
                 if isinstance(v, int) and bind(combined.root, "pid", v) is not False]
        for pid in named:
            if not os.path.exists(f"/proc/{pid}"):
                raise ProcessError(f"no process {pid} (the filter names it)")
    filters: dict[int | None, str | bool] = {}
    for pid in named if named is not None else pids or ():
        rest = bind(combined.root, "pid", pid)
        if isinstance(rest, bool):
            filters[pid] = rest
            continue
        text = Condition(combined.text, rest).kernel_filter()
        if text is None:
            raise UsageError("count filters in the kernel, and here it cannot: "
                             f"{flt.why_not_kernel()}; `uprobes trace` or -e ptrace can")
        filters[pid] = text
    return FilterPlan(filters, True, named)


READ_TRIES = 20  # reads of a tracefs list before we give up on a consistent one
FATAL = (errno.EMFILE, errno.ENFILE, errno.EACCES, errno.EPERM)  # not the probe's fault


def _in_event(line: str, group: str, event: str) -> str:
    """`line` defining (or appending to) `group/event`."""
    head, _, rest = line.partition(" ")
    return f"{head.partition(':')[0]}:{group}/{event} {rest}"


def _selectors(field_name: str, lows: list[int]) -> list[str]:
    """Per value of `lows` (distinct), a filter on `field_name` that holds for
    an address whose low bits are that value and for no other of `lows`: the
    bit tests of a binary split of them, the most even bit first, so a hit
    of another site fails after a test or two. One value: no test ("")."""
    out = {}

    def split(values: list[int], tests: list[str]) -> None:
        if len(values) == 1:
            out[values[0]] = " && ".join(tests)
            return
        bit = min(range(12), key=lambda b: abs(2 * sum(v >> b & 1 for v in values) - len(values)))
        ones = [v for v in values if v >> bit & 1]
        split(ones, [*tests, f"{field_name} & {1 << bit}"])
        split([v for v in values if not v >> bit & 1], [*tests, f"!({field_name} & {1 << bit})"])

    split(list(lows), [])
    return [out[v] for v in lows]


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


def _open_counting(event_id: int, tid: int, cpu: int = -1, flags: int = 0) -> PerfEvent:
    """A counting (not sampling) tracepoint event, disabled: on task `tid` on
    any CPU (with `flags` ATTR_INHERIT..., the tasks it creates too), or
    (`tid` -1) on every task of CPU `cpu`."""
    attr = PerfEventAttr()
    attr.size = ctypes.sizeof(attr)
    attr.type = PERF_TYPE_TRACEPOINT
    attr.config = event_id
    attr.sample_period = 0
    attr.sample_type = 0
    attr.flags = ATTR_DISABLED | flags
    return PerfEvent.open(attr, pid=tid, cpu=cpu,
                          what=f"counting tracepoint {event_id} on task {tid} cpu {cpu}")


def _remove_group_at_once(group: ProbeGroup) -> None:
    """Remove all of `group`'s events with one write to uprobe_events.

    The kernel runs the `-:` lines one by one, but an event no perf fd uses
    any more is gone without a grace period, so one write costs little per
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
