"""`uprobes count`: hits per probe, counted in the kernel with no records."""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
from typing import TextIO

from uprobes.commands.resolve import parse_specs
from uprobes.commands.selection import (
    add_duration_argument,
    add_filter_arguments,
    add_selection_arguments,
    check_selection,
    choose_engine,
    hit_filter,
    uretprobe_note,
)
from uprobes.engines.kernel.counting import KernelCounter, plan_filter, refusal_note
from uprobes.engines.launch import Launched, finish, launch
from uprobes.engines.ptrace.tracer import PtraceTracer
from uprobes.engines.signals import StopSignals
from uprobes.errors import ProcessError, UsageError
from uprobes.model.probe import ResolvedProbe
from uprobes.render.counts import write_count_json, write_count_table
from uprobes.resolve.resolver import Resolver
from uprobes.sys.pidfd import watch_process

NAME = "count"
HELP = "count hits per probe (system-wide, in a process, or in a command it starts)"
EXAMPLES = [
    "uprobes count 'libc:str*' -- /bin/ls /",
    "uprobes count --json 'libc:malloc' 'libc:free' -- /usr/bin/python3.11 -c pass",
    "uprobes count 'libc:malloc%return' -i 0.05 -- /usr/bin/python3.11 -c "
    "'import time; time.sleep(0.2)'",
    "uprobes count 'usdt:/usr/bin/python3.11:python:function__entry' "
    "-- /usr/bin/python3.11 -c 'import json'",
    "uprobes count --duration 0.5 'libc:getpid'  # system-wide for half a second",
    "uprobes count --if 'size > 4096' 'libc:malloc size=%di:u64' -- /usr/bin/python3.11 -c pass",
]

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_selection_arguments(p)
    add_filter_arguments(p)
    p.add_argument("-i", "--interval", type=float, metavar="SECONDS",
                   help="also print the counts of each interval of SECONDS")
    add_duration_argument(p)


def _check(args: argparse.Namespace) -> None:
    check_selection(args)
    for opt in ("interval", "duration"):
        value = getattr(args, opt)
        if value is not None and value <= 0:
            raise UsageError(f"--{opt} must be a positive number of seconds")


def _pidfd(pid: int) -> int:
    pidfd = watch_process(pid)
    if pidfd < 0:
        raise ProcessError(f"no process {pid}")
    return pidfd


def run(args: argparse.Namespace, out: TextIO) -> int:
    _check(args)
    resolver = Resolver(pid=args.pid, force=args.force, uretprobe=args.uretprobe)
    probes = resolver.resolve_all(parse_specs(args.specs))
    args.hit_filter = hit_filter(args, probes)
    notes = [note for p in probes for note in p.notes]
    for note in notes[:3]:
        sys.stderr.write(f"uprobes: note: {note}\n")
    if len(notes) > 3:  # a glob over libc: one note per IFUNC would bury the counts
        sys.stderr.write(f"uprobes: note: ... and {len(notes) - 3} more notes "
                         "(`uprobes resolve` shows them all)\n")
    uretprobe_note(probes, sys.stderr)
    sink = open(args.output, "w") if args.output else out
    try:
        if choose_engine(args, probes) == "ptrace":
            return _count_ptrace(args, probes, sink)
        if args.hit_filter is not None:
            # No records to test here: counting happens in the kernel alone,
            # and what it cannot count is said before anything starts.
            per_process = args.pid is not None or bool(args.argv_command)
            plan_filter(args.hit_filter, [-1] if per_process else None)
        # From here a stop signal ends the counting, not us (StopSignals); after
        # it, CommandSignals only notes one (see uprobes.engines.signals).
        with StopSignals() as stop:
            return _count(args, probes, sink, stop)
    finally:
        if sink is not out:
            sink.close()


def _count(args: argparse.Namespace, probes: list[ResolvedProbe], sink: TextIO,
           stop: StopSignals) -> int:
    launched: Launched | None = None
    if args.argv_command:
        launched = launch(args.argv_command)
        pids: list[int] | None = [launched.pid]
    else:
        pids = [args.pid] if args.pid is not None else None
    watch = -1
    try:
        if pids is not None:
            watch = _pidfd(pids[0])
        with KernelCounter(probes, pids=pids, all_threads=launched is None,
                           force=args.force, hit_filter=args.hit_filter) as counter:
            if counter.refused:
                sys.stderr.write("uprobes: note: "
                                 + refusal_note(counter.refused, counter.total) + "\n")
            if counter.exited is not None:
                _note(f"process {counter.exited} exited while its probes were placed")
            if launched is not None:
                launched.release()
            elif counter.exited is None:
                where = f"process {pids[0]}" if pids else \
                    f"in process{'es' if len(counter.pids) > 1 else ''} " \
                    f"{', '.join(map(str, counter.pids))} (named by the filter)" \
                    if counter.pids is not None else "system-wide"
                sys.stderr.write(f"uprobes: counting {len(counter.placed)} probes {where}; "
                                 "Ctrl-C to stop\n")
                sys.stderr.flush()
            started = time.monotonic()
            _loop(args, counter, sink, stop, watch)
            counter.disable()
            final = counter.counts()
            if launched is None:  # the table first: detaching many probes takes a while
                _final(args, sink, final)
        if launched is not None:
            # A stop signal ends the counting, never the command: it runs to its
            # end (--duration ends both), and the counts are the last lines,
            # after its own output.
            status = finish(launched, started, args.duration, _note)
            _final(args, sink, final)
            return status
    except BaseException:
        if launched is not None and launched._go >= 0:
            launched.abort()
        raise
    finally:
        if watch >= 0:
            os.close(watch)
    return 0


def _count_ptrace(args: argparse.Namespace, probes: list[ResolvedProbe], sink: TextIO) -> int:
    """Counting on the ptrace engine: its loop is the wait for stops, run in
    slices of an interval (or the whole duration)."""
    launched = launch(args.argv_command) if args.argv_command else None
    tracer = None
    try:
        tracer = PtraceTracer(probes, pid=args.pid, child=launched.pid if launched else None,
                              force=args.force, hit_filter=args.hit_filter,
                              trapfree=not args.no_trapfree,
                              note=_note)
        with tracer:
            if launched is not None:
                launched.release()
            else:
                sys.stderr.write(f"uprobes: counting {len(tracer.counts)} probes in process "
                                 f"{args.pid}; Ctrl-C to stop\n")
                sys.stderr.flush()
            started = time.monotonic()
            deadline = started + args.duration if args.duration else None
            previous: dict[str, int] = {}
            while True:
                now = time.monotonic()
                slices = [t - now for t in (deadline,) if t is not None]
                if args.interval:
                    slices.append(args.interval)
                tracer.run(None, max(0.0, min(slices)) if slices else None)
                if args.interval:
                    current = dict(tracer.counts)
                    _interval(args, sink, {k: v - previous.get(k, 0) for k, v in current.items()})
                    previous = current
                if tracer.target_exited or tracer.signal is not None or (
                        deadline is not None and time.monotonic() >= deadline):
                    break
            final = dict(tracer.counts)
        if launched is None:
            _final(args, sink, final)
            return 0
        if tracer.child_status is not None:
            launched.status = tracer.child_status
        status = finish(launched, started, args.duration, _note)
        _final(args, sink, final)
        return status
    except BaseException:
        if launched is not None:
            if tracer is not None and tracer.child_status is not None:
                launched.status = tracer.child_status
            if launched._go >= 0:
                launched.abort()
        raise


def _note(text: str) -> None:
    sys.stderr.write(f"uprobes: note: {text}\n")


def _final(args: argparse.Namespace, sink: TextIO, final: dict[str, int]) -> None:
    if args.json:
        write_count_json(sink, final)
    else:
        write_count_table(sink, final)
    sink.flush()


def _loop(args: argparse.Namespace, counter: KernelCounter, sink: TextIO, stop: StopSignals,
          watch: int) -> None:
    """Until the watched process ends, a stop signal, or --duration; with -i,
    print each interval's counts."""
    start = time.monotonic()
    deadline = start + args.duration if args.duration else None
    next_tick = start + args.interval if args.interval else None
    # Counters start at zero when enabled, before a launched command runs its
    # first instruction: the first interval counts from there. (Reading a
    # baseline here instead lost the first interval's hits whenever we were
    # scheduled out after releasing the command, about 1 run in 3 on a busy
    # machine: a short command's hits all landed in the baseline.)
    previous: dict[str, int] = {}
    fds = [stop.fileno()] + ([watch] if watch >= 0 else [])
    while not stop.stopped:
        now = time.monotonic()
        if next_tick is not None and now >= next_tick:
            current = counter.counts()
            delta = {k: v - previous.get(k, 0) for k, v in current.items()}
            previous = current
            _interval(args, sink, delta)
            next_tick += args.interval * max(1, int((now - next_tick) // args.interval) + 1)
        if deadline is not None and now >= deadline:
            return
        waits = [t - now for t in (next_tick, deadline) if t is not None]
        ready, _, _ = select.select(fds, [], [], max(0.0, min(waits)) if waits else None)
        if watch in ready:
            return


def _interval(args: argparse.Namespace, sink: TextIO, delta: dict[str, int]) -> None:
    stamp = time.strftime("%H:%M:%S")
    if args.json:
        from uprobes.render.json import write_json
        write_json(sink, {"time": stamp, "interval_s": args.interval, "counts": delta})
    else:
        write_count_table(sink, delta, title=f"{stamp} (last {args.interval:g}s)")
        sink.write("\n")
    sink.flush()
