"""Where a call's time goes (`uprobes latency --breakdown`).

From the kernel's events of a thread (engines/kevents) come two lists of
intervals: off the CPU, each with its reason, and inside system calls,
each with the call's name. Off the CPU begins at a switch out, whose state
says why (`S` sleeping, `D` blocked, `R` preempted while runnable, `t`
stopped by a tracer); a wakeup turns the rest of the interval into
waiting for a CPU (`runnable`); a switch back in ends it. A call from
entry to return is then cut by these intervals into parts:

- `on-cpu`: the call's time minus every part off the CPU;
- `off-cpu REASON`: the time off the CPU for each reason;
- `syscall NAME`: the time inside each system call (its time off the CPU
  counted there too: the two views overlap, each adds up on its own).

Each part's time per call is kept in a histogram per function (0 for a
call without that part), and the on- and off-CPU parts are also summed by
the log2 bucket of the call's duration (`by_bucket`), for a histogram
whose bars show what their calls were made of.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field

from uprobes.analysis.histogram import Histogram
from uprobes.model.kevent import KernelEvent

ON_CPU = "on-cpu"
RUNNABLE = "runnable"
_REASONS = {"R": RUNNABLE, "S": "sleeping", "I": "sleeping", "D": "blocked", "P": "blocked",
            "T": "stopped", "t": "stopped", "X": "exiting", "Z": "exiting"}

Interval = tuple[int, int, str]  # (start_ns, end_ns, what)


def reason(state: object) -> str:
    """The reason for a sched_switch state (`S`, `R+`, `D|K`...)."""
    return _REASONS.get(str(state)[:1], "other")


@dataclass
class ThreadIntervals:
    """One thread's time off the CPU and in system calls, in time order."""

    off: list[Interval] = field(default_factory=list)
    syscalls: list[Interval] = field(default_factory=list)
    _off_since: tuple[int, str] | None = None
    _in_call: tuple[int, str] | None = None

    def add(self, ev: KernelEvent) -> None:
        """The thread's next event (in time order)."""
        kind = ev.kind
        if kind == "off_cpu":
            self._off_since = (ev.ts_ns, reason(ev.fields.get("state")))
        elif kind == "wakeup":
            if self._off_since is not None and self._off_since[1] != RUNNABLE:
                start, why = self._off_since
                self.off.append((start, ev.ts_ns, why))
                self._off_since = (ev.ts_ns, RUNNABLE)
        elif kind == "on_cpu":
            if self._off_since is not None:
                start, why = self._off_since
                self.off.append((start, ev.ts_ns, why))
                self._off_since = None
        elif kind == "syscall_enter":
            self._in_call = (ev.ts_ns, ev.name)
        elif kind == "syscall_exit":
            if self._in_call is not None and self._in_call[1] == ev.name:
                self.syscalls.append((self._in_call[0], ev.ts_ns, ev.name))
            self._in_call = None


def intervals(events: Iterable[KernelEvent]) -> dict[int, ThreadIntervals]:
    """Each thread's intervals from its kernel events (any order)."""
    threads: dict[int, ThreadIntervals] = {}
    for ev in sorted(events, key=lambda e: e.ts_ns):
        t = threads.get(ev.tid)
        if t is None:
            t = threads[ev.tid] = ThreadIntervals()
        t.add(ev)
    return threads


def _overlap(spans: list[Interval], starts: list[int], lo: int, hi: int) -> dict[str, int]:
    """ns of [lo, hi) inside the `spans` (sorted, not overlapping), by what."""
    out: dict[str, int] = {}
    i = max(bisect_right(starts, lo) - 1, 0)
    while i < len(spans) and spans[i][0] < hi:
        start, end, what = spans[i]
        ns = min(end, hi) - max(start, lo)
        if ns > 0:
            out[what] = out.get(what, 0) + ns
        i += 1
    return out


@dataclass
class Call:
    """One completed call of a function, on one thread."""

    function: str
    tid: int
    start_ns: int
    end_ns: int


def call_parts(call: Call, thread: ThreadIntervals | None,
               starts: tuple[list[int], list[int]] | None = None) -> dict[str, int]:
    """The parts (see the module's doc) of one call, in ns."""
    duration = max(call.end_ns - call.start_ns, 0)
    if thread is None:
        return {ON_CPU: duration}
    off_starts, sys_starts = starts or ([s for s, _, _ in thread.off],
                                        [s for s, _, _ in thread.syscalls])
    off = _overlap(thread.off, off_starts, call.start_ns, call.end_ns)
    parts = {ON_CPU: max(duration - sum(off.values()), 0)}
    parts.update((f"off-cpu {why}", ns) for why, ns in off.items())
    parts.update((f"syscall {name}", ns) for name, ns in
                 _overlap(thread.syscalls, sys_starts, call.start_ns, call.end_ns).items())
    return parts


@dataclass
class Breakdown:
    """One function's calls, split: a histogram per part, and the totals."""

    calls: int = 0
    total_ns: int = 0
    parts: dict[str, Histogram] = field(default_factory=dict)
    part_totals: dict[str, int] = field(default_factory=dict)
    by_bucket: dict[int, dict[str, int]] = field(default_factory=dict)
    """Log2 bucket of a call's duration in ns (its `bit_length`, at least
    1, as Histogram.log2_buckets numbers rows) -> the on- and off-CPU
    parts of its calls, summed."""


def breakdowns(calls: Iterable[Call], events: Iterable[KernelEvent]) -> dict[str, Breakdown]:
    """Each function's breakdown, from its calls and its threads' kernel events."""
    threads = intervals(events)
    starts = {tid: ([s for s, _, _ in t.off], [s for s, _, _ in t.syscalls])
              for tid, t in threads.items()}
    per_call: dict[str, list[dict[str, int]]] = {}
    totals: dict[str, int] = {}
    buckets: dict[str, dict[int, dict[str, int]]] = {}
    for call in calls:
        parts = call_parts(call, threads.get(call.tid), starts.get(call.tid))
        per_call.setdefault(call.function, []).append(parts)
        duration = call.end_ns - call.start_ns
        totals[call.function] = totals.get(call.function, 0) + duration
        row = buckets.setdefault(call.function, {}).setdefault(
            max(duration.bit_length(), 1), {})
        for name, ns in parts.items():
            if not name.startswith("syscall "):
                row[name] = row.get(name, 0) + ns
    out: dict[str, Breakdown] = {}
    for function, rows in per_call.items():
        names = sorted({name for row in rows for name in row},
                       key=lambda n: (n != ON_CPU, not n.startswith("off-cpu"), n))
        b = out[function] = Breakdown(calls=len(rows), total_ns=totals[function],
                                      by_bucket=buckets[function])
        for name in names:
            h = b.parts[name] = Histogram()
            for row in rows:
                h.add(row.get(name, 0))
            b.part_totals[name] = h.total
    return out
