"""`uprobes count`: hits per probe, with no records (the engine's `Counter`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from uprobes.analysis.keyed import TASK_KEYS, Aggregate, KeyedCounts
from uprobes.commands.resolve import parse_specs
from uprobes.commands.selection import (
    add_duration_argument,
    add_filter_arguments,
    add_selection_arguments,
    check_selection,
    command_argv,
    hit_filter,
    run_selected,
    uretprobe_note,
)
from uprobes.engines.base import (
    Counter,
    Request,
    keyed_problem,
    open_counter,
    open_keyed_counter,
)
from uprobes.engines.launch import finish, launch
from uprobes.errors import UsageError
from uprobes.model.event import Event
from uprobes.model.probe import ResolvedProbe
from uprobes.render.counts import (
    write_count_json,
    write_count_table,
    write_keyed_json,
    write_keyed_table,
)
from uprobes.resolve.resolver import Resolver
from uprobes.session import Session

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
    "uprobes count -e ptrace --by size 'libc:malloc size=%di:u64' -- /usr/bin/python3.11 -c pass",
    "uprobes count -e ptrace --by tid --value size 'libc:malloc size=%di:u64' "
    "-- /usr/bin/python3.11 -c pass",
]

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_selection_arguments(p)
    add_filter_arguments(p)
    p.add_argument("-i", "--interval", type=float, metavar="SECONDS",
                   help="also print the counts of each interval of SECONDS")
    p.add_argument("--by", metavar="KEY",
                   help="count per KEY: tid, pid, comm, or the name of a fetcharg every SPEC "
                        "has (e.g. 'libc:malloc size=%%di:u64' --by size); -e ptrace counts "
                        "in the program a register or stack value (at most 4096 keys a probe, "
                        "hits beyond are counted and said), other keys from events")
    p.add_argument("--value", metavar="ARG",
                   help="with --by: also the sum, min, max and mean of fetcharg ARG per key")
    add_duration_argument(p)


def _check(args: argparse.Namespace) -> None:
    check_selection(args)
    if args.value is not None and args.by is None:
        raise UsageError("--value sums a fetcharg per key: give --by KEY too")
    if args.by is not None and args.interval is not None:
        raise UsageError("--by prints its table at the end: drop -i")
    for opt in ("interval", "duration"):
        value = getattr(args, opt)
        if value is not None and value <= 0:
            raise UsageError(f"--{opt} must be a positive number of seconds")


def run(args: argparse.Namespace, out: TextIO) -> int:
    _check(args)
    resolver = Resolver(pid=args.pid, force=args.force, uretprobe=args.uretprobe,
                        argv=command_argv(args))
    probes = resolver.resolve_all(parse_specs(args.specs))
    args.hit_filter = hit_filter(args, probes)
    notes = [note for p in probes for note in p.notes]
    for note in notes[:3]:
        sys.stderr.write(f"uprobes: note: {note}\n")
    if len(notes) > 3:  # a glob over libc: one note per IFUNC would bury the counts
        sys.stderr.write(f"uprobes: note: ... and {len(notes) - 3} more notes "
                         "(`uprobes resolve` shows them all)\n")
    uretprobe_note(probes, sys.stderr)
    from_events = False
    if args.by is not None:
        _check_keys(args, probes)
        why = keyed_problem(Request(probes, args.engine, pid=args.pid,
                                    child=0 if args.argv_command else None,
                                    trapfree=not args.no_trapfree, by=args.by,
                                    value=args.value))
        if why is not None and "kernel engine" not in why:
            _note(f"--by {args.by} is counted from events, not in the program ({why})")
        from_events = why is not None
    sink = open(args.output, "w") if args.output else out
    try:
        if from_events:
            return _count_events(args, sink, notes)
        return _count(args, probes, sink)
    finally:
        if sink is not out:
            sink.close()


def _count(args: argparse.Namespace, probes: list[ResolvedProbe], sink: TextIO) -> int:
    launched = launch(args.argv_command) if args.argv_command else None
    counter: Counter | None = None
    try:
        # What the engine cannot count (a filter the kernel cannot say, a key
        # it cannot compute) is refused here, before the command runs.
        request = Request(
            probes, args.engine, pid=args.pid, child=launched.pid if launched else None,
            force=args.force, note=_note, hit_filter=args.hit_filter,
            trapfree=not args.no_trapfree, by=args.by, value=args.value)
        keyed = open_keyed_counter(request) if args.by is not None else None
        counter = keyed or open_counter(request)
        with counter:
            if launched is not None:
                launched.release()
            elif not counter.target_exited:
                by = f" by {args.by}" if args.by is not None else ""
                sys.stderr.write(f"uprobes: counting {len(counter.counts)} probes{by} "
                                 f"{counter.where}; Ctrl-C to stop\n")
                sys.stderr.flush()
            started = time.monotonic()
            _loop(args, counter, sink, started)
            counter.stop()
            final = keyed.by_key() if keyed is not None else dict(counter.counts)
            if launched is None:  # the table first: detaching many probes takes a while
                _final(args, sink, final)
        if launched is None:
            return 0
        # A stop signal ends the counting, never the command: it runs to its
        # end (--duration ends both), and the counts are the last lines,
        # after its own output.
        launched.reaped(counter.child_status)
        status = finish(launched, started, args.duration, _note)
        _final(args, sink, final)
        return status
    except BaseException:
        if launched is not None:
            launched.failed(counter.child_status if counter is not None else None)
        raise


def _count_events(args: argparse.Namespace, sink: TextIO, said_notes: list[str]) -> int:
    """`--by` from events, where the program's code cannot count (the kernel
    engine; a key or value read from memory, a DWARF value): each hit's key
    and value as a Session's event has them."""
    counts = KeyedCounts(args.by, args.value)

    def on_hit(ev: Event) -> None:
        key = getattr(ev, args.by) if args.by in TASK_KEYS else _key(ev.args.get(args.by))
        agg = counts.keys.setdefault(ev.probe, {}).setdefault(key, Aggregate())
        value = ev.args.get(args.value) if args.value is not None else 0
        if isinstance(value, int):
            agg.add(1, value, value, value)
        else:  # its value could not be read
            agg.count += 1
            agg.unread += 1

    said = set(said_notes)  # the resolver's, said once already

    def note(text: str) -> None:
        if text not in said:
            _note(text)

    session = Session(args.engine, force=args.force, uretprobe=args.uretprobe,
                      trapfree=not args.no_trapfree, note=note)
    for spec in args.specs:
        session.probe(spec, on_hit, condition=args.condition, comm=args.comm, tid=args.tid)
    status = run_selected(session, args, "counting")
    for p in session.probes:
        counts.keys.setdefault(p.name, {})
    _final(args, sink, counts)
    return status


def _key(value: object) -> int | str:
    """A fetched value as a key: a number, a string, `(fault)` where it
    could not be read, else its JSON text (a float, a struct)."""
    if isinstance(value, (int, str)):
        return int(value) if isinstance(value, bool) else value
    return "(fault)" if value is None else json.dumps(value)


def _check_keys(args: argparse.Namespace, probes: list[ResolvedProbe]) -> None:
    """Every probe fetches what --by and --value name."""
    for arg in (None if args.by in TASK_KEYS else args.by, args.value):
        if arg is None:
            continue
        for p in probes:
            if all(a.name != arg for a in p.args):
                raise UsageError(f"{p.name} fetches no {arg}: add {arg}=FETCHARG to its spec "
                                 f"(e.g. '{p.spec.text} {arg}=%di:u64')")


def _note(text: str) -> None:
    sys.stderr.write(f"uprobes: note: {text}\n")


def _final(args: argparse.Namespace, sink: TextIO, final: dict[str, int] | KeyedCounts) -> None:
    if isinstance(final, KeyedCounts):
        for name, why in final.uncounted.items():
            _note(f"{name} is not counted by {final.by}: {why}")
        (write_keyed_json if args.json else write_keyed_table)(sink, final)
    elif args.json:
        write_count_json(sink, final)
    else:
        write_count_table(sink, final)
    sink.flush()


def _loop(args: argparse.Namespace, counter: Counter, sink: TextIO, started: float) -> None:
    """Until the target ends, a stop signal, or --duration; with -i, print
    each interval's counts."""
    deadline = started + args.duration if args.duration else None
    next_tick = started + args.interval if args.interval else None
    # Counters start at zero when enabled, before a launched command runs its
    # first instruction: the first interval counts from there. (Reading a
    # baseline here instead lost the first interval's hits whenever we were
    # scheduled out after releasing the command, about 1 run in 3 on a busy
    # machine: a short command's hits all landed in the baseline.)
    previous: dict[str, int] = {}
    while not counter.target_exited and counter.signal is None:
        now = time.monotonic()
        if next_tick is not None and now >= next_tick:
            current = dict(counter.counts)
            _interval(args, sink, {k: v - previous.get(k, 0) for k, v in current.items()})
            previous = current
            next_tick += args.interval * max(1, int((now - next_tick) // args.interval) + 1)
        if deadline is not None and now >= deadline:
            return
        waits = [t - now for t in (next_tick, deadline) if t is not None]
        counter.count(max(0.0, min(waits)) if waits else None)


def _interval(args: argparse.Namespace, sink: TextIO, delta: dict[str, int]) -> None:
    stamp = time.strftime("%H:%M:%S")
    if args.json:
        from uprobes.render.json import write_json
        write_json(sink, {"time": stamp, "interval_s": args.interval, "counts": delta})
    else:
        write_count_table(sink, delta, title=f"{stamp} (last {args.interval:g}s)")
        sink.write("\n")
    sink.flush()
