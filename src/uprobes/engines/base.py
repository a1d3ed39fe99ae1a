"""What every engine offers, and the one place that opens an engine for a run.

Two roles, each a Protocol that mypy checks the engines against:

- `Tracer`: every hit delivered, as an `Event`, as `Hit` tuples, or into a
  renderer (`trace`, and `uprobes.Session` under latency, top and stacks).
- `Counter`: hits counted per probe (`count`).
- `Timer`: calls timed in the program, a histogram per function
  (`latency`); only the ptrace engine's trap-free probes can, so
  `open_timer` gives None where they cannot serve and the caller pairs
  a `Tracer`'s events itself.

The kernel engine has a class per role (`KernelTracer`, `KernelCounter`);
the ptrace engine's `PtraceTracer` plays both. Callers describe the run in
a `Request` and call `open_tracer` or `open_counter`, which pick the engine
(`uprobes.engines.choose`) and build it, not yet entered; they never name
an engine's class. The ptrace engine is imported only when it is picked:
`trace -e kernel` starts without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from uprobes.analysis.histogram import Latencies
from uprobes.analysis.keyed import TASK_KEYS, KeyedCounts
from uprobes.engines.choose import pick_engine
from uprobes.engines.reaper import Watch
from uprobes.errors import UsageError
from uprobes.lang.condition import Condition
from uprobes.model.event import Event, Hit, ProbeInfo
from uprobes.model.filters import HitFilter, counted_fields
from uprobes.model.probe import ResolvedProbe
from uprobes.render.protocol import HitRenderer


class _Run(Protocol):
    """What both roles share: a context manager that places the probes on
    entry and removes every one of them on exit, and how the run ended."""

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    @property
    def target_exited(self) -> bool:
        """The process or command traced has ended (the run ends with it)."""

    @property
    def signal(self) -> int | None:
        """The stop signal (SIGINT, SIGTERM, SIGHUP) that ended the run, if one did."""

    @property
    def child_status(self) -> int | None:
        """The launched command's exit status when the engine reaped it (the
        ptrace engine is its tracer, so it collects the exit); None when it
        did not, and the caller waits for the command itself."""

    def stop(self) -> None:
        """End the run at its next wake-up (callable from a handler)."""


class Tracer(_Run, Protocol):
    """Every hit of the probes, delivered in the caller's thread."""

    @property
    def infos(self) -> dict[str, ProbeInfo]:
        """Display name -> ProbeInfo of each probe placed, for the renderers."""

    @property
    def events(self) -> int:
        """Hits delivered so far."""

    @property
    def lost(self) -> int:
        """Records dropped because a ring was full; never silent: report it."""

    @property
    def kernel_filters(self) -> Mapping[str, str]:
        """`group/event` -> the filter the kernel tests before it writes a
        record; empty on an engine that tests every filter itself."""

    @property
    def current_hit(self) -> Any:
        """While a handler runs on an engine that stops the thread at the
        hit, that thread (`uprobes.engines.ptrace.hit.PtraceHit`: registers
        and memory); None otherwise."""

    def run(self, on_event: Callable[[Event], None], duration: float | None = None) -> None:
        """Deliver an `Event` per hit until the target exits, a stop signal,
        `stop()`, or `duration` seconds."""

    def run_hits(self, on_hits: Callable[[list[Hit]], None],
                 duration: float | None = None) -> None:
        """`run()` handing over batches of `Hit` tuples (no Event built)."""

    def run_render(self, renderer: HitRenderer, duration: float | None = None) -> None:
        """`run_hits` into a renderer, by the fastest path the renderer allows
        (one that is also a `RawSink`, engines/trapfree/reader.py, gets the
        trap-free rings' records as they are: `uprobes record`)."""


class Counter(_Run, Protocol):
    """Hits per probe, with nothing delivered."""

    @property
    def counts(self) -> Mapping[str, int]:
        """Hits per probe (display name) so far, every probe counted listed
        (copy it to keep it: it may be the engine's own, still counting)."""

    def live_counts(self) -> dict[str, int]:
        """`counts` as of now, for a reader in another thread while `count`
        runs (an exporter): what the engine counted and has not yet added to
        `counts` included, nothing changed; a value never less than at the
        reads before."""

    @property
    def where(self) -> str:
        """Where the probes count, in words: `system-wide`, `in process N`..."""

    def count(self, seconds: float | None) -> None:
        """Count for `seconds` (None: until the end), returning early when
        the target ends or a stop signal arrives (`target_exited`, `signal`)."""


class KeyedCounter(Counter, Protocol):
    """Hits per probe and key, counted where they happen (`count --by`)."""

    def by_key(self) -> KeyedCounts:
        """The counts by key so far (keys as shown), overflow, probes not counted."""


class Timer(_Run, Protocol):
    """Calls of functions timed where they run, nothing delivered."""

    def count(self, seconds: float | None) -> None:
        """Time calls for `seconds` (None: until the end), as `Counter.count`."""

    def latencies(self) -> Latencies:
        """The histograms so far (after the run: as read when it ended);
        callable from another thread while `count` runs, and a read never
        has fewer calls in a bucket than a read before it."""

    def live_counts(self) -> dict[str, int]:
        """The hits of the probes counted, not timed (`Request.counted`), so
        far: from any thread, as `Counter.live_counts`."""

    def traced_processes(self) -> set[int]:
        """The processes the run traces now: the one asked for and the
        children it forked since (followed from their fork)."""


@dataclass(frozen=True)
class Request:
    """A run to open: the probes, the engine asked for, and where to place them.

    `engine`: "auto", "kernel" or "ptrace" (see `uprobes.engines.choose`).
    `pid`: an existing process and what it starts; `child`: a launched
    command's pid, held before exec; neither: system-wide (the kernel engine
    only). `note` gets the one-line notes of the run (a probe of a glob left
    out). `stack_bytes` > 0: each event gets its user stack. `hit_filter`:
    only the hits it keeps are delivered or counted. `prefilter`: per probe,
    a condition the kernel may test so that failing hits make no record (the
    caller still filters what arrives). `trapfree`: the ptrace engine may
    place probes as jumps into in-process code, no stop per hit.
    `guard_traps` (without `trapfree`): every hit still stops the thread, but
    the ptrace engine may test a `py:` function's guard in the program, so a
    call of another function does not stop (a jump whose code stops at an
    int3 of its own only for the calls it keeps: a hit as an int3's).
    `ring_pages`: data pages of each of the kernel engine's per-CPU rings
    (None: its default, larger with stacks). `python`: stacks hold the
    Python frames of a CPython program (the ptrace engine reads them).
    `orphans`: the ptrace engine's watcher for a kill -9 of uprobes, shared
    by several runs (`open_orphan_watch`); None: each run starts its own.
    `counted` (a timer): display names of probes counted in the program, not
    timed (`live_counts()`); `int3s=False`: a probe the ptrace engine cannot
    place trap-free is left out (a note) rather than stopping at each hit.
    `let_go(pid)`: asked by the ptrace engine when a fork child of the target
    execs; True: it is detached, nothing placed in it (else followed on,
    and what it starts).
    """

    probes: list[ResolvedProbe]
    engine: str = "auto"
    pid: int | None = None
    child: int | None = None
    force: bool = False
    note: Callable[[str], object] | None = None
    stack_bytes: int = 0
    hit_filter: HitFilter | None = None
    prefilter: Callable[[ResolvedProbe], Condition | None] | None = None
    trapfree: bool = False
    guard_traps: bool = False
    ring_pages: int | None = None
    by: str | None = None
    value: str | None = None
    python: bool = False
    orphans: Watch | None = None
    counted: frozenset[str] = frozenset()
    int3s: bool = True
    let_go: Callable[[int], bool] | None = None

    def pick(self, noted: bool = False, counting: bool = False) -> str:
        """The engine that serves this request: `kernel` or `ptrace` (`noted`:
        with a note of why `auto` takes the ptrace engine, if the kernel
        cannot express a probe; `counting`: the probes fetch only what the
        filter tests, as a count's do)."""
        probes = self.probes
        if counting:
            probes = [replace(p, args=tuple(a for a in p.args if a.name in counted))
                      for p, counted in ((p, counted_fields(self.hit_filter, p))
                                         for p in probes)]
        return pick_engine(self.engine, probes,
                           has_target=self.pid is not None or self.child is not None,
                           python=self.python, note=self.note if noted else None)


def open_tracer(request: Request) -> Tracer:
    """The tracer for `request`, on the engine it picks; enter it to place the probes."""
    if request.pick(noted=True) == "ptrace":
        from uprobes.engines.ptrace.tracer import PtraceTracer
        return PtraceTracer(request.probes, pid=request.pid, child=request.child,
                            force=request.force, note=request.note,
                            stack_bytes=request.stack_bytes, hit_filter=request.hit_filter,
                            trapfree="record" if request.trapfree
                            else "guards" if request.guard_traps else False,
                            python=request.python, orphans=request.orphans)
    from uprobes.engines.kernel.streams import DEFAULT_RING_PAGES, STACK_RING_PAGES
    from uprobes.engines.kernel.tracer import KernelTracer
    pages = request.ring_pages or (STACK_RING_PAGES if request.stack_bytes else DEFAULT_RING_PAGES)
    return KernelTracer(request.probes, pid=request.pid, child=request.child, ring_pages=pages,
                        force=request.force, note=request.note,
                        stack_bytes=request.stack_bytes, hit_filter=request.hit_filter,
                        prefilter=request.prefilter)


def open_counter(request: Request) -> Counter:
    """The counter for `request`, on the engine it picks; enter it to place the probes."""
    if request.pick(noted=True, counting=True) == "ptrace":
        from uprobes.engines.ptrace.tracer import PtraceTracer
        return PtraceTracer(request.probes, pid=request.pid, child=request.child,
                            force=request.force, note=request.note,
                            hit_filter=request.hit_filter,
                            trapfree="count" if request.trapfree else False,
                            orphans=request.orphans)
    from uprobes.engines.kernel.counting import KernelCounter
    target = request.child if request.child is not None else request.pid
    return KernelCounter(request.probes, pids=None if target is None else [target],
                         all_threads=request.child is None, force=request.force,
                         hit_filter=request.hit_filter, note=request.note)


def open_keyed_counter(request: Request) -> KeyedCounter:
    """A counter by key for `request` (`by` set): only the ptrace engine's
    trap-free probes count by key, in the program; elsewhere a UsageError
    says what to change."""
    if request.pick() != "ptrace":
        raise UsageError("--by counts in the traced program: give -e ptrace and -p PID or "
                         "-- CMD (the kernel engine counts per probe only)")
    if not request.trapfree:
        raise UsageError("--by counts in the program with trap-free probes: drop --no-trapfree")
    from uprobes.engines.ptrace.tracer import PtraceTracer
    return PtraceTracer(request.probes, pid=request.pid, child=request.child,
                        force=request.force, note=request.note, trapfree="count",
                        by=request.by, value=request.value, hit_filter=request.hit_filter,
                        orphans=request.orphans)


def keyed_problem(request: Request) -> str | None:
    """Why the probes of `request` (`by` set) cannot be counted by key in the
    program (then the caller counts them from events), or None: the kernel
    engine has no program code to count in, and the ptrace engine's code
    reads keys and values from registers and stack words only."""
    if request.pick() != "ptrace":
        return "the kernel engine counts per probe only"
    if not request.trapfree:
        return None  # open_keyed_counter says what to change
    from uprobes.engines.ptrace.bykey import key_problem
    return key_problem(request.probes, request.by, request.value)


def open_timer(request: Request) -> Timer | None:
    """A timer for `request`, whose probes are entry and return probe pairs
    (an entry names the function, its return's rets come with it): the
    ptrace engine's trap-free timing, when it is the engine picked and
    nothing asks for events (no stacks, a filter the entries' code can
    test); else None."""
    if request.pick() != "ptrace" or not request.trapfree or request.stack_bytes:
        return None
    moved = next((p for p in request.probes if not p.is_return and p.symbol_offset), None)
    if moved is not None:
        # Its code pairs a return with the entry whose stack pointer is the
        # return's; past the prologue the stack pointer is lower than that.
        if request.note is not None:
            request.note(f"{moved.name} is probed past its function's first instruction "
                         "(after an unoptimized function's prologue, for its variables): "
                         "calls are paired from events, not timed in the program")
        return None
    if request.hit_filter is not None:
        from uprobes.engines.ptrace.timed import filter_problem
        why = filter_problem(request.probes, request.hit_filter)
        if why is not None:
            if request.note is not None:
                request.note(f"the filter is tested on events, not in the program ({why}): "
                             "filter on the tid, the comm (== or !=) or on fetchargs that "
                             "are registers or stack words to test it there")
            return None
    if request.by is not None and request.by not in TASK_KEYS:
        from uprobes.engines.ptrace.timed import key_problem
        why = key_problem(request.probes, request.by)
        if why is not None:
            if request.note is not None:
                request.note(f"--by {request.by} is keyed from events, not in the program ({why}):"
                             " fetch it from a register or a stack word to key it there")
            return None
    if request.int3s:
        from uprobes.engines.ptrace.bykey import jump_problem
        why = jump_problem(request.probes, whole=True)
        if why is not None:
            if request.note is not None:
                request.note(f"calls are paired from events, not timed in the program ({why})")
            return None
    request.pick(noted=True)  # why the ptrace engine, if it is for a probe the kernel cannot take
    from uprobes.engines.ptrace.tracer import PtraceTracer
    return PtraceTracer(request.probes, pid=request.pid, child=request.child,
                        force=request.force, note=request.note, trapfree="time",
                        by=request.by, hit_filter=request.hit_filter,
                        orphans=request.orphans, counted=request.counted,
                        int3s=request.int3s, let_go=request.let_go)


def open_orphan_watch() -> Watch:
    """One watcher for the ptrace runs of a process that runs several (the
    agent's): what each places is undone by it if uprobes is killed, and
    one watcher serves them all (each starts a process of its own else).
    Close it once every run sharing it has ended."""
    from uprobes.engines.ptrace.orphan import open_watch
    return open_watch()


if TYPE_CHECKING:  # mypy holds each engine to its roles
    from uprobes.engines.kernel.counting import KernelCounter
    from uprobes.engines.kernel.tracer import KernelTracer
    from uprobes.engines.ptrace.tracer import PtraceTracer

    _kernel_tracer: type[Tracer] = KernelTracer
    _kernel_counter: type[Counter] = KernelCounter
    _ptrace_tracer: type[Tracer] = PtraceTracer
    _ptrace_counter: type[Counter] = PtraceTracer
    _ptrace_timer: type[Timer] = PtraceTracer
    _ptrace_keyed: type[KeyedCounter] = PtraceTracer
