"""`Session`: uprobes from Python. Probe lines with handlers, then one run.

    import uprobes

    s = uprobes.Session()
    @s.probe("libc:malloc size=%di:u64")
    def on_malloc(ev):
        print(ev.comm, ev.args["size"])
    status = s.spawn(["/bin/ls", "/"])

A session collects probes (`probe()`), then runs once: `spawn()` starts a
command with the probes in place before its first instruction and returns
its exit status; `attach()` follows a running process and its threads;
`run()` traces system-wide (the kernel engine only).

Engines: "kernel" (the kernel's uprobes: events reach handlers a moment
after the hit), "ptrace" (ours: handlers run while the thread is stopped at
the probe; `event.hit` gives its registers and memory and can change them)
and "auto" (the kernel where it can serve, see `uprobes.engines.choose`).
Each blocks, calling handlers in the caller's thread, until the command or
process ends, `duration` passes, a handler calls `stop()`, or
SIGINT/SIGTERM/SIGHUP arrive (which stop the run, never the traced
program). Every probe is removed on every way out.

Probe lines are parsed when given, so a mistake shows at the line that made
it; they are resolved when the run starts (`attach()` resolves names as the
process sees them). The same line given twice is one probe with two
consumers; a hit calls its only handler directly, or a prepared chain when
there are several (see `uprobes.model.registry`).

The kernel's own events of the traced threads (`Session(kernel="sched,
syscalls,faults")` or any `GROUP:EVENT` tracepoint, as `trace --kernel`)
go to the handlers given by `on_kernel()`, interleaved with the probes'
events in time order on the same clock (CLOCK_MONOTONIC): a system call
made between two hits reaches its handler between theirs. They are read
by a thread of ours every few milliseconds, whether hits come or not; a
kernel handler may run on it, never at the same time as another handler.

Filters (`pid`, `tid`, `comm`, `condition`) are tested per consumer on
each event that arrives. On the kernel engine the OR of a line's
consumers' filters, as far as the kernel's event filter can say it, is
also tested in the kernel first: a hit no consumer wants makes no record
(see `uprobes.model.filters.pushdown`). Only the records change, never
what a handler gets.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TypeVar

from uprobes.engines.base import Request, Tracer, open_tracer
from uprobes.engines.choose import ENGINES, pick_engine
from uprobes.engines.kevents.decode import parse_kernel_option
from uprobes.engines.kevents.pump import Pump
from uprobes.engines.kevents.source import KernelEvents
from uprobes.engines.launch import finish, launch
from uprobes.errors import KernelError, SpecError, UsageError
from uprobes.lang import parse
from uprobes.lang.ast import ProbeSpec
from uprobes.lang.condition import Condition
from uprobes.lang.render import render
from uprobes.model.event import Event, Hit, ProbeInfo, hit_event
from uprobes.model.filters import HitFilter, pushdown
from uprobes.model.kevent import KernelEvent, KernelRow, row_event
from uprobes.model.probe import ResolvedProbe
from uprobes.model.registry import Consumer, prepare_dispatch
from uprobes.render.pyargs import shown_event_args, shown_infos
from uprobes.render.timeline import Timeline
from uprobes.render.values import shown_args
from uprobes.resolve.resolver import Resolver
from uprobes.unwind.capture import DEFAULT_STACK_BYTES, check_stack_bytes

EventHandler = Callable[[Event], object]
KernelHandler = Callable[[KernelEvent], object]
EventFilter = Callable[[Event], bool]
H = TypeVar("H", bound=EventHandler)



@dataclass
class _Line:
    """One distinct probe line and the consumers that asked for it."""

    spec: ProbeSpec
    consumers: list[Consumer] = field(default_factory=list)
    filters: list[HitFilter | None] = field(default_factory=list)
    """Each consumer's filter but its `filter=` predicate (what the kernel may test)."""


class Session:
    """Probe lines with handlers, run once on an engine.

    `engine`: "kernel", "ptrace" or "auto" (see the module's docstring).
    `force` skips the executable-segment and instruction checks. `note`
    receives the one-line notes a run produces (a glob entry the kernel
    refused, an IFUNC); by default they go to stderr. `uretprobe`: return
    probes use the kernel's uretprobe instead of probes on the function's
    own `ret`s (see `uprobes.resolve.retsites`). `stack_bytes` > 0
    gives every event its user stack (`event.stack`, innermost frame
    first), walked from that many bytes of stack copied at the hit (see
    `uprobes.unwind.capture`); the kernel engine's rings then default to
    its `STACK_RING_PAGES`, as samples carry the copy (`ring_pages` None:
    the kernel engine's default). `python`: stacks also hold the Python
    frames of a CPython program, each eval-loop frame replaced by the
    Python functions it runs (`Frame.python`; the ptrace engine reads them,
    so `auto` takes it; stacks of `DEFAULT_STACK_BYTES` unless
    `stack_bytes` says). `py_args`: a `py:` entry's event has the call's
    arguments, `args`, a `PyArguments` (name -> int, bool, str, None, or
    a `Shown` text for anything else), and a return's the value returned,
    `value` (CPython 3.11), besides `raised` (the exception's type's name,
    or None), which every `py:` return has; the kernel engine pays for
    reading them at every Python call of the process (docs/python.md).
    """

    def __init__(self, engine: str = "auto", *, force: bool = False, uretprobe: bool = False,
                 ring_pages: int | None = None, stack_bytes: int = 0,
                 note: Callable[[str], object] | None = None, trapfree: bool = False,
                 python: bool = False, kernel: str | Sequence[str] | None = None,
                 py_args: bool = False) -> None:
        if engine not in ENGINES:
            raise UsageError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
        if python and not stack_bytes:
            stack_bytes = DEFAULT_STACK_BYTES
        if stack_bytes:
            check_stack_bytes(stack_bytes, "stack_bytes (0: no stacks)")
        self.python = python
        self.py_args = py_args
        self.engine_used: str | None = None
        """The engine the run took (`auto` decides when the run starts)."""
        self.engine = engine
        self.force = force
        self.uretprobe = uretprobe
        self.stack_bytes = stack_bytes
        self.trapfree = trapfree
        """On the ptrace engine: probes that fetch registers and the stack only
        record each hit in the program (no stop; docs/ptrace-engine.md,
        trap-free tracing) and handlers run as the records are read, with no
        `event.hit`: for handlers that only look at events."""
        self.ring_pages = ring_pages
        self.kernel = None if kernel is None else parse_kernel_option(
            kernel if isinstance(kernel, str) else ",".join(kernel))
        """The kernel's events asked for (`trace --kernel`'s words), or None."""
        self._kernel_handlers: list[KernelHandler] = []
        self.kernel_events = 0
        """Kernel events delivered by the run."""
        self.kernel_lost = 0
        """Kernel events the kernel dropped (a ring full); never silent: check it."""
        self._note = note or (lambda text: sys.stderr.write(f"uprobes: note: {text}\n"))
        self._lines: dict[str, _Line] = {}
        self._tracer: Tracer | None = None
        self._ran = False
        self._stopped = False
        self.events = 0
        """Events delivered by the run (to handlers or not)."""
        self.lost = 0
        """Records the kernel dropped (ring full); never silent: check it."""
        self.signal: int | None = None
        """The stop signal (SIGINT, SIGTERM, SIGHUP) that ended the run, if one did."""
        self.probes: list[ResolvedProbe] = []
        """What the run placed its probes from, once it has started."""
        self.kernel_filters: dict[str, str] = {}
        """On the kernel engine, once the run has started: `group/event` ->
        the filter the kernel tests before it writes a record (events whose
        consumers' filters it can say; see the module's docstring)."""

    # ------------------------------------------------------------ probes

    def probe(self, spec: str, handler: H | None = None, *,
              filter: EventFilter | None = None, condition: str | None = None,
              pid: int | Sequence[int] | None = None,
              tid: int | Sequence[int] | None = None,
              comm: str | Sequence[str] | None = None) -> Callable[[H], H] | H:
        """Add a probe line with a handler; as a decorator without `handler`.

        The handler gets each `Event` of the line that passes the filters:
        `pid`/`tid`/`comm` (one or several), `condition` (the kernel's filter
        language on the line's fetchargs, `comm`, `pid` and `tid`:
        `'size > 4096 && comm == "ls"'`) and `filter(event) -> bool`.
        """
        if self._ran:
            raise UsageError("a session runs once: add probes before spawn/attach/run")
        parsed = parse(spec)
        if not isinstance(parsed, ProbeSpec):
            raise SpecError("a '-:EVENT' line clears a probe; give probes to place", spec, 0)
        hit_filter = HitFilter.parse(condition, _several(comm, "comm"), _several(tid, "tid"),
                                     _several(pid, "pid"))
        tests: list[EventFilter] = []
        if hit_filter is not None and hit_filter.condition is not None:
            hit_filter.condition.check_fields(spec, {a.name: a.type for a in parsed.args})
            tests.append(hit_filter.condition.predicate())
        if filter is not None:
            tests.append(filter)

        def add(fn: H) -> H:
            call: EventHandler = fn
            if len(tests) == 1:
                predicate = tests[0]

                def call(ev: Event) -> object:
                    return fn(ev) if predicate(ev) else None
            elif tests:
                def call(ev: Event) -> object:
                    return fn(ev) if all(t(ev) for t in tests) else None
            line = self._lines.setdefault(render(parsed), _Line(parsed))
            task_filter = hit_filter.task_filter() if hit_filter else None
            line.consumers.append(Consumer(handler=call, filter=task_filter, tag=fn))  # type: ignore[arg-type]
            line.filters.append(hit_filter)
            return fn

        return add if handler is None else add(handler)

    def on_kernel(self, handler: KernelHandler | None = None
                  ) -> Callable[[KernelHandler], KernelHandler] | KernelHandler:
        """Add a handler of the kernel's events (`Session(kernel=...)`); as a
        decorator without `handler`. Each `KernelEvent` goes to every handler."""
        if self.kernel is None:
            raise UsageError("kernel events are asked for when the session is made: "
                             "Session(kernel='sched,syscalls')")
        if self._ran:
            raise UsageError("a session runs once: add handlers before spawn/attach/run")

        def add(fn: KernelHandler) -> KernelHandler:
            self._kernel_handlers.append(fn)
            return fn
        return add if handler is None else add(handler)

    # ------------------------------------------------------------ runs

    def spawn(self, argv: Sequence[str], *, duration: float | None = None,
              ready: Callable[[], object] | None = None,
              launched: Callable[[int], object] | None = None) -> int:
        """Run `argv` with the probes in place from its first instruction;
        return its exit status (128+N if signal N ended it). When `duration`
        seconds pass first, tracing stops and the command is ended (SIGTERM,
        SIGKILL 5 s later if it still runs), as perf stat --timeout ends its
        own. If tracing stops first otherwise (stop(), a signal, an
        exception), the command runs on unharmed and this waits for it.
        `launched` is called with the command's pid while it is held before
        its exec, the probes in place (to watch it from its first instruction
        by other means too)."""
        self._resolve(pid=None, has_target=True, argv=argv)
        with self._kernel_source() as source:
            child = launch(list(argv))
            released = False
            started = 0.0
            try:
                if source is not None:
                    source.open(child=child.pid)
                with self._open(child=child.pid):
                    if launched is not None:
                        launched(child.pid)
                    child.release()
                    released = True
                    started = time.monotonic()
                    self._run(duration, ready, source)
            except BaseException:
                if self._tracer is not None:
                    child.reaped(self._tracer.child_status)
                if released:
                    child.wait()
                else:
                    child.abort()  # never released: the command must not run at all
                raise
        if self._tracer is not None:
            child.reaped(self._tracer.child_status)
        return finish(child, started, duration, self._note)

    def attach(self, pid: int, *, duration: float | None = None,
               ready: Callable[[], object] | None = None) -> None:
        """Trace process `pid` (all its threads, and the children it starts)
        until it exits, `duration` passes or `stop()`."""
        self._resolve(pid=pid, has_target=True)
        with self._kernel_source() as source:
            if source is not None:  # before the probes: the first hit has its events
                source.open(pid=pid)
            with self._open(pid=pid):
                self._run(duration, ready, source)

    def run(self, duration: float | None = None,
            ready: Callable[[], object] | None = None) -> None:
        """Trace every process on the machine that hits the probes.

        `ready` (in every run method) is called once every probe is in
        place, before the first event is delivered: the moment to start a
        workload that must be seen whole."""
        self._resolve(pid=None, has_target=False)
        with self._kernel_source() as source:
            if source is not None:
                source.open()
            with self._open():
                self._run(duration, ready, source)

    @property
    def lost_so_far(self) -> int:
        """`lost` while the run goes on (a long run exports it as it grows)."""
        return self._tracer.lost if self._tracer is not None else self.lost

    def stop(self) -> None:
        """Stop the run: no handler is called after this (call it from a handler
        or, on the kernel engine, from another thread: the run ends at its next
        wake-up)."""
        self._stopped = True
        if self._tracer is not None:
            self._tracer.stop()

    # ------------------------------------------------------------ inside

    def finish(self) -> None:
        """End the run at its next wake-up, from any thread; unlike `stop()`,
        the hits already recorded are still delivered (a long-running caller
        that counts every hit ends a run this way to start another)."""
        if self._tracer is not None:
            self._tracer.stop()

    def _resolve(self, *, pid: int | None, has_target: bool,
                 argv: Sequence[str] | None = None) -> None:
        """Resolve every line, as process `pid` sees names, and pick the
        engine (the run starts here)."""
        if self._ran:
            raise UsageError("a session runs once: make a new Session for another run")
        if not self._lines:
            raise UsageError("no probes: add some with Session.probe() first")
        self._ran = True
        self.probes = Resolver(pid=pid, force=self.force, uretprobe=self.uretprobe,
                               py_args=self.py_args, py_values=self.py_args,
                               argv=tuple(argv) if argv else None).resolve_all(
            [line.spec for line in self._lines.values()])
        for p in self.probes:
            for text in p.notes:
                self._note(text)
        self.engine_used = pick_engine(self.engine, self.probes, has_target=has_target,
                                       python=self.python, note=self._note)

    def _open(self, *, pid: int | None = None, child: int | None = None) -> Tracer:
        """The engine's tracer for the resolved probes, to be entered. An
        engine whose kernel filters records gets each line's consumers'
        filters OR-ed (`pushdown`); the others ignore them."""
        assert self.engine_used is not None
        conditions: dict[int, Condition | None] = {
            id(line.spec): pushdown(line.filters) for line in self._lines.values()}
        self._tracer = open_tracer(Request(
            self.probes, self.engine_used, pid=pid, child=child, force=self.force,
            note=self._note, stack_bytes=self.stack_bytes,
            prefilter=lambda p: conditions[id(p.spec)], trapfree=self.trapfree,
            guard_traps=True,
            ring_pages=self.ring_pages, python=self.python))
        return self._tracer

    @contextmanager
    def _kernel_source(self) -> Iterator[KernelEvents | None]:
        """The kernel's events asked for, opened for the run's tasks by the
        caller (before the probes go in: the first hit has its events)."""
        if self.kernel is None:
            yield None
            return
        with KernelEvents(self.kernel, note=self._note) as source:
            yield source

    def _run(self, duration: float | None, ready: Callable[[], object] | None,
             source: KernelEvents | None = None) -> None:
        tracer = self._tracer
        assert tracer is not None
        # Placed names -> prepared dispatch. A spec's probes share its
        # consumers; a glob gives one placed probe per address.
        by_spec = {id(line.spec): line for line in self._lines.values()}
        dispatch: dict[str, Callable[[Event], None]] = {}
        for p in self.probes:  # an event's `probe` is its resolved probe's name
            line = by_spec[id(p.spec)]
            dispatch[p.name] = prepare_dispatch(
                [(c.filter, c.handler) for c in line.consumers if c.handler is not None])
        table = dispatch.get
        # Probes with DWARF values: their events show them as `--json` does.
        viewed = {name: info.args for name, info in tracer.infos.items()
                  if any(t.view is not None for _, t in info.args)}
        # `py:` probes: their raw fields as values (render/pyargs.py).
        py_infos, py_converts = shown_infos(tracer.infos, structured=True)

        def deliver(ev: Event) -> None:
            call = table(ev.probe)
            if call is None or self._stopped:
                return
            hit = tracer.current_hit
            if hit is not None:  # an engine that stops the thread: handlers see it
                ev = replace(ev, hit=hit)
            info_args = viewed.get(ev.probe)
            if info_args is not None:
                ev = replace(ev, args=shown_args(ev.args, info_args))
            convert = py_converts.get(ev.probe)
            if convert is not None:
                ev = replace(ev, args=shown_event_args(ev.args, py_infos[ev.probe], convert))
            call(ev)

        self.kernel_filters = dict(tracer.kernel_filters)
        if source is None:
            try:
                if ready is not None:
                    ready()
                tracer.run(deliver, duration)
            finally:
                self.events, self.lost = tracer.events, tracer.lost
                self.signal = tracer.signal
            return
        handlers = _KernelHandlers(self, deliver, tracer.infos)
        timeline = Timeline(handlers, source)

        def tick() -> None:
            try:
                timeline.tick(time.monotonic_ns())
            except BaseException:
                tracer.stop()  # a handler's error ends the run; Pump raises it here
                raise
        try:
            if ready is not None:
                ready()
            with Pump(tick):
                tracer.run(timeline.event, duration)
            source.disable()
            timeline.summary(tracer.events, tracer.lost)
        finally:
            self.events, self.lost = tracer.events, tracer.lost
            self.signal = tracer.signal
            self.kernel_events = handlers.delivered
            try:
                self.kernel_lost = source.lost
            except KernelError:  # the counters unreadable: the error on the way out matters
                pass


class _KernelHandlers:
    """What `Timeline` writes to, for a Session: probe events to the probes'
    dispatch, kernel events to the `on_kernel` handlers."""

    def __init__(self, session: Session, deliver: Callable[[Event], None],
                 infos: dict[str, ProbeInfo]) -> None:
        self.session = session
        self.deliver = deliver
        self.infos = infos
        self.delivered = 0

    def hits(self, hits: list[Hit]) -> None:
        for hit in hits:
            self.deliver(hit_event(hit, self.infos[hit[4]]))

    def event(self, event: Event) -> None:
        self.deliver(event)

    def kernel_rows(self, rows: list[KernelRow]) -> None:
        for row in rows:
            if self.session._stopped:
                return
            self.delivered += 1
            event = row_event(row)
            for handler in self.session._kernel_handlers:
                handler(event)

    def kernel_summary(self, events: int, lost: int) -> None:
        """The counts are the session's (`kernel_events`, `kernel_lost`)."""

    def summary(self, events: int, lost: int) -> None:
        """The counts are the session's (`events`, `lost`)."""


V = TypeVar("V", int, str)


def _several(value: V | Sequence[V] | None, name: str) -> list[V] | None:
    """`pid=`, `tid=`, `comm=`: one value or several; an empty list would
    match no task at all, which is a mistake, not a filter."""
    if value is None:
        return None
    if isinstance(value, (int, str)):
        return [value]
    if not value:
        raise UsageError(f"{name}=[] matches no task: give at least one, or leave it out")
    return list(value)


__all__ = ["Event", "Session"]
