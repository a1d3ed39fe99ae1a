"""The probe registry, after the kernel's design: the ptrace engine keeps its
probes here and a `Session` its consumers (the kernel engine's probes live
in the kernel's own registry).

A `Probe` is one instruction of one file, keyed by (dev, ino, file offset)
(or, in the vDSO, by process and offset). Probes sit in a sorted index, so
an engine that sees a file mapped finds all of that inode's probes in one
range scan (the kernel's `build_probe_list`). Each probe has consumers: a
handler, a return handler, a task filter. What a hit calls is prepared when
consumers change, never searched per hit: nothing, one handler directly, or
a prepared tuple. Consumers may come and go while probes fire: dispatchers
are immutable and swapped whole.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from uprobes.errors import EngineError
from uprobes.model.probe import InodeKey, ProbeKey, ResolvedProbe, VdsoKey


class TaskLike(Protocol):
    """What a filter needs to know of the task that hit a probe."""

    @property
    def pid(self) -> int: ...
    @property
    def tid(self) -> int: ...
    @property
    def comm(self) -> str: ...


Handler = Callable[[TaskLike], object]
Dispatch = Callable[[TaskLike], None]


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a consumer wants; None in a field means any.

    `wants_process` decides before a breakpoint is placed (the kernel's
    `uprobe_consumer.filter` prefilter); `accepts` decides per hit.
    """

    pids: frozenset[int] | None = None
    tids: frozenset[int] | None = None
    comms: frozenset[str] | None = None

    def wants_process(self, pid: int, comm: str | None = None) -> bool:
        if self.pids is not None and pid not in self.pids:
            return False
        # A process's comm changes at exec; decide on it only when known.
        return not (self.comms is not None and comm is not None and comm not in self.comms)

    def accepts(self, task: TaskLike) -> bool:
        if self.pids is not None and task.pid not in self.pids:
            return False
        if self.tids is not None and task.tid not in self.tids:
            return False
        return self.comms is None or task.comm in self.comms


@dataclass(eq=False)
class Consumer:
    """One user of a probe: what to call on entry and on return, for whom."""

    handler: Handler | None = None
    ret_handler: Handler | None = None
    filter: TaskFilter | None = None
    tag: object = None

    def wants_process(self, pid: int, comm: str | None = None) -> bool:
        return self.filter is None or self.filter.wants_process(pid, comm)


def _nothing(task: TaskLike) -> None:
    return None


def prepare_dispatch(pairs: list[tuple[TaskFilter | None, Handler]]) -> Dispatch:
    """The call a hit makes: direct for one consumer, a loop over a tuple for several."""
    if not pairs:
        return _nothing
    if len(pairs) == 1:
        flt, handler = pairs[0]
        if flt is None:
            return handler  # type: ignore[return-value]

        def filtered(task: TaskLike) -> None:
            if flt.accepts(task):
                handler(task)
        return filtered
    prepared = tuple(pairs)

    def chain(task: TaskLike) -> None:
        for f, h in prepared:
            if f is None or f.accepts(task):
                h(task)
    return chain


@dataclass(eq=False)
class Probe:
    """One probed instruction and its consumers (refcounted by them)."""

    key: ProbeKey
    point: ResolvedProbe
    consumers: tuple[Consumer, ...] = ()
    dispatch: Dispatch = field(default=_nothing)
    ret_dispatch: Dispatch = field(default=_nothing)

    @property
    def refs(self) -> int:
        return len(self.consumers)

    @property
    def wants_return(self) -> bool:
        return any(c.ret_handler is not None for c in self.consumers)

    def wants_process(self, pid: int, comm: str | None = None) -> bool:
        """Whether any consumer wants a breakpoint in process `pid` at all."""
        return any(c.wants_process(pid, comm) for c in self.consumers)

    def _rebuild(self) -> None:
        entry = [(c.filter, c.handler) for c in self.consumers if c.handler is not None]
        ret = [(c.filter, c.ret_handler) for c in self.consumers if c.ret_handler is not None]
        self.dispatch = prepare_dispatch(entry)
        self.ret_dispatch = prepare_dispatch(ret)


def _sort_key(key: ProbeKey) -> tuple[int, int, int, int]:
    if isinstance(key, InodeKey):
        return (0, key.dev, key.ino, key.file_offset)
    return (1, key.pid, 0, key.offset)


class Registry:
    """All probes of a session, by key, in key order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._probes: dict[ProbeKey, Probe] = {}
        self._order: list[tuple[int, int, int, int]] = []
        self._keys: list[ProbeKey] = []

    def __len__(self) -> int:
        return len(self._probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter([self._probes[k] for k in self._keys])

    def get(self, key: ProbeKey) -> Probe | None:
        return self._probes.get(key)

    def add(self, point: ResolvedProbe, consumer: Consumer) -> Probe:
        """Add `consumer` to the probe at `point.key`, creating the probe if new."""
        with self._lock:
            probe = self._probes.get(point.key)
            if probe is None:
                probe = Probe(point.key, point)
                sk = _sort_key(point.key)
                i = bisect.bisect_left(self._order, sk)
                self._order.insert(i, sk)
                self._keys.insert(i, point.key)
                self._probes[point.key] = probe
            elif probe.point.ref_ctr_offset != point.ref_ctr_offset:
                raise EngineError(
                    f"{point.path}:0x{point.file_offset:x}: reference counter offset mismatch "
                    f"with an existing probe (0x{probe.point.ref_ctr_offset or 0:x} vs "
                    f"0x{point.ref_ctr_offset or 0:x})")
            probe.consumers = probe.consumers + (consumer,)
            probe._rebuild()
            return probe

    def remove(self, key: ProbeKey, consumer: Consumer) -> bool:
        """Drop `consumer`; returns True when that was the probe's last one (it is gone)."""
        with self._lock:
            probe = self._probes.get(key)
            if probe is None or consumer not in probe.consumers:
                raise EngineError(f"no such consumer on probe {key}")
            probe.consumers = tuple(c for c in probe.consumers if c is not consumer)
            probe._rebuild()
            if probe.consumers:
                return False
            sk = _sort_key(key)
            i = bisect.bisect_left(self._order, sk)
            del self._order[i]
            del self._keys[i]
            del self._probes[key]
            return True

    def in_inode(self, dev: int, ino: int) -> list[Probe]:
        """Every probe of one file, by file offset: what to place when it is mapped."""
        lo = bisect.bisect_left(self._order, (0, dev, ino, -1))
        hi = bisect.bisect_left(self._order, (0, dev, ino + 1, -1))
        return [self._probes[k] for k in self._keys[lo:hi]]

    def in_vdso(self, pid: int) -> list[Probe]:
        lo = bisect.bisect_left(self._order, (1, pid, 0, -1))
        hi = bisect.bisect_left(self._order, (1, pid + 1, 0, -1))
        return [self._probes[k] for k in self._keys[lo:hi] if isinstance(k, VdsoKey)]

    def inodes(self) -> list[tuple[int, int]]:
        """The distinct files probed, in order."""
        out: list[tuple[int, int]] = []
        for k in self._keys:
            if isinstance(k, InodeKey) and (not out or out[-1] != (k.dev, k.ino)):
                out.append((k.dev, k.ino))
        return out
