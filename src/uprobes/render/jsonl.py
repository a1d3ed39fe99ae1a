"""JSON Lines: one object per hit, then one summary object.

`{"probe": "GRP/EVENT", "kind": "p"|"r", "pid", "tid", "comm", "cpu",
"ts_ns", "ip", "func" (return probes only), "args": {name: value}}`, and
with `trace --stack` `"stack": [{"addr", "symbol", "offset", "file"}, ...]`
innermost first (unknown parts null).
Integers are JSON numbers (a `char` too: its byte value), strings are
strings, a faulted string fetch is null, an array a list. The last line is
`{"summary": {"events": N, "lost": M}}`: scripts tell it apart by its only
key, and learn whether the kernel dropped records (lost > 0). It also holds
`"clocks": {"start": {...}, "end": {...}}`, CLOCK_MONOTONIC, REALTIME and
BOOTTIME read together as the run started and ended (`monotonic_ns`,
`realtime_ns`, `boottime_ns`): `ts_ns` is MONOTONIC, and these convert it.

With `trace --kernel`, the kernel's events come between the hits in time
order, one object each: `{"kernel": KIND, "name", "pid", "tid", "comm",
"cpu", "ts_ns", "fields": {...}}` (kinds and fields: uprobes.model.kevent),
and the summary gains `"kernel": {"events": K, "lost": L}`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TextIO

from uprobes.lang.ast import FetchType
from uprobes.model.event import Event, Hit, ProbeInfo, hit_event
from uprobes.model.kevent import KernelEvent, KernelRow, row_event, shape_of
from uprobes.render.rows import RowShape
from uprobes.render.values import Shown, fold_of, shown_args, view_json
from uprobes.sys.clocks import ClockSnapshot, snapshot

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_MAX_TEMPLATES = 65536  # kept for as many tasks and shapes


def _text(value: str) -> str:
    """`value` as JSON, for a %-template."""
    return _dumps(value).replace("%", "%%")


def event_doc(event: Event, info: ProbeInfo | None = None) -> dict[str, object]:
    """An event as its JSON object; with `info`, values that have a source
    type's view (enums, bools, floats) as that view gives them."""
    doc: dict[str, object] = {
        "probe": event.probe, "kind": event.kind, "pid": event.pid, "tid": event.tid,
        "comm": event.comm, "cpu": event.cpu, "ts_ns": event.ts_ns, "ip": event.ip,
    }
    if event.kind == "r":
        doc["func"] = event.func
    doc["args"] = shown_args(event.args, info.args) if info else event.args
    if event.stack is not None:
        doc["stack"] = [frame.as_dict() for frame in event.stack]
    return doc


def _is_int(ftype: FetchType) -> bool:
    return not ftype.is_string and ftype.array is None and ftype.view is None


def _converter(ftype: FetchType) -> Callable[[Shown], object]:
    if _is_int(ftype):
        return lambda v: v
    if ftype.view is not None:
        return lambda v: _dumps(view_json(v, ftype))
    return _dumps


class _Template:
    """One probe's line as a %-template: the keys and constant parts are
    encoded once, a hit only fills in numbers and (escaped) strings. The
    output is what `_dumps(event_doc(...))` writes, byte for byte."""

    def __init__(self, info: ProbeInfo) -> None:
        self.info = info
        self.is_return = info.kind == "r"
        self.fold = fold_of(info.args)
        self.args = info.args if self.fold is None else self.fold.args
        self.text = self.line(pid="%d", tid="%d", comm="%s", cpu="%d", ip="%d", func="%s")
        self.plain = self.fold is None and all(_is_int(t) for _, t in info.args)
        self.converts: list[Callable[[Shown], object]] = [
            _converter(t) for _, t in self.args]

    def line(self, *, pid: str, tid: str, comm: str, cpu: str, ip: str, func: str) -> str:
        """The template, with each value before `ts_ns` and the arguments
        put in as given: a %-code leaves it to fill in, JSON text fixes it
        (escaped for %)."""
        info = self.info
        probe = _dumps(info.name).replace("%", "%%")  # `ns::f(int)%return`, `operator%`
        head = (f'{{"probe":{probe},"kind":{_dumps(info.kind)},'
                f'"pid":{pid},"tid":{tid},"comm":{comm},"cpu":{cpu},"ts_ns":%d,"ip":{ip}')
        if self.is_return:
            head += f',"func":{func}'
        body = ",".join(f"{_dumps(name)}:{'%d' if _is_int(t) else '%s'}" for name, t in self.args)
        return head + ',"args":{' + body + "}}\n"


class JsonLinesRenderer:
    """Writes one JSON object per event and a summary object at the end."""

    def __init__(self, out: TextIO, probes: dict[str, ProbeInfo],
                 clock_start: ClockSnapshot | None = None) -> None:
        self.out = out
        self.probes = probes
        self._templates: dict[str, _Template] = {}
        self._comms: dict[str, str] = {}
        self.clock_start = clock_start or snapshot()
        self.clock_end: ClockSnapshot | None = None  # None: the clocks at `summary`
        self._kernel: dict[str, int] | None = None
        self._kernel_templates: dict[tuple[str, str, tuple[str, ...]], str] = {}
        # (pid, tid, cpu, comm, shape number) -> its rows' template ("": none)
        self._row_templates: dict[tuple[int, int, int, str, int], str] = {}

    def event(self, event: Event) -> None:
        self.out.write(_dumps(event_doc(event, self.probes.get(event.probe))) + "\n")

    def hits(self, hits: list[Hit]) -> None:
        """Write a batch of hits (the fast path: no `Event` objects)."""
        self.out.write("".join(self.lines(hits)))

    def write_lines(self, lines: list[str]) -> None:
        """Write lines that `lines` or `row_lines` made."""
        self.out.write("".join(lines))

    def row_lines(self, shape: RowShape) -> str | None:
        """The template of a piece of rows `(ts_ns, *args)` of `shape` (see
        `RowShape`): what the rows share is part of it, `%` fills in a row
        as it is (JSON escapes newlines: a line holds one, its last). None
        for a probe whose values are not all numbers (strings need escaping)."""
        t = self._templates.get(shape.probe) or self._template(shape.probe)
        if not t.plain:
            return None
        return t.line(pid=str(shape.pid), tid=str(shape.tid),
                      comm=_dumps(shape.comm).replace("%", "%%"), cpu=str(shape.cpu),
                      ip=str(shape.ip),
                      func="null" if shape.func is None else str(shape.func))

    def lines(self, hits: list[Hit]) -> list[str]:
        """The lines of a batch of hits, one a hit."""
        templates, comms = self._templates, self._comms
        lines: list[str] = []
        append = lines.append
        for hit in hits:
            ts_ns, pid, tid, cpu, probe, comm, ip, func, args = hit
            t = templates.get(probe) or self._template(probe)
            c = comms.get(comm) or self._comm(comm)
            try:
                if t.plain and not t.is_return:
                    append(t.text % (pid, tid, c, cpu, ts_ns, ip, *args))
                else:
                    shown = args if t.fold is None else t.fold.values(args)
                    values = shown if t.plain else [f(v) for f, v in zip(t.converts, shown)]
                    if t.is_return:
                        append(t.text % (pid, tid, c, cpu, ts_ns, ip,
                                         "null" if func is None else func, *values))
                    else:
                        append(t.text % (pid, tid, c, cpu, ts_ns, ip, *values))
            except TypeError:  # a value of an unexpected kind: the slow, general way
                info = self.probes[probe]
                append(_dumps(event_doc(hit_event(hit, info), info)) + "\n")
        return lines

    def _comm(self, comm: str) -> str:
        c = self._comms[comm] = _dumps(comm)
        return c

    def _template(self, probe: str) -> _Template:
        t = self._templates[probe] = _Template(self.probes[probe])
        return t

    def summary(self, events: int, lost: int) -> None:
        clocks = {"start": self.clock_start.as_dict(),
                  "end": (self.clock_end or snapshot()).as_dict()}
        doc: dict[str, object] = {"events": events, "lost": lost}
        if self._kernel is not None:
            doc["kernel"] = self._kernel
        doc["clocks"] = clocks
        self.out.write(_dumps({"summary": doc}) + "\n")

    def kernel_rows(self, rows: list[KernelRow]) -> None:
        """Kernel events: what `kernel_event` writes, those of an all-ints
        shape (system calls, a busy thread's hundred thousand a second) by a
        template per shape and task (pid, tid, cpu, comm), made once: only
        the stamp and the values are turned into text."""
        templates = self._row_templates
        lines: list[str] = []
        append = lines.append
        for row in rows:
            template = templates.get(row[1:6])
            if template is None:
                template = self._row_template(row)
            if template:
                append(template % ((row[0],) + row[6]))
                continue
            if lines:
                self.out.write("".join(lines))
                lines.clear()
            self.kernel_event(row_event(row))
        self.out.write("".join(lines))

    def _row_template(self, row: KernelRow) -> str:
        """The template of `row`'s shape and task ("": a shape not all ints)."""
        _, pid, tid, cpu, comm, number, _ = row
        shape = shape_of(number)
        template = ""
        if shape.ints:
            body = ",".join(f"{_text(k)}:%d" for k in shape.names)
            template = (f'{{"kernel":{_text(shape.kind)},"name":{_text(shape.name)},"pid":{pid},'
                        f'"tid":{tid},"comm":{_text(comm)},"cpu":{cpu},"ts_ns":%d,'
                        f'"fields":{{{body}}}}}\n')
        if len(self._row_templates) >= _MAX_TEMPLATES:  # a long system-wide run: bounded
            self._row_templates.clear()
        self._row_templates[row[1:6]] = template
        return template

    def kernel_event(self, ev: KernelEvent) -> None:
        """One kernel event: what `_dumps(ev.as_dict())` writes, by a template
        per kind, name and field names when every field is an integer (a
        busy thread makes a hundred thousand a second)."""
        fields = ev.fields
        values = tuple(fields.values())
        if not all(type(v) is int for v in values):
            self.out.write(_dumps(ev.as_dict()) + "\n")
            return
        key = (ev.kind, ev.name, tuple(fields))
        template = self._kernel_templates.get(key)
        if template is None:
            body = ",".join(f"{_dumps(k).replace('%', '%%')}:%d" for k in fields)
            template = self._kernel_templates[key] = (
                f'{{"kernel":{_dumps(ev.kind)},"name":{_dumps(ev.name).replace("%", "%%")},'
                f'"pid":%d,"tid":%d,"comm":%s,"cpu":%d,"ts_ns":%d,"fields":{{{body}}}}}\n')
        comm = self._comms.get(ev.comm) or self._comm(ev.comm)
        self.out.write(template % (ev.pid, ev.tid, comm, ev.cpu, ev.ts_ns, *values))

    def kernel_summary(self, events: int, lost: int) -> None:
        self._kernel = {"events": events, "lost": lost}
