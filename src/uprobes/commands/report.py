"""`uprobes report DIR`: a recording's counts per probe and, for every function
recorded at entry and return, its latency histogram: what `count` and
`latency` would have printed of the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import TextIO

from uprobes.analysis.calls import RA_ARG, SP_ARG, CallPairer, past_entry
from uprobes.analysis.histogram import Histogram
from uprobes.commands.replay import open_recording, report_damage
from uprobes.commands.selection import add_filter_arguments
from uprobes.errors import UsageError
from uprobes.model.event import FRAME_ARG, Hit, hit_event
from uprobes.render.counts import ranked, write_count_table
from uprobes.render.histogram import UNITS, histogram_doc, write_histograms

NAME = "report"
HELP = "a recording's hit counts per probe and call latency per function"
EXAMPLES = [
    "uprobes record -o /tmp/rec 'libc:malloc' 'r libc:malloc' -- /bin/ls / && "
    "uprobes report /tmp/rec",
    "uprobes record -o /tmp/rec 'libc:malloc' 'r libc:malloc' -- /bin/ls / && "
    "uprobes report --json --unit us /tmp/rec",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="what uprobes record -o DIR wrote")
    p.add_argument("--json", action="store_true",
                   help='one JSON line: {"counts": {...}, "latency": {...}, "lost": N}')
    p.add_argument("--unit", choices=tuple(UNITS), default="ns",
                   help="histogram buckets in ns (default), us or ms")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    add_filter_arguments(p)


def run(args: argparse.Namespace, out: TextIO) -> int:
    rec, keep = open_recording(args)
    counts: Counter[str] = Counter({name: 0 for name in rec.infos})
    histograms: dict[str, Histogram] = {name: Histogram() for name in sorted(rec.calls)}
    infos, calls = rec.infos, frozenset(rec.calls)
    marked = any(n in (SP_ARG, RA_ARG, FRAME_ARG) for info in infos.values()
                 for n, _ in info.args)
    past = {name: n for name, n in past_entry(rec.probes).items() if name in calls}
    pairer: CallPairer | _Stacks = CallPairer(past_entry=past) if marked else _Stacks(past)
    returns = frozenset(name for name, info in infos.items() if info.kind == "r")
    for batch in rec.batches(keep):
        counts.update(hit[4] for hit in batch)
        if isinstance(pairer, _Stacks):  # no stack pointers to pair by: on the tuples
            pairer.pair(batch, calls, returns, histograms)
            continue
        for hit in batch:
            if hit[4] not in calls and hit[7] is None:
                continue  # an instant: neither a timed entry nor a return
            ev = hit_event(hit, infos[hit[4]])
            start = pairer.route(ev, calls)
            if not isinstance(start, bool):
                histograms[start.probe].add(ev.ts_ns - start.ts_ns)
    try:
        sink = open(args.output, "w") if args.output else out
    except OSError as e:
        raise UsageError(f"cannot write {args.output}: {e.strerror}") from e
    try:
        if args.json:
            sink.write(json.dumps({
                "counts": dict(ranked(counts)),
                "latency": {name: histogram_doc(h) for name, h in histograms.items()},
                "lost": rec.lost, "unpaired_returns": pairer.unpaired_returns,
                "never_returned": pairer.abandoned + pairer.open_calls},
                separators=(",", ":")) + "\n")
        else:
            write_count_table(sink, counts)
            if histograms:
                sink.write("\n")
                write_histograms(sink, histograms, args.unit)
    finally:
        if sink is not out:
            sink.close()
    report_damage(rec)
    if rec.lost:
        sys.stderr.write(f"uprobes: {rec.lost} hits were lost while recording\n")
    return 0


class _Stacks:
    """`CallPairer` for hits that carry no stack pointer or return address
    (what `record` keeps of `'FUNC' 'r FUNC'`): a stack of open calls per
    (process, thread, function), a return closing the newest, on the hit
    tuples themselves (a tenth of the time of building events)."""

    def __init__(self, past: dict[str, int]) -> None:
        self.past = past  # entries past their function's first instruction
        self.unpaired_returns = 0
        self.abandoned = 0
        self._open: dict[tuple[int, int, int], list[tuple[int, str]]] = {}

    @property
    def open_calls(self) -> int:
        return sum(map(len, self._open.values()))

    def pair(self, hits: list[Hit], calls: frozenset[str], returns: frozenset[str],
             histograms: dict[str, Histogram]) -> None:
        stacks, past = self._open, self.past
        for ts, pid, tid, _, probe, _, ip, func, _ in hits:
            if probe in calls:
                at = ip - past[probe] if past and probe in past else ip
                stacks.setdefault((pid, tid, at), []).append((ts, probe))
            elif probe in returns:
                stack = stacks.get((pid, tid, ip if func is None else func))
                if stack:
                    start, name = stack.pop()
                    histograms[name].add(ts - start)
                else:
                    self.unpaired_returns += 1
