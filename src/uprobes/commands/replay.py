"""`uprobes replay DIR`: a recording (`uprobes record`) rendered as `trace` renders.

Every format of `trace` (text, JSON lines, Perfetto, Chrome JSON), from the
hits the run kept (record/replay.py), with the run's own clocks in the
summary; the filters of `trace` (`--if`, `--comm`, `--tid`) choose which.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from typing import TextIO

from uprobes.commands import trace
from uprobes.commands.selection import add_filter_arguments
from uprobes.errors import UsageError
from uprobes.model.filters import HitFilter
from uprobes.record.replay import Recording

NAME = "replay"
HELP = "print a recording's hits as trace prints them (text, JSON, Perfetto)"
EXAMPLES = [
    "uprobes record -o /tmp/rec 'libc:malloc size=%di:u64' -- /bin/ls / && "
    "uprobes replay /tmp/rec",
    "uprobes record -o /tmp/rec 'libc:malloc size=%di:u64' -- /bin/ls / && "
    "uprobes replay --json --if 'size > 100' /tmp/rec",
    "uprobes record -o /tmp/rec 'libc:malloc' 'r libc:malloc' -- /bin/ls / && "
    "uprobes replay --format perfetto -o /tmp/rec.perfetto-trace /tmp/rec",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="what uprobes record -o DIR wrote")
    p.add_argument("--format", choices=trace.FORMATS, default=None,
                   help="as trace's --format: text (default), jsonl, perfetto, chrome-json")
    p.add_argument("--json", action="store_true", help="JSON lines (--format jsonl)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    add_filter_arguments(p)


def open_recording(args: argparse.Namespace) -> tuple[Recording, HitFilter | None]:
    """The recording `args.directory` and the filter of `args` checked against its probes."""
    rec = Recording(args.directory)
    keep = HitFilter.parse(args.condition, args.comm, args.tid)
    if keep is not None:
        keep.check(list(rec.infos.values()))
    return rec, keep


def report_damage(rec: Recording) -> None:
    """One line each for what the recording could not give back."""
    if not rec.complete:
        sys.stderr.write("uprobes: note: the recording run ended in an error: what it wrote "
                         "before is shown\n")
    if rec.corrupt:
        sys.stderr.write(f"uprobes: note: {rec.corrupt} ring records that no probe's code "
                         "can have written (the traced program overwrote its ring) are left "
                         "out\n")
    if rec.truncated:
        sys.stderr.write(f"uprobes: note: {rec.truncated}: what was before the cut is shown\n")


def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.json and args.format not in (None, "jsonl"):
        raise UsageError(f"--json is --format jsonl; it cannot go with --format {args.format}")
    rec, keep = open_recording(args)
    events = 0
    with ExitStack() as stack:
        out, binary = trace.open_output(args, out, stack)
        renderer = trace.make_renderer(args, out, binary, rec.infos, rec.probes, rec.calls,
                                       rec.clocks)
        for batch in rec.batches(keep):
            events += len(batch)
            renderer.hits(batch)
        renderer.summary(events, rec.lost)
        (binary or out).flush()
    report_damage(rec)
    sys.stderr.write(f"uprobes: {events} events, {rec.lost} lost\n")
    return 0
