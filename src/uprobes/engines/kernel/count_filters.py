"""The kernel filters of `KernelCounter`'s counters: the user's, and each site's own.

A shared event's counter would sum every probe point in it, so each counter
per site keeps only its own site's hits: the low 12 bits of the hit's
address (`__probe_ip`, `__probe_func` for a uretprobe) equal its file
offset's (a file is mapped page by page), and they differ between the probe
points of one event. The filter tests the few bits that tell a site from its
event's others (`selectors`, a binary split), then the user's filter. A
filtered-out hit is not counted (perf_tp_event() tests the filter first).

`pid` in a user's filter: the kernel's filter has no field for the process,
but a counter bound to a process knows it. A condition on `pid` (with
`==`/`!=`) is bound per process (`lang.condition.bind`): each process
counted gets what is left of the condition; system-wide, the processes
counted are those the condition names, and it must reject every other one
(`plan_filter`). Such counters are inherited by threads only
(`inherit_thread`): a child is another process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from uprobes.errors import ProcessError, UsageError
from uprobes.lang.condition import Condition, bind, values_of
from uprobes.model.filters import HitFilter


@dataclass(frozen=True)
class FilterPlan:
    """How a filter is counted in the kernel: `filters` is the kernel filter
    text for every task (key None) or, `by_pid`, per process (True: every
    hit, False: none); `pids`, the processes a `pid` condition names when no
    process was given."""

    filters: dict[int | None, str | bool]
    by_pid: bool = False
    pids: list[int] | None = None


def plan_filter(flt: HitFilter, pids: Sequence[int] | None) -> FilterPlan:
    """The kernel's part of counting with `flt` in processes `pids` (None:
    system-wide). UsageError when the kernel cannot count it: a string it
    cannot spell, `pid` compared otherwise than by == and !=, or a `pid`
    condition that holds for processes it does not name."""
    combined = flt.combined
    if "pid" not in combined.fields:
        text = flt.kernel_filter()
        if text is None:
            raise UsageError("count filters in the kernel, and here it cannot: "
                             f"{flt.why_not_kernel()}; `uprobes trace` or -e ptrace can")
        return FilterPlan({None: text})
    why = "count tests pid in the kernel by counting per process"
    try:
        others = bind(combined.root, "pid", None)
    except ValueError as e:
        raise UsageError(f"{why}, so it takes pid == N and pid != N only (not {e}); "
                         "`uprobes trace` or -e ptrace can") from None
    if others is not False:
        what = "processes it does not name" if pids is None else \
            "processes other than the one counted (its children)"
        raise UsageError(f"{why}, and this condition holds for {what}; name the processes "
                         "(pid == N), or use `uprobes trace` or -e ptrace")
    named = None
    if pids is None:
        named = [v for v in values_of(combined.root, "pid")
                 if isinstance(v, int) and bind(combined.root, "pid", v) is not False]
        for pid in named:
            if not os.path.exists(f"/proc/{pid}"):
                raise ProcessError(f"no process {pid} (the filter names it)")
    filters: dict[int | None, str | bool] = {}
    for pid in named if named is not None else pids or ():
        rest = bind(combined.root, "pid", pid)
        if isinstance(rest, bool):
            filters[pid] = rest
            continue
        text = Condition(combined.text, rest).kernel_filter()
        if text is None:
            raise UsageError("count filters in the kernel, and here it cannot: "
                             f"{flt.why_not_kernel()}; `uprobes trace` or -e ptrace can")
        filters[pid] = text
    return FilterPlan(filters, True, named)


def selectors(field_name: str, lows: list[int]) -> list[str]:
    """Per value of `lows` (distinct), a filter on `field_name` that holds for
    an address whose low bits are that value and for no other of `lows`: the
    bit tests of a binary split of them, the most even bit first, so a hit
    of another site fails after a test or two. One value: no test ("")."""
    out = {}

    def split(values: list[int], tests: list[str]) -> None:
        if len(values) == 1:
            out[values[0]] = " && ".join(tests)
            return
        bit = min(range(12), key=lambda b: abs(2 * sum(v >> b & 1 for v in values) - len(values)))
        ones = [v for v in values if v >> bit & 1]
        split(ones, [*tests, f"{field_name} & {1 << bit}"])
        split([v for v in values if not v >> bit & 1], [*tests, f"!({field_name} & {1 << bit})"])

    split(list(lows), [])
    return [out[v] for v in lows]
