"""`uprobes record -o DIR`: keep every hit now, render it later (`replay`, `report`).

The run is `trace`'s, with a `RecordWriter` (record/writer.py) for its
renderer: on the ptrace engine the trap-free rings' records go to disk as
they are, with no work per record, so the program runs at the speed of a
copy, not of a renderer; hits of int3 probes and of the kernel engine are
kept as the hit tuples they are. Filters are `replay`'s and `report`'s:
a recording keeps every hit.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from uprobes.commands import trace
from uprobes.commands.resolve import parse_specs
from uprobes.commands.selection import (
    add_duration_argument,
    add_selection_arguments,
    check_selection,
    command_argv,
    uretprobe_note,
)
from uprobes.engines.launch import launch
from uprobes.errors import UsageError
from uprobes.model.event import ProbeInfo
from uprobes.record.writer import RecordWriter, prepare
from uprobes.resolve.resolver import Resolver

NAME = "record"
HELP = "keep every hit of the probes in a directory, for replay and report later"
EXAMPLES = [
    "uprobes record -o /tmp/rec 'libc:malloc size=%di:u64' 'r libc:malloc ptr=$retval:x64' "
    "-- /bin/ls /  # then: uprobes replay /tmp/rec; uprobes report /tmp/rec",
    "uprobes record -e ptrace -o /tmp/rec 'libc:getppid' 'r libc:getppid' -- /usr/bin/python3.11 "
    "-c 'import os; print(sum(os.getppid() for _ in range(100000)))'  # trap-free: the "
    "records kept as they are",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_selection_arguments(p)
    add_duration_argument(p)
    p.add_argument("--ring-pages", type=int, default=None, metavar="N",
                   help="-e kernel: data pages of each CPU's ring buffer, a power of two")


def run(args: argparse.Namespace, out: TextIO) -> int:
    check_selection(args)
    if not args.output:
        raise UsageError("record writes a directory: give -o DIR")
    if args.json:
        raise UsageError("a recording has one format; --json is replay's (uprobes replay "
                         "--json DIR)")
    if args.duration is not None and args.duration < 0:
        raise UsageError("--duration must be at least 0")
    resolver = Resolver(pid=args.pid, force=args.force, uretprobe=args.uretprobe, py_args=True,
                        argv=command_argv(args))
    probes = resolver.resolve_all(parse_specs(args.specs))
    for p in probes:
        for note in p.notes:
            sys.stderr.write(f"uprobes: note: {note}\n")
    uretprobe_note(probes, sys.stderr)
    directory = prepare(args.output)
    # What `trace` reads of its arguments, for a run with no stacks and no filter.
    args.hit_filter = None
    args.stack = args.python = False
    args.stack_bytes = 0
    writers: list[RecordWriter] = []

    def writer(infos: dict[str, ProbeInfo]) -> RecordWriter:
        w = RecordWriter(directory, probes, infos, trace.call_entries(probes), args.engine,
                         args.argv_command or None, args.pid)
        writers.append(w)
        return w
    child = launch(args.argv_command) if args.argv_command else None
    try:
        status = trace.run_trace(args, out, None, probes, child, None, make=writer)
    except BaseException:
        for w in writers:
            try:
                w.abandon(w.events_seen, 0)
            except Exception:  # noqa: BLE001 - the run's own error is the one to see
                pass
        raise
    size = (directory / "events.bin").stat().st_size
    sys.stderr.write(f"uprobes: recorded into {args.output} ({size / 1e6:.1f} MB): "
                     f"uprobes replay {args.output}; uprobes report {args.output}\n")
    return status
