"""The agent on the ptrace engine (`-e ptrace`, `engine = "ptrace"`): each
function of an entry and a return line timed, and every other line's hits
counted, inside every process that runs the probed executable, from the
moment it starts until it exits.

The kernel's process events (processes.py, the netlink process connector)
tell of each exec as it happens (without them, or once they ended, /proc is
looked at every RESCAN_S; after the kernel dropped some, once); a process
whose /proc/PID/exe is a probed executable (the probe's file, or its
`executable`) and whose comm is one a probe asks for (any, if none) gets a
tracer of its own, in a thread of the agent's: the ptrace engine's trap-free
timing (trapfree="time"), jumps in the program whose code keeps each
thread's histograms in shared memory, and its trap-free counters for the
lines counted (a line that cannot be trap-free is left out with a note: no
int3, no stop per hit). The tracer's thread blocks until the process does
something the tracer must see (a clone, an exec, its exit), then detaches
when it exits or when the agent ends. Processes running when the agent
starts are found by one scan of /proc. At each export the histograms and
counters are read from the program's shared memory (no ptrace request, no
stop of the program).

A fork of a followed process is followed by its parent's tracer (ptrace
attaches it at the fork) and counts into the parent's series; if it outlives
its parent, it is followed anew by a tracer of its own. Series carry
no pid: processes of one executable and comm add into one series, and one
that exits leaves its calls in it, so the counts never go down.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from uprobes.analysis.histogram import Histogram
from uprobes.elf.image import ElfImage
from uprobes.engines.base import Request, Timer, open_orphan_watch, open_timer
from uprobes.engines.ptrace.permissions import tracer_of
from uprobes.errors import EngineError, ProcessError, UprobesError, UsageError
from uprobes.lang.ast import ProbeSpec
from uprobes.model.event import display_names
from uprobes.model.probe import ResolvedProbe
from uprobes.resolve.resolver import Resolver

from .config import AgentConfig, AgentProbe, check_probe
from .metrics import LATENCY_BOUNDS_NS, Labels, LatencySeries, Metrics
from .probes import function_key

MAX_PROCESSES = 64
"""Processes followed at once; past it a process is not followed (one note)."""

MAX_NOTES = 1000
"""Distinct tracer notes remembered (each said once); past it, said again."""

WAKE_S = 0.2
"""How often the manager thread looks whether it should end."""

RESCAN_S = 2.0
"""Without the kernel's process events: how often /proc is looked at for
processes started since (one listdir, and a stat per process)."""

END_S = 120.0
"""The longest the tracers may take to detach once the agent ends."""

_Calls = dict[str, dict[Labels, LatencySeries]]
_Hits = dict[str, dict[Labels, int]]


@dataclass(frozen=True)
class _Function:
    """A function timed: its entry line and its return line."""

    entry: AgentProbe
    ret: AgentProbe


def _plan(config: AgentConfig) -> tuple[list[_Function], list[AgentProbe]]:
    """The functions `config` times (an entry and a return line each) and the
    lines it counts (the others); what the ptrace engine's agent cannot do
    is refused in one line."""
    specs = [(p, check_probe(p)) for p in config.probes]
    entries: dict[str, AgentProbe] = {}
    returns: dict[str, AgentProbe] = {}
    for probe, spec in specs:
        if probe.labels or probe.stacks:
            raise UsageError(f"{probe.line}: on the ptrace engine the hits are counted and the "
                             "calls timed in the program, which fetches nothing: leave out "
                             f"{'labels' if probe.labels else 'stacks'}")
        (returns if spec.is_return else entries).setdefault(function_key(spec), probe)
    functions = [_Function(entries[k], returns[k]) for k in entries if k in returns]
    paired = {id(f.entry) for f in functions} | {id(f.ret) for f in functions}
    return functions, [p for p, _ in specs if id(p) not in paired]


class _Target:
    """The processes a line is placed in (a function timed, or a line
    counted): those running `exe`."""

    def __init__(self, line: AgentProbe, function: _Function | None) -> None:
        self.line = line
        self.function = function
        spec = check_probe(line)
        self.specs: list[ProbeSpec] = [spec] if function is None else [
            spec, check_probe(function.ret)]
        exe = line.executable
        if exe is None:
            probes = Resolver(uretprobe=False).resolve_all([spec])
            exe = probes[0].path
            with ElfImage.open(exe) as image:
                if image.elf_type != "EXEC" and not image.is_pie:
                    raise UsageError(f"{line.line}: {exe} is a library: on the "
                                     "ptrace engine say which program's processes to follow "
                                     "(executable = PATH in the config's [[probe]])")
        self.exe = os.path.realpath(exe)
        try:
            st = os.stat(self.exe)
        except OSError as e:
            raise UsageError(f"{line.line}: cannot read {self.exe}: "
                             f"{e.strerror}") from None
        self.ident = (st.st_dev, st.st_ino)
        self.comm = line.comm


@dataclass(frozen=True)
class _Named:
    """A function timed in one process, and its lines' probe labels there
    (display names, as the kernel engine's events give them)."""

    function: _Function
    entry: str
    ret: str


def _named(targets: list[_Target],
           probes: list[ResolvedProbe]) -> tuple[dict[str, _Named], dict[str, AgentProbe]]:
    """Each timed function's entry display name -> it and its labels; each
    counted probe's display name -> its line."""
    names = list(zip(display_names(probes), probes))
    timed, counted = {}, {}
    for t in targets:
        f = t.function
        if f is None:
            counted.update({n: t.line for n, p in names if p.spec.text == t.line.line})
            continue
        entry = next((n for n, p in names if not p.is_return and p.spec.text == f.entry.line),
                     None)
        ret = next((n for n, p in names if p.spec.text == f.ret.line), None)
        if entry is not None:
            timed[entry] = _Named(f, entry, ret or entry)
    return timed, counted


@dataclass
class _Process:
    """A process followed: its tracer (once attached) and what labels its calls."""

    pid: int
    exe: str
    comm: str
    targets: list[_Target]
    timer: Timer | None = None  # set once its probes are in place
    thread: threading.Thread | None = None
    settled: threading.Event = field(default_factory=threading.Event)  # placed, or given up
    names: dict[str, _Named] = field(default_factory=dict)  # a timed function's, by name
    counted: dict[str, AgentProbe] = field(default_factory=dict)  # display name -> line


def _targets(config: AgentConfig) -> list[_Target]:
    functions, counted = _plan(config)
    return [_Target(f.entry, f) for f in functions] + [_Target(line, None) for line in counted]


def _running(pid: int, targets: list[_Target]) -> tuple[str, str, list[_Target]] | None:
    """(executable, comm, the targets it runs) of process `pid`; None if it
    is gone or a kernel thread."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/comm", errors="surrogateescape") as f:
            comm = f.read().rstrip("\n")
    except OSError:
        return None
    return exe, comm, [t for t in targets if t.ident == (st.st_dev, st.st_ino)
                       and (not t.comm or comm in t.comm)]


def check(config: AgentConfig) -> None:
    """Raise what following `config` would raise, with nothing placed: a line
    the engine refuses, or one that does not resolve in a process running its
    executable now (where each tracer resolves its lines; with none running,
    only the first). So a reload that would fail is refused while the probes
    before it run on, not after they were taken out."""
    targets = _targets(config)
    for name in os.listdir("/proc"):
        if not targets:
            return
        if not name.isdigit() or int(name) == os.getpid():
            continue
        running = _running(int(name), targets)
        here = running[2] if running is not None else []
        if here:
            try:
                Resolver(pid=int(name), uretprobe=False).resolve_all(
                    [s for t in here for s in t.specs])
            except ProcessError:
                continue  # it ended meanwhile: another process may tell
            targets = [t for t in targets if t not in here]


class Following:
    """The processes of the probed executables, followed while running (the
    interface of counting.CountRun: `placed`, `ended`, `error`, `lost`,
    `end()`); the metrics read their hits and calls live (`Metrics.live_timed`)."""

    def __init__(self, config: AgentConfig, metrics: Metrics, note: Callable[[str], object],
                 on_ready: Callable[[AgentConfig], object]) -> None:
        self.config = config
        self.metrics = metrics
        self.note = note
        self.on_ready = on_ready
        self.error: BaseException | None = None
        self.placed = False
        self.lost = 0
        self._targets = _targets(config)
        self._lock = threading.Lock()  # the live processes against a scrape
        self._live: dict[int, _Process] = {}
        self._hits: _Hits = {}  # of processes gone
        self._calls: _Calls = {}
        self._pids: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._ending = threading.Event()
        self._limit_noted = False
        self._failed_noted = False  # a process not followed (its tracer failed) was said
        self._noted: set[str] = set()
        self._orphans = open_orphan_watch()  # one watcher for every process's tracer
        metrics.keep_only({p.key: p.labels for p in config.probes})
        metrics.live_timed = self._read
        metrics.live_followed = lambda: sum(p.timer is not None for p in list(self._live.values()))
        self._thread = threading.Thread(target=self._main, name="uprobes-follow", daemon=True)
        self._rescan = False
        self._missed = threading.Event()  # process events were dropped: scan /proc once

    def begin(self, events: bool = True) -> None:
        """Scan /proc, then follow what `consider` is given (call it first
        from now on: a process that starts meanwhile is then not missed).
        `events`: the kernel's process events reach `consider`; without
        them, /proc is scanned again every RESCAN_S."""
        self._rescan = not events
        self._thread.start()

    # ------------------------------------------------------------ processes

    def missed(self, forever: bool) -> None:
        """The kernel dropped process events (`forever`: they ended): /proc
        is scanned for what they would have told (from any thread), once,
        or every RESCAN_S from now on."""
        if forever:
            self._rescan = True
        self._missed.set()

    def consider(self, pid: int) -> None:
        """A process has just exec'd or been forked (the process events'
        thread, which must never wait: the pid is queued for the manager)."""
        self._pids.put(pid)

    def _main(self) -> None:
        try:
            self._scan()  # those already running
            deadline = time.monotonic() + END_S  # in place in those, then ready
            for proc in list(self._live.values()):
                proc.settled.wait(max(0.0, deadline - time.monotonic()))
            self.placed = True
            self.metrics.placed = len(self.config.probes)
            self.on_ready(self.config)
            scanned = time.monotonic()
            while not self._ending.is_set():
                if self._missed.is_set() or (
                        self._rescan and time.monotonic() - scanned >= RESCAN_S):
                    self._missed.clear()  # before: what is dropped meanwhile is scanned for
                    self._scan()
                    scanned = time.monotonic()
                try:
                    pid = self._pids.get(timeout=WAKE_S)
                except queue.Empty:
                    continue
                self._consider(pid)
        except BaseException as e:  # handed to the main thread (`ended`)
            self.error = e

    def _scan(self) -> None:
        for name in os.listdir("/proc"):
            if name.isdigit():
                self._consider(int(name))

    def _consider(self, pid: int) -> None:
        """Follow `pid` if it runs a probed executable (an exec or a new
        process; a fork our tracer already follows is left to it)."""
        if pid == os.getpid() or self._ending.is_set():
            return
        followed = self._live.get(pid)
        if followed is not None:
            self._recheck(followed)
            return
        running = _running(pid, self._targets)
        if running is None or not running[2]:
            return  # gone, a kernel thread, or none of ours
        exe, comm, targets = running
        tracer = tracer_of(pid)
        if tracer:  # a fork that a tracer of ours follows already, or someone else's
            if not os.path.exists(f"/proc/self/task/{tracer}"):
                self.note(f"process {pid} ({exe}) is traced by process {tracer} already: "
                          "not followed (one tracer per process)")
            return
        if len(self._live) >= MAX_PROCESSES:
            self.metrics.drop("process_limit")
            if not self._limit_noted:
                self._limit_noted = True
                self.note(f"{MAX_PROCESSES} processes followed: more are not "
                          "(uprobes_dropped_total{reason=\"process_limit\"} counts them)")
            return
        proc = _Process(pid, exe, comm, targets)
        proc.thread = threading.Thread(target=self._follow, args=(proc,),
                                       name=f"uprobes-follow-{pid}", daemon=True)
        with self._lock:
            self._live[pid] = proc
        proc.thread.start()

    @staticmethod
    def _recheck(proc: _Process) -> None:
        """A followed process exec'd: if it runs no probed program now, its
        tracer lets it go (a tracer costs a program each clone and signal;
        its fork children that exec are let go by the tracer: `_runs`)."""
        if not _runs(proc.pid, proc.targets) and os.path.exists(f"/proc/{proc.pid}") \
                and proc.timer is not None:
            proc.timer.stop()

    def _follow(self, proc: _Process) -> None:
        """The tracer of one process, in its own thread (every ptrace request
        of a tracer comes from the thread that attached)."""
        final: _Read = ({}, {})
        try:
            probes = Resolver(pid=proc.pid, uretprobe=False).resolve_all(
                [s for t in proc.targets for s in t.specs])
            proc.names, proc.counted = _named(proc.targets, probes)
            exited = f"process {proc.pid} exited"  # what a followed process does: no note

            def note(text: str) -> None:
                if text != exited:
                    self._note_once(text)
            timer = open_timer(Request(probes, "ptrace", pid=proc.pid, trapfree=True,
                                       note=note, orphans=self._orphans,
                                       counted=frozenset(proc.counted), int3s=False,
                                       let_go=lambda pid: not _runs(pid, proc.targets)))
            if timer is None:
                raise EngineError("the ptrace engine cannot time these calls")
            with timer:
                with self._lock:
                    proc.timer = timer
                    ending = self._ending.is_set()
                proc.settled.set()
                if not ending:
                    timer.count(None)  # until it exits, or `end()` stops it
                # Its children outlive its tracer (a daemon's parent exits at
                # once): each gets a tracer of its own, as a new process would.
                left = timer.traced_processes() - {proc.pid}
            final = _reading(timer)
            if not self._ending.is_set():
                for pid in sorted(left):
                    self.consider(pid)
        except (UprobesError, OSError) as e:  # this process's, never the whole agent's
            # Short-lived processes fail so by the thousand (gone before the
            # attach): counted, and said for the first only.
            self.metrics.drop("not_followed")
            with self._lock:
                first, self._failed_noted = not self._failed_noted, True
            if first:
                self.note(f"process {proc.pid} ({proc.exe}) not followed: {e} (more are not "
                          "said: uprobes_dropped_total{reason=\"not_followed\"} counts them)")
        finally:
            with self._lock:  # its calls move from live to kept in one step
                self._live.pop(proc.pid, None)
                _add(self._hits, self._calls, proc, *final)
            proc.settled.set()

    def _note_once(self, text: str) -> None:
        """A tracer's note, once: each process's tracer says the same things
        (how many probes are trap-free), and processes come by the thousand."""
        with self._lock:
            if text in self._noted:
                return
            if len(self._noted) < MAX_NOTES:
                self._noted.add(text)
        self.note(text)

    # ------------------------------------------------------------ metrics

    def _read(self) -> tuple[_Hits, _Calls]:
        with self._lock:
            hits: _Hits = {k: dict(v) for k, v in self._hits.items()}
            calls: _Calls = {k: {lb: s.copy() for lb, s in v.items()}
                             for k, v in self._calls.items()}
            for proc in list(self._live.values()):
                if proc.timer is not None:
                    _add(hits, calls, proc, *_reading(proc.timer))
        return hits, calls

    # ------------------------------------------------------------ the end

    @property
    def ended(self) -> bool:
        return not self._thread.is_alive()

    def end(self) -> None:
        """Detach from every process (each tracer in its thread, all at once)
        and keep what they timed in the metrics; bounded by END_S."""
        self._ending.set()
        deadline = time.monotonic() + END_S
        self._thread.join(END_S)
        while True:
            with self._lock:
                live = list(self._live.values())
            for proc in live:
                if proc.timer is not None:
                    proc.timer.stop()
            if not live or time.monotonic() >= deadline:
                break
            for proc in live:
                if proc.thread is not None:
                    proc.thread.join(0.05)
        self.metrics.live_timed = None
        self.metrics.live_followed = None
        self.metrics.placed = 0
        if live:  # the watcher stays: it undoes what is theirs when the agent exits
            raise EngineError(f"processes {', '.join(str(p.pid) for p in live)} were not "
                              f"detached within {END_S:g} s")
        self._orphans.close()
        self.metrics.add_hits(self._hits)
        self.metrics.add_calls(self._calls)


def _runs(pid: int, targets: list[_Target]) -> bool:
    """Whether process `pid` runs the executable of one of `targets` (gone:
    False)."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return False
    return any(t.ident == (st.st_dev, st.st_ino) for t in targets)


_Read = tuple[dict[str, Histogram], dict[str, int]]


def _reading(timer: Timer) -> _Read:
    """A tracer's histograms and counts, by display name (from any thread)."""
    return timer.latencies().histograms, timer.live_counts()


def _add(hits: _Hits, calls: _Calls, proc: _Process, histograms: dict[str, Histogram],
         counts: dict[str, int]) -> None:
    """Add a process's calls (`histograms`) and hits (`counts`), by display
    name, to the series of its lines."""
    for name, n in counts.items():
        line = proc.counted.get(name)
        if line is not None and n:
            mine = hits.setdefault(line.key, {})
            labels = (name, proc.exe, proc.comm)
            mine[labels] = mine.get(labels, 0) + n
    for name, h in histograms.items():
        named = proc.names.get(name)
        if named is None or not h.count:
            continue
        function = named.function
        for probe, label in ((function.entry, named.entry), (function.ret, named.ret)):
            mine = hits.setdefault(probe.key, {})
            labels = (label, proc.exe, proc.comm)
            mine[labels] = mine.get(labels, 0) + h.count
        labels = (named.entry, proc.exe, proc.comm)
        have = calls.setdefault(function.entry.key, {}).get(labels)
        if have is None:
            calls[function.entry.key][labels] = _series(h)
        else:
            have.merge(_series(h))


def _series(h: Histogram) -> LatencySeries:
    """The agent's buckets of a histogram: each fine bucket's calls go where
    its middle falls (monotonic: a bucket of a later read never has fewer)."""
    out = LatencySeries(count=h.count, sum_ns=h.total, min_ns=h.min or 0, max_ns=h.max)
    for lo, hi, n in h.spans():
        out.buckets[bisect_left(LATENCY_BOUNDS_NS, (lo + hi) // 2)] += n
    return out
