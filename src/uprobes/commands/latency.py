"""`uprobes latency`: how long each call of a function takes, as a histogram.

Each SPEC names a function; it gets an entry and a return probe, and the
calls are paired per thread (see `uprobes.analysis.calls`). The result is
a log2 histogram per function, as funclatency draws it, with count, mean,
p50/p90/p99 and max; `--json` gives the numbers as one line, `--svg FILE`
draws the histograms (render/histogram_svg.py). `--breakdown` splits each
call's time into on-CPU, off-CPU by reason and time in each system call,
from the kernel's events of the timed threads (latency_breakdown.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from uprobes.analysis.breakdown import Call, breakdowns
from uprobes.analysis.calls import RA_ARG, SP_ARG, CallPairer, past_entry
from uprobes.analysis.histogram import Histogram
from uprobes.analysis.keyed import TASK_KEYS
from uprobes.commands.resolve import parse_specs
from uprobes.commands.selection import (
    add_duration_argument,
    add_filter_arguments,
    add_selection_arguments,
    check_selection,
    open_svg,
    run_selected,
)
from uprobes.errors import SpecError, UsageError
from uprobes.lang import parse
from uprobes.lang.ast import FileTarget, ProbeKind, ProbeSpec, PyTarget
from uprobes.lang.condition import parse_condition
from uprobes.lang.render import render
from uprobes.model.event import Event
from uprobes.render.breakdown import part_histograms, write_breakdowns, write_breakdowns_json
from uprobes.render.histogram import UNITS, write_histograms, write_histograms_json
from uprobes.render.histogram_svg import write_histograms_svg
from uprobes.session import Session

NAME = "latency"
HELP = "histogram of how long each call of the functions takes"
EXAMPLES = [
    "uprobes latency 'libc:malloc' 'libc:free' -- /bin/ls /usr",
    "uprobes latency --unit us 'libc:getaddrinfo' -- /usr/bin/getent hosts localhost",
    "uprobes latency --json 'libc:qsort' -- /usr/bin/sort /etc/services -o /dev/null",
    "uprobes latency --svg /tmp/malloc.svg 'libc:malloc' -- /bin/ls /usr  # the histogram drawn",
    "uprobes latency --breakdown 'libc:fflush' -- /bin/echo hi"
    "  # on-CPU, off-CPU by reason, time in each system call",
    "uprobes latency --by fd 'libc:read fd=%di:s32' -- /bin/cat /etc/hostname - < /etc/services"
    "  # a histogram per file descriptor",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_selection_arguments(p)
    add_filter_arguments(p)
    p.add_argument("--unit", choices=tuple(UNITS), default="ns",
                   help="histogram buckets in ns (default), us or ms")
    p.add_argument("--svg", metavar="FILE", default=None,
                   help="also draw the histograms into FILE (SVG)")
    p.add_argument("--breakdown", action="store_true",
                   help="split each call's time into on-CPU, off-CPU by reason (runnable, "
                        "sleeping, blocked, stopped) and time in each system call, from the "
                        "kernel's sched and syscall events of the timed threads")
    p.add_argument("--by", metavar="KEY",
                   help="a histogram per key (as bpftrace's @[KEY] = hist()): tid, pid, "
                        "comm, or a fetcharg the SPECs name at entry ('libc:read fd=%%di:s32' "
                        "--by fd: a histogram per file descriptor)")
    add_duration_argument(p)


def probe_pair(spec: ProbeSpec, fetch: bool = True, by: str | None = None) -> tuple[str, str]:
    """The entry and return probe lines that time the function `spec` names
    (`fetch`: the entry fetches what pairs it with its return in Python;
    `by`: the fetcharg of the spec that keys its histograms, which it keeps)."""
    if spec.kind is not ProbeKind.ENTRY:
        raise SpecError("latency times functions: name the function, not its return",
                        spec.text, 0)
    if isinstance(spec.target, PyTarget):
        # Its probes fetch the frame that pairs an entry with its return.
        if spec.args or by not in (None, *TASK_KEYS):
            raise SpecError("a py: function is timed as it is (--by: tid, pid or comm)",
                            spec.text, 0)
        return render(spec), render(replace(spec, kind=ProbeKind.RETURN))
    if not isinstance(spec.target, FileTarget):
        raise SpecError("latency times functions in a file (not USDT or vDSO probes)",
                        spec.text, 0)
    if by is not None and by not in TASK_KEYS:
        if [a.name for a in spec.args] != [by]:
            raise SpecError(f"--by {by} keys calls by a fetcharg: name it, and only it, in "
                            f"each SPEC ('FUNCTION {by}=%di')", spec.text, 0)
    elif spec.args:
        raise SpecError("latency fetches no arguments; give the function only (or key the "
                        "histograms by one: --by NAME 'FUNCTION NAME=%di')", spec.text, 0)
    # The entry's stack pointer and return address pair it with its return
    # (whose ip is the address returned to): the return fetches nothing, so
    # it goes on the function's own rets, which exceptions unwind through.
    entry = render(spec) + (f" {SP_ARG}=%sp:u64 {RA_ARG}=+0(%sp):x64" if fetch else "")
    ret_event = f"{spec.event}__return" if spec.event else None
    ret = render(replace(spec, kind=ProbeKind.RETURN, event=ret_event, args=()))
    return entry, ret


def run(args: argparse.Namespace, out: TextIO) -> int:
    check_selection(args)
    if args.duration is not None and args.duration < 0:
        raise UsageError("--duration must be at least 0")
    args.svg_file = open_svg(args.svg)
    try:
        python = any(isinstance(s.target, PyTarget) for s in parse_specs(args.specs))
        if args.engine == "ptrace" and not args.no_trapfree and not args.uretprobe \
                and not (args.breakdown or python):
            from uprobes.commands.latency_inprog import run_in_program
            lines = [line for spec in parse_specs(args.specs)
                     for line in probe_pair(spec, fetch=False, by=args.by)]
            status = run_in_program(args, out, lines)
            if status is not None:
                return status
        return run_paired(args, out)
    finally:
        if args.svg_file is not None:
            args.svg_file.close()


def entry_condition(condition: str | None, specs: list[str],
                    by: str | None) -> Callable[[Event], bool] | None:
    """`--if COND` as a test of a call's entry event (None: no `--if`),
    its fields checked against each function's entry probe (SpecError
    naming the probe's fields otherwise)."""
    if condition is None:
        return None
    cond = parse_condition(condition)
    for spec in parse_specs(specs):
        entry = parse(probe_pair(spec, fetch=False, by=by)[0])
        assert isinstance(entry, ProbeSpec)
        cond.check_fields(render(entry), {a.name: a.type for a in entry.args})
    return cond.predicate()


def run_paired(args: argparse.Namespace, out: TextIO) -> int:
    """`latency` from events: every entry and return paired per thread here."""
    pairer = CallPairer()
    histograms: dict[str, Histogram] = {}

    def key(ev: Event) -> str:
        """The histogram a call goes to: its function's, or with --by its key's
        (a task's, or the value the entry fetched)."""
        if args.by is None:
            return ev.probe
        if args.by in TASK_KEYS:
            return f"{ev.probe} {args.by}={getattr(ev, args.by)}"
        value = ev.args.get(args.by)
        return f"{ev.probe} {args.by}={'(fault)' if value is None else value}"

    placed: list[bool] = []

    def on_entry(ev: Event) -> None:
        if args.by is None and ev.probe not in histograms:
            histograms[ev.probe] = Histogram()
        if not placed:  # the probes are placed by the first hit
            placed.append(True)
            pairer.past_entry.update(past_entry(session.probes))
        pairer.entry(ev)

    calls: list[Call] = []
    # `--if` is decided at the entry, where its fields are (a return fetches
    # nothing), as the program's own code decides it: every entry is paired,
    # and a call whose entry fails it is left out. Tested on the entries
    # alone, the returns of the calls it rejects would close the calls it
    # keeps (a recursive call returns where its caller does).
    keep = entry_condition(args.condition, args.specs, args.by)

    def on_return(ev: Event) -> None:
        start = pairer.ret(ev)
        if start is not None and (keep is None or keep(start)):
            histograms.setdefault(key(start), Histogram()).add(ev.ts_ns - start.ts_ns)
            if args.breakdown:
                calls.append(Call(start.probe, ev.tid, start.ts_ns, ev.ts_ns))

    session = Session(args.engine, force=args.force, uretprobe=args.uretprobe,
                      trapfree=not args.no_trapfree)
    for spec in parse_specs(args.specs):
        entry, ret = probe_pair(spec, by=args.by)
        filters = dict(comm=args.comm, tid=args.tid)
        session.probe(entry, on_entry, **filters)
        session.probe(ret, on_return, **filters)
    sink = open(args.output, "w") if args.output else out
    gatherer = None
    if args.breakdown:
        from uprobes.commands.latency_breakdown import EventGatherer
        gatherer = EventGatherer()
    try:
        launched = None
        if gatherer is not None:
            launched = lambda pid: gatherer.start(child=pid)  # noqa: E731
            if not args.argv_command:
                gatherer.start(pid=args.pid)
        status = run_selected(session, args, "timing calls", launched=launched)
        parts = {} if gatherer is None else breakdowns(calls, gatherer.finish())
        if args.json and gatherer is not None:
            write_breakdowns_json(sink, histograms, parts)
        elif args.json:
            write_histograms_json(sink, histograms)
        else:
            write_histograms(sink, histograms, args.unit)
            if gatherer is not None:
                write_breakdowns(sink, parts, args.unit)
        sink.flush()
        if args.svg_file is not None:
            write_histograms_svg(args.svg_file, {**histograms, **part_histograms(parts)},
                                 args.unit, {name: b.by_bucket for name, b in parts.items()})
    finally:
        if gatherer is not None:
            gatherer.close()
        if sink is not out:
            sink.close()
    if gatherer is not None and gatherer.lost:
        sys.stderr.write(f"uprobes: {gatherer.lost} kernel events lost: the breakdown "
                         "misses them\n")
    if session.lost or pairer.unpaired_returns or pairer.abandoned or pairer.open_calls:
        sys.stderr.write(f"uprobes: {session.lost} records lost, {pairer.unpaired_returns} "
                         f"returns without an entry, {pairer.abandoned} calls never returned, "
                         f"{pairer.open_calls} still open at the end\n")
    return status
