"""`uprobes stacks`: which code paths reach a probe, counted.

Each hit's user stack is captured (as `trace --stack` does) and counted
under its probe: the most frequent call paths, one frame a line, with
counts and shares (BCC's stackcount, bpftrace's `@[ustack] = count()`);
`--folded` writes them as flame-graph tools read them
(`comm;main;...;malloc 42`), `--json` as one line, and `--svg FILE`
draws them as a flame graph (render/flamegraph.py). Nothing is printed per
hit: the counts come at the end.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from uprobes.analysis.stacks import StackCounter
from uprobes.commands.resolve import parse_specs
from uprobes.commands.selection import (
    add_duration_argument,
    add_filter_arguments,
    add_selection_arguments,
    check_selection,
    open_svg,
    run_selected,
)
from uprobes.engines.kernel.streams import STACK_RING_PAGES
from uprobes.errors import UsageError
from uprobes.lang.render import render
from uprobes.render.flamegraph import write_flamegraph
from uprobes.render.stacks import write_folded, write_stacks, write_stacks_json
from uprobes.session import Session
from uprobes.unwind.capture import DEFAULT_STACK_BYTES, check_stack_bytes

NAME = "stacks"
HELP = "count the distinct user stacks that reach each probe (flame-graph input with --folded)"
EXAMPLES = [
    "uprobes stacks --top 3 'libc:malloc' -- /usr/bin/python3.11 -c 'import json'",
    "uprobes stacks --folded -o /tmp/ls.folded 'libc:malloc' -- /bin/ls /usr; "
    "tail -2 /tmp/ls.folded  # then: flamegraph.pl /tmp/ls.folded > ls.svg",
    "uprobes stacks -e ptrace --json 'libc:write' -- /bin/echo hi",
    "uprobes stacks --svg /tmp/ls.svg 'libc:malloc' -- /bin/ls /usr  # a flame graph",
    "uprobes stacks --python --folded 'libc:getpid' -- /usr/bin/python3.11 -c "
    "'import os; f = lambda: os.getpid(); f()'  # Python frames in the stacks",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_selection_arguments(p)
    add_filter_arguments(p)
    p.add_argument("--folded", action="store_true",
                   help="one line per call path, `comm;outermost;...;innermost COUNT`, "
                        "as flamegraph.pl, inferno and speedscope read it")
    p.add_argument("--svg", metavar="FILE", default=None,
                   help="also draw the stacks as a flame graph into FILE (SVG; hover for "
                        "counts, click to zoom)")
    p.add_argument("--python", action="store_true",
                   help="a CPython program's stacks show its Python functions (qualified "
                        "name, file:line) in place of the interpreter's eval loop (ptrace "
                        "engine; docs/python.md)")
    p.add_argument("--top", type=int, metavar="N", default=10,
                   help="the N most frequent stacks of each probe (default 10; 0: all)")
    p.add_argument("--stack-bytes", type=int, default=DEFAULT_STACK_BYTES, metavar="N",
                   help=f"bytes of stack copied at each hit from the stack pointer up "
                        f"(default {DEFAULT_STACK_BYTES}); a deeper stack is cut there")
    p.add_argument("--ring-pages", type=int, default=None, metavar="N",
                   help=f"data pages of each CPU's ring buffer, a power of two (default "
                        f"{STACK_RING_PAGES}: each sample holds its stack copy)")
    add_duration_argument(p)


def run(args: argparse.Namespace, out: TextIO) -> int:
    check_selection(args)
    if args.top < 0:
        raise UsageError("--top must be at least 0")
    if args.folded and args.json:
        raise UsageError("give either --folded or --json, not both")
    if args.duration is not None and args.duration < 0:
        raise UsageError("--duration must be at least 0")
    check_stack_bytes(args.stack_bytes)
    svg = open_svg(args.svg)
    counter = StackCounter()
    session = Session(args.engine, force=args.force, uretprobe=args.uretprobe,
                      ring_pages=args.ring_pages, stack_bytes=args.stack_bytes,
                      python=args.python, trapfree=not args.no_trapfree)
    filters = dict(condition=args.condition, comm=args.comm, tid=args.tid)
    for spec in parse_specs(args.specs):
        session.probe(render(spec), counter.add, **filters)
    sink = open(args.output, "w") if args.output else out
    try:
        status = run_selected(session, args, "counting stacks")
        top = args.top or None
        if args.folded:
            write_folded(sink, counter)
        elif args.json:
            write_stacks_json(sink, counter, top)
        else:
            write_stacks(sink, counter, top)
        sink.flush()
        if svg is not None:
            write_flamegraph(svg, counter.folded(), f"uprobes stacks {' '.join(args.specs)}")
    finally:
        if sink is not out:
            sink.close()
        if svg is not None:
            svg.close()
    if session.lost:
        # (--ring-pages sizes the kernel's perf rings; the ptrace engine's are its own)
        rings = "a bigger --ring-pages or " if session.engine_used == "kernel" else ""
        sys.stderr.write(f"uprobes: {session.lost} records lost (their stacks are not "
                         f"counted); {rings}a smaller --stack-bytes loses fewer\n")
    return status
