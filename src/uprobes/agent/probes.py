"""The agent's probes as a `Session`: each configured probe line with a
handler that counts its hits into `Metrics`, and entry/return lines of one
function paired into calls whose durations go into its histogram.

Labels of a hit: the probe's name (as `trace --json` shows it), the
executable of the process (its /proc/PID/exe, read once per process and
kept in a bounded table: `unknown` when the process is gone before its
first hit is read), the task's comm, then the configured fetched values.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import replace

from uprobes.analysis.calls import RA_ARG, SP_ARG, CallPairer, past_entry
from uprobes.lang.ast import ProbeKind, ProbeSpec, PyTarget
from uprobes.lang.render import render
from uprobes.model.event import Event
from uprobes.session import Session

from .config import AgentConfig, AgentProbe, check_probe
from .metrics import Labels, Metrics

UNKNOWN = "unknown"  # the executable of a process gone before it was read

MAX_PROCESSES = 4096
"""Executables remembered (one per process seen), the oldest forgotten first."""

MAX_OPEN_CALLS = 65536
"""(thread, function) pairs with calls open; past it the open calls are
given up (counted as unpaired) so threads that died mid-call cannot grow
memory."""


class Executables:
    """(pid, comm) -> the file the process runs (an exec changes both).

    Filled as processes exec (`learn`, from the kernel's process events, while
    the process surely runs) and otherwise at a process's first hit (by then a
    short-lived one may be gone: `unknown`). Bounded: the oldest go first."""

    def __init__(self, limit: int = MAX_PROCESSES) -> None:
        self.limit = limit
        self._seen: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()

    def learn(self, pid: int) -> None:
        """Process `pid` has just exec'd: note what it runs."""
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            with open(f"/proc/{pid}/comm", errors="surrogateescape") as f:
                comm = f.read().rstrip("\n")
        except OSError:
            return
        self._add((pid, comm), exe)

    def _add(self, key: tuple[int, str], exe: str) -> None:
        with self._lock:
            seen = self._seen
            seen.pop(key, None)
            if len(seen) >= self.limit:
                del seen[next(iter(seen))]
            seen[key] = exe

    def __call__(self, pid: int, comm: str) -> str:
        exe = self._seen.get((pid, comm))
        if exe is None:
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                exe = UNKNOWN
            self._add((pid, comm), exe)
        return exe


def missing_file(probe: AgentProbe) -> str | None:
    """The file `probe` names by path when it does not exist (yet), else None
    (a short name, or a name looked up on PATH, is the resolver's to find)."""
    spec = check_probe(probe)
    path = getattr(spec.target, "path", None)
    if isinstance(path, str) and "/" in path and not os.path.exists(path):
        return path
    return None


def function_key(spec: ProbeSpec) -> str:
    """What an entry line and a return line of the same function share."""
    return render(replace(spec, kind=ProbeKind.ENTRY, args=(), event=None, text=""))


STACK_BYTES = 8192
"""Stack copied at each hit when a probe counts stacks (see `uprobes stacks`)."""

OnCall = Callable[[Event, Event], object]
"""Given each call timed: its entry event and its return event."""


def build_session(config: AgentConfig, metrics: Metrics, executables: Executables,
                  note: Callable[[str], object], on_call: OnCall | None = None,
                  on_stack: Callable[[Event], object] | None = None) -> Session:
    """A session whose handlers count into `metrics` (and hand each call timed
    to `on_call`); the metrics keep the series of the probes still configured
    (unchanged ones keep their counts)."""
    stacks = any(p.stacks for p in config.probes)
    session = Session(config.engine, note=note, stack_bytes=STACK_BYTES if stacks else 0)
    specs = [(probe, check_probe(probe)) for probe in config.probes]
    returns = {function_key(spec) for _, spec in specs if spec.is_return}
    entries: dict[str, AgentProbe] = {}
    for probe, spec in specs:
        if not spec.is_return and function_key(spec) in returns:
            entries.setdefault(function_key(spec), probe)
    metrics.keep_only({p.key: p.labels for p in config.probes})
    pairer = CallPairer()
    for probe, spec in specs:
        fkey = function_key(spec)
        timed_entry = not spec.is_return and entries.get(fkey) is probe
        timed_return = spec.is_return and fkey in entries
        line = probe.line
        if timed_entry and not isinstance(spec.target, PyTarget):
            # (a py: function's probes fetch the frame that pairs its calls)
            line += f" {SP_ARG}=%sp:u64 {RA_ARG}=+0(%sp):x64"
        handler = _handler(probe, metrics, executables, pairer, timed_entry,
                           entries[fkey] if timed_return else None, on_call)
        if timed_entry:
            handler = _placed_first(handler, pairer, session)
        if probe.stacks and on_stack is not None:
            handler = _and_stack(handler, on_stack)
        if probe.executable is not None:
            handler = _only_in(probe.executable, handler, executables, metrics)
        session.probe(line, handler, comm=list(probe.comm) or None)
    return session


def _placed_first(handler: Callable[[Event], None], pairer: CallPairer,
                  session: Session) -> Callable[[Event], None]:
    """`handler` for a timed entry, which first tells `pairer` where the
    probes were placed (an entry after an unoptimized function's prologue,
    where its DWARF arguments are, pairs by its function's address)."""
    placed: list[bool] = []

    def placed_first(ev: Event) -> None:
        if not placed:  # the probes are placed by the first hit
            placed.append(True)
            pairer.past_entry.update(past_entry(session.probes))
        handler(ev)
    return placed_first


def _and_stack(handler: Callable[[Event], None],
               on_stack: Callable[[Event], object]) -> Callable[[Event], None]:
    def and_stack(ev: Event) -> None:
        handler(ev)
        on_stack(ev)
    return and_stack


def _only_in(exe: str, handler: Callable[[Event], None], executables: Executables,
             metrics: Metrics) -> Callable[[Event], None]:
    """`handler` for the hits in processes running `exe`; a hit whose process
    was gone before what it ran could be read is counted as dropped
    (`executable_unknown`), not silently left out."""
    def only_in(ev: Event) -> None:
        running = executables(ev.pid, ev.comm)
        if running == exe:
            handler(ev)
        elif running == UNKNOWN:
            metrics.drop("executable_unknown")
    return only_in


def _handler(probe: AgentProbe, metrics: Metrics, executables: Executables,
             pairer: CallPairer, timed_entry: bool, timed_by: AgentProbe | None,
             on_call: OnCall | None) -> Callable[[Event], None]:
    key = probe.key
    hit = metrics.hit

    def labels_of(p: AgentProbe) -> Callable[[Event], Labels]:
        extra = p.labels

        def labels(ev: Event) -> Labels:
            values = [str(ev.args.get(n)) for n in extra]
            return (ev.probe, executables(ev.pid, ev.comm), ev.comm, *values)
        return labels

    labels = labels_of(probe)
    if timed_entry:
        def on_entry(ev: Event) -> None:
            hit(key, labels(ev))
            if pairer.threads >= MAX_OPEN_CALLS:
                before = pairer.abandoned
                pairer.give_up()
                metrics.unpaired += pairer.abandoned - before
            pairer.entry(ev)
        return on_entry
    if timed_by is not None:
        entry_key = timed_by.key
        entry_labels = labels_of(timed_by)

        def on_return(ev: Event) -> None:
            hit(key, labels(ev))
            before = pairer.unpaired_returns + pairer.abandoned
            start = pairer.ret(ev)
            if start is not None:
                metrics.call(entry_key, entry_labels(start), ev.ts_ns - start.ts_ns)
                if on_call is not None:
                    on_call(start, ev)
            missed = pairer.unpaired_returns + pairer.abandoned - before
            if missed:
                metrics.unpaired += missed
        return on_return
    return lambda ev: hit(key, labels(ev))
