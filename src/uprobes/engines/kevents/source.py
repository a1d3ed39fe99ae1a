"""Perf events on kernel tracepoints for exactly the traced threads, and their rings.

The kernel does the filtering: each event is opened for a task on each CPU
with `inherit`, so it records that task and the threads and children it
makes afterwards, nothing else (a process given by pid gets one per
thread, rescanning its threads until no new one appears, as the probes'
own events do). A command launched held before exec gets events that
start counting at its exec (`enable_on_exec`): what the launcher does
before is not the command's. System-wide, every task on every CPU but
uprobes itself (a kernel filter on `common_pid`: reading the rings would
otherwise feed them).

Every sample is stamped on CLOCK_MONOTONIC (`use_clockid`), the probes'
clock. Losses are never silent: a full ring drops records and says so by
PERF_RECORD_LOST only once it has room again, which never comes if the
run ends first, so each traced task also gets a counting event per
tracepoint, and `lost` is what the kernel counted minus what was read.
One ring per CPU holds every event of that CPU; `read()` hands over what
they hold, decoded, in time order.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from bisect import bisect_right
from collections.abc import Callable
from contextlib import ExitStack
from operator import itemgetter

from uprobes.engines.kevents.decode import Decoders, Tracepoint, resolve
from uprobes.engines.kevents.records import Records
from uprobes.errors import KernelError, ProcessError
from uprobes.model.kevent import KernelEvent, KernelRow, row_event, shape_of
from uprobes.sys import procfs
from uprobes.sys.perf import (
    PerfEvent,
    online_cpus,
    open_counting,
    raise_fd_limit,
    tracepoint_attr,
)
from uprobes.sys.perf_ring import RingBuffer
from uprobes.sys.tracefs import Tracefs

MIN_RING_PAGES = 4096
"""Under a locked-memory limit too low for the rings asked for, each is
halved down to this (16 MiB) before the run gives up."""


def default_ring_pages(cpus: int) -> int:
    """Data pages of each CPU's ring: a busy thread's events fill its CPU's
    ring at up to 8 MiB a second, and the reader waits for a CPU as long as
    the machine is busy: 64 MiB on a machine of up to 4 CPUs, less with
    more (256 MiB in all), down to 16 MiB beyond 16."""
    pages = max(MIN_RING_PAGES, min(16384, 65536 // max(cpus, 1)))
    return 1 << (pages.bit_length() - 1)  # a power of two


_READ_BYTES = 8 << 20
"""At most this much of a ring is decoded at once (the rows it makes stay
in memory until written: a ring full after the reader fell behind is
read in pieces)."""
# The reader is woken per this much of a ring; the poll of the engine's
# loop, which reads these rings with its hits, bounds the latency.
_WAKEUP_BYTES = 64 * 1024
_MAX_ABOUT = 64  # tasks named in one kernel filter
COMM_TTL_NS = 100_000_000  # a comm read is read again after 100 ms (a thread renamed)
_MAX_ABOUT_BATCHES = 64  # batches of `about` events for threads born later (per CPU each)


class KernelEvents:
    """The tracepoints' events of a run: open, read in time order, close (a
    context manager owning every fd and ring)."""

    def __init__(self, names: list[str], tracefs: Tracefs | None = None,
                 ring_pages: int | None = None,
                 note: Callable[[str], object] | None = None) -> None:
        """`names`: tracepoints (`decode.parse_kernel_option`); an unknown
        one is a UsageError here, before anything is opened. `note`
        receives the one-line notes (rings made smaller than asked)."""
        if tracefs is None:
            try:
                tracefs = Tracefs()
            except KernelError as e:
                if e.errno != errno.EACCES:
                    raise
                # The engines' wording offers `-e ptrace`: no help here.
                raise KernelError("the kernel's events (--kernel) need tracefs and perf "
                                  "tracepoint events, which are for root only here: run as "
                                  "root (or leave --kernel out)", e.errno) from e
        self.points: list[Tracepoint] = resolve(tracefs, names)
        self._comms: dict[int, str] = {}  # tid -> comm, read since `_refresh_comms` last ran
        self._stale: dict[int, str] = {}  # ... read before: for threads gone since
        self._comms_read = time.monotonic_ns()
        self._own_pid = os.getpid()
        self.records = Records(Decoders(tracefs, self.points, self._comms), self._comm,
                               self._own_pid, {tp.format.id for tp in self.points
                                               if tp.switches or tp.about is not None})
        self.cpus = online_cpus()
        self.ring_pages = ring_pages or default_ring_pages(len(self.cpus))
        self._fit_pages = self.ring_pages  # what the next ring is mapped with
        self._note = note or (lambda text: sys.stderr.write(f"uprobes: note: {text}\n"))
        self.rings: dict[int, RingBuffer] = {}
        self._stack = ExitStack()
        self._opened: set[int] = set()
        self._pids: dict[int, int] = {}  # tid -> pid of the threads seen going off the CPU
        self.count = 0
        self.drained = True  # the last read_rows() read the rings to their ends
        self._waiting: list[KernelRow] = []  # read, but newer than a cut ring's last
        self._counters: dict[int, list[PerfEvent]] = {}  # event id -> counting events
        self._closed_lost: int | None = None
        self._about_tids: set[int] | None = None  # whom the `about` events cover (None: all)
        self._about_events = 0
        self._about_batches = 0  # batches opened for threads born after the start
        self._stopped = False  # disable() was called: nothing more is opened

    def open(self, *, pid: int | None = None, child: int | None = None) -> None:
        """Events for `child` (a command held before exec), or every thread of
        `pid`, or (neither) every task."""
        if child is not None:
            self._open_task(child, on_exec=True)
            self._open_about([child])
        elif pid is not None:
            seen: set[int] = set()
            while new := sorted(set(procfs.tids(pid)) - seen):
                for tid in new:
                    try:
                        self._open_task(tid)
                    except KernelError as e:
                        if e.errno != errno.ESRCH:  # a thread that ended meanwhile
                            raise
                seen.update(new)
            self._open_about(sorted(seen))
        else:
            self._open_task(-1)
            self._open_about(None)

    def _open_about(self, tids: list[int] | None) -> None:
        """The tracepoints about another task (`Tracepoint.about`), on every
        CPU for all tasks, filtered to `tids` (None: every task) in the
        kernel. A thread started later gets its own such events once its
        first switch off the CPU is read (`_more_about`): its wakeups from
        then on are recorded (a perf event's filter cannot be replaced,
        EEXIST, so the set grows by events: `_more_about`)."""
        self._about_tids = None if tids is None else set(tids)
        if tids is None:
            self._open_about_events(None)
        for first in range(0, len(tids or ()), _MAX_ABOUT):
            self._open_about_events((tids or [])[first:first + _MAX_ABOUT])

    def _open_about_events(self, tids: list[int] | None) -> None:
        self._about_events += sum(tp.about is not None for tp in self.points) * len(self.cpus)
        raise_fd_limit(len(self.points) * len(self.cpus) * len(self._opened)
                       + self._about_events, spare=256)
        for tp in self.points:
            if tp.about is None:
                continue
            flt = None if tids is None else " || ".join(f"{tp.about} == {t}" for t in tids)
            for cpu in self.cpus:
                self._open_one(tp, -1, cpu, flt, on_exec=False)

    def _more_about(self, tids: list[int]) -> None:
        """Threads seen for the first time: their wakeups from now on too, by
        one more batch of events per read (up to _MAX_ABOUT_BATCHES batches:
        each is an event per CPU, and every wakeup on the machine runs each
        one's filter)."""
        known = self._about_tids
        if known is None or self._stopped or self._about_batches >= _MAX_ABOUT_BATCHES:
            return
        new = [t for t in dict.fromkeys(tids) if t not in known][:_MAX_ABOUT]
        if not new:
            return
        known.update(new)
        self._about_batches += 1
        try:
            self._open_about_events(new)
        except KernelError as e:
            if e.errno not in (errno.ESRCH, errno.EMFILE, errno.ENFILE):
                raise
            # A thread gone meanwhile, or no fd left: no more of these.
            self._about_batches = _MAX_ABOUT_BATCHES

    def _open_task(self, task: int, on_exec: bool = False) -> None:
        if task in self._opened:
            return
        self._opened.add(task)
        raise_fd_limit(len(self.points) * len(self.cpus) * len(self._opened), spare=256)
        for tp in self.points:
            if tp.about is not None:
                continue
            for cpu in self.cpus:
                self._open_one(tp, task, cpu, f"common_pid != {os.getpid()}" if task == -1
                               else None, on_exec)
            if task != -1:
                counter = self._stack.enter_context(open_counting(
                    tp.format.id, pid=task, inherit=True, enable_on_exec=on_exec))
                self._counters.setdefault(tp.format.id, []).append(counter)
                if not on_exec:
                    counter.enable()

    def _open_one(self, tp: Tracepoint, task: int, cpu: int, flt: str | None,
                  on_exec: bool) -> PerfEvent:
        watermark = min(self.ring_pages * 4096 // 4, _WAKEUP_BYTES)
        attr = tracepoint_attr(tp.format.id, inherit=task != -1, watermark_bytes=watermark,
                               context_switch=tp.switches, enable_on_exec=on_exec)
        ev = self._stack.enter_context(PerfEvent.open(
            attr, pid=task, cpu=cpu, what=f"tracepoint {tp.name} task {task} cpu {cpu}",
            hints={errno.ENOENT: f"the tracepoint {tp.name} went away",
                   errno.ESRCH: "the process ended"}))
        if flt is not None:
            ev.set_filter(flt)
        ring = self.rings.get(cpu)
        if ring is None:
            self.rings[cpu] = self._stack.enter_context(self._ring(ev))
        else:
            ev.set_output(ring.event)
        if not on_exec:
            ev.enable()
        return ev

    def _ring(self, ev: PerfEvent) -> RingBuffer:
        """`ev`'s ring: of `ring_pages`, or, when the locked-memory limit has
        no room for it (root without CAP_IPC_LOCK too), halved down to
        MIN_RING_PAGES, the size of every later ring from then on."""
        shrunk = False
        while True:
            try:
                ring = RingBuffer(ev, self._fit_pages)
            except KernelError as e:
                if e.errno not in (errno.EPERM, errno.ENOMEM) \
                        or self._fit_pages // 2 < MIN_RING_PAGES:
                    raise
                self._fit_pages //= 2
                shrunk = True
                continue
            if shrunk:
                size = self._fit_pages * 4096
                said = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
                self._note(f"the kernel's events get rings of {said} a CPU, not more, under "
                           "the locked-memory limit (ulimit -l): a burst loses events sooner")
            return ring

    def fds(self) -> list[int]:
        return [r.fileno() for r in self.rings.values()]

    def read(self) -> list[KernelEvent]:
        """Every event the rings hold now, decoded, in time order."""
        rows: list[KernelRow] = []
        for _ in range(self.ring_pages * 4096 // _READ_BYTES + 2):  # a full ring's pieces
            rows += self.read_rows()
            if self.drained:
                break
        rows.sort(key=_ts)
        return [row_event(row) for row in rows]

    def read_rows(self) -> list[KernelRow]:
        """The events the rings hold now, as rows (`model.kevent.KernelRow`)
        in time order, but at most _READ_BYTES of each ring: when a ring
        has more, only the events stamped up to the last one read from it
        are handed over (the others wait for the next read, so that none
        handed over later is older than one handed over now), and
        `drained` is False."""
        self._refresh_comms()
        out: list[KernelRow] = []
        marks: list[int] = []  # a cut ring's last stamp read
        # Every ring is taken before any is decoded: what a CPU records while
        # another's records are decoded waits for the next read, and is then
        # older than what that read already had (it is merged back in order,
        # at a cost that grows with the gap).
        for ring, (data, whole) in [(ring, ring.peek(_READ_BYTES))
                                    for ring in self.rings.values()]:
            start = len(out)
            ring.advance(self.records.read(data, out, ring.corrupt, whole))
            if not whole:
                marks.append(out[-1][0] if len(out) > start else 0)
        out.sort(key=_ts)
        sched = self.records.sched
        if sched:
            sched.sort(key=_ts)
            out = self._our_wakeups(out, sched)
            sched.clear()
        if self._waiting:
            out = self._waiting + out
            out.sort(key=_ts)  # two runs in order: one merge
        self.drained = not marks
        if marks:
            cut = bisect_right(out, min(marks), key=_ts)
            out, self._waiting = out[:cut], out[cut:]
        else:
            self._waiting = []
        self.count += len(out)
        return out

    def _our_wakeups(self, rows: list[KernelRow], sched: list[KernelRow]) -> list[KernelRow]:
        """`rows` (in time order) with the wakeups of our threads only: a
        thread we saw leave the CPU before (it must have, to be woken: a
        wakeup before that, as a launched command's before its exec, or of
        a thread not ours, which one of ours woke, is left out). `sched`:
        the switches off a CPU and wakeups among `rows`, in time order."""
        pids = self._pids
        born: list[int] = []
        wakeups: dict[int, KernelRow | None] = {}  # id() of a row -> what replaces it
        for row in sched:
            tid = row[2]
            if shape_of(row[5]).kind == "off_cpu":
                if tid not in pids:
                    born.append(tid)
                pids[tid] = row[1]
            else:
                owner = pids.get(tid)
                wakeups[id(row)] = None if owner is None else (row[0], owner, *row[2:])
        if born:
            self._more_about(born)
        if not wakeups:
            return rows
        get = wakeups.get
        return [new for row in rows if (new := get(id(row), row)) is not None]

    def _comm(self, tid: int) -> str:
        """The thread's comm, read when a row needs it and `_comms` has none
        (`_refresh_comms`); a thread gone keeps the last one read."""
        try:
            comm = procfs.comm(tid)
        except (ProcessError, KernelError):
            comm = self._stale.get(tid, "<...>")  # "<...>": what the kernel's trace prints
        self._comms[tid] = comm
        return comm

    def _refresh_comms(self) -> None:
        """Every COMM_TTL_NS, the comms known are read again as rows need
        them: a thread that renamed itself (prctl(PR_SET_NAME)) is seen so
        (the sched_switch rows name their threads themselves, anew each time)."""
        now = time.monotonic_ns()
        if now - self._comms_read < COMM_TTL_NS:
            return
        self._comms_read = now
        self._stale.update(self._comms)
        self._comms.clear()

    @property
    def lost(self) -> int:
        """Records the kernel dropped: by its own count of each tracepoint's
        hits for the traced tasks, less the samples read (a system-wide
        run has no such count: what PERF_RECORD_LOST said)."""
        if self._closed_lost is not None:
            return self._closed_lost
        short = 0
        for event_id, counters in self._counters.items():
            hits = sum(c.read_count() for c in counters)
            short += max(hits - self.records.samples.get(event_id, 0), 0)
        return max(short, self.records.lost)

    def disable(self) -> None:
        """Stop recording (before the last read)."""
        self._stopped = True
        for ring in self.rings.values():
            ring.event.disable()
        for counters in self._counters.values():
            for counter in counters:
                counter.disable()

    def close(self) -> None:
        """Close every fd and ring; `lost` keeps its last value."""
        if self._closed_lost is None:
            try:
                self._closed_lost = self.lost
            except KernelError:  # a counter gone with its task: what the rings said
                self._closed_lost = self.records.lost
            finally:
                self._stack.close()

    def __enter__(self) -> KernelEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ts = itemgetter(0)

