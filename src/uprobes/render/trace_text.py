"""The kernel's own trace line for each hit, as `cat trace` shows it.

`comm-tid [cpu] seconds: EVENT: (0xaddr) name=value ...`, return probes
`(0xret <- 0xfunc)`. Values are printed the way kernel/trace/trace_probe.c
prints each fetch type: u* `%u`, s* `%d`, x* `0x%x`, char `'%c'`, strings
`"%s"` or `(fault)`, arrays `{a,b,c}` (trace_probe_print_args()), bitfields
as their container's u* type. Seconds are `%5lu.%06lu` as in the trace
file's header (of CLOCK_MONOTONIC here, not the trace clock).
"""

from __future__ import annotations

from typing import TextIO

from uprobes.engines.event import ArgValue, Event, ProbeInfo
from uprobes.spec.ast import FetchType


def format_value(value: ArgValue, ftype: FetchType) -> str:
    """One argument as the kernel prints it."""
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
    """` name=value` for every argument, as trace_probe_print_args() writes them."""
    return "".join(f" {name}={format_value(event.args.get(name), ftype)}"
                   for name, ftype in info.args)


def format_location(event: Event) -> str:
    """`(0xip)`, or `(0xret <- 0xfunc)` for a return probe (print_uprobe_event())."""
    if event.kind == "r":
        return f"(0x{event.ip:x} <- 0x{event.func or 0:x})"
    return f"(0x{event.ip:x})"


def format_line(event: Event, info: ProbeInfo) -> str:
    secs, nsec = divmod(event.ts_ns, 1_000_000_000)
    head = f"{event.comm:>16}-{event.tid:<7} [{event.cpu:03d}] {secs:5d}.{nsec // 1000:06d}"
    return f"{head}: {info.event}: {format_location(event)}{format_args(event, info)}"


class TraceTextRenderer:
    """Writes one kernel-style trace line per event."""

    def __init__(self, out: TextIO, probes: dict[str, ProbeInfo]) -> None:
        self.out = out
        self.probes = probes

    def event(self, event: Event) -> None:
        self.out.write(format_line(event, self.probes[event.probe]) + "\n")

    def summary(self, events: int, lost: int) -> None:
        """Text output carries no summary line: it goes to stderr."""
