"""`uprobes top`: a live table of hits per second, per probe and process.

On a terminal the table is redrawn every interval, like top(1); in a pipe
each interval's table is appended. Until the first hit, one line says what
is being waited for. On exit (the command or process ends, --duration,
Ctrl-C) a final summary of the totals stays on the screen.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import TextIO

from uprobes.analysis.rates import HitRates, RateRow
from uprobes.commands.resolve import parse_specs
from uprobes.commands.selection import (
    add_duration_argument,
    add_filter_arguments,
    add_selection_arguments,
    check_selection,
    run_selected,
)
from uprobes.errors import UsageError
from uprobes.lang.render import render
from uprobes.render.json import write_json
from uprobes.render.table import write_table
from uprobes.session import Session

NAME = "top"
HELP = "live table of hits per second, per probe and process"
EXAMPLES = [
    "uprobes top --duration 3 'libc:malloc' 'libc:free'  # system-wide, 3 seconds",
    "uprobes top -i 0.5 'libc:str*' -- /usr/bin/python3.11 -c 'import json, csv'",
    "uprobes top --if 'size >= 4096' 'libc:malloc size=%di:u64' -- /usr/bin/sort /etc/services",
]
_CLEAR = "\x1b[H\x1b[2J"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_selection_arguments(p)
    add_filter_arguments(p)
    p.add_argument("-i", "--interval", type=float, default=1.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 1)")
    add_duration_argument(p)
    p.add_argument("-n", "--rows", type=int, default=20, metavar="N",
                   help="show the N busiest probe/process pairs (default 20)")


def run(args: argparse.Namespace, out: TextIO) -> int:
    check_selection(args)
    if args.interval <= 0:
        raise UsageError("--interval must be a positive number of seconds")
    if args.duration is not None and args.duration < 0:
        raise UsageError("--duration must be at least 0")
    specs = parse_specs(args.specs)
    rates = HitRates()
    session = Session(args.engine, force=args.force, uretprobe=args.uretprobe,
                      trapfree=not args.no_trapfree)
    for spec in specs:
        session.probe(render(spec), rates.add, condition=args.condition, comm=args.comm,
                      tid=args.tid)
    where = (f"in {args.argv_command[0]}" if args.argv_command else
             f"in process {args.pid}" if args.pid is not None else "system-wide")
    sink = open(args.output, "w") if args.output else out
    live = _Live(sink, rates, args, f"{len(specs)} probe line(s) {where}")
    status = 0
    try:
        status = run_selected(session, args, "watching rates", ready=live.start)
    finally:
        live.stop()
        _summary(sink, rates, args, session.lost)
        if sink is not out:
            sink.close()
    return status


class _Live:
    """Redraws the table every interval from a thread of its own."""

    def __init__(self, out: TextIO, rates: HitRates, args: argparse.Namespace, what: str) -> None:
        self.out, self.rates, self.args, self.what = out, rates, args, what
        self.tty = out.isatty()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uprobes-top", daemon=True)
        self._began = 0.0

    def start(self) -> None:
        self._began = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._done.wait(self.args.interval):
            rows = self.rates.snapshot()
            waited = time.monotonic() - self._began
            if self.tty:
                self.out.write(_CLEAR)
            if not rows:
                line = f"waiting for the first hit of {self.what} ({waited:.0f}s)"
                if self.args.json:
                    write_json(self.out, {"waiting_s": round(waited, 1)})
                else:
                    self.out.write(line + "\n")
            elif self.args.json:
                write_json(self.out, {"time": time.strftime("%H:%M:%S"),
                                      "rates": [_row_doc(r) for r in rows[:self.args.rows]]})
            else:
                total = sum(r.per_second for r in rows)
                title = (f"{time.strftime('%H:%M:%S')}  {total:,.0f} hits/s  "
                         f"{self.rates.total:,} hits in {waited:.0f}s, {self.what}")
                _table(self.out, rows[:self.args.rows], title, rates=True)
                if not self.tty:
                    self.out.write("\n")
            self.out.flush()


def _row_doc(r: RateRow) -> dict[str, object]:
    return {"probe": r.probe, "pid": r.pid, "comm": r.comm,
            "per_s": round(r.per_second, 1), "total": r.total}


def _table(out: TextIO, rows: list[RateRow], title: str, rates: bool) -> None:
    headers = ["PROBE", "PID", "COMM"] + (["HITS/S"] if rates else []) + ["TOTAL"]
    cells = [[r.probe, str(r.pid), r.comm] + ([f"{r.per_second:,.0f}"] if rates else [])
             + [f"{r.total:,}"] for r in rows]
    write_table(out, headers, cells, title=title, right=list(range(3, len(headers))))


def _summary(out: TextIO, rates: HitRates, args: argparse.Namespace, lost: int) -> None:
    rows = sorted(rates.snapshot(), key=lambda r: (-r.total, r.probe, r.pid))
    if args.json:
        write_json(out, {"summary": [_row_doc(r) for r in rows], "lost": lost})
    elif rows:
        _table(out, rows, f"total: {sum(r.total for r in rows):,} hits, {lost} lost", rates=False)
    else:
        out.write("no hits\n")
    out.flush()
