"""Perf tracepoint events on our probes, and one ring buffer per CPU they share.

Which tasks: system-wide (`pid=-1` on every CPU); or given tasks, each opened
with `inherit` on every CPU so threads and children they create later are
followed. `inherit` only covers tasks created after the open, so for an
existing process every thread is opened, as `perf record -p` does; threads
started while we open are caught by rescanning /proc/PID/task until no new
one appears. The kernel also uses the tasks as the uprobe's prefilter: only
their address spaces get breakpoints.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import ExitStack

from uprobes.engines.kernel.batches import read_batch, read_runs
from uprobes.errors import KernelError
from uprobes.sys import procfs
from uprobes.sys.perf import PerfEvent, online_cpus, open_tracepoint, raise_fd_limit
from uprobes.sys.perf_ring import ForkRecord, MmapRecord, RingBuffer, Sample

DEFAULT_RING_PAGES = 256
"""1 MiB per CPU. Bigger rings absorb longer waits of the reader for a CPU,
but the reader's memory grows with what one read brings (a burst of hits
fills every ring before the reader empties them), so 1 MiB stays the
default and `--ring-pages` buys slack for bursts (the runs behind this:
docs/benchmarks.md, ring sizes)."""
# Wake the reader per this much of a ring (~3,000 records of 2 numbers):
# short rounds keep it a sleeper the scheduler wakes promptly, not a task
# with a long round to finish while the rings fill.
WAKEUP_BYTES = 256 * 1024
# With user stacks a sample is ~8 KiB: 16 MiB per CPU holds a burst of ~2000,
# the size of a program's start-up burst of mallocs on one CPU (smaller rings
# lost samples of it: docs/benchmarks.md, ring sizes).
STACK_RING_PAGES = 4096


class CpuStreams:
    """Owns every perf event and every per-CPU ring; closes them on exit."""

    def __init__(self, ring_pages: int = DEFAULT_RING_PAGES, user_regs: int = 0,
                 user_stack_bytes: int = 0) -> None:
        self.ring_pages = ring_pages
        self.user_regs = user_regs  # each sample's user registers and stack (perf.tracepoint_attr)
        self.user_stack_bytes = user_stack_bytes
        self.cpus = online_cpus()
        self.rings: dict[int, RingBuffer] = {}
        self.events: list[PerfEvent] = []
        self._stack = ExitStack()
        self._opened: set[tuple[int, int]] = set()  # (event id, task)
        self._tracked: set[int] = set()  # tasks whose mmaps one of their events reports
        self.filters: dict[int, str] = {}
        """Event id -> the kernel filter every perf event on it gets before it
        is enabled (the tracefs `filter` file does not apply to perf events)."""

    def open(self, event_ids: list[int], tasks: list[int]) -> None:
        """Open (enabled) events for every id x task x CPU; `tasks=[-1]`: system-wide."""
        raise_fd_limit(len(event_ids) * len(tasks) * len(self.cpus) + len(self.events))
        for event_id in event_ids:
            for task in tasks:
                if (event_id, task) in self._opened:
                    continue
                self._open_one(event_id, task)
                self._opened.add((event_id, task))

    def _open_one(self, event_id: int, task: int) -> None:
        # With stacks, a task's first event also reports its mappings: a
        # stack is named after the process may have exited (and its maps gone).
        track = bool(self.user_regs) and task not in self._tracked
        self._tracked.add(task)
        for cpu in self.cpus:
            ring = self.rings.get(cpu)
            # Wake the reader when a quarter of the ring or WAKEUP_BYTES is
            # used; the poll timeout bounds the latency when hits are few.
            watermark = min(self.ring_pages * 4096 // 4, WAKEUP_BYTES)
            ev = self._stack.enter_context(open_tracepoint(
                event_id, pid=task, cpu=cpu, inherit=task != -1, watermark_bytes=watermark,
                user_regs=self.user_regs, user_stack_bytes=self.user_stack_bytes,
                track_mmaps=track))
            self.events.append(ev)
            flt = self.filters.get(event_id)
            if flt is not None:
                # Inherited copies (threads, children) use this one's filter:
                # perf_tp_filter_match() looks at the parent event.
                ev.set_filter(flt)
            if ring is None:
                self.rings[cpu] = self._stack.enter_context(RingBuffer(ev, self.ring_pages))
            else:
                ev.set_output(ring.event)
            ev.enable()

    def follow_process(self, pid: int, event_ids: list[int]) -> None:
        """Every thread of `pid`, until a scan finds no thread we have not opened."""
        seen: set[int] = set()
        while True:
            now = set(procfs.tids(pid))
            new = sorted(now - seen)
            if not new:
                return
            for tid in new:
                try:
                    self.open(event_ids, [tid])
                except KernelError as e:
                    if e.errno != errno.ESRCH:  # the thread ended meanwhile: nothing to follow
                        raise
            seen |= now

    def fds(self) -> list[int]:
        return [r.fileno() for r in self.rings.values()]

    def read(self) -> Iterator[Sample]:
        for ring in self.rings.values():
            yield from ring.read()

    def read_batches(self) -> list[tuple[bytes, list[int]]]:
        """One `read_batch` per CPU: (bytes, sample body offsets)."""
        return [read_batch(ring) for ring in self.rings.values()]

    def read_runs(self, alike: tuple[int, ...] = (), periods: int = 1,
                  ) -> list[tuple[bytes, list[tuple[int, int, int, int]]]]:
        """One `read_runs` per CPU: (bytes, runs of alike samples)."""
        return [read_runs(ring, alike, periods) for ring in self.rings.values()]

    def take_mmaps(self) -> list[MmapRecord | ForkRecord]:
        """The PERF_RECORD_MMAP2s and process FORKs read since the last call
        (in order within a ring)."""
        out: list[MmapRecord | ForkRecord] = []
        for ring in self.rings.values():
            if ring.mmaps:
                out += ring.mmaps
                ring.mmaps = []
        return out

    @property
    def lost_records(self) -> int:
        """What PERF_RECORD_LOST records reported so far."""
        return sum(r.lost for r in self.rings.values())

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.rings.values())

    def hits(self) -> int:
        """Every hit the events counted, children's included (an inherited
        event's read() sums its children). A sampling event counts a hit even
        when the ring had no room for its record, but not one its filter
        dropped (perf_tp_event() tests the filter first; measured: with a
        filter matching nothing, 90k hits count 0)."""
        return sum(ev.read_count() for ev in self.events)

    def lost(self) -> int:
        """Records that never reached us: hits counted minus samples read.

        PERF_RECORD_LOST alone is not enough: the kernel writes it only
        when a later record fits, so losses at the end of a run (a child's
        last burst into a full ring) would go unreported. Read this after
        disable() and a last read()."""
        return max(self.lost_records, self.hits() - self.samples)

    def disable(self) -> None:
        for ev in self.events:
            try:
                ev.disable()
            except KernelError:
                pass

    def close(self) -> None:
        self.events.clear()
        self.rings.clear()
        self._stack.close()

    def __enter__(self) -> CpuStreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


