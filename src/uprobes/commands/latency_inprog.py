"""`uprobes latency -e ptrace`: calls timed in the program (the engine's `Timer`).

No event reaches us: the trap-free probes keep each thread's open calls
and histograms in memory shared with the program (engines/trapfree/timing.py),
read at the end, with the probes' own cost measured on the spot and taken
off (the output says how much). Where the engine cannot time in the program
(`open_timer` gives None) the caller pairs events instead (latency.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from uprobes.analysis.histogram import Latencies
from uprobes.commands.resolve import parse_specs
from uprobes.commands.selection import command_argv, hit_filter
from uprobes.engines.base import Request, Timer, open_timer
from uprobes.engines.launch import finish, launch
from uprobes.render.histogram import write_histograms, write_histograms_json
from uprobes.render.histogram_svg import write_histograms_svg
from uprobes.resolve.resolver import Resolver


def run_in_program(args: argparse.Namespace, out: TextIO, lines: list[str]) -> int | None:
    """`latency` timed in the program, the functions' entry and return probe
    `lines` given; None (nothing run) when the engine cannot time there."""
    resolver = Resolver(pid=args.pid, force=args.force, uretprobe=False,
                        argv=command_argv(args))
    probes = resolver.resolve_all(parse_specs(lines))
    # The filter is decided at each call's entry (its return has the entry's verdict).
    flt = hit_filter(args, [p for p in probes if not p.is_return])
    launched = launch(args.argv_command) if args.argv_command else None
    timer: Timer | None = None
    try:
        timer = open_timer(Request(probes, args.engine, pid=args.pid,
                                   child=launched.pid if launched else None,
                                   force=args.force, note=_note, trapfree=True,
                                   by=args.by, hit_filter=flt))
        if timer is None:
            if launched is not None:
                launched.abort()
            return None
        with timer:
            if launched is not None:
                launched.release()
            else:
                sys.stderr.write(f"uprobes: timing calls in process {args.pid}; "
                                 "Ctrl-C to stop\n")
                sys.stderr.flush()
            started = time.monotonic()
            deadline = started + args.duration if args.duration is not None else None
            while not timer.target_exited and timer.signal is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                timer.count(left)
            timer.stop()
        status = 0
        if launched is not None:
            launched.reaped(timer.child_status)
            status = finish(launched, started, args.duration, _note)
        _write(args, out, timer.latencies())
        return status
    except BaseException:
        if launched is not None:
            launched.failed(timer.child_status if timer is not None else None)
        raise


def _note(text: str) -> None:
    sys.stderr.write(f"uprobes: note: {text}\n")


def _write(args: argparse.Namespace, out: TextIO, lat: Latencies) -> None:
    for name, why in lat.untimed.items():
        _note(f"{name} is not timed: {why} (--no-trapfree pairs its calls with int3s)")
    sink = open(args.output, "w") if args.output else out
    try:
        if args.json:
            run_wide: dict[str, object] = {  # the run's, with each histogram
                "subtracted_ns": round(lat.subtracted_ns, 1),
                "clock_step_ns": round(lat.tsc_step_ns, 1)}
            if args.by is not None:
                run_wide["unkeyed_calls"] = lat.unkeyed  # the table of keys was full
            write_histograms_json(sink, lat.histograms, extra=run_wide)
        else:
            write_histograms(sink, lat.histograms, args.unit)
            sink.write(f"probe cost subtracted: {lat.subtracted_ns:.1f} ns a call (the mean "
                       f"of the fastest 90% of {lat.calibration_calls} calls of an empty "
                       "function timed by the same probe code, on the spot); the clock's "
                       f"step here: {lat.tsc_step_ns:.1f} ns\n")
        sink.flush()
        if args.svg_file is not None:
            write_histograms_svg(args.svg_file, lat.histograms, args.unit)
    finally:
        if sink is not out:
            sink.close()
    if lat.unpaired or lat.abandoned:
        sys.stderr.write(f"uprobes: {lat.unpaired} returns without an entry, {lat.abandoned} "
                         "calls never returned\n")
    if lat.unkeyed:
        sys.stderr.write(f"uprobes: {lat.unkeyed} calls could not be keyed: the table of "
                         f"{lat.key_limit} histograms by (function, --by {args.by}) was full "
                         "where they hashed (fewer distinct keys fit)\n")
    if lat.too_deep or lat.no_row:
        sys.stderr.write(f"uprobes: {lat.too_deep} calls deeper than a thread's "
                         f"{lat.depth_limit} open calls and {lat.no_row} calls of threads beyond "
                         f"the {lat.row_limit} timing rows were not timed\n")
