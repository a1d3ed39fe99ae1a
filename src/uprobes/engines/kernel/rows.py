"""Runs of one event's records as rows of numbers, for the fast path (lines.py).

A run of records that agree in everything but their time and arguments
(`RowPlan.words`: the task, the CPU, the probed address, the comm) is one
hit of one probe repeated: its first record, decoded the general way, gives
what they share (`RowShape`), and one `struct.iter_unpack` gives the rest as
rows `(ts_ns, *args)`. Words are compared, not values: two records that agree
there give the same hit but for the time and arguments.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from uprobes.engines.kernel.records import RET_FIELD, RecordDecoder, RetSiteDecoder
from uprobes.model.event import COMM_FIELD, Hit
from uprobes.render.rows import RowShape
from uprobes.sys.event_format import EventFormat
from uprobes.sys.perf_ring import SampleLayout

_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclass
class RowPlan:
    """How to read a run of one event's records (see the module's doc).

    `code` unpacks, after a record's 8-byte header, the time and the
    arguments and skips the rest; `words` are the u32 words (offsets from a
    record's start) the rows of a piece must share; the comm's own bytes
    are added from its data_loc (`comm_loc_at`) in the piece's first record."""

    code: str
    ts_at: int
    words: tuple[int, ...]
    comm_loc_at: int
    raw_at: int
    _structs: dict[tuple[int, int, int], struct.Struct | None] = field(default_factory=dict)

    def struct(self, record_size: int, stride: int, repeat: int = 1) -> struct.Struct | None:
        """The whole record of `record_size` bytes and what follows it up
        to `stride`, `repeat` times over (None: too short for the fields)."""
        key = (record_size, stride, repeat)
        if key not in self._structs:
            fixed = 8 + struct.calcsize("<" + self.code)
            one = f"8x{self.code}{stride - fixed}x"
            self._structs[key] = (None if record_size < fixed
                                  else struct.Struct("<" + one * repeat))
        return self._structs[key]

    def shared(self, data: bytes, pos: int, record_size: int) -> list[tuple[int, int]]:
        """The (offset, 4) words the piece starting at `pos` must share: the
        plan's, and those holding its first record's comm."""
        loc = int.from_bytes(data[pos + self.comm_loc_at:pos + self.comm_loc_at + 4], "little")
        start = self.raw_at + (loc & 0xFFFF)
        end = min(record_size, start + (loc >> 16))
        comm = range(start - start % 4, end, 4)
        return [(k, 4) for k in (*self.words, *comm)]

    @staticmethod
    def shape(first: Hit) -> RowShape:
        """What the rows of a piece share, from its first record's hit."""
        ts_ns, pid, tid, cpu, probe, comm, ip, func, _ = first
        return RowShape(probe, comm, pid, tid, cpu, ip, func)


def row_plan(decoder: RecordDecoder | RetSiteDecoder) -> RowPlan | None:
    """The plan for `decoder`'s records; None when a hit holds more than
    numbers at fixed places (string or array arguments, no hidden comm) or
    the layout is not one this reads (fields out of order or unaligned)."""
    entry = decoder.entry if isinstance(decoder, RetSiteDecoder) else decoder
    layout, fmt = entry.layout, entry.fmt
    args = [name for name, _ in entry.info.args]
    if isinstance(decoder, RetSiteDecoder):
        args.remove(RET_FIELD)  # the address returned to: shared, like an entry's ip
    fields = {f.name: f for f in fmt.fields}
    if COMM_FIELD not in fields or any(
            name not in fields or fields[name].data_loc or fields[name].array_len
            for name in args):
        return None
    sample_at = _sample_offsets(layout)
    raw_at = 8 + layout.size
    code = "".join(c if name == "time_ns" else "x" * struct.calcsize(c)
                   for c, name in zip(layout.code, layout.names))
    raw_code = _raw_code(fmt, args)
    if raw_code is None:
        return None
    # Shared: the task and CPU, the addresses a hit shows, the comm's data_loc.
    shared = [sample_at["pid"], sample_at["tid"], sample_at["cpu"]]
    for name in ("__probe_ip", "__probe_func", "__probe_ret_ip", RET_FIELD):
        if name in fields and name not in args:
            f = fields[name]
            shared += range(raw_at + f.offset, raw_at + f.offset + f.size, 4)
    comm_loc_at = raw_at + fields[COMM_FIELD].offset
    shared.append(comm_loc_at)
    if any(k % 4 for k in shared) or sample_at["time_ns"] % 8:
        return None
    return RowPlan(code + raw_code, sample_at["time_ns"], tuple(shared), comm_loc_at, raw_at)


def _sample_offsets(layout: SampleLayout) -> dict[str, int]:
    """Record offsets (header included) of the sample's named values."""
    out: dict[str, int] = {}
    at = 8
    for c, name in zip(layout.code, layout.names):
        if name:
            out.setdefault(name, at)
        at += struct.calcsize(c)
    return out


def _raw_code(fmt: EventFormat, args: list[str]) -> str | None:
    """The raw record's fields as a struct code unpacking only `args`, in
    their order (None when the format puts them in another)."""
    code, at, seen = "", 0, []
    for f in sorted(fmt.fields, key=lambda f: f.offset):
        if f.offset < at or f.element_size not in _CODES:
            return None
        code += "x" * (f.offset - at)
        if f.name in args:
            one = _CODES[f.element_size]
            code += one.lower() if f.signed else one
            seen.append(f.name)
        else:
            code += "x" * f.size
        at = f.offset + f.size
    return code if seen == args else None
