"""What `--kernel` names, the tracepoints behind each, and their records decoded.

`sched` is `sched:sched_switch` (off-CPU, with the state the thread left
in), `sched:sched_wakeup` (woken: runnable again, waiting for a CPU) and
perf's switch records (back on a CPU); `syscalls` is
`raw_syscalls:sys_enter`/`sys_exit` (two events for every system call,
named from the system call table, the arguments named by the kernel's
`syscalls:sys_enter_NAME` format); `faults` is
`exceptions:page_fault_user`. Any other word is a tracepoint by name,
decoded field by field from its `format` file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from uprobes.errors import KernelError, UsageError
from uprobes.model.kevent import KernelRow, KernelShape, KernelValue, shape_id
from uprobes.sys import tracepoints
from uprobes.sys.event_format import EventFormat
from uprobes.sys.tracefs import Tracefs

SETS: dict[str, tuple[str, ...]] = {
    "sched": ("sched:sched_switch", "sched:sched_wakeup"),
    "syscalls": ("raw_syscalls:sys_enter", "raw_syscalls:sys_exit"),
    "faults": ("exceptions:page_fault_user",),
}

# The task states sched_switch's print fmt names, by bit (TASK_REPORT);
# none set is R, and the bit above them marks a preempted task (`R+`).
_STATE_LETTERS = "SDTtXZPI"
_PREEMPTED = 1 << len(_STATE_LETTERS)

Decoder = Callable[[bytes, int, int, int, int, int, int, str], KernelRow]
"""(ring bytes, where the raw record starts in them, its size, pid, tid,
cpu, ts_ns, comm) -> the row. Offsets, not a slice: most decoders unpack a
few fields in place. (raw_syscalls' records are decoded in the walk over
the ring itself, records.py, by the shapes of `Syscalls`.)"""

Unpack = Callable[[bytes, int], tuple[int, ...]]

ON_CPU = shape_id(KernelShape("on_cpu", "sched_switch", ints=True))
"""Back on a CPU (perf's switch record, no fields): its shape's number."""


@dataclass(frozen=True)
class Tracepoint:
    """One tracepoint to open: its name, format, whether it is `sched` (then
    its events also get perf's switch records), and `about`: the field
    naming the task an event is about when that is not the task it runs in
    (sched_wakeup runs in the waker; measured on 6.18, the woken task's own
    perf events do not get it, so it is opened on every CPU and filtered
    in the kernel by that field)."""

    name: str
    format: EventFormat
    switches: bool = False
    about: str | None = None


def parse_kernel_option(text: str) -> list[str]:
    """`sched,syscalls,faults,GROUP:EVENT` -> the tracepoint names, each once."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise UsageError("--kernel needs sched, syscalls, faults or GROUP:EVENT names")
    names: list[str] = []
    for w in words:
        if w in SETS:
            names += SETS[w]
        elif ":" in w or "/" in w:
            group, event = tracepoints.split_name(w)
            names.append(f"{group}:{event}")
        else:
            raise UsageError(f"--kernel {w!r}: not sched, syscalls, faults nor a "
                             "GROUP:EVENT tracepoint")
    return list(dict.fromkeys(names))


def resolve(tracefs: Tracefs, names: list[str]) -> list[Tracepoint]:
    """The format of each tracepoint (an unknown one: a UsageError with near names)."""
    sets = {n: word for word, members in SETS.items() for n in members}
    out = []
    for name in names:
        why = f"--kernel {sets[name]}" if name in sets else ""
        out.append(Tracepoint(name, tracepoints.find(tracefs, name, why),
                              switches=name == "sched:sched_switch",
                              about="pid" if name == "sched:sched_wakeup" else None))
    return out


def state_letters(prev_state: int) -> str:
    """sched_switch's `prev_state` as its print fmt shows it: `S`, `D`, `R+`..."""
    bits = prev_state & (_PREEMPTED - 1)
    text = "|".join(c for i, c in enumerate(_STATE_LETTERS) if bits >> i & 1) or "R"
    return text + ("+" if prev_state & _PREEMPTED else "")


def _plain(value: object) -> KernelValue:
    if isinstance(value, tuple):
        return list(value)
    assert value is None or isinstance(value, int | str)
    return value


def _chars(raw: bytes, offset: int, size: int) -> str:
    """A `char name[N]` field: the text up to its NUL."""
    return bytes(raw[offset:offset + size]).split(b"\0", 1)[0].decode("utf-8", "replace")


class Syscalls:
    """raw_syscalls' records: where their fields are, and the shape of each
    system call's entry and exit by its number (made once, on its first
    event). `entered` (tid -> the call it is in) names an exit whose number
    the kernel reports as -1."""

    ID_AT = 8  # the system call's number, in both records
    VALUE_AT = 16  # sys_enter's first argument, sys_exit's return value

    def __init__(self, tracefs: Tracefs, points: list[Tracepoint]) -> None:
        self.tracefs = tracefs
        formats = {tp.name: tp.format for tp in points}
        self.enter_id = self.exit_id = -1  # -1: not asked for
        for name, field in (("raw_syscalls:sys_enter", "args"), ("raw_syscalls:sys_exit", "ret")):
            fmt = formats.get(name)
            if fmt is None:
                continue
            if (fmt.field("id").offset, fmt.field(field).offset) != (self.ID_AT, self.VALUE_AT):
                raise KernelError(f"unexpected layout of {fmt.name}: id at "
                                  f"{fmt.field('id').offset}, {field} at {fmt.field(field).offset}")
            if name.endswith("enter"):
                self.enter_id = fmt.id
            else:
                self.exit_id = fmt.id
        self.entered: dict[int, int] = {}
        self.enters: dict[int, tuple[int, Unpack | None]] = {}
        self.exits: dict[int, int] = {}

    def enter(self, nr: int) -> tuple[int, Unpack | None]:
        """The shape (its number) of system call `nr`'s entry, and what
        unpacks its arguments at VALUE_AT (None: it has none)."""
        names = self._names_of(nr)[:6]
        got = self.enters[nr] = (
            shape_id(KernelShape("syscall_enter", tracepoints.syscall_name(nr), names,
                                 ints=True)),
            struct.Struct(f"<{len(names)}Q").unpack_from if names else None)
        return got

    def exit(self, nr: int) -> int:
        """The shape (its number) of system call `nr`'s exit."""
        shape = self.exits[nr] = shape_id(KernelShape(
            "syscall_exit", tracepoints.syscall_name(nr), ("ret",), ints=True))
        return shape

    def _names_of(self, nr: int) -> tuple[str, ...]:
        """The argument names of system call `nr`, from its own syscalls:
        tracepoint's format (all six, `arg1`..., when it has none)."""
        names: tuple[str, ...] = tuple(f"arg{i}" for i in range(1, 7))
        name = tracepoints.syscall_names().get(nr)
        if name is not None:
            try:
                fmt = self.tracefs.event_format("syscalls", f"sys_enter_{name}")
                names = tuple(f.name for f in fmt.fields if f.name != "__syscall_nr")
            except KernelError:
                pass
        return names


class Decoders:
    """Raw record -> `KernelRow`, by the tracepoint id it carries (but
    raw_syscalls': `syscalls`). `comms` (tid -> comm) learns each thread's
    name from its switches off a CPU."""

    def __init__(self, tracefs: Tracefs, points: list[Tracepoint],
                 comms: dict[int, str] | None = None) -> None:
        self.comms: dict[int, str] = {} if comms is None else comms
        self.syscalls = Syscalls(tracefs, points)
        self.by_id: dict[int, Decoder] = {
            tp.format.id: self._decoder(tp) for tp in points if not tp.name.startswith(
                "raw_syscalls:sys_")}

    def _decoder(self, tp: Tracepoint) -> Decoder:
        fmt = tp.format
        if tp.name == "sched:sched_switch":
            return self._sched_switch(fmt)
        if tp.name == "sched:sched_wakeup":
            return self._sched_wakeup(fmt)
        kind = "page_fault" if tp.name == "exceptions:page_fault_user" else "tracepoint"
        fields = fmt.fields
        shape = shape_id(KernelShape(kind, fmt.name if kind == "page_fault" else tp.name,
                                     tuple(f.name for f in fields)))

        def generic(data: bytes, at: int, size: int, pid: int, tid: int, cpu: int, ts: int,
                    comm: str) -> KernelRow:
            raw = data[at:at + size]
            return (ts, pid, tid, cpu, comm, shape, tuple(_plain(f.decode(raw)) for f in fields))
        return generic

    def _sched_switch(self, fmt: EventFormat) -> Decoder:
        state, prev_comm, next_comm, next_pid = (
            fmt.field(n) for n in ("prev_state", "prev_comm", "next_comm", "next_pid"))
        shape = shape_id(KernelShape("off_cpu", "sched_switch",
                                     ("state", "next_comm", "next_pid")))
        comms = self.comms

        def off(data: bytes, at: int, size: int, pid: int, tid: int, cpu: int, ts: int,
                comm: str) -> KernelRow:
            raw = data[at:at + size]
            prev_state = state.decode(raw)
            # The record names the thread as it was: better than a comm read since.
            name = comms[tid] = _chars(raw, prev_comm.offset, prev_comm.size)
            return (ts, pid, tid, cpu, name, shape, (
                state_letters(prev_state if isinstance(prev_state, int) else 0),
                _chars(raw, next_comm.offset, next_comm.size), _plain(next_pid.decode(raw))))
        return off

    def _sched_wakeup(self, fmt: EventFormat) -> Decoder:
        woken, comm_field, cpu_field = (fmt.field(n) for n in ("pid", "comm", "target_cpu"))
        shape = shape_id(KernelShape("wakeup", "sched_wakeup", ("waker_tid", "target_cpu")))

        def wakeup(data: bytes, at: int, size: int, pid: int, tid: int, cpu: int, ts: int,
                   comm: str) -> KernelRow:
            raw = data[at:at + size]
            # The sample's task is the waker; the event is the woken thread's.
            target = woken.decode(raw)
            woken_tid = target if isinstance(target, int) else tid
            return (ts, -1, woken_tid, cpu, _chars(raw, comm_field.offset, comm_field.size),
                    shape, (tid, _plain(cpu_field.decode(raw))))
        return wakeup
