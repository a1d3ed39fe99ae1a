"""The hit filters of a run: `--if COND`, `--comm NAME...`, `--tid TID...`.

All three become one condition (`comm == "a" || comm == "b"`, and the
same for tids, joined with COND by `&&`), so each engine has one thing to
apply. The kernel engine hands its filter text to every perf event of a
probe (PERF_EVENT_IOC_SET_FILTER, checked against the probe's record in
perf_tp_event()): a hit that fails it writes no record and is not counted
by the event either, so it is neither read nor "lost". The ptrace engine
tests the task fields before it fetches anything, the rest after.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from uprobes.probe import ResolvedProbe
from uprobes.registry import TaskFilter
from uprobes.spec.condition import TASK_FIELDS, Compare, Condition, Event, Logic, Node, \
    parse_condition


@dataclass(frozen=True)
class HitFilter:
    """Which hits a run keeps. `condition` is the user's `--if`; `comms` and
    `tids` the tasks named by `--comm` and `--tid` (empty: any)."""

    condition: Condition | None = None
    comms: tuple[str, ...] = ()
    tids: tuple[int, ...] = ()

    @classmethod
    def parse(cls, condition: str | None, comms: Sequence[str] | None = None,
              tids: Sequence[int] | None = None) -> HitFilter | None:
        """The filter of a command line; None when it filters nothing. A bad
        condition raises SpecError with a caret."""
        if condition is None and not comms and not tids:
            return None
        return cls(None if condition is None else parse_condition(condition),
                   tuple(dict.fromkeys(comms or ())), tuple(dict.fromkeys(tids or ())))

    @property
    def combined(self) -> Condition:
        """Everything as one condition."""
        parts: list[Node] = []
        for field, values in (("comm", self.comms), ("tid", self.tids)):
            if values:
                parts.append(_any_of([Compare(field, "==", v) for v in values]))
        if self.condition is not None:
            parts.append(self.condition.root)
        root = parts[0]
        for part in parts[1:]:
            root = Logic("&&", root, part)
        text = " && ".join(filter(None, [
            " || ".join(f'comm == "{c}"' for c in self.comms),
            " || ".join(f"tid == {t}" for t in self.tids),
            self.condition.text if self.condition else ""]))
        return Condition(text, root)

    @property
    def arg_fields(self) -> set[str]:
        """The probe fetchargs the condition names (what a probe must fetch)."""
        return {f for f in self.combined.fields if f not in TASK_FIELDS}

    @property
    def needs_comm(self) -> bool:
        return "comm" in self.combined.fields

    def check(self, probes: Sequence[ResolvedProbe]) -> None:
        """Every probe has the fields the condition names, of fitting kinds
        (SpecError naming the probe's fields otherwise)."""
        if self.condition is None:
            return
        from uprobes.engines.kernel.records import probe_info
        for p in probes:
            self.condition.check_fields(p.name, dict(probe_info(p).args))

    def kernel_filter(self) -> str | None:
        """The kernel's filter text, or None when it cannot say it (`pid`)."""
        return self.combined.kernel_filter()

    def why_not_kernel(self) -> str:
        """Why `kernel_filter()` is None, in a few words."""
        if "pid" in self.combined.fields:
            return "the kernel's event filter has no field for the process id (pid)"
        return "a string holds both quote characters (the kernel's strings have no escapes)"

    def predicate(self) -> Callable[[Event], bool]:
        """The whole filter, per event."""
        return self.combined.predicate()

    def task_filter(self) -> TaskFilter | None:
        """`--comm`/`--tid` alone: what can be decided before fetching anything."""
        if not self.comms and not self.tids:
            return None
        return TaskFilter(tids=frozenset(self.tids) if self.tids else None,
                          comms=frozenset(self.comms) if self.comms else None)


@dataclass(frozen=True)
class TaskView:
    """What a condition reads of a hit before an `Event` is built."""

    pid: int
    tid: int
    comm: str
    args: Mapping[str, object]


def _any_of(nodes: list[Node]) -> Node:
    root = nodes[0]
    for n in nodes[1:]:
        root = Logic("||", root, n)
    return root
