"""Pairing entry and return events into call durations, per thread.

Each function's entries wait on a per-thread stack until their return:
recursion and nesting pair correctly. Every entry and return carries the
stack pointer (`__sp=%sp`), which tells live calls from calls that were
left without returning (longjmp, an exception unwinding through them): a
live caller's frame is always higher on the stack than its callee's, so a
new entry drops the open entries at or below its own stack pointer, and a
return drops those deeper than its frame. They are counted, never
mis-paired. A
return with no entry (the call began before the probes were in) is
skipped. At the function's entry the stack pointer points at the return
address; at the kernel's return probe it is 8 bytes higher (the `ret` has
popped it), at a probe on the `ret` instruction it is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uprobes.analysis.histogram import Histogram
from uprobes.engines.event import Event

SP_ARG = "__sp"


@dataclass
class CallPairer:
    """Feed it entry and return events; `histograms` maps a function's name
    (its entry probe's) to the durations of its completed calls."""

    histograms: dict[str, Histogram] = field(default_factory=dict)
    unpaired_returns: int = 0
    abandoned: int = 0
    _open: dict[tuple[int, int, int], list[tuple[int, int]]] = field(default_factory=dict)
    _names: dict[tuple[int, int], str] = field(default_factory=dict)

    def entry(self, ev: Event, name: str) -> None:
        """`name` is the function's display name; its entry is `ev.ip`."""
        sp = int(ev.args.get(SP_ARG) or 0)  # type: ignore[call-overload]
        self._names[(ev.pid, ev.ip)] = name
        stack = self._open.setdefault((ev.pid, ev.tid, ev.ip), [])
        while stack and stack[-1][0] <= sp:
            stack.pop()  # left without returning: a live caller is higher up
            self.abandoned += 1
        stack.append((sp, ev.ts_ns))
        self.histograms.setdefault(name, Histogram())

    def ret(self, ev: Event) -> None:
        func = ev.func if ev.func is not None else ev.ip
        stack = self._open.get((ev.pid, ev.tid, func))
        sp = int(ev.args.get(SP_ARG) or 0)  # type: ignore[call-overload]
        while stack and stack[-1][0] < sp - 8:
            stack.pop()  # a deeper frame that was left without returning
            self.abandoned += 1
        if not stack:
            self.unpaired_returns += 1
            return
        _, start = stack.pop()
        self.histograms[self._names[(ev.pid, func)]].add(ev.ts_ns - start)
