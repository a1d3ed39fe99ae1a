"""Our probes as kernel events, and their raw trace records decoded into `Event`s.

Every probe of a run lives in the run's own tracefs group (`uprobes_<pid>`),
whatever group the user named; `KernelProbe` keeps both names. Each line gets
one hidden fetcharg, `__uprobes_comm=$comm`, so every record carries the
name of the task that hit the probe exactly as it was at the hit (perf
samples carry no comm, and /proc may be gone by the time we read).

A return probe with `ret_sites` becomes one entry event per `ret` of its
function, with a second hidden fetcharg, `__uprobes_ret=+0(%sp):x64`, the
address the `ret` returns to; `RetSiteDecoder` turns their records into the
return events a uretprobe would have given (`(0xRET <- 0xFUNC)`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from uprobes.engines.event import ArgValue, Event, ProbeInfo
from uprobes.errors import KernelError
from uprobes.probe import ResolvedProbe
from uprobes.spec import kernel_line
from uprobes.spec.ast import UsdtTarget
from uprobes.spec.lower import lower_fetcharg
from uprobes.sys.event_format import EventFormat, Field
from uprobes.spec.ast import FetchType
from uprobes.sys.perf import Sample

COMM_FIELD = "__uprobes_comm"
RET_FIELD = "__uprobes_ret"
MAX_ARGS = 128  # MAX_TRACE_ARGS in kernel/trace/trace_probe.h
_MAX_EVENT_NAME = 63
_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclass(frozen=True)
class KernelProbe:
    """One resolved probe placed as `group/event` in our own group, at
    `file_offset`: the probe's own, or one of its `ret_sites` (then
    `func_delta` is how far that `ret` lies past the function's entry)."""

    probe: ResolvedProbe
    info: ProbeInfo
    group: str
    event: str
    line: str
    file_offset: int
    func_delta: int | None = None

    def decoder(self, fmt: EventFormat) -> RecordDecoder | RetSiteDecoder:
        if self.func_delta is None:
            return RecordDecoder(fmt, self.info)
        return RetSiteDecoder(fmt, self.info, self.func_delta)


def kernel_probes(probes: list[ResolvedProbe], group: str) -> list[KernelProbe]:
    """The uprobe_events lines for `probes` in `group`; event names kept where
    they are unique in it (two user groups may both have an `f`)."""
    out: list[KernelProbe] = []
    used: set[str] = set()
    for p in probes:
        info = probe_info(p)
        sites: list[int | None] = list(p.ret_sites) if p.ret_sites else [None]
        for site in sites:
            event, n = p.event, 1
            while event in used:
                suffix = f"_{n}"
                event = p.event[:_MAX_EVENT_NAME - len(suffix)] + suffix
                n += 1
            used.add(event)
            line = kernel_line(replace(p, group=group, event=event), ret_site=site)
            hidden = 1
            if site is not None:
                line += f" {RET_FIELD}=+0(%sp):x64"
                hidden += 1
            if len(p.args) + hidden <= MAX_ARGS and all(a.name != COMM_FIELD for a in p.args):
                line += f" {COMM_FIELD}=$comm"
            if site is None:
                out.append(KernelProbe(p, info, group, event, line, p.file_offset))
            else:
                out.append(KernelProbe(p, info, group, event, line, site,
                                       site - p.file_offset))
    return out


def probe_info(p: ResolvedProbe) -> ProbeInfo:
    """Display name, kind and argument types (after lowering: a USDT `$argN`
    takes the operand's size and sign) of a resolved probe."""
    usdt = p.usdt_args if isinstance(p.spec.target, UsdtTarget) else None
    args = tuple((a.name, lower_fetcharg(a, usdt).type) for a in p.args)
    return ProbeInfo(p.name, "r" if p.is_return else "p", args)


class RecordDecoder:
    """Raw record of one event -> `Event`, with one precompiled struct for the
    fixed part of the record (the format file gives every field's offset)."""

    def __init__(self, fmt: EventFormat, info: ProbeInfo) -> None:
        self.info = info
        self.is_return = fmt.is_return
        fields = sorted(fmt.fields, key=lambda f: f.offset)
        code, at = "<", 0
        # (name, first index in the unpacked tuple, count or 0, data_loc)
        self._slots: list[tuple[str, int, int, bool]] = []
        index = 0
        for f in fields:
            if f.offset < at:
                raise KernelError(f"overlapping fields in the format of {fmt.name}")
            code += "x" * (f.offset - at)
            elem = f.element_size
            if elem not in _CODES:
                raise KernelError(f"field {f.name} of {fmt.name} has size {f.size}")
            one = _CODES[elem].lower() if f.signed and not f.data_loc else _CODES[elem]
            count = f.array_len or 0
            code += one * max(count, 1)
            self._slots.append((f.name, index, count, f.data_loc))
            index += max(count, 1)
            at = f.offset + f.size
        self._struct = struct.Struct(code)
        self._arg_names = [name for name, _ in info.args]
        self._fields: dict[str, Field] = {f.name: f for f in fields}

    def decode(self, sample: Sample) -> Event:
        raw = sample.raw
        values = self._struct.unpack_from(raw)
        got: dict[str, ArgValue] = {}
        for name, i, count, data_loc in self._slots:
            if data_loc:
                got[name] = _string(raw, values[i])
            elif count:
                got[name] = list(values[i:i + count])
            else:
                got[name] = values[i]
        comm = got.pop(COMM_FIELD, None)
        if self.is_return:
            ip, func = got["__probe_ret_ip"], got["__probe_func"]
        else:
            ip, func = got["__probe_ip"], None
        return Event(
            probe=self.info.name, kind=self.info.kind, pid=sample.pid, tid=sample.tid,
            comm=comm if isinstance(comm, str) else _proc_comm(sample.tid),
            cpu=sample.cpu, ts_ns=sample.time_ns, ip=ip if isinstance(ip, int) else 0,
            func=func if isinstance(func, int) else None,
            args={name: got.get(name) for name in self._arg_names})


class RetSiteDecoder:
    """Records of an entry event on a `ret` -> the return events a uretprobe
    gives: `ip` the address returned to (the hidden `__uprobes_ret`),
    `func` the function's entry (the `ret`'s address less `func_delta`:
    both lie in one mapping, so run-time distance is file distance)."""

    def __init__(self, fmt: EventFormat, info: ProbeInfo, func_delta: int) -> None:
        self.info = info
        self._delta = func_delta
        self._entry = RecordDecoder(fmt, ProbeInfo(
            info.name, "p", (*info.args, (RET_FIELD, FetchType("x64")))))

    def decode(self, sample: Sample) -> Event:
        ev = self._entry.decode(sample)
        ret = ev.args.pop(RET_FIELD)
        return replace(ev, kind="r", ip=ret if isinstance(ret, int) else 0,
                       func=ev.ip - self._delta)


def _string(raw: bytes, loc: int) -> str | None:
    """A `__data_loc` string: u32 `len << 16 | offset`; length 0 means the
    fetch faulted (an empty string still has its NUL)."""
    length = loc >> 16
    if length == 0:
        return None
    start = loc & 0xFFFF
    return raw[start:start + length].split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _proc_comm(tid: int) -> str:
    """Fallback when a probe has no room for the hidden `$comm` (128 args)."""
    try:
        with open(f"/proc/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "<...>"
