"""The kernel's own trace line for each hit, as `cat trace` shows it.

`comm-tid [cpu] seconds: EVENT: (0xaddr) name=value ...`, return probes
`(0xret <- 0xfunc)`. Values are printed the way kernel/trace/trace_probe.c
prints each fetch type: u* `%u`, s* `%d`, x* `0x%x`, char `'%c'`, strings
`"%s"` or `(fault)`, arrays `{a,b,c}` (trace_probe_print_args()), bitfields
as their container's u* type. Seconds are `%5lu.%06lu` as in the trace
file's header (of CLOCK_MONOTONIC here, not the trace clock).

An event with a stack (`trace --stack`) is followed by one line per frame,
innermost first, each indented by a tab (as perf script and bpftrace print
stacks): `\tsymbol+0xoff (path)`.

Kernel events (`trace --kernel`) get lines of the same shape:
`sched_switch: off-cpu state=S next_comm=... next_pid=N`, `sched_wakeup:
woken by TID target_cpu=N`, `sched_switch: on-cpu`, `sys_enter:
openat(dfd=0xffffff9c, filename=0x55..., ...)` (the arguments in hex, as
the kernel's syscall events print them), `sys_exit: openat = -2`,
`page_fault_user: address=0x... ip=0x... error_code=0x6`, and any other
tracepoint's fields as `name=value` (in hex for the `syscalls:` events,
as their print fmt has them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TextIO

from uprobes.lang.ast import FetchType
from uprobes.model.event import ENGINE_ARGS, Event, Hit, ProbeInfo, hit_event
from uprobes.model.kevent import KernelEvent, KernelRow, KernelValue, row_event
from uprobes.render.rows import RowShape
from uprobes.render.values import Composed, Shown, fold_of, view_text


def format_value(value: Shown, ftype: FetchType) -> str:
    """One argument as the kernel prints it (by its source type, with a view)."""
    if ftype.view is not None or isinstance(value, Composed):
        return view_text(value, ftype)
    if isinstance(value, list):
        return "{" + ",".join(_scalar(v, ftype) for v in value) + "}"
    return _scalar(value, ftype)


def _scalar(value: int | str | None, ftype: FetchType) -> str:
    if ftype.is_string or isinstance(value, str) or value is None:
        return "(fault)" if value is None else f'"{value}"'
    bits = ftype.size * 8
    unsigned = value & ((1 << bits) - 1)
    base = ftype.base
    if base == "char":
        return f"'{chr(unsigned)}'"
    if base.startswith("x"):
        return f"0x{unsigned:x}"
    if base.startswith("s"):
        return str(unsigned - (1 << bits) if unsigned >> (bits - 1) else unsigned)
    return str(unsigned)  # u*, and bitfields (printed as their u* container)


def format_args(event: Event, info: ProbeInfo) -> str:
    """` name=value` for every argument, as trace_probe_print_args() writes
    them (those the engines add for themselves left out: `ENGINE_ARGS`)."""
    fold = fold_of(info.args)
    if fold is None:
        return "".join(f" {name}={format_value(event.args.get(name), ftype)}"
                       for name, ftype in info.args if name not in ENGINE_ARGS)
    values = fold.values([event.args.get(name) for name, _ in info.args])
    return "".join(f" {name}={format_value(value, ftype)}"
                   for (name, ftype), value in zip(fold.args, values) if name not in ENGINE_ARGS)


def format_location(event: Event) -> str:
    """`(0xip)`, or `(0xret <- 0xfunc)` for a return probe (print_uprobe_event())."""
    if event.kind == "r":
        return f"(0x{event.ip:x} <- 0x{event.func or 0:x})"
    return f"(0x{event.ip:x})"


def format_line(event: Event, info: ProbeInfo) -> str:
    secs, nsec = divmod(event.ts_ns, 1_000_000_000)
    head = f"{event.comm:>16}-{event.tid:<7} [{event.cpu:03d}] {secs:5d}.{nsec // 1000:06d}"
    return f"{head}: {info.event}: {format_location(event)}{format_args(event, info)}"


def _kernel_value(value: KernelValue, hexadecimal: bool) -> str:
    if isinstance(value, list):
        return "{" + ",".join(_kernel_value(v, hexadecimal) for v in value) + "}"
    if isinstance(value, str) or value is None:
        return "(fault)" if value is None else f'"{value}"'
    return f"0x{value & (1 << 64) - 1:x}" if hexadecimal else str(value)


def format_kernel_line(ev: KernelEvent) -> str:
    """The trace line of a kernel event (see the module's doc)."""
    secs, nsec = divmod(ev.ts_ns, 1_000_000_000)
    head = f"{ev.comm:>16}-{ev.tid:<7} [{ev.cpu:03d}] {secs:5d}.{nsec // 1000:06d}"
    f = ev.fields
    if ev.kind == "off_cpu":
        body = (f"sched_switch: off-cpu state={f.get('state')} next_comm={f.get('next_comm')} "
                f"next_pid={f.get('next_pid')}")
    elif ev.kind == "on_cpu":
        body = "sched_switch: on-cpu"
    elif ev.kind == "wakeup":
        body = f"sched_wakeup: woken by {f.get('waker_tid')} target_cpu={f.get('target_cpu')}"
    elif ev.kind == "syscall_enter":
        args = ", ".join(f"{k}={_kernel_value(v, True)}" for k, v in f.items())
        body = f"sys_enter: {ev.name}({args})"
    elif ev.kind == "syscall_exit":
        body = f"sys_exit: {ev.name} = {f.get('ret')}"
    else:
        hexadecimal = ev.kind == "page_fault" or ev.name.startswith("syscalls:")
        event = ev.name.rpartition(":")[2]
        body = f"{event}:" + "".join(f" {k}={_kernel_value(v, hexadecimal)}"
                                     for k, v in f.items())
    return f"{head}: {body}"


def _fast_code(ftype: FetchType) -> str | None:
    """A %-code printing a value of `ftype` as the kernel does, when the
    decoded value needs no work first: u* and s* come decoded with the
    record's own signedness, x* unsigned. None: use `format_value`."""
    if ftype.is_string or ftype.array is not None or ftype.bitfield is not None \
            or ftype.view is not None:
        return None
    if ftype.base[0] in "us":
        return "%d"
    if ftype.base[0] == "x":
        return "0x%x"
    return None



def _as_is(value: Shown) -> object:
    """An argument its %-code prints as it comes."""
    return value


def _formatter(ftype: FetchType) -> Callable[[Shown], str]:
    """`format_value` for arguments of `ftype`."""
    return lambda value: format_value(value, ftype)


class _Template:
    """One probe's trace line as a %-template (see `format_line`)."""

    def __init__(self, info: ProbeInfo) -> None:
        self.info = info
        self.is_return = info.kind == "r"
        self.fold = fold_of(info.args)
        self.args = info.args if self.fold is None else self.fold.args
        codes = [_fast_code(t) for _, t in self.args]
        self.text = self.line(comm="%16s", tid="%-7d", cpu="%03d", ip="0x%x", func="0x%x")
        self.plain = None not in codes and self.fold is None
        self.converts: list[Callable[[Shown], object]] = [
            _as_is if c else _formatter(t) for (_, t), c in zip(self.args, codes)]

    def line(self, *, comm: str, tid: str, cpu: str, ip: str, func: str) -> str:
        """The template, with each value but the time and the arguments put
        in as given: a %-code leaves it to fill in, text fixes it (escaped
        for %)."""
        info = self.info
        event = info.event.replace("%", "%%")
        where = f"({ip} <- {func})" if self.is_return else f"({ip})"
        codes = [_fast_code(t) for _, t in self.args]
        return (f"{comm}-{tid} [{cpu}] %5d.%06d: {event}: {where}"
                + "".join("%.0s" if name in ENGINE_ARGS  # (takes its value, shows none)
                          else f" {name.replace('%', '%%')}={c or '%s'}"
                          for (name, _), c in zip(self.args, codes)) + "\n")


class TraceTextRenderer:
    """Writes one kernel-style trace line per event."""

    def __init__(self, out: TextIO, probes: dict[str, ProbeInfo]) -> None:
        self.out = out
        self.probes = probes
        self._templates: dict[str, _Template] = {}

    def event(self, event: Event) -> None:
        text = format_line(event, self.probes[event.probe]) + "\n"
        if event.stack is not None:
            text += "".join(f"\t{frame}\n" for frame in event.stack)
        self.out.write(text)

    def hits(self, hits: list[Hit]) -> None:
        """Write a batch of hits (the fast path: no `Event` objects)."""
        self.out.write("".join(self.lines(hits)))

    def write_lines(self, lines: list[str]) -> None:
        """Write lines that `lines` or `row_lines` made."""
        self.out.write("".join(lines))

    def row_lines(self, shape: RowShape) -> Callable[[Iterable[tuple[int, ...]]], list[str]] | None:
        """The lines of a piece of rows `(ts_ns, *args)` of `shape` (see
        `RowShape`) from one template holding what the rows share; per row
        only the split of the time into seconds and microseconds is Python.
        None when a value needs formatting first (strings, arrays, chars)."""
        t = self._templates.get(shape.probe)
        if t is None:
            t = self._templates[shape.probe] = _Template(self.probes[shape.probe])
        if not t.plain:
            return None
        fill = t.line(comm=f"{shape.comm:>16}".replace("%", "%%"), tid=f"{shape.tid:<7}",
                      cpu=f"{shape.cpu:03d}", ip=f"0x{shape.ip:x}",
                      func=f"0x{shape.func or 0:x}").__mod__

        def lines(rows: Iterable[tuple[int, ...]]) -> list[str]:
            return [fill(divmod(row[0] // 1000, 1_000_000) + row[1:]) for row in rows]

        return lines

    def lines(self, hits: list[Hit]) -> list[str]:
        """The lines of a batch of hits, one a hit."""
        templates = self._templates
        lines: list[str] = []
        append = lines.append
        for hit in hits:
            ts_ns, pid, tid, cpu, probe, comm, ip, func, args = hit
            t = templates.get(probe)
            if t is None:
                t = templates[probe] = _Template(self.probes[probe])
            secs, nsec = divmod(ts_ns, 1_000_000_000)
            try:
                shown = args if t.fold is None else t.fold.values(args)
                values = shown if t.plain else [f(v) for f, v in zip(t.converts, shown)]
                if t.is_return:
                    append(t.text % (comm, tid, cpu, secs, nsec // 1000, ip, func or 0, *values))
                else:
                    append(t.text % (comm, tid, cpu, secs, nsec // 1000, ip, *values))
            except TypeError:  # a value of an unexpected kind: the slow, general way
                append(format_line(hit_event(hit, self.probes[probe]), self.probes[probe]) + "\n")
        return lines

    def kernel_rows(self, rows: list[KernelRow]) -> None:
        for row in rows:
            self.kernel_event(row_event(row))

    def kernel_event(self, ev: KernelEvent) -> None:
        self.out.write(format_kernel_line(ev) + "\n")

    def kernel_summary(self, events: int, lost: int) -> None:
        """Text output carries no summary line: it goes to stderr."""

    def summary(self, events: int, lost: int) -> None:
        """Text output carries no summary line: it goes to stderr."""
