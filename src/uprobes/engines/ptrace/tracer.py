"""`PtraceTracer`: the ptrace engine's session, a `Tracer` and a `Counter` (engines/base.py).

It traces a launched command (`child`: seized while held before exec,
probes placed at its exec stop) or a running process (`pid`: every
thread seized and interrupted, probes placed, threads resumed), follows
clone, fork, vfork and exec, and places int3s in every traced address
space that maps a probed file, also when libraries come later (the
dynamic linker's rendezvous). Each hit runs the registry's consumers
synchronously (see hit.py), then the displaced instruction out of line
(relocate.py), never in place. Signals reach the program as they would
untraced; group-stops are kept with PTRACE_LISTEN.

The hit path is one waitpid, PTRACE_GETREGS, PTRACE_SETREGS and
PTRACE_CONT (boosted or emulated instructions); a return probe adds one
read and one write of the stack at entry. The `cpu` of an event costs one
more pread (/proc/TID/stat), only when events are built (`trace`).

Every ptrace request must come from the thread that attached: enter, run
and exit a tracer in one thread. Exit undoes everything, at any moment:
every thread stopped, threads inside a slot moved back to the original
code, hijacked return addresses restored, int3s removed, all detached
(the XOL areas stay mapped: a signal frame may still point into one).

This module is the facade: the session's public surface and its
consumers. The work is done by one part per concern, of which
`PtraceTracer` is made (state.py says what they share): attach.py
(seizing threads, placing probes), loop.py (stops, hits, resuming),
lifecycle.py (clone, fork, exec, exit; stopping every thread) and
teardown.py (undoing it all).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from types import TracebackType
from typing import cast

from uprobes.engines import reaper
from uprobes.engines.ptrace import breakpoints
from uprobes.engines.ptrace.attach import Attach
from uprobes.engines.ptrace.breakpoints import PlacementRefused
from uprobes.engines.ptrace.bykey import KeyCounter
from uprobes.engines.ptrace.hit import PtraceHit
from uprobes.engines.ptrace.lifecycle import ThreadLife
from uprobes.engines.ptrace.loop import RunLoop
from uprobes.engines.ptrace.orphan import OrphanGuard
from uprobes.engines.ptrace.state import RAW_WAKE_S, RING_WAKE_S, ended
from uprobes.engines.ptrace.tasks import AddressSpace, Thread
from uprobes.engines.ptrace.teardown import Teardown
from uprobes.engines.ptrace.timed import CallTimer
from uprobes.engines.signals import WAKE_SIGNAL, StopSignals, wake_handler_installed
from uprobes.engines.tracee import relocate
from uprobes.engines.tracee.fetch import ArgFetcher, FetchContext
from uprobes.engines.trapfree.jumppatch import TrapFree
from uprobes.engines.trapfree.reach import Span
from uprobes.engines.trapfree.reader import RawSink, RawSite, Recorder, ShapedLines
from uprobes.errors import EngineError, KernelError, UprobesError, UsageError
from uprobes.model.event import ArgValue, Event, Hit, ProbeInfo, display_names, hit_event
from uprobes.model.filters import HitFilter, TaskView, with_guard
from uprobes.model.probe import InodeKey, ResolvedProbe, VdsoKey
from uprobes.model.refusal import Refusals
from uprobes.model.registry import Consumer, Registry, TaskLike
from uprobes.render.protocol import HitRenderer, LineRenderer
from uprobes.resolve.abi import probe_info
from uprobes.sys import ptrace
from uprobes.sys.thread_timer import ThreadTimer
from uprobes.unwind.capture import StackCapture, Symbolizer, stack_delivery
from uprobes.unwind.cpython.reader import PythonStacks
from uprobes.unwind.stack import StackCopy

_WAKE_S = 0.05  # the run loop's wake-up period (stop flag, deadline)
_FIRST_POLL_S = 0.0005  # a polling loop's first pause after an event (then doubling)


class PtraceTracer(Attach, RunLoop, ThreadLife, Teardown, CallTimer, KeyCounter):
    """A tracing session on the ptrace engine; use as a context manager.

    `pid`: an existing process (all its threads, and what they start later).
    `child`: a launched command's pid, held before exec (it and its
    children). `note` receives one line per probe skipped. `registry`
    holds the probes and their consumers: add consumers (handlers getting a
    `PtraceHit`) before entering; the tracer adds one per probe for its events.
    `stack_bytes`: `run()` gives each event its user stack, walked from the
    registers and up to that many bytes read from the stack pointer at the
    hit (0: no stacks). `python`: with stacks, each one's Python frames
    too, read from the interpreter while the thread is stopped.
    `hit_filter`: only the hits it keeps are counted and delivered; its
    `--tid`/`--comm` part is tested before anything is fetched, the
    condition as soon as what it names is fetched.
    `trapfree`: probes whose only consumer is the tracer's own (not on a
    return, no `stack_bytes`) are placed as jumps to in-process code where
    that is safe (jumppatch.py), no stop per hit. "count" (or True): such a
    tracer only counts (`run(None)`); a probe with no filter then adds to a
    counter, one with a filter records into a ring (recording.py) and is
    counted as its records are read. "record": every such probe records,
    and its events are read from the rings at the run loop's wake-ups
    (every `RING_WAKE_S`), at an int3 hit and at the end of `run`. "time":
    each entry probe names a function, and its return probe's rets come
    with it; the calls are timed in the program (timed.py), `latencies()`
    gives them; such a tracer only runs `count`. `by` (with "count"): each
    probe counts by that key in the program, `value` adds the sum, min and
    max of a fetcharg per key (bykey.py, `by_key()`). `counted` (with
    "time"): display names of probes counted instead, by trap-free counters,
    in the same tracer (one tracer per process: the agent times some
    functions and counts other lines). `int3s=False`: a probe that cannot
    be trap-free is left out with a note instead of taking an int3 (whose
    stop per hit would cost the tracer what the jumps save). `orphans`: the
    watcher that makes a kill -9 of uprobes safe for the programs, shared
    with other tracers (`engines.base.open_orphan_watch()`); None: one of
    its own, started with its first int3. `let_go(pid)`: asked when a fork
    child of the target execs; True: nothing placed, the child detached.
    """

    def __init__(self, probes: list[ResolvedProbe], *, pid: int | None = None,
                 child: int | None = None, force: bool = False,
                 note: Callable[[str], object] | None = None, stack_bytes: int = 0,
                 hit_filter: HitFilter | None = None, trapfree: bool | str = False,
                 python: bool = False, by: str | None = None,
                 value: str | None = None, orphans: reaper.Watch | None = None,
                 counted: frozenset[str] = frozenset(), int3s: bool = True,
                 let_go: Callable[[int], bool] | None = None) -> None:
        ptrace.ensure_x86_64()
        if trapfree not in (False, True, "count", "record", "time", "guards"):
            raise ValueError(f"trapfree must be False, 'count', 'record', 'time' or 'guards', "
                             f"not {trapfree!r}")
        self._trapfree = "count" if trapfree is True else trapfree or None
        self._jumps = TrapFree() if trapfree else None
        self._recorder: Recorder | None = None  # made by the first recording probe
        self._shaped: ShapedLines | None = None  # run_render's writer of recorded hits
        self._raw: RawSink | None = None  # run_render's keeper of records as they are
        self._roster_turn = 0
        self._held: tuple[AddressSpace, list[int]] | None = None  # stopped to place jumps
        self.hit_filter = hit_filter
        task_filter = hit_filter.task_filter() if hit_filter else None
        if pid is None and child is None:
            raise UsageError("the ptrace engine traces a process (-p PID) or a command "
                             "(-- CMD), not the whole system")
        self.probes = probes
        self.pid = pid
        self.child = child
        self.force = force
        self.stack_bytes = stack_bytes
        self._capturing = False
        self._note = note or (lambda _: None)
        self._pystacks = PythonStacks(self._note) if python and stack_bytes else None
        self._symbolizer = Symbolizer() if stack_bytes else None
        self.registry = Registry()
        self.counts: dict[str, int] = {}
        # Our handlers that, when no events are built, only count (no filter):
        # a hit whose dispatch is one of them just counts, with no PtraceHit.
        self._count_only: dict[Callable[[TaskLike], None], str] = {}
        self._py_count_only: dict[Callable[[TaskLike], None], str] = {}
        self._counting: dict[Callable[[TaskLike], None], str] = {}
        # Every event handler of ours, and the probe line it serves.
        self._ours: dict[Callable[[TaskLike], object], ResolvedProbe] = {}
        self._infos: dict[str, ProbeInfo] = {}
        self._refusals = Refusals(probes, self._note)
        self._ret_sites: dict[InodeKey, int] = {}  # a ret's key -> its offset in the function
        self._refused_early = False  # a precheck failed because the process had ended
        names = display_names(probes)
        # With "time": the probes named in `counted` are counted, the others timed.
        self._counted = {id(p) for p, n in zip(probes, names) if n in counted}
        self._int3s = int3s
        self._let_go = let_go
        timed = [(p, n) for p, n in zip(probes, names) if id(p) not in self._counted]
        self._time_functions([p for p, _ in timed] if trapfree == "time" else [],
                             [n for _, n in timed])
        self._names_by_line = names
        self._count_by(by, value)
        for name, p in zip(display_names(probes), probes):
            reason = None if isinstance(p.key, VdsoKey) else _precheck(p)
            if reason is not None:
                if pid is not None and ended(pid, within=0):
                    self._refused_early = True
                    break
                self._refusals.refuse(p, p.name, reason)
                continue
            info = probe_info(p)
            self._infos[info.name] = info
            self.counts[name] = 0
            handler = self._event_handler(name, info, p)
            self._ours[handler] = p
            if hit_filter is None and p.guard is None:
                self._count_only[handler] = name
            elif hit_filter is None and p.py_guard is not None:
                self._py_count_only[handler] = name
            if not p.is_return:
                self.registry.add(p, Consumer(handler=handler, filter=task_filter, tag=name))
                continue
            consumer = Consumer(ret_handler=handler, filter=task_filter, tag=name)
            if p.ret_sites and isinstance(p.key, InodeKey):
                # On the function's own rets (resolve/retsites.py): nothing on the stack.
                for off in p.ret_sites:
                    key = InodeKey(p.key.dev, p.key.ino, off)
                    self._ret_sites[key] = off - p.file_offset
                    self.registry.add(replace(p, key=key, file_offset=off), consumer)
            else:
                self.registry.add(p, consumer)
        # Prechecks read the files through /proc/PID/root: a process that ended
        # meanwhile fails them all, which is its exit, not a refusal.
        self._vanished = self._refused_early
        if not self.counts and not self._vanished:
            raise EngineError("no probe can be placed")
        self.threads: dict[int, Thread] = {}
        self._nested: dict[int, Thread] = {}
        self.events = 0
        self.lost = 0
        self._corrupt_rings = 0  # ring words put back (Ring.corrupt), at the last read
        self._faulted: set[int] = set()  # processes told of a fault in our code
        self._tsc_traps: dict[int, int] = {}  # by pid: rdtsc(p)s of our code emulated
        self.signal: int | None = None
        self.target_exited = False
        self.child_status: int | None = None
        self.current_hit: PtraceHit | None = None
        self._on_hits: Callable[[list[Hit]], None] | None = None
        self._pending_new: dict[int, ptrace.WaitStatus] = {}
        self._done = False
        self._placed_once = False
        self._comm_refused_in = set()
        self._walk_checked: dict[int, str | None] = {}  # pid -> why no Python walk there
        self._walk_spans: dict[tuple[int, str, int], list[Span] | str] = {}  # (reach.py)
        self._quiescing = False
        self._stack = ExitStack()
        self._undo = ExitStack()
        self._signals: StopSignals | None = None
        self._orphans = OrphanGuard(self._note, orphans)  # kill -9 of uprobes: see orphan.py
        self._waiter: int | None = None  # the native id of a run blocked in waits, to wake

    @property
    def infos(self) -> dict[str, ProbeInfo]:
        """Display name -> ProbeInfo, for the renderers."""
        return dict(self._infos)

    @property
    def kernel_filters(self) -> dict[str, str]:
        """None: this engine tests every filter itself (`Tracer`, engines/base.py)."""
        return {}

    @property
    def where(self) -> str:
        """Where the probes count, in words (`Counter`, engines/base.py)."""
        return f"in process {self.pid}" if self.pid is not None else f"in command {self.child}"

    def traced_processes(self) -> set[int]:
        """The processes traced now: the one asked for and those it forked
        (`Timer`, engines/base.py: any thread, a copy)."""
        return {t.pid for t in list(self.threads.values())}

    def live_counts(self) -> dict[str, int]:
        """`counts` with what the jumps counted since `count` last returned
        (`Counter`, engines/base.py: any thread, nothing changed)."""
        jumps = self._jumps
        return dict(self.counts) if jumps is None else jumps.peek_counts(self.counts)

    # ------------------------------------------------------------ consumers

    def _event_handler(self, name: str, info: ProbeInfo,
                       p: ResolvedProbe) -> Callable[[TaskLike], None]:
        counts = self.counts
        fetcher = None
        # The condition (`--tid`/`--comm` are the consumer's TaskFilter, tested
        # before this runs): before the fetch when it names no fetcharg.
        cond = with_guard(self.hit_filter.condition if self.hit_filter else None, p)
        keep = cond.predicate() if cond else None
        keep_after_fetch = keep is not None and bool(p.guard or self.hit_filter and
                                                     self.hit_filter.arg_fields)

        def on_hit(task: TaskLike) -> None:
            # `task` is a PtraceHit (an int3) or a RecordedHit (read from a ring).
            nonlocal fetcher
            hit = cast(PtraceHit, task)
            if keep is not None and not keep_after_fetch \
                    and not keep(TaskView(hit.pid, hit.tid, hit.comm, {})):
                return
            emit = self._on_hits
            if emit is None and not keep_after_fetch:
                counts[name] += 1
                return
            args: tuple[ArgValue, ...] = ()
            if p.args:
                if fetcher is None:
                    fetcher = ArgFetcher(p)
                ctx = FetchContext(hit.comm, hit.file_base)
                if fetcher.reads_vectors:
                    ctx.vector = _vector_reader(hit.tid)
                got = fetcher.fetch(hit.regs, hit.mem, ctx)
                if keep_after_fetch and keep and not keep(TaskView(hit.pid, hit.tid, hit.comm,
                                                                   got)):
                    return
                args = tuple(got.get(n) for n, _ in info.args)
            counts[name] += 1
            if emit is None:
                return
            self.events += 1
            self.current_hit = hit  # the stopped thread, for a Session handler
            try:
                if self._capturing:  # run() with stacks: the capture rides along
                    emit([(hit.ts_ns, hit.pid, hit.tid, hit.cpu, info.name, hit.comm, hit.ip,
                           hit.func, args, self._capture(hit))])  # type: ignore[list-item]
                    return
                emit([(hit.ts_ns, hit.pid, hit.tid, hit.cpu, info.name, hit.comm, hit.ip,
                       hit.func, args)])
            finally:
                self.current_hit = None
        return on_hit

    def _capture(self, hit: PtraceHit) -> StackCapture:
        """Registers and the top of the stack of the stopped thread (a return
        hit's registers are already the caller's: rip the return address), or
        of a recorded hit, as its probe's code copied them."""
        r = hit.regs
        regs = {0: r.rax, 1: r.rdx, 2: r.rcx, 3: r.rbx, 4: r.rsi, 5: r.rdi, 6: r.rbp,
                7: r.rsp, 8: r.r8, 9: r.r9, 10: r.r10, 11: r.r11, 12: r.r12, 13: r.r13,
                14: r.r14, 15: r.r15, 16: hit.ip}
        copied = getattr(hit, "copied", None)  # a RecordedHit's, its code copied at the hit
        if copied is not None:
            return StackCapture(regs, StackCopy(r.rsp, copied), getattr(hit, "python", None))
        mem = hit.thread.mm.mem
        data = mem.read_upto(r.rsp, self.stack_bytes)
        py = None if self._pystacks is None else self._pystacks.capture(hit.pid, hit.tid, mem.read)
        return StackCapture(regs, StackCopy(r.rsp, data), py)

    def _rename_word(self) -> int | None:
        """The kernel's rename word now (trapfree/renames.py), read from our
        own mapping of it, where the jumps' code keeps --comm verdicts under
        it: an int3 hit's name is read again only when it moved
        (`Thread.comm_now`). None without one: each hit reads the name (a
        pread, ~2 us; a word of our own would cost ~1 s to close)."""
        return None if self._jumps is None else self._jumps.rename_word()

    # ------------------------------------------------------------ set-up

    def __enter__(self) -> PtraceTracer:
        try:
            self._signals = self._stack.enter_context(StopSignals())
            if self._jumps is not None:
                self._stack.callback(self._jumps.close)  # the BPF rename word, last
            self._stack.callback(self._report_corrupt)  # after the detach's last reads
            self._stack.callback(self._detach_all)
            if self.child is not None:
                self._seize_child(self.child)
            elif self._vanished:
                self._exited_while("its probes were resolved")
            else:
                assert self.pid is not None
                if self._pystacks is not None:
                    self._pystacks.prepare(self.pid)
                try:
                    self._attach(self.pid)
                except UprobesError:
                    if not ended(self.pid):
                        raise
                    self._exited_while("its probes were placed")
        except BaseException:
            self._stack.close()
            raise
        return self

    def _exited_while(self, what: str) -> None:
        """The -p process ended before the run began: not our error; the run
        is over (what was placed is removed at exit, as after any run)."""
        self._note(f"process {self.pid} exited while {what}")
        self.target_exited = True
        self._done = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    # ------------------------------------------------------------ the loop

    def stop(self) -> None:
        """Stop `run()` at its next wake-up, and wake it (callable from a
        handler, or from any thread)."""
        self._done = True
        self.wake()

    def wake(self) -> None:
        """Make `run()` look at its stop flag now, from any thread: a run
        outside the main thread that blocks in its waits gets `WAKE_SIGNAL`.
        (One that polls sees the flag within `_WAKE_S`; the main thread's
        waits are bounded by its interval timer.) A signal that arrives after
        the run ended is harmless: its handler stays installed."""
        tid = self._waiter
        if tid is not None:
            ptrace.tgkill(os.getpid(), tid, WAKE_SIGNAL)

    def count(self, seconds: float | None) -> None:
        """Only count, for `seconds` (None: until the end; `Counter`, engines/base.py)."""
        self.run(None, seconds)

    def run(self, on_event: Callable[[Event], None] | None,
            duration: float | None = None) -> None:
        """Handle hits (and hand `on_event` an Event for each) until the
        target exits, a stop signal, `stop()`, or `duration` seconds.
        Without `on_event` only `counts` are kept (nothing is fetched)."""
        if on_event is None:
            self.run_hits(None, duration)
            return
        infos = self._infos
        if self.stack_bytes > 0:
            # Walked at the hit, while the maps are the ones the stack was built on.
            self._capturing = True
            try:
                assert self._symbolizer is not None
                self.run_hits(stack_delivery(infos, on_event, self._symbolizer), duration)
            finally:
                self._capturing = False
            return

        def deliver(hits: list[Hit]) -> None:
            for hit in hits:
                on_event(hit_event(hit, infos[hit[4]]))
        self.run_hits(deliver, duration)

    def run_hits(self, on_hits: Callable[[list[Hit]], None] | None,
                 duration: float | None = None) -> None:
        """`run()` handing over `Hit` tuples (here one per call, at the hit,
        while the thread is still stopped)."""
        signals = self._signals
        assert signals is not None, "enter the tracer first"
        if on_hits is not None and self._trapfree in ("count", "time"):
            raise EngineError("a tracer with trap-free counters only counts: run(None)")
        self._on_hits = on_hits
        self._counting = self._count_only if on_hits is None else {}
        deadline = None if duration is None else time.monotonic() + duration
        main = threading.current_thread() is threading.main_thread()
        old = None
        ring_wake = RAW_WAKE_S if self._raw is not None else RING_WAKE_S
        wake = ring_wake if self._trapfree in ("count", "record") else _WAKE_S  # rings to read
        # Every wait is bounded by a signal every `wake` s: SIGALRM in the
        # main thread, else `WAKE_SIGNAL` from a timer of this thread's own
        # (also what `wake()` sends). Without that signal's handler, a thread
        # other than the main one polls.
        blocking = main or wake_handler_installed()
        timer = None
        if main:
            old = signal.signal(signal.SIGALRM, lambda *_: None)
            signal.setitimer(signal.ITIMER_REAL, wake, wake)
        elif blocking:
            timer = ThreadTimer(threading.get_native_id(), WAKE_SIGNAL, wake).__enter__()
            self._waiter = threading.get_native_id()
        try:
            for thread in list(self.threads.values()):
                if thread.stopped:
                    self._resume(thread)
            if self.child is not None and self.child in self.threads:
                pass  # released by the caller; its exec stop places the probes
            threads = self.threads
            # Reports are peeked, not consumed: a hit's stop stays pending until
            # its thread is resumed, so a kill -9 of uprobes mid-hit delivers the
            # SIGTRAP to the in-tracee handler (orphan.py) instead of resuming
            # the thread past its int3 with no signal.
            wait_any = ptrace.peek_any
            consume = ptrace.wait_task
            trap = self._trap
            poll = not blocking
            pause = _FIRST_POLL_S
            rings = self._jumps.rings if self._jumps is not None else []
            drained = time.monotonic()
            while not self._done and signals.signum is None:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                behind = False
                if rings and now - drained >= ring_wake:  # (each read is a heartbeat)
                    behind = self._drain(rings)  # True: more is waiting, come straight back
                    drained = 0.0 if behind else now
                tid, status = wait_any(poll or behind)
                if tid == 0:
                    if poll and not behind:
                        time.sleep(pause)
                        pause = min(pause * 2, wake)  # idle: fewer polls
                    continue
                pause = _FIRST_POLL_S
                if status == ptrace.TRAP_STOP:  # the common stop, a hit: straight to _trap
                    t = threads.get(tid)
                    if t is not None:
                        t.stopped = True
                        if rings:  # what the rings hold happened before this hit
                            self._drain(rings)
                        try:
                            trap(t)
                        except KernelError as e:
                            if e.errno != errno.ESRCH:
                                ptrace.consume_pending(tid)  # else the detach sees it again
                                raise
                            # Killed during its hit (its process died of a signal in
                            # another thread): its exit is reported next.
                        except BaseException:
                            ptrace.consume_pending(tid)
                            raise
                        continue
                if tid < 0:
                    break
                self._handle(tid, consume(tid))
        finally:
            self._waiter = None
            if timer is not None:
                timer.__exit__(None, None, None)
            if main:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
                signal.signal(signal.SIGALRM, old)
            self.signal = signals.signum or None
            if self._jumps is not None:
                self._jumps.fold_into(self.counts)  # what the jumps counted meanwhile
                if self._jumps.rings:
                    self._drain_last()

    def run_render(self, renderer: HitRenderer, duration: float | None = None) -> None:
        """`run_hits` into a renderer; recorded hits of text and JSON lines
        (renderers with `row_lines`) are written from row templates."""
        self._shaped = ShapedLines(renderer) if isinstance(renderer, LineRenderer) else None
        raw = renderer if isinstance(renderer, RawSink) else None
        self._raw = raw
        try:
            self.run_hits(renderer.hits, duration)
        finally:
            self._shaped = None
            self._raw = None
            if raw is not None and self._recorder is not None:
                clock = self._recorder.clock
                clock.refresh()  # the rate over the whole run, for every record of it
                raw.sites(self._raw_sites(), clock.rate())

    def _raw_sites(self) -> list[RawSite]:
        """What each probe id of the rings stands for (RawSink.sites)."""
        assert self._recorder is not None
        out = []
        for site in self._recorder.sites:
            ret = site.func is not None
            handlers = [c.ret_handler if ret else c.handler
                        for c in site.probe.consumers]  # type: ignore[attr-defined]
            out.append(RawSite(tuple(self._ours[h] for h in handlers if h in self._ours),
                               site.recipe, site.ip, site.file_base, site.func))
        return out


def _precheck(p: ResolvedProbe) -> str | None:
    """Whether the probed instruction can run out of line at all (decided from
    the file, before anything runs): None, or why not."""
    assert isinstance(p.key, InodeKey)
    try:
        original = breakpoints.original_bytes(p.path, p.key.dev, p.key.ino, p.file_offset)
        probe_addr = 0x10000000 + p.file_offset
        relocate.plan(original, probe_addr, probe_addr + 0x100000)
    except (PlacementRefused, relocate.UnsupportedInstruction) as e:
        return str(e)
    return None


def _vector_reader(tid: int) -> Callable[[int], int]:
    """The low 8 bytes of the stopped thread's xmmN, its SSE registers read once."""
    got: list[bytes] = []

    def low(n: int) -> int:
        if not got:
            got.append(ptrace.xmm_registers(tid))
        return int.from_bytes(got[0][16 * n:16 * n + 8], "little")
    return low
