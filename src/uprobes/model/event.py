"""What a probe hit is, whichever engine saw it: `Event`, and the `ProbeInfo`
renderers need to format its values.

Addresses in an event are run-time addresses (`ip`, `func`); `ts_ns` is
CLOCK_MONOTONIC, so events line up with other sources on the machine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from uprobes.lang.ast import FetchType
from uprobes.model.probe import ResolvedProbe

# The hidden fetcharg the kernel engine adds to every probe (the task's
# comm as it was at the hit); the ptrace engine models it, as it takes
# from the same string space.
COMM_FIELD = "__uprobes_comm"
FRAME_ARG = "__frame"
"""A fetcharg that names the frame a call runs in, which its entry and its
return both fetch (a `py:` function's interpreter frame): they pair by it
(analysis/calls.py)."""
PY_OPARG_ARG = "__py_oparg"
"""A `py:` entry's RESUME argument (0: a call starts), which its guard tests."""
PY_OP_ARG = "__py_op"
"""At the eval loop's exits and resumptions by an exception, the opcode of
the frame's last instruction (0: the frame never ran), which the guard tests."""
PY_FOBJ_ARG = "__py_fobj"
"""At the eval loop's exit by an exception, the frame's object (0: the
frame never ran: every frame that ran and raised has one, made for its
traceback entry)."""
SP_ARG = "__sp"
RA_ARG = "__ra"
"""An entry's stack pointer and return address, which `latency` pairs calls by."""
ENGINE_ARGS = frozenset({FRAME_ARG, PY_OPARG_ARG, PY_OP_ARG, PY_FOBJ_ARG, SP_ARG, RA_ARG})
"""Fetchargs the engines and commands add for themselves: `--json` has
them, text lines leave them out."""
MAX_ARGS = 128  # fetchargs per probe: MAX_TRACE_ARGS in kernel/trace/trace_probe.h

ArgValue = int | str | None | list[int] | list[str | None]
"""An argument's value: an integer, a string, None for a string whose fetch
faulted (the kernel prints `(fault)`), or a list for `TYPE[N]`."""


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """`text` with its control characters (a newline would end a line of
    output, and start another that looks like a frame) as Python escapes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


@dataclass(frozen=True)
class Frame:
    """One code address, named: `symbol+offset (path)`; unknown parts None.
    `link_addr`: the same place as the file's link-time address (None when
    no file maps it), the same in every process whatever ASLR did.

    A Python frame (`python` True) is a function of the interpreted program:
    `symbol` its qualified name, `path` its source file, `line` the line it
    runs (None: a line the code object does not know), `runtime_addr` its
    code object; shown as `qualname (file:line)`."""

    runtime_addr: int
    path: str | None
    symbol: str | None
    offset: int = 0
    link_addr: int | None = None
    line: int | None = None
    python: bool = False

    def __str__(self) -> str:
        if self.python and self.path is None:  # no code object: where frames were cut
            return str(self.symbol)
        if self.python:
            return printable(f"{self.symbol} ({self.path}:"
                             f"{'?' if self.line is None else self.line})")
        where = f" ({self.path})" if self.path else ""
        if self.symbol is None:
            return f"0x{self.runtime_addr:x}{where}"
        return f"{self.symbol}+0x{self.offset:x}{where}"

    def as_dict(self) -> dict[str, object]:
        if self.python:
            return {"python": True, "symbol": self.symbol, "file": self.path, "line": self.line}
        return {"addr": self.runtime_addr, "symbol": self.symbol, "offset": self.offset,
                "file": self.path}



@dataclass(frozen=True)
class ProbeInfo:
    """A probe as the user named it, and the types of its arguments.

    `name` is `GROUP/EVENT` in the user's group (`uprobes` by default, the
    provider for USDT), never an engine's internal group.
    """

    name: str
    kind: str
    args: tuple[tuple[str, FetchType], ...] = ()

    @property
    def event(self) -> str:
        """The event part of `name` (what the kernel's trace line shows)."""
        return self.name.rpartition("/")[2]


@dataclass(frozen=True)
class Event:
    """One hit of one probe.

    `kind` is "p" (entry) or "r" (return). `ip` is the probed instruction's
    run-time address for "p" and the address returned to for "r"; `func`
    (return probes only) is the function's entry address. `args` maps each
    fetcharg name to its value, in the probe's order: an `ArgValue` as the
    engines record it; in a Session's events a value with a DWARF type is
    shown as `--json` shows it (`uprobes.render.values.shown_args`: floats,
    enums by name, structs as dicts, None where it could not be read).

    `stack`: with stacks asked for (`trace --stack`), the user stack at the
    hit, innermost first (the probed function, then its callers); None
    otherwise.

    `hit`: on the ptrace engine, while a `Session` handler runs, the stopped
    thread (`uprobes.engines.ptrace.hit.PtraceHit`: `regs`, `read`, `write`,
    `set`); None on the kernel engine, and after the handler returns.
    """

    probe: str
    kind: str
    pid: int
    tid: int
    comm: str
    cpu: int
    ts_ns: int
    ip: int
    func: int | None = None
    args: dict[str, Any] = field(default_factory=dict)
    stack: tuple[Frame, ...] | None = None
    hit: Any = field(default=None, compare=False, repr=False)


Hit = tuple[int, int, int, int, str, str, int, int | None, tuple[ArgValue, ...]]
"""An event as a plain tuple, for the fast path from ring to output (a
dataclass costs microseconds per hit to build): `(ts_ns, pid, tid, cpu,
probe, comm, ip, func, args)`, `args` in the probe's order. Sorts by time
first."""


def hit_event(hit: Hit, info: ProbeInfo, stack: tuple[Frame, ...] | None = None) -> Event:
    """The `Event` of a hit of the probe `info` (with its `stack`, if walked)."""
    ts_ns, pid, tid, cpu, probe, comm, ip, func, args = hit
    return Event(probe=probe, kind=info.kind, pid=pid, tid=tid, comm=comm, cpu=cpu,
                 ts_ns=ts_ns, ip=ip, func=func,
                 args={name: value for (name, _), value in zip(info.args, args)}, stack=stack)


def display_names(probes: Sequence[ResolvedProbe]) -> list[str]:
    """`GRP/EVENT` as the user named each probe, made unique (`_2`, `_3`...);
    the places of one function that share an `alias` share it."""
    seen: dict[str, int] = {}
    names = []
    for p in probes:
        if p.alias is not None:
            names.append(p.alias)
            continue
        n = seen.get(p.name, 0) + 1
        seen[p.name] = n
        names.append(p.name if n == 1 else f"{p.name}_{n}")
    return names
