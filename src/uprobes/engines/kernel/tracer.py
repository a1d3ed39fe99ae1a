"""`KernelTracer`: the kernel engine's tracing session.

Places every probe in the run's tracefs group, opens perf tracepoint events
on them (system-wide, for a process and its threads, or for a launched
command and its children), reads the per-CPU rings in a poll loop and hands
each hit as an `Event` to a callback. Everything is undone on exit, on an
exception, and after SIGINT/SIGTERM/SIGHUP (which stop the loop, never the
traced program).
"""

from __future__ import annotations

import os
import select
import time
from bisect import bisect_left
from collections.abc import Callable
from contextlib import ExitStack
from operator import itemgetter
from types import TracebackType

from uprobes.engines.kernel.groups import check_event_count, open_run_group, remove_run_group
from uprobes.engines.kernel.insn_guard import screen_sites
from uprobes.engines.kernel.lines import ALIKE, PERIODS, RAW_AT, LineQueue
from uprobes.engines.kernel.records import (
    PAGE_MASK,
    KernelProbe,
    RecordDecoder,
    RetSiteDecoder,
    event_line,
    kernel_probes,
    shared_events,
)
from uprobes.engines.kernel.stacks import USER_REGS_MASK, with_capture
from uprobes.engines.kernel.streams import DEFAULT_RING_PAGES, CpuStreams
from uprobes.engines.signals import StopSignals
from uprobes.errors import EngineError, KernelError, ProcessError, ResolveError
from uprobes.lang.condition import Condition
from uprobes.lang.condition import Event as CondEvent
from uprobes.model.event import COMM_FIELD, Event, Hit, ProbeInfo, hit_event
from uprobes.model.filters import HitFilter, with_guard
from uprobes.model.probe import ResolvedProbe
from uprobes.model.refusal import Refusals
from uprobes.render.protocol import HitRenderer, LineRenderer
from uprobes.sys import procfs
from uprobes.sys.perf_ring import ForkRecord
from uprobes.sys.pidfd import has_ended, watch_process
from uprobes.sys.tracefs import ProbeGroup, ProbeRejected, Tracefs
from uprobes.unwind.capture import Symbolizer, stack_delivery

POLL_MS = 100  # longest wait for a quiet ring: the output latency at low rates


class KernelTracer:
    """A tracing session on the kernel's uprobes; use as a context manager.

    `pid`: an existing process (all its threads, and what they start later).
    `child`: a launched command's pid, held before exec (it and its
    children). Neither: system-wide. `note` receives one line per probe
    skipped because the kernel refused it (globs only; a single probe the
    kernel refuses is an error). `stack_bytes`: each sample also carries
    the user registers and that many bytes of user stack, and `run()` gives
    each event its walked, named stack (0: no stacks). `hit_filter`: only
    the hits it keeps are delivered; tested in the kernel (no record for the
    others) where its event filter can say it, else per hit here, with one
    note saying so. `prefilter`: per probe, a condition the kernel may test
    on its event so that hits failing it make no record; the caller still
    filters what arrives (`uprobes.Session`: each consumer its own), so where
    the kernel cannot take it every hit arrives, silently.
    `kernel_filters` says which events got a filter (either kind).
    The engine's `Tracer` (engines/base.py).
    """

    child_status: int | None = None  # a launched command is its launcher's to reap
    current_hit: None = None  # the kernel never stops the thread at a hit

    def __init__(self, probes: list[ResolvedProbe], *, pid: int | None = None,
                 child: int | None = None, ring_pages: int = DEFAULT_RING_PAGES,
                 tracefs: Tracefs | None = None, force: bool = False,
                 note: Callable[[str], object] | None = None, stack_bytes: int = 0,
                 hit_filter: HitFilter | None = None,
                 prefilter: Callable[[ResolvedProbe], Condition | None] | None = None) -> None:
        self.probes = probes
        self.stack_bytes = stack_bytes
        self.symbolizer: Symbolizer | None = None
        self._capturing = False
        self.hit_filter = hit_filter
        self.prefilter = prefilter
        self.kernel_filters: dict[str, str] = {}
        """`group/event` -> the filter the kernel tests on it (its tracefs
        `filter` file holds it too)."""
        # event id -> why not in the kernel, and what is tested here instead
        self._python_filtered: dict[int, tuple[str, Callable[[CondEvent], bool]]] = {}
        self.force = force
        self.pid = pid
        self.child = child
        self.ring_pages = ring_pages
        self._tracefs = tracefs
        self._note = note or (lambda _: None)
        self._refusals = Refusals(probes, self._note)
        self.decoders: dict[int, RecordDecoder | RetSiteDecoder] = {}
        self._hit_functions: dict[int, Callable[[bytes, int], Hit]] = {}
        self.placed: list[KernelProbe] = []
        self.events = 0
        self.signal: int | None = None
        self.target_exited = False
        self._stack = ExitStack()
        self._streams: CpuStreams | None = None
        self._signals: StopSignals | None = None
        self._pidfd = -1
        self._lost_final: int | None = None

    @property
    def infos(self) -> dict[str, ProbeInfo]:
        """Display name -> ProbeInfo, for the renderers."""
        return {kp.info.name: kp.info for kp in self.placed}

    @property
    def lost(self) -> int:
        """Records the kernel dropped because a ring was full (PERF_RECORD_LOST)."""
        if self._lost_final is not None:
            return self._lost_final
        return self._streams.lost_records if self._streams else 0

    # ------------------------------------------------------------ set-up

    def __enter__(self) -> KernelTracer:
        try:
            self._signals = self._stack.enter_context(StopSignals())
            tfs = self._tracefs or Tracefs()
            group = open_run_group(tfs)
            self._stack.callback(remove_run_group, group)
            self._streams = self._stack.enter_context(CpuStreams(
                self.ring_pages, USER_REGS_MASK if self.stack_bytes else 0, self.stack_bytes))
            self._stack.callback(self._streams.disable)
            target = self.child if self.child is not None else self.pid
            if target is not None:
                self._open_pidfd(target)
            kps = kernel_probes(self.probes, group.name)
            unsafe, alone = screen_sites((kp.probe.path, kp.file_offset) for kp in kps)
            if self.force:
                unsafe = {}
            safe = []
            for kp in kps:
                why = unsafe.get((kp.probe.path, kp.file_offset))
                if why is None:
                    safe.append(kp)
                else:
                    self._refusals.refuse(kp.probe, kp.info.name, why, ResolveError(
                        f"{kp.info.name}: {why} (use --force to probe it anyway)"),
                        skippable=_partial_ok(kp))
            # One filter per kernel event: probes with different ones never share.
            by_filter: dict[Condition | None, list[KernelProbe]] = {}
            for kp in safe:
                by_filter.setdefault(self._condition(kp.probe), []).append(kp)
            events = [members for kps_alike in by_filter.values()
                      for members in shared_events(kps_alike, alone)]
            check_event_count(len(events), len(safe))
            for members in events:
                self._place(tfs, group, members)
                if self.target_exited:
                    self._note(f"process {self.pid} exited while its probes were placed")
                    break
            if not self.placed and not self.target_exited:
                raise KernelError("the kernel refused every probe")
            self._note_python_filter()
            if self.stack_bytes:  # before a launched command runs (see preload)
                self.symbolizer = Symbolizer()
                self.symbolizer.preload(kp.probe.path for kp in self.placed)
        except BaseException:
            self._stack.close()
            raise
        return self

    def _place(self, tfs: Tracefs, group: ProbeGroup, members: list[KernelProbe]) -> None:
        """Place `members` as one kernel event (named after the first). When
        the kernel refuses the event (one probe point it cannot take fails
        them all, e.g. ENOTSUPP for an instruction it cannot step), the
        halves are placed apart, down to the probe it refused."""
        streams = self._streams
        assert streams is not None
        event = members[0].event
        added: list[KernelProbe] = []
        try:
            try:
                group.add_event(event, [event_line(kp, event) for kp in members])
                added = list(members)
            except KernelError:
                if len(members) == 1:
                    raise
                # One line was refused: find which, one line at a time.
                for kp in members:
                    try:
                        group.add(event_line(kp, event))
                        added.append(kp)
                    except KernelError as e:
                        self._refusals.refuse(kp.probe, kp.info.name, _reason(e),
                                              _too_big(kp, e), skippable=_partial_ok(kp))
            if not added:
                return
            fmt = tfs.event_format(group.name, event)
            self._choose_filter(tfs, group, event, fmt.id, added)
            if self.child is not None:
                streams.open([fmt.id], [self.child])
            elif self.pid is not None:
                streams.follow_process(self.pid, [fmt.id])
            else:
                streams.open([fmt.id], [-1])
        except (KernelError, ProcessError) as e:
            if self.pid is not None and self.child is None and has_ended(self._pidfd):
                # The process ended: its files under /proc/PID/root went with it.
                # (An event made stays in the group, removed with it at the end.)
                self.target_exited = True
                return
            if isinstance(e, ProcessError):
                raise
            if len(added) > 1:
                group.remove(event)
                half = len(added) // 2
                self._place(tfs, group, added[:half])
                if not self.target_exited:
                    self._place(tfs, group, added[half:])
                return
            # A glob places what the kernel accepts (some libc entry points
            # start with instructions uprobes refuse: ENOTSUPP) and names the rest.
            kp = (added or members)[0]
            self._refusals.refuse(kp.probe, kp.info.name, _reason(e), _too_big(kp, e),
                                  skippable=_partial_ok(kp))
            if added:
                group.remove(event)
            return
        if len(added) == 1:
            self.decoders[fmt.id] = added[0].decoder(fmt)
        else:
            names = {kp.file_offset & PAGE_MASK: kp.info.name for kp in added}
            self.decoders[fmt.id] = RecordDecoder(fmt, added[0].info, names=names)
        self.placed.extend(added)
        text = streams.filters.get(fmt.id)
        if text is not None:
            self.kernel_filters[f"{group.name}/{event}"] = text

    def _condition(self, probe: ResolvedProbe) -> Condition | None:
        """The condition `probe`'s event is to be filtered on, if any."""
        if self.hit_filter is not None:
            return with_guard(self.hit_filter.combined, probe)
        return with_guard(None if self.prefilter is None else self.prefilter(probe), probe)

    def _required(self, probe: ResolvedProbe) -> Condition | None:
        """What a hit of `probe` must meet to be delivered (the prefilter is
        only what the kernel may drop early: the consumers test theirs)."""
        return with_guard(self.hit_filter.combined if self.hit_filter else None, probe)

    def _choose_filter(self, tfs: Tracefs, group: ProbeGroup, event: str, event_id: int,
                       members: list[KernelProbe]) -> None:
        """The filter of `event`: in the kernel (set on each of its perf
        events before they are enabled) or, where it cannot say a
        `hit_filter`, here."""
        streams = self._streams
        assert streams is not None
        streams.filters.pop(event_id, None)  # a removed event's id may come back
        cond = self._condition(members[0].probe)
        if cond is None:
            return
        text = cond.kernel_filter()
        if text is None:
            why = self.hit_filter.why_not_kernel() if self.hit_filter \
                else cond.why_not_kernel() or "no kernel spelling"
        elif "comm" in cond.fields and any(COMM_FIELD not in kp.line for kp in members):
            why = f"{members[0].info.name} has no room for the hidden {COMM_FIELD} field"
        else:
            # The tracefs `filter` file runs the same parser: a filter the
            # kernel refuses shows here, with no perf event (and no uprobe)
            # made for it. The file keeps it, to show what the perf events
            # test (it filters only the ftrace buffer, which this event
            # never feeds: it is not enabled there).
            try:
                tfs.set_filter(group.name, event, text)
                streams.filters[event_id] = text
                return
            except KernelError as e:
                why = f"the kernel refused {text!r}: {e}"
        required = self._required(members[0].probe)
        if required is not None:
            self._python_filtered[event_id] = (why, required.predicate())

    def _note_python_filter(self) -> None:
        why = {w for fid, (w, _) in self._python_filtered.items() if fid in self.decoders}
        if why:
            self._note("the filter is tested per hit here, not in the kernel ("
                       + "; ".join(sorted(why)) + "): every hit is still a record")

    def _open_pidfd(self, pid: int) -> None:
        self._pidfd = watch_process(pid)
        if self._pidfd < 0:
            raise ProcessError(f"no process {pid}")
        self._stack.callback(os.close, self._pidfd)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()
        self._streams = None

    # ------------------------------------------------------------ the loop

    def stop(self) -> None:
        """Stop `run()` after its current read (callable from a handler)."""
        if self._signals is not None and self._signals.signum is None:
            self._signals.signum = 0

    def run(self, on_event: Callable[[Event], None], duration: float | None = None) -> None:
        """Deliver events until the target exits, a stop signal, `stop()`, or
        `duration` seconds; then deliver what the rings still hold. Events
        come in time order across CPUs (see `run_hits`)."""
        infos = {kp.info.name: kp.info for kp in self.placed}
        if self.symbolizer is not None:
            # Hits carry captures (see _read_round); they are walked as
            # delivered, with the mappings the rings reported. (run_hits
            # alone gives plain hits: the samples' stacks are skipped.)
            self._capturing = True
            self._hit_functions.clear()
            try:
                self.run_hits(stack_delivery(infos, on_event, self.symbolizer), duration)
            finally:
                self._capturing = False
                self._hit_functions.clear()
            return

        def deliver(hits: list[Hit]) -> None:
            for hit in hits:
                on_event(hit_event(hit, infos[hit[4]]))

        self.run_hits(deliver, duration)

    def run_hits(self, on_hits: Callable[[list[Hit]], None],
                 duration: float | None = None) -> None:
        """`run()` for the fast path: hands over batches of `Hit` tuples.

        Rings are per CPU, so one read gathers each CPU's recent hits and a
        hit on one CPU may still be unread while a later one on another CPU
        is in hand. Hits are held back until they are older than the start
        of the previous read round: by then every record stamped earlier has
        been written to its ring and read (a record is written right at its
        hit). What is held back is delivered at the end.
        """
        held: list[Hit] = []

        def read() -> None:
            nonlocal held
            held = self._read_round(held)

        def release(before: int | None) -> None:
            cut = len(held) if before is None else bisect_left(held, before, key=_ts)
            if cut:
                self._deliver(held[:cut], on_hits)
                del held[:cut]

        self._loop(read, release, duration)

    def run_render(self, renderer: HitRenderer, duration: float | None = None) -> None:
        """`run_hits` into a renderer. Text and JSON lines (renderers with
        `row_lines`) take the fast path of `lines.py`, which writes the
        same lines in the same order; a filter tested here, stacks, or
        another renderer go hit by hit."""
        if self._python_filtered or self.symbolizer is not None or \
                not isinstance(renderer, LineRenderer):
            self.run_hits(renderer.hits, duration)
            return
        streams = self._streams
        assert streams is not None, "enter the tracer first"
        self._refresh_hit_functions()
        queue = LineQueue(self.decoders, self._hit_functions, renderer)
        write = renderer.write_lines

        def release(before: int | None) -> None:
            lines = queue.take(before)
            if lines:
                self.events += len(lines)
                write(lines)

        self._loop(lambda: queue.read(streams.read_runs(ALIKE, PERIODS)), release, duration)

    def _loop(self, read: Callable[[], None], release: Callable[[int | None], None],
              duration: float | None) -> None:
        """Poll and `read` the rings, `release` what is older than the
        previous round (None: everything, at the end); see `run_hits`."""
        streams, signals = self._streams, self._signals
        assert streams is not None and signals is not None, "enter the tracer first"
        poller = select.poll()
        for fd in streams.fds():
            poller.register(fd, select.POLLIN)
        poller.register(signals.fileno(), select.POLLIN)
        if self._pidfd >= 0:
            poller.register(self._pidfd, select.POLLIN)
        deadline = None if duration is None else time.monotonic() + duration
        previous_round = 0
        while True:
            timeout = POLL_MS
            if deadline is not None:
                timeout = max(0, min(timeout, int((deadline - time.monotonic()) * 1000)))
            ready = {fd for fd, _ in poller.poll(timeout)}
            # The target's end is checked before the read: every record it
            # wrote is in the rings by then (samples are written at the hit).
            if self._pidfd in ready:
                self.target_exited = True
                break
            if signals.stopped or (deadline is not None and time.monotonic() >= deadline):
                break
            this_round = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            read()
            release(previous_round)
            previous_round = this_round
        self.signal = signals.signum or None
        # Stop counting, read what is left, then compare counts with samples.
        streams.disable()
        read()
        release(None)
        self._lost_final = streams.lost()

    def _refresh_hit_functions(self) -> None:
        hits = self._hit_functions
        if len(hits) != len(self.decoders):
            hits.update((i, self._hit_function(d)) for i, d in self.decoders.items())

    def _read_round(self, held: list[Hit]) -> list[Hit]:
        """`held` and every hit the rings hold now, sorted by time."""
        streams = self._streams
        assert streams is not None
        self._refresh_hit_functions()
        hits = self._hit_functions
        append = held.append
        if self._python_filtered:
            self._read_filtered(streams, hits, append)
        else:
            for data, bodies in streams.read_batches():
                for body in bodies:
                    at = body + RAW_AT
                    hit = hits.get(data[at] | data[at + 1] << 8)
                    if hit is not None:
                        append(hit(data, body))
        symbolizer = self.symbolizer
        if symbolizer is not None:
            # Mappings as the samples were taken (a process may have exited
            # since), then the maps of each process still running. Forks
            # last, in time order: the rings are read one after another, and
            # a parent's mappings (its exec's, on another CPU) come first.
            spaces = symbolizer.spaces
            forks: list[ForkRecord] = []
            for m in streams.take_mmaps():
                if isinstance(m, ForkRecord):
                    forks.append(m)
                    continue
                spaces.mapped(m.pid, procfs.Mapping(
                    m.start, m.start + m.length, "r-xp", m.file_offset, m.dev_major,
                    m.dev_minor, m.inode, m.path))
            for f in sorted(forks, key=lambda f: f.time):
                spaces.forked(f.ppid, f.pid)
            for h in held:
                spaces.seen(h[1])
        # Each ring is in time order: sorting merges a few sorted runs.
        held.sort(key=_ts)
        return held

    def _hit_function(self, decoder: RecordDecoder | RetSiteDecoder) -> Callable[[bytes, int], Hit]:
        hit = decoder.hit_function()
        if not self._capturing:
            return hit
        return with_capture(hit, RAW_AT - 4, isinstance(decoder, RetSiteDecoder))

    def _read_filtered(self, streams: CpuStreams, hits: dict[int, Callable[[bytes, int], Hit]],
                       append: Callable[[Hit], None]) -> None:
        """The read loop when some events are filtered here, per hit."""
        infos = {kp.info.name: kp.info for kp in self.placed}
        here = self._python_filtered
        for data, bodies in streams.read_batches():
            for body in bodies:
                at = body + RAW_AT
                event_id = data[at] | data[at + 1] << 8
                hit = hits.get(event_id)
                if hit is None:
                    continue
                h = hit(data, body)
                # h[:9]: without a stack capture --stack appends
                tested = here.get(event_id)
                if tested is None or tested[1](hit_event(h[:9], infos[h[4]])):
                    append(h)

    def _deliver(self, hits: list[Hit], on_hits: Callable[[list[Hit]], None]) -> None:
        if hits:
            self.events += len(hits)
            on_hits(hits)


_ts = itemgetter(0)


def _partial_ok(kp: KernelProbe) -> bool:
    """Whether `kp` may be left out alone: a return probe on its rets is
    placed whole or not at all (see `Refusals`)."""
    return kp.func_delta is None


_TOO_BIG = ("Event too big", "Line length is too long", "Too many arguments")
"""The kernel's words for a probe of more fetchargs than one event takes."""


def _too_big(kp: KernelProbe, e: KernelError) -> KernelError | EngineError:
    """The kernel's refusal, or for a probe too big for it (a Rust enum of
    many variants, each field a fetch) one line that says what to do."""
    if isinstance(e, ProbeRejected) and e.kernel_message.startswith(_TOO_BIG):
        return EngineError(f"{kp.info.name}: its {len(kp.info.args)} fetches are more than "
                           f"one kernel event takes ({e.kernel_message}); -e ptrace reads them")
    return e


def _reason(e: KernelError) -> str:
    if isinstance(e, ProbeRejected):
        return e.kernel_message
    return str(e)
