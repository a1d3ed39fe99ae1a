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
from uprobes.model.kevent import KernelEvent, KernelValue
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

Decoder = Callable[[bytes, int, int, int, int, int, int, str], KernelEvent]
"""(ring bytes, where the raw record starts in them, its size, pid, tid,
cpu, ts_ns, comm) -> the event. Offsets, not a slice: most decoders
unpack a few fields in place."""


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


class Decoders:
    """Raw record -> `KernelEvent`, by the tracepoint id it carries."""

    def __init__(self, tracefs: Tracefs, points: list[Tracepoint]) -> None:
        self.tracefs = tracefs
        self.by_id: dict[int, Decoder] = {}
        self._arg_names: dict[int, tuple[str, ...]] = {}
        self._entered: dict[int, int] = {}  # tid -> the system call it is in
        for tp in points:
            self.by_id[tp.format.id] = self._decoder(tp)

    def decode(self, raw: bytes, pid: int, tid: int, cpu: int, ts_ns: int,
               comm: str) -> KernelEvent | None:
        """One raw record (common_type first) on its own."""
        decoder = self.by_id.get(int.from_bytes(raw[0:2], "little"))
        return None if decoder is None else decoder(raw, 0, len(raw), pid, tid, cpu, ts_ns, comm)

    def _decoder(self, tp: Tracepoint) -> Decoder:
        fmt = tp.format
        if tp.name == "sched:sched_switch":
            return self._sched_switch(fmt)
        if tp.name == "sched:sched_wakeup":
            return self._sched_wakeup(fmt)
        if tp.name == "raw_syscalls:sys_enter":
            return self._sys_enter(fmt)
        if tp.name == "raw_syscalls:sys_exit":
            return self._sys_exit(fmt)
        kind = "page_fault" if tp.name == "exceptions:page_fault_user" else "tracepoint"
        name = fmt.name if kind == "page_fault" else tp.name
        fields = fmt.fields

        def generic(data: bytes, at: int, size: int, pid: int, tid: int, cpu: int, ts: int,
                    comm: str) -> KernelEvent:
            raw = data[at:at + size]
            return KernelEvent(ts, pid, tid, cpu, kind, name, comm,
                               {f.name: _plain(f.decode(raw)) for f in fields})
        return generic

    def _sched_switch(self, fmt: EventFormat) -> Decoder:
        state, prev_comm, next_comm, next_pid = (
            fmt.field(n) for n in ("prev_state", "prev_comm", "next_comm", "next_pid"))

        def off(data: bytes, at: int, size: int, pid: int, tid: int, cpu: int, ts: int,
                comm: str) -> KernelEvent:
            raw = data[at:at + size]
            prev_state = state.decode(raw)
            # The record names the thread as it was: better than a comm read since.
            return KernelEvent(ts, pid, tid, cpu, "off_cpu", "sched_switch",
                               _chars(raw, prev_comm.offset, prev_comm.size), {
                "state": state_letters(prev_state if isinstance(prev_state, int) else 0),
                "next_comm": _chars(raw, next_comm.offset, next_comm.size),
                "next_pid": _plain(next_pid.decode(raw))})
        return off

    def _sched_wakeup(self, fmt: EventFormat) -> Decoder:
        woken, comm_field, cpu_field = (fmt.field(n) for n in ("pid", "comm", "target_cpu"))

        def wakeup(data: bytes, at: int, size: int, pid: int, tid: int, cpu: int, ts: int,
                   comm: str) -> KernelEvent:
            raw = data[at:at + size]
            # The sample's task is the waker; the event is the woken thread's.
            target = woken.decode(raw)
            woken_tid = target if isinstance(target, int) else tid
            return KernelEvent(ts, -1, woken_tid, cpu, "wakeup", "sched_wakeup",
                               _chars(raw, comm_field.offset, comm_field.size),
                               {"waker_tid": tid, "target_cpu": _plain(cpu_field.decode(raw))})
        return wakeup

    def _sys_enter(self, fmt: EventFormat) -> Decoder:
        nr_at, args_at = fmt.field("id").offset, fmt.field("args").offset
        unpack = struct.Struct("<q6Q").unpack_from
        if args_at != nr_at + 8:
            raise KernelError(f"unexpected layout of {fmt.name}: args at {args_at}")

        def enter(data: bytes, at: int, size: int, pid: int, tid: int, cpu: int, ts: int,
                  comm: str) -> KernelEvent:
            nr, *args = unpack(data, at + nr_at)
            self._entered[tid] = nr
            names = self._arg_names.get(nr)
            if names is None:
                names = self._names_of(nr)
            return KernelEvent(ts, pid, tid, cpu, "syscall_enter",
                               tracepoints.syscall_name(nr), comm, dict(zip(names, args)))
        return enter

    def _sys_exit(self, fmt: EventFormat) -> Decoder:
        nr_at, ret_at = fmt.field("id").offset, fmt.field("ret").offset
        nr_of, ret_of = struct.Struct("<q").unpack_from, struct.Struct("<q").unpack_from

        def leave(data: bytes, at: int, size: int, pid: int, tid: int, cpu: int, ts: int,
                  comm: str) -> KernelEvent:
            nr = nr_of(data, at + nr_at)[0]
            if nr < 0:
                # A call that rewrote its registers (the uretprobe trampoline's,
                # rt_sigreturn) exits as -1: it is the call the thread entered.
                nr = self._entered.get(tid, nr)
            return KernelEvent(ts, pid, tid, cpu, "syscall_exit", tracepoints.syscall_name(nr),
                               comm, {"ret": ret_of(data, at + ret_at)[0]})
        return leave

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
        self._arg_names[nr] = names
        return names
