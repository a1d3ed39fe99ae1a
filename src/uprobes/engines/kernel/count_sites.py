"""What `KernelCounter` places: probe points, grouped into shared kernel events.

Probes are tracefs events of the run's group, and they share events the way
`trace`'s do (`records.shared_events`): the kernel appends probe points to an
event with the same file, kind and fetchargs, and tears a whole event down
with one set of grace periods. That is what makes detaching fast: closing
the last perf event of an event (or of a uprobe PMU counter, one per probe
per CPU, what `count` used before) runs uprobe_unregister_sync() and
tracepoint_synchronize_unregister() under event_mutex, tens of milliseconds
each, so probes counted one event each took seconds per hundred to detach;
shared, a thousand libc probes are a handful of events. Probes with the
same line (one place, the same fetchargs) are one probe point counted under
each name.

The kernel refuses some probe sites (ENOTSUPP, 524: an instruction it
cannot single-step or emulate, e.g. some AVX-512 entry points of libc); a
refused probe is left out and named (`Refusal`, `refusal_note`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from uprobes.engines.kernel.records import PAGE_MASK
from uprobes.errors import KernelError
from uprobes.lang.ast import ProbeKind
from uprobes.model.probe import InodeKey, ResolvedProbe
from uprobes.sys.perf import PerfEvent

ENOTSUPP = 524  # kernel-internal, what uprobe registration answers for unprobeable insns

MAX_SHARED = 64
"""Most sites in one event counted per site (a pid or a filter). Every hit
of the event runs each site's counter filter (perf_tp_event() walks them
all), tens of nanoseconds a site, so a hit's cost grows with the event; 64
keeps that to microseconds while 1,000 probes still detach as a few dozen
events (`python -m bench.kernel --only shared,attach` measures both;
docs/benchmarks.md). Counted through
uprobe_profile (system-wide), an event has no per-site cost and no cap."""


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
class Site:
    """One probe point counted: a placed probe (or one `ret` of a return
    probe) and the display name its count adds to."""

    name: str
    probe: ResolvedProbe  # as placed: its own file offset
    whole: ResolvedProbe  # as the user gave it (a filter fetches its fetchargs)
    ret_site: int | None
    line: str = ""  # the uprobe_events line, event name left out (`in_event`)
    fds: list[PerfEvent] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)  # names of sites identical to this one

    @property
    def names(self) -> list[str]:
        """Every display name this site's count adds to."""
        return [self.name, *self.aliases]


@dataclass
class Event:
    """A kernel event holding `sites` (one probe point each)."""

    name: str
    sites: list[Site]
    by_profile: bool  # counted through uprobe_profile (else per-site perf counters)
    enablers: list[PerfEvent] = field(default_factory=list)  # by_profile: keep it registered
    profile_at: list[int] = field(default_factory=list)  # per site: its line among the event's

    @property
    def kind(self) -> str:
        return self.sites[0].line.partition(":")[0]

    def lines(self, group: str) -> list[str]:
        return [in_event(s.line, group, self.name) for s in self.sites]

    def fds(self) -> list[PerfEvent]:
        return [*self.enablers, *(e for s in self.sites for e in s.fds)]

    def close(self) -> None:
        for e in self.fds():
            e.close()
        self.enablers.clear()
        for s in self.sites:
            s.fds.clear()


@dataclass(frozen=True)
class Task:
    """Where counters go: task `tid` (inherited by what it creates) of
    process `pid`, or (`tid` -1) every task on CPU `cpu`."""

    tid: int
    cpu: int
    pid: int | None


_names = itertools.count()  # event names unique in this process (two counters, one group)


def event_name() -> str:
    """A name for a new event that no one else uses: `uprobe_profile` names
    events but not groups, so a profile-counted event is found by it."""
    return f"n{os.getpid()}_{next(_names)}"


def share(sites: list[Site], alone: set[tuple[str, int]], max_shared: int,
          profile: bool) -> list[Event]:
    """`sites` (each with its `line`) grouped into events: one file, kind and
    fetchargs, distinct low 12 bits (see `records.shared_events`). A USDT
    probe with a semaphore, and a site the kernel will likely refuse
    (`alone`), keep one each. Sites with the same line would count the same
    hits, and at one place they could share no event: the first counts
    under the names of all. `profile`: entry probes are counted through
    uprobe_profile, with no cap; the others take at most `max_shared`."""
    events: list[Event] = []
    Key = tuple[str, str, str]
    slots: dict[Key, list[tuple[set[int], Event]]] = {}
    # Where to look first for a site with these low bits: every earlier
    # event holds them or is full, and stays so (each is looked past once).
    start: dict[tuple[Key, int], int] = {}
    same: dict[tuple[str, str | None], Site] = {}
    for site in sites:
        # (a guard tells hits at one place apart: a py: function's)
        first = same.setdefault((site.line, site.whole.guard), site)
        if first is not site:
            first.aliases.append(site.name)
            continue
        kind, _, rest = site.line.partition(":")
        place, _, args = rest.partition(" ")[2].partition(" ")
        by_profile = profile and kind == "p"
        if "(" in place or (site.probe.path, site.probe.file_offset) in alone \
                or site.whole.guard:
            events.append(Event(event_name(), [site], by_profile))
            continue
        low = site.probe.file_offset & PAGE_MASK
        key = (kind, site.probe.path, args)
        of_key = slots.setdefault(key, [])
        at = start.get((key, low), 0)
        while at < len(of_key) and (low in of_key[at][0] or not (
                by_profile or len(of_key[at][1].sites) < max_shared)):
            at += 1
        start[(key, low)] = at + 1
        if at < len(of_key):
            of_key[at][0].add(low)
            of_key[at][1].sites.append(site)
        else:
            event = Event(event_name(), [site], by_profile)
            of_key.append(({low}, event))
            events.append(event)
    return events


def in_event(line: str, group: str, event: str) -> str:
    """`line` defining (or appending to) `group/event`."""
    head, _, rest = line.partition(" ")
    return f"{head.partition(':')[0]}:{group}/{event} {rest}"


def sites_of(p: ResolvedProbe) -> list[tuple[ResolvedProbe, int | None]]:
    """What is placed for `p`: itself, or a return probe with `ret_sites` as
    one entry probe on each `ret` (their hits sum to its returns), each with
    its `ret` site. The copies carry no fetchargs (a filter's come from `p`)."""
    if not p.ret_sites:
        return [(p, None)]
    return [(replace(p, kind=ProbeKind.ENTRY, file_offset=site, args=(), ret_sites=None,
                     link_addr=None, key=replace(p.key, file_offset=site)
                     if isinstance(p.key, InodeKey) else p.key), site)
            for site in p.ret_sites]
