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
from collections.abc import Callable, Set
from dataclasses import dataclass, replace
from operator import itemgetter

from uprobes.engines.kernel.probe_line import kernel_line
from uprobes.errors import KernelError
from uprobes.lang.ast import FetchType
from uprobes.lang.names import kernel_event_name
from uprobes.model.event import COMM_FIELD, MAX_ARGS, ArgValue, Event, Hit, ProbeInfo, hit_event
from uprobes.model.probe import ResolvedProbe
from uprobes.resolve.abi import probe_info
from uprobes.sys.event_format import EventFormat
from uprobes.sys.perf import TRACE_SAMPLE_TYPE
from uprobes.sys.perf_ring import Sample, SampleLayout

RET_FIELD = "__uprobes_ret"
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
    tried: dict[str, int] = {}  # per name, the suffixes tried so far: none is tried twice
    for p in probes:
        info = probe_info(p)
        sites: list[int | None] = list(p.ret_sites) if p.ret_sites else [None]
        for site in sites:
            name = kernel_event_name(p.event)
            event, n = name, tried.get(name, 1)
            while event in used:
                suffix = f"_{n}"
                event = name[:_MAX_EVENT_NAME - len(suffix)] + suffix
                n += 1
            tried[name] = n
            used.add(event)
            line = kernel_line(replace(p, group=group, event=event), ret_site=site)
            hidden = 1
            if site is not None:
                # (a py: function's return site is no `ret`: nothing is returned
                # to from there, and the ptrace engine shows the site itself)
                line += f" {RET_FIELD}=" + ("%ip:x64" if p.guard else "+0(%sp):x64")
                hidden += 1
            if len(p.args) + hidden <= MAX_ARGS and all(a.name != COMM_FIELD for a in p.args):
                line += f" {COMM_FIELD}=$comm"
            if site is None:
                out.append(KernelProbe(p, info, group, event, line, p.file_offset))
            else:
                out.append(KernelProbe(p, info, group, event, line, site,
                                       site - p.file_offset))
    return out


PAGE_MASK = 0xFFF


def shared_events(kps: list[KernelProbe],
                  alone: Set[tuple[str, int]] = frozenset()) -> list[list[KernelProbe]]:
    """The probes grouped into kernel events: each list becomes one event.

    The kernel lets one event hold many probe points (a line naming an
    existing event with the same fetchargs appends to it), and it removes
    them all at once: one grace period for the event instead of one per
    probe (a grace period is tens of milliseconds; one per probe is why
    detaching `libc:*` took minutes). An event's records all look alike, so the probe that fired is
    told by the low 12 bits of its address: a file is mapped page by page,
    so an address and its file offset agree there. Probes of one file, kind
    and fetchargs share an event when those bits differ; return probes on
    `ret` sites and USDT probes (a semaphore each) keep an event each, and
    so do the (path, file_offset) sites in `alone` (likely refused).
    """
    events: list[list[KernelProbe]] = []
    # Per file, kind and fetchargs: its events, and per low 12 bits how many
    # of them hold a probe with those bits. A probe goes to the first event
    # without its bits, and those holding them are always the first ones, so
    # that count is where it goes: no scan, however many probes collide.
    slots: dict[tuple[str, str, str], tuple[list[list[KernelProbe]], dict[int, int]]] = {}
    for kp in kps:
        kind, _, rest = kp.line.partition(":")
        place, _, args = rest.partition(" ")[2].partition(" ")
        if (kp.func_delta is not None or kp.probe.ref_ctr_offset or "(" in place
                or (kp.probe.path, kp.file_offset) in alone):
            events.append([kp])
            continue
        low = kp.file_offset & PAGE_MASK
        members_of, holding = slots.setdefault((kind, kp.probe.path, args), ([], {}))
        at = holding.get(low, 0)
        holding[low] = at + 1
        if at < len(members_of):
            members_of[at].append(kp)
        else:
            members_of.append([kp])
            events.append(members_of[-1])
    return events


def event_line(kp: KernelProbe, event: str) -> str:
    """`kp`'s uprobe_events line, defining (or appending to) `group/event`."""
    head, _, rest = kp.line.partition(" ")
    return f"{head.partition(':')[0]}:{kp.group}/{event} {rest}"


class RecordDecoder:
    """Perf sample of one event -> `Hit` (or `Event`), with one precompiled
    struct for the sample's fixed part and the record's fixed fields (the
    format file gives every field's offset): one unpack per hit. Strings
    (`__data_loc`) are sliced out only for the fields that are strings."""

    def __init__(self, fmt: EventFormat, info: ProbeInfo,
                 layout: SampleLayout | None = None,
                 names: dict[int, str] | None = None) -> None:
        self.info = info
        self.fmt = fmt
        self.probe = info.name
        # An event shared by probes (shared_events): probe name by address & PAGE_MASK.
        self.names = names
        self.is_return = fmt.is_return
        self.layout = layout or SampleLayout.of(TRACE_SAMPLE_TYPE)
        ip_name = "__probe_ret_ip" if self.is_return else "__probe_ip"
        wanted = {ip_name, COMM_FIELD, *(name for name, _ in info.args)}
        if self.is_return:
            wanted.add("__probe_func")
        # The sample's fixed part, then the record's fields; what we do not
        # use is padding, so an unpack makes only the values a hit needs.
        prefix, index = "", 0
        sample_at: dict[str, int] = {}
        for c, name in zip(self.layout.code, self.layout.names):
            if name in ("time_ns", "pid", "tid", "cpu"):
                prefix += c
                sample_at[name] = index
                index += 1
            else:
                prefix += "x" * struct.calcsize(c)
        if len(sample_at) != 4:
            raise KernelError("trace samples need TIME, TID and CPU")
        self._sample_at = tuple(sample_at[n] for n in ("time_ns", "pid", "tid", "cpu"))
        self._base = base = index
        # (first index in the unpacked record values, count or 0, data_loc)
        slots: dict[str, tuple[int, int, bool]] = {}
        full_code, at, index = "", 0, 0
        for f in sorted(fmt.fields, key=lambda f: f.offset):
            if f.offset < at:
                raise KernelError(f"overlapping fields in the format of {fmt.name}")
            full_code += "x" * (f.offset - at)
            elem = f.element_size
            if elem not in _CODES:
                raise KernelError(f"field {f.name} of {fmt.name} has size {f.size}")
            one = _CODES[elem].lower() if f.signed and not f.data_loc else _CODES[elem]
            count = f.array_len or 0
            if f.name in wanted:
                full_code += one * max(count, 1)
                slots[f.name] = (index, count, f.data_loc)
                index += max(count, 1)
            else:
                full_code += "x" * f.size
            at = f.offset + f.size
        self._full = struct.Struct("<" + prefix + full_code)
        self._raw_at = self.layout.size
        # decode(Sample) unpacks the raw record alone, wanted fields at the same indices.
        self._raw = struct.Struct("<" + full_code)
        self._comm = slots.get(COMM_FIELD)
        ip = slots.get(ip_name)
        if ip is None:
            raise KernelError(f"the format of {fmt.name} has no {ip_name}")
        self._ip = ip[0]
        func = slots.get("__probe_func") if self.is_return else None
        self._func = func[0] if func else None
        # Each argument: (index, count, data_loc), or None when the format lacks it.
        self._args = [slots.get(name) for name, _ in info.args]
        self._getter: Callable[[tuple[int, ...]], tuple[ArgValue, ...]] | None = None
        if all(a is not None and not a[1] and not a[2] for a in self._args):
            self._getter = _getter([base + a[0] for a in self._args if a is not None])
        self._comms: dict[bytes, str] = {}

    def _arg_values(self, values: tuple[int, ...], data: bytes, raw_at: int,
                    base: int) -> tuple[ArgValue, ...]:
        out: list[ArgValue] = []
        for a in self._args:
            if a is None:
                out.append(None)
                continue
            i, count, data_loc = a
            if data_loc and count:  # string[N]: N data_locs, a string each
                out.append([_string_at(data, raw_at, loc)
                            for loc in values[base + i:base + i + count]])
            elif data_loc:
                out.append(_string_at(data, raw_at, values[base + i]))
            elif count:
                out.append(list(values[base + i:base + i + count]))
            else:
                out.append(values[base + i])
        return tuple(out)

    def _comm_at(self, values: tuple[int, ...], data: bytes, raw_at: int, base: int,
                 tid: int) -> str:
        if self._comm is None:
            return _proc_comm(tid)
        loc = values[base + self._comm[0]]
        start = raw_at + (loc & 0xFFFF)
        key = data[start:start + (loc >> 16)]
        comm = self._comms.get(key)
        if comm is None:
            if not key:  # the fetch faulted
                return _proc_comm(tid)
            comm = key.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
            self._comms[key] = comm
        return comm

    def hit(self, data: bytes, at: int) -> Hit:
        """The hit whose sample body starts at `at` in `data` (batches.read_batch)."""
        return self.hit_function()(data, at)

    def hit_function(self) -> Callable[[bytes, int], Hit]:
        """`hit` as a closure over this format's constants: what the read
        loop calls once per record (no attribute lookups, one unpack)."""
        unpack = self._full.unpack_from
        t, p, d, c = self._sample_at
        base, raw_at, probe = self._base, self._raw_at, self.probe
        ip = base + self._ip
        func = None if self._func is None else base + self._func
        getter, comm_at, arg_values = self._getter, self._comm_at, self._arg_values
        comms = self._comms
        comm_i = None if self._comm is None else base + self._comm[0]
        names = self.names
        # A return probe's __probe_func is the probed function; an entry's ip the probe.
        where = func if self.is_return and func is not None else ip

        def hit(data: bytes, at: int) -> Hit:
            v = unpack(data, at)
            tid = v[d]
            if comm_i is not None:
                loc = v[comm_i]
                start = at + raw_at + (loc & 0xFFFF)
                comm = comms.get(data[start:start + (loc >> 16)])
                if comm is None:
                    comm = comm_at(v, data, at + raw_at, base, tid)
            else:
                comm = comm_at(v, data, at + raw_at, base, tid)
            args = getter(v) if getter is not None else arg_values(v, data, at + raw_at, base)
            name = probe if names is None else names.get(v[where] & PAGE_MASK, probe)
            return (v[t], v[p], tid, v[c], name, comm, v[ip],
                    None if func is None else v[func], args)

        return hit

    def decode(self, sample: Sample) -> Event:
        """The `Event` of one parsed `Sample` (the convenient, slower way)."""
        raw = sample.raw
        v = self._raw.unpack_from(raw)
        probe = self.probe
        if self.names is not None:
            at = v[self._func] if self.is_return and self._func is not None else v[self._ip]
            probe = self.names.get(at & PAGE_MASK, probe)
        hit: Hit = (sample.time_ns, sample.pid, sample.tid, sample.cpu, probe,
                    self._comm_at(v, raw, 0, 0, sample.tid), v[self._ip],
                    v[self._func] if self._func is not None else None,
                    self._arg_values(v, raw, 0, 0))
        return hit_event(hit, self.info)


class RetSiteDecoder:
    """Records of an entry event on a `ret` -> the return events a uretprobe
    gives: `ip` the address returned to (the hidden `__uprobes_ret`),
    `func` the function's entry (the `ret`'s address less `func_delta`:
    both lie in one mapping, so run-time distance is file distance)."""

    def __init__(self, fmt: EventFormat, info: ProbeInfo, func_delta: int) -> None:
        self.info = info
        self.probe = info.name
        self._delta = func_delta
        self.entry = self._entry = RecordDecoder(fmt, ProbeInfo(
            info.name, "p", (*info.args, (RET_FIELD, FetchType("x64")))))

    def hit(self, data: bytes, at: int) -> Hit:
        """The hit whose sample body starts at `at` in `data` (batches.read_batch)."""
        return self.hit_function()(data, at)

    def hit_function(self) -> Callable[[bytes, int], Hit]:
        """The entry decoder's closure, turned into the return hit."""
        entry, delta = self._entry.hit_function(), self._delta

        def hit(data: bytes, at: int) -> Hit:
            ts_ns, pid, tid, cpu, probe, comm, ip, _, args = entry(data, at)
            ret = args[-1]
            return (ts_ns, pid, tid, cpu, probe, comm, ret if isinstance(ret, int) else 0,
                    ip - delta, args[:-1])

        return hit

    def decode(self, sample: Sample) -> Event:
        ev = self._entry.decode(sample)
        ret = ev.args.pop(RET_FIELD)
        return replace(ev, kind="r", ip=ret if isinstance(ret, int) else 0,
                       func=ev.ip - self._delta)


def _getter(indices: list[int]) -> Callable[[tuple[int, ...]], tuple[ArgValue, ...]]:
    """A function picking `indices` out of a tuple, as a tuple (itemgetter
    returns a bare item for one index)."""
    if not indices:
        return lambda v: ()
    if len(indices) == 1:
        i = indices[0]
        return lambda v: (v[i],)
    return itemgetter(*indices)


def _string_at(data: bytes, raw_at: int, loc: int) -> str | None:
    """A `__data_loc` string of the record at `raw_at`: u32 `len << 16 |
    offset`; length 0 means the fetch faulted (an empty string still has its NUL)."""
    length = loc >> 16
    if length == 0:
        return None
    start = raw_at + (loc & 0xFFFF)
    return data[start:start + length].split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _proc_comm(tid: int) -> str:
    """Fallback when a probe has no room for the hidden `$comm` (128 args)."""
    try:
        with open(f"/proc/{tid}/comm", errors="surrogateescape") as f:
            return f.read().strip()
    except OSError:
        return "<...>"
