"""What the kernel's own events are beside the probes' hits (`trace --kernel`).

A `KernelEvent` is one record of a kernel tracepoint for a traced thread,
stamped on the probes' clock (CLOCK_MONOTONIC ns), so the two interleave
by `ts_ns`. Kinds, each with its `fields`:

- `off_cpu` (`sched_switch`): the thread left the CPU; `state` is the
  kernel's letter for why (`R`/`R+` preempted while runnable, `S`
  sleeping, `D` blocked uninterruptibly, ...), `next_comm`, `next_pid`.
- `wakeup` (`sched_wakeup`): the thread was woken (runnable again, waiting
  for a CPU); `waker_tid`, `target_cpu`.
- `on_cpu` (`sched_switch`): the thread came back on a CPU.
- `syscall_enter` (`name` the system call's): its arguments by the names
  the kernel gives them; `syscall_exit`: `ret`.
- `page_fault` (`page_fault_user`): `address`, `ip`, `error_code`.
- `tracepoint` (`name` is `group:event`): every field of the record.

A busy thread makes a hundred thousand of these a second, so the reader
hands them on as `KernelRow` tuples, `(ts_ns, pid, tid, cpu, comm, shape,
values)`: what events of one kind, name and field names share is one
`KernelShape`, and `values` are the fields in its order. A renderer that
writes many rows (JSON lines) works on the rows; `row_event` makes the
`KernelEvent` of one for the others.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TypeAlias

KernelValue = int | str | None | list[int] | list[str | None]

KINDS = ("off_cpu", "wakeup", "on_cpu", "syscall_enter", "syscall_exit", "page_fault", "tracepoint")


@dataclass(slots=True)
class KernelEvent:
    """One kernel event of one thread (see the module's kinds). Not frozen:
    a frozen dataclass costs a microsecond more to build, and a busy thread
    makes a hundred thousand of these a second; treat it as read-only."""

    ts_ns: int
    pid: int
    tid: int
    cpu: int
    kind: str
    name: str
    comm: str = ""
    fields: dict[str, KernelValue] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """The event as JSON lines write it: `kernel` (the kind) first."""
        return {"kernel": self.kind, "name": self.name, "pid": self.pid, "tid": self.tid,
                "comm": self.comm, "cpu": self.cpu, "ts_ns": self.ts_ns,
                "fields": self.fields}


@dataclass(frozen=True)
class KernelShape:
    """What the events of one kind, name and field names share. `ints`: every
    value is always an int (a renderer may then format them by a template
    made once per shape)."""

    kind: str
    name: str
    names: tuple[str, ...] = ()
    ints: bool = False


KernelRow: TypeAlias = tuple[int, int, int, int, str, int, tuple[KernelValue, ...]]
"""(ts_ns, pid, tid, cpu, comm, shape, values): one event, its shape by
number (`shape_id`), `values` named by the shape's `names`."""

# Rows name their shape by a number, not the object: a tuple of numbers,
# strings and such tuples is untracked by Python's cycle collector at its
# first pass, one holding an object is traversed by every pass, and a run
# holds a hundred thousand rows and more (waiting to be merged with hits).
_shapes: list[KernelShape] = []
_ids: dict[KernelShape, int] = {}
_ids_lock = threading.Lock()


def shape_id(shape: KernelShape) -> int:
    """The number rows carry for `shape` (one per distinct shape, kept for
    the process's life: there are a few per system call and tracepoint)."""
    n = _ids.get(shape)
    if n is None:
        with _ids_lock:
            n = _ids.setdefault(shape, len(_shapes))
            if n == len(_shapes):
                _shapes.append(shape)
    return n


def shape_of(n: int) -> KernelShape:
    """The shape numbered `n` by `shape_id`."""
    return _shapes[n]


def row_event(row: KernelRow) -> KernelEvent:
    """The `KernelEvent` of a row."""
    ts_ns, pid, tid, cpu, comm, shape, values = row
    kind = _shapes[shape]
    return KernelEvent(ts_ns, pid, tid, cpu, kind.kind, kind.name, comm,
                       dict(zip(kind.names, values)))
