"""The hit filters of a run: `--if COND`, `--comm NAME...`, `--tid TID...`
(and a `Session` consumer's `condition`, `comm`, `tid` and `pid`).

All of them become one condition (`comm == "a" || comm == "b"`, and the
same for tids and pids, joined with COND by `&&`), so each engine has one
thing to apply. The kernel engine hands its filter text to every perf event of a
probe (PERF_EVENT_IOC_SET_FILTER, checked against the probe's record in
perf_tp_event()): a hit that fails it writes no record and is not counted
by the event either, so it is neither read nor "lost". The ptrace engine
tests the task fields before it fetches anything, the rest after.

`pushdown` gives the one kernel filter for a probe whose consumers each
have their own filter: it passes what any of them keeps, so the kernel
drops the hits none of them wants and each still tests its own filter.

A probe's own `guard` (a `py:` function's, model/probe.py) is no user's
filter: `with_guard` adds it to whatever else a probe's hits are tested on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from uprobes.lang.condition import (
    TASK_FIELDS,
    Compare,
    Condition,
    Event,
    Node,
    join,
    parse_condition,
    widened,
)
from uprobes.model.event import ProbeInfo
from uprobes.model.probe import ResolvedProbe
from uprobes.model.registry import TaskFilter


@dataclass(frozen=True)
class HitFilter:
    """Which hits a run keeps. `condition` is the user's `--if`; `comms`,
    `tids` and `pids` the tasks named by `--comm` and `--tid` or a
    Session consumer's `comm`, `tid` and `pid` (empty: any)."""

    condition: Condition | None = None
    comms: tuple[str, ...] = ()
    tids: tuple[int, ...] = ()
    pids: tuple[int, ...] = ()

    @classmethod
    def parse(cls, condition: str | None, comms: Sequence[str] | None = None,
              tids: Sequence[int] | None = None,
              pids: Sequence[int] | None = None) -> HitFilter | None:
        """The filter of a command line or a consumer; None when it filters
        nothing. A bad condition raises SpecError with a caret."""
        if condition is None and not comms and not tids and not pids:
            return None
        return cls(None if condition is None else parse_condition(condition),
                   tuple(dict.fromkeys(comms or ())), tuple(dict.fromkeys(tids or ())),
                   tuple(dict.fromkeys(pids or ())))

    @property
    def combined(self) -> Condition:
        """Everything as one condition."""
        parts: list[Node] = []
        for field, values in (("comm", self.comms), ("tid", self.tids),
                              ("pid", self.pids)):
            if values:
                parts.append(join("||", [Compare(field, "==", v) for v in values]))
        if self.condition is not None:
            parts.append(self.condition.root)
        root = join("&&", parts)
        text = " && ".join(filter(None, [
            " || ".join(f'comm == "{c}"' for c in self.comms),
            " || ".join(f"tid == {t}" for t in self.tids),
            " || ".join(f"pid == {p}" for p in self.pids),
            self.condition.text if self.condition else ""]))
        return Condition(text, root)

    @property
    def arg_fields(self) -> set[str]:
        """The probe fetchargs the condition names (what a probe must fetch)."""
        return {f for f in self.combined.fields if f not in TASK_FIELDS}

    @property
    def needs_comm(self) -> bool:
        return "comm" in self.combined.fields

    def check(self, probes: Sequence[ProbeInfo]) -> None:
        """Every probe has the fields the condition names, of fitting kinds
        (SpecError naming the probe's fields otherwise)."""
        if self.condition is None:
            return
        for p in probes:
            self.condition.check_fields(p.name, dict(p.args))

    def kernel_filter(self) -> str | None:
        """The kernel's filter text, or None when it cannot say it (`pid`)."""
        return self.combined.kernel_filter()

    def why_not_kernel(self) -> str:
        """Why `kernel_filter()` is None, in a few words."""
        return self.combined.why_not_kernel()

    def predicate(self) -> Callable[[Event], bool]:
        """The whole filter, per event."""
        return self.combined.predicate()

    def task_filter(self) -> TaskFilter | None:
        """The tasks alone: what can be decided before fetching anything."""
        if not self.comms and not self.tids and not self.pids:
            return None
        return TaskFilter(pids=frozenset(self.pids) if self.pids else None,
                          tids=frozenset(self.tids) if self.tids else None,
                          comms=frozenset(self.comms) if self.comms else None)


def pushdown(filters: Sequence[HitFilter | None]) -> Condition | None:
    """The one condition the kernel can test for a probe whose consumers
    have `filters` (None: a consumer that takes every hit): it holds for
    every hit one of them keeps (see `widened`). None when that is every
    hit: a consumer unfiltered, or filtered only on what the kernel cannot
    say (`pid`, a Python predicate)."""
    roots: list[Node] = []
    for flt in filters:
        root = None if flt is None else widened(flt.combined.root)
        if root is None:
            return None
        if root not in roots:
            roots.append(root)
    if not roots:
        return None
    either = join("||", roots)
    return Condition(Condition("", either).kernel_filter() or "", either)


@dataclass(frozen=True)
class TaskView:
    """What a condition reads of a hit before an `Event` is built."""

    pid: int
    tid: int
    comm: str
    args: Mapping[str, object]


@cache
def _guard(text: str) -> Condition:
    return parse_condition(text)


def counted_fields(flt: HitFilter | None, probe: ResolvedProbe) -> set[str]:
    """The fetchargs of `probe` a count of its hits fetches: those `flt`
    and the probe's guard test (counting writes no record)."""
    guard = with_guard(None, probe)
    return (flt.arg_fields if flt else set()) | (guard.fields if guard else set())


def with_guard(cond: Condition | None, probe: ResolvedProbe) -> Condition | None:
    """`cond` (None: no condition) and `probe`'s guard, both."""
    if probe.guard is None:
        return cond
    guard = _guard(probe.guard)
    if cond is None:
        return guard
    return Condition(f"({guard.text}) && ({cond.text})", join("&&", [guard.root, cond.root]))
