"""Counting hits per probe in the kernel, with no records at all.

The probes are placed as probe points sharing a few kernel events
(count_sites.py), and a run needing more events than `groups.MAX_EVENTS`
is refused before anything is placed. When counting ends, the events are
removed in one write.

A shared event is one tracepoint: its perf counter sums every probe point in
it. Each probe's own count comes from one of two places:

- System-wide with no filter: `uprobe_profile`, the hits the kernel counts
  per probe point (trace_uprobe's `nhits`, bumped for every hit before any
  perf filtering). Its lines name no group and no offset, only the file and
  the event, in the order of `uprobe_events`; so our events carry names no
  one else uses (`count_sites.event_name`) and a probe is found by its place
  among its event's lines. One counting perf event on one CPU keeps the
  event registered (a CPU-wide event makes the uprobe system-wide); hits on
  the other CPUs skip the perf side altogether. Return probes through the
  kernel's uretprobe count on the other way: `nhits` counts their entries.
- A process (`-p PID`), a launched command, or a filter: one counting perf
  event per probe and task (or CPU), whose filter keeps only its own probe's
  hits, and the user's filter (count_filters.py).

Per task, counting events are inherited (`inherit`): the kernel copies them
into every thread and child the task creates after the open, and reading
the parent's counter sums theirs (exited children are folded in). Inherit
does not reach threads that already exist, so for `-p` every existing
thread gets its own counters, re-listing /proc/PID/task until no new thread
appears. The uprobe PMU is not used with a pid: with `inherit` it made the
target's pthread_create fail with EFAULT (see `uprobes.sys.pmu`).

The pid given to perf is also the kernel's prefilter (uprobe_perf_filter):
other processes never get the breakpoints.

One refused probe point fails its whole event, which is then placed in
halves down to the probe it refused. A refused probe is left out and named
in `refused`; only when every probe is refused is that an error.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from types import TracebackType

from uprobes.engines.kernel.count_filters import plan_filter, selectors
from uprobes.engines.kernel.count_sites import (
    MAX_SHARED,
    Event,
    Refusal,
    Site,
    Task,
    event_name,
    refusal_note,
    refusal_reason,
    share,
    sites_of,
)
from uprobes.engines.kernel.groups import check_event_count, open_run_group, remove_run_group
from uprobes.engines.kernel.insn_guard import screen_sites
from uprobes.engines.kernel.probe_line import kernel_line
from uprobes.engines.kernel.records import PAGE_MASK
from uprobes.engines.signals import StopSignals
from uprobes.errors import EngineError, KernelError, ProcessError, UprobesError
from uprobes.model.event import COMM_FIELD, display_names
from uprobes.model.filters import HitFilter, counted_fields, with_guard
from uprobes.model.probe import ResolvedProbe, VdsoKey
from uprobes.sys import procfs
from uprobes.sys.perf import online_cpus, open_counting
from uprobes.sys.pidfd import has_ended, watch_process
from uprobes.sys.tracefs import ProbeGroup, Tracefs


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
        self._sites: list[Site] = []
        sites = [(name, probe, p, site) for name, probe in zip(names, probes)
                 for p, site in sites_of(probe)]
        unsafe, self._alone = screen_sites((p.path, p.file_offset) for _, _, p, _ in sites)
        if force:
            unsafe = {}
        for name, probe, p, site in sites:
            why = unsafe.get((p.path, p.file_offset))
            if why:
                self.refused.append(Refusal(name, None, why))
            else:
                self._sites.append(Site(name, p, probe, site))
                self.names.append(name)
        self._tracefs = tracefs
        self.group: ProbeGroup | None = None
        self._events: list[Event] = []  # placed
        self._tasks: list[Task] = []
        self._seen: set[int] = set()
        self._base: dict[str, list[int]] = {}  # uprobe_profile hits per event at the start
        self._frozen: dict[str, int] | None = None
        # Held by a read of the counters and by close(): a read from another
        # thread (`live_counts`) never meets a closed fd, nor reads zeros after.
        self._reading = threading.Lock()
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
                self._tasks = [Task(-1, cpu, None) for cpu in online_cpus()]
            else:
                self._tasks = [Task(pid, -1, pid) for pid in self.pids
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

    def _site_line(self, site: Site) -> str:
        """Counting fetches nothing but what the filter tests: the line carries
        the place (and the USDT semaphore, `(0xREF)`, so the kernel sets it)."""
        assert self.group is not None
        flt = self.hit_filter
        fields = counted_fields(flt, site.whole)
        if not fields and not (flt and flt.needs_comm):
            return kernel_line(replace(site.probe, group=self.group.name, event="e", args=()))
        kept = tuple(a for a in site.whole.args if a.name in fields)
        line = kernel_line(replace(site.whole, group=self.group.name, event="e", args=kept),
                           ret_site=site.ret_site)
        return line + (f" {COMM_FIELD}=$comm" if flt and flt.needs_comm else "")

    def _share(self) -> list[Event]:
        """Sites grouped into events (`count_sites.share`); counted through
        uprobe_profile system-wide with no filter."""
        for site in self._sites:
            site.line = self._site_line(site)
        guarded = any(site.whole.guard for site in self._sites)
        return share(self._sites, self._alone, self.max_shared,
                     profile=self.pids is None and self.hit_filter is None and not guarded)

    def _place(self, event: Event) -> None:
        """Add `event` and open its counters on every task so far. When the
        kernel refuses it (one probe point it cannot take fails them all),
        its halves are placed apart, down to the probe it refused."""
        assert self.group is not None
        try:
            self.group.add_event(event.name, event.lines(self.group.name))
            try:
                if event.by_profile:
                    event.enablers.append(open_counting(self._event_id(event),
                                                        cpu=self._tasks[0].cpu))
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
                    self._place(Event(event_name(), part, event.by_profile))
            return
        self._events.append(event)

    def _event_id(self, event: Event) -> int:
        assert self.group is not None
        return self.group.tracefs.event_id(self.group.name, event.name)

    def _open(self, event: Event, task: Task) -> None:
        """A counter per site of `event` on `task`, each keeping its own
        site's hits (and the user's filter's). A task that has ended is
        skipped."""
        user = self._filter_for(task.pid)
        if user is False:
            return
        event_id = self._event_id(event)
        field_name = "__probe_func" if event.kind == "r" else "__probe_ip"
        pick = selectors(field_name, [s.probe.file_offset & PAGE_MASK for s in event.sites])
        for site, selector in zip(event.sites, pick):
            try:
                fd = open_counting(event_id, pid=task.tid, cpu=task.cpu,
                                   inherit=task.tid != -1, inherit_thread=self._by_pid)
            except KernelError as e:
                if e.errno == errno.ESRCH:
                    return  # the thread ended before we reached it
                raise
            site.fds.append(fd)
            guard = _guard_filter(site.whole)
            text = " && ".join(f"({t})" for t in (selector, user, guard)
                               if isinstance(t, str) and t)
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
            new: list[Task] = []
            for pid in self.pids:
                if self._filter_for(pid) is False:
                    continue
                try:
                    tids = procfs.tids(pid)
                except UprobesError:
                    continue
                new.extend(Task(t, -1, pid) for t in tids if t not in self._seen)
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
        with self._reading:
            return self._read_counts()

    def _read_counts(self) -> dict[str, int]:
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

    def live_counts(self) -> dict[str, int]:
        """`counts`: the kernel's counters, read now from any thread (`Counter`)."""
        return self.counts

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
        in one write. Safe to call twice. The counts are kept as they were."""
        first: BaseException | None = None
        with self._reading:
            counting = self._base or not any(e.by_profile for e in self._events)
            if self._frozen is None and self._events and counting:
                try:
                    self._frozen = self._read_counts()
                except (OSError, UprobesError):
                    pass  # what cannot be read now was not counted
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


READ_TRIES = 20  # reads of a tracefs list before we give up on a consistent one
FATAL = (errno.EMFILE, errno.ENFILE, errno.EACCES, errno.EPERM)  # not the probe's fault


def _remove_group_at_once(group: ProbeGroup) -> None:
    """Remove all of `group`'s events with one write to uprobe_events
    (`Tracefs.remove_events`); on any failure fall back to the group's own
    one-by-one removal, which names the event that failed."""
    if not group.events:
        return
    try:
        group.tracefs.remove_events(group.name, group.events)
    except KernelError:
        pass  # the group's own removal below names what failed
    group.events.clear()
    if group.tracefs.events_of_group(group.name):
        remove_run_group(group)


def _guard_filter(probe: ResolvedProbe) -> str | None:
    """`probe`'s guard in the kernel's filter language (its strings are
    spelled otherwise than ours), or None when it has none."""
    guard = with_guard(None, probe)
    if guard is None:
        return None
    text = guard.kernel_filter()
    if text is None:
        raise EngineError(f"{probe.name}: the kernel cannot say this probe's filter "
                          f"({guard.text}); -e ptrace can")
    return text
