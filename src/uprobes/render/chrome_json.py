"""Trace files for ui.perfetto.dev and chrome://tracing: the Chrome
trace-event JSON format.

An entry and the return of the same call (a `p` and an `r` probe on one
function, paired per thread by `uprobes.analysis.calls`) become one
complete slice (`"ph": "X"`) on the thread's track, with the entry's args
and the return's under `"return"`; every other hit is an instant
(`"ph": "i"`, thread scope). Processes and threads are named by their comm
(metadata events). With `trace --stack` a hit's frames are its arg
`stack` (a slice: the entry's), one `symbol+0xoff (path)` string each.
Timestamps are CLOCK_MONOTONIC microseconds, so the file
lines up with other traces of the machine. Events are streamed as they
come: a slice when its call returns, an entry still open at the end as an
instant. The last object, `uprobes`, holds the event and lost counts and
the clocks read together at the start and the end (`clocks`, as in the
JSON lines summary), so other traces can be lined up with this one.

Kernel events (`trace --kernel`) go on the same thread tracks: a system
call is a slice from its entry to its exit (`cat` `syscall`, its arguments
and `ret`), time off the CPU a slice `off-cpu (STATE)` (`cat` `sched`) from
the switch out to the switch back in, anything else an instant (`cat`
`kernel`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TextIO

from uprobes.analysis.calls import CallPairer
from uprobes.model.event import Event, Hit, ProbeInfo, hit_event
from uprobes.model.kevent import KernelEvent, KernelRow, row_event
from uprobes.render.values import plain_args
from uprobes.sys.clocks import ClockSnapshot, snapshot

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _us(ns: int) -> float:
    return ns / 1000


class ChromeJsonRenderer:
    """Writes one JSON document; `summary()` closes it.

    `calls`: names of the entry probes that have a return probe on the same
    function; their hits wait for the return to become slices. `past_entry`:
    those placed past their function's first instruction (`CallPairer.past_entry`). (Hits of any
    other entry probe are instants at once, so nothing piles up.)
    """

    def __init__(self, out: TextIO, probes: dict[str, ProbeInfo],
                 calls: Iterable[str] = (), clock_start: ClockSnapshot | None = None,
                 past_entry: Mapping[str, int] | None = None) -> None:
        self.out = out
        self.probes = probes
        self.calls = frozenset(calls)
        self._pairer = CallPairer(past_entry=dict(past_entry or {}))
        self._threads: set[int] = set()
        self._processes: set[int] = set()
        self._first = True
        self.clock_start = clock_start or snapshot()
        self.clock_end: ClockSnapshot | None = None  # None: the clocks at `summary`
        self._kernel_open: dict[tuple[int, str], KernelEvent] = {}  # (tid, off_cpu|syscall)
        self._kernel_counts: dict[str, int] | None = None
        out.write('{"displayTimeUnit":"ns","traceEvents":[\n')

    def _write(self, doc: dict[str, object]) -> None:
        self.out.write(("" if self._first else ",\n") + _dumps(doc))
        self._first = False

    def _name_task(self, ev: Event | KernelEvent) -> None:
        if ev.pid not in self._processes and (ev.tid == ev.pid or ev.pid not in self._threads):
            self._processes.add(ev.pid)
            self._write({"ph": "M", "name": "process_name", "pid": ev.pid, "tid": ev.pid,
                         "args": {"name": ev.comm}})
        if ev.tid not in self._threads:
            self._threads.add(ev.tid)
            self._write({"ph": "M", "name": "thread_name", "pid": ev.pid, "tid": ev.tid,
                         "args": {"name": ev.comm}})

    def hits(self, hits: list[Hit]) -> None:
        """A batch of hits (what `KernelTracer.run_hits` hands over)."""
        for hit in hits:
            self.event(hit_event(hit, self.probes[hit[4]]))

    def event(self, ev: Event) -> None:
        self._name_task(ev)
        start = self._pairer.route(ev, self.calls)
        if isinstance(start, Event):
            self._slice(start, ev)
        elif not start:
            self._instant(ev)

    def _slice(self, start: Event, end: Event) -> None:
        info = self.probes[start.probe]
        args: dict[str, object] = dict(plain_args(start.args, info.args))
        if start.stack is not None:
            args["stack"] = [str(frame) for frame in start.stack]
        if end.args:
            end_info = self.probes.get(end.probe)
            args["return"] = plain_args(end.args, end_info.args) if end_info else end.args
        self._write({"ph": "X", "name": self.probes[start.probe].event, "cat": start.probe,
                     "pid": start.pid, "tid": start.tid, "ts": _us(start.ts_ns),
                     "dur": _us(end.ts_ns - start.ts_ns), "args": args})

    def _instant(self, ev: Event) -> None:
        info = self.probes.get(ev.probe)
        args: dict[str, object] = dict(plain_args(ev.args, info.args) if info else ev.args)
        if ev.stack is not None:
            args["stack"] = [str(frame) for frame in ev.stack]
        self._write({"ph": "i", "s": "t", "name": info.event if info else ev.probe,
                     "cat": ev.probe, "pid": ev.pid, "tid": ev.tid, "ts": _us(ev.ts_ns),
                     "args": args})

    def kernel_rows(self, rows: list[KernelRow]) -> None:
        for row in rows:
            self.kernel_event(row_event(row))

    def kernel_event(self, ev: KernelEvent) -> None:
        self._name_task(ev)
        opening = {"off_cpu": "sched", "syscall_enter": "syscall"}.get(ev.kind)
        if opening is not None:
            self._kernel_open[ev.tid, opening] = ev
            return
        closing = {"on_cpu": "sched", "syscall_exit": "syscall"}.get(ev.kind)
        if closing is not None:
            start = self._kernel_open.pop((ev.tid, closing), None)
            if start is not None:
                self._kernel_slice(start, ev)
            return
        self._kernel_instant(ev)

    def _kernel_slice(self, start: KernelEvent, end: KernelEvent) -> None:
        if start.kind == "off_cpu":
            name, cat, args = f"off-cpu ({start.fields.get('state')})", "sched", start.fields
        else:
            name, cat, args = start.name, "syscall", {**start.fields, **end.fields}
        self._write({"ph": "X", "name": name, "cat": cat, "pid": start.pid, "tid": start.tid,
                     "ts": _us(start.ts_ns), "dur": _us(end.ts_ns - start.ts_ns),
                     "args": args})

    def _kernel_instant(self, ev: KernelEvent) -> None:
        self._write({"ph": "i", "s": "t", "name": ev.name, "cat": "kernel", "pid": ev.pid,
                     "tid": ev.tid, "ts": _us(ev.ts_ns), "args": ev.fields})

    def kernel_summary(self, events: int, lost: int) -> None:
        self._kernel_counts = {"events": events, "lost": lost}

    def summary(self, events: int, lost: int) -> None:
        for ev in sorted(self._pairer.still_open(), key=lambda e: e.ts_ns):
            self._instant(ev)
        for kev in sorted(self._kernel_open.values(), key=lambda e: e.ts_ns):
            self._kernel_instant(kev)
        self._kernel_open.clear()
        counts: dict[str, object] = {"events": events, "lost": lost}
        if self._kernel_counts is not None:
            counts["kernel"] = self._kernel_counts
        counts["clocks"] = {"start": self.clock_start.as_dict(),
                            "end": (self.clock_end or snapshot()).as_dict()}
        self.out.write('\n],"uprobes":' + _dumps(counts) + "}\n")
