"""A trace event's `format` file, parsed, and the raw records it describes, decoded.

Pure functions over text and bytes: the tracefs layer reads the file, the
perf ring buffer hands over the raw record (PERF_SAMPLE_RAW), and this module
maps one onto the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from uprobes.errors import KernelError

_FIELD_RE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d+);")
_ARRAY_RE = re.compile(r"^(?P<name>\w+)\[(?P<len>\d*)\]$")
_STRING_ARRAY_RE = re.compile(r"\[\]\[(?P<len>\d+)\]$")

Value = int | str | None | tuple[int, ...] | tuple[str | None, ...]


@dataclass(frozen=True)
class Field:
    """One field of a trace record.

    `type` is the C type as the kernel prints it (`s64`, `unsigned long`,
    `__data_loc char[]`). `data_loc` fields hold a u32 `len << 16 | offset`
    pointing into the record's dynamic area (strings). `array_len` is set for
    fixed arrays such as `u16 d[]` (length = size / element size), and for
    string arrays (`string[N]`), which the kernel declares `__data_loc
    char[][N]`: N data_locs side by side, one string each.
    """

    name: str
    type: str
    offset: int
    size: int
    signed: bool
    data_loc: bool = False
    array_len: int | None = None

    @property
    def element_size(self) -> int:
        """Size of one element (the whole field when not an array)."""
        return self.size // self.array_len if self.array_len else self.size

    @property
    def is_string(self) -> bool:
        """A `__data_loc char[]` field: a string the probe fetched."""
        return self.data_loc and self.type.replace(" ", "").startswith("__data_locchar")

    def decode(self, raw: bytes) -> Value:
        """This field's value in `raw`: int, tuple of ints, str, or None for a
        string whose fetch faulted (the kernel stores length 0 then and prints
        `(fault)`; an empty string has length 1, its NUL)."""
        chunk = raw[self.offset:self.offset + self.size]
        if len(chunk) < self.size:
            raise KernelError(f"trace record too short for field {self.name}: "
                              f"{len(raw)} bytes, need {self.offset + self.size}")
        if self.data_loc and self.array_len is not None:
            return tuple(_string(raw, int.from_bytes(chunk[i:i + 4], "little"))
                         for i in range(0, self.size, 4))
        if self.data_loc:
            loc = int.from_bytes(chunk, "little")
            if self.is_string:
                return _string(raw, loc)
            return None if loc >> 16 == 0 else tuple(_bytes(raw, loc))
        if self.array_len is not None:
            es = self.element_size
            return tuple(int.from_bytes(chunk[i:i + es], "little", signed=self.signed)
                         for i in range(0, self.size, es))
        return int.from_bytes(chunk, "little", signed=self.signed)


@dataclass(frozen=True)
class EventFormat:
    """A parsed `events/GROUP/EVENT/format` file."""

    name: str
    id: int
    common_fields: tuple[Field, ...]
    fields: tuple[Field, ...]
    print_fmt: str

    def field(self, name: str) -> Field:
        """The field called `name` (common fields included)."""
        for f in self.common_fields + self.fields:
            if f.name == name:
                return f
        raise KernelError(f"event {self.name} has no field {name!r}")

    @property
    def is_return(self) -> bool:
        """A return probe: the kernel records `__probe_func` and `__probe_ret_ip`."""
        return any(f.name == "__probe_ret_ip" for f in self.fields)

    @property
    def args(self) -> tuple[Field, ...]:
        """The probe's own fetchargs, without the `__probe_*` fields."""
        return tuple(f for f in self.fields if not f.name.startswith("__probe_"))

    def decode(self, raw: bytes) -> dict[str, Value]:
        """Every non-common field of the raw record, by name."""
        return {f.name: f.decode(raw) for f in self.fields}

    def record_type(self, raw: bytes) -> int:
        """The event id a raw record carries in `common_type`."""
        return int.from_bytes(raw[0:2], "little")


def _bytes(raw: bytes, loc: int) -> bytes:
    """What a data_loc (u32 `len << 16 | offset`) points at in `raw`."""
    start = loc & 0xFFFF
    return raw[start:start + (loc >> 16)]


def _string(raw: bytes, loc: int) -> str | None:
    """The string at data_loc `loc`; None when its fetch faulted (length 0)."""
    if loc >> 16 == 0:
        return None
    return _bytes(raw, loc).split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _parse_field(decl: str, offset: int, size: int, signed: bool) -> Field:
    data_loc = decl.startswith("__data_loc")
    ctype, _, name = decl.rpartition(" ")
    array_len: int | None = None
    strings = _STRING_ARRAY_RE.search(ctype) if data_loc else None
    if strings:
        array_len = int(strings.group("len"))
    m = _ARRAY_RE.match(name)
    if m and not data_loc:
        name = m.group("name")
        ctype += "[]"
        if m.group("len"):
            array_len = int(m.group("len"))
        else:
            # The kernel prints probe arrays as `u16 d[]` with the total size;
            # the element size is in the type name (u16 -> 2 bytes).
            bits = re.search(r"(\d+)$", ctype[:-2])
            elem = int(bits.group(1)) // 8 if bits else 1
            array_len = size // max(elem, 1)
    return Field(name=name, type=ctype, offset=offset, size=size, signed=signed,
                 data_loc=data_loc, array_len=array_len)


def parse_format(text: str) -> EventFormat:
    """Parse the text of a `format` file into an `EventFormat`."""
    name = ""
    event_id = -1
    common: list[Field] = []
    fields: list[Field] = []
    print_fmt = ""
    seen_blank = False
    for line in text.splitlines():
        if line.startswith("name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            event_id = int(line.split(":", 1)[1])
        elif line.startswith("print fmt:"):
            print_fmt = line.split(":", 1)[1].strip()
        elif (m := _FIELD_RE.match(line)) is not None:
            f = _parse_field(m.group("decl").strip(), int(m.group("offset")),
                             int(m.group("size")), m.group("signed") == "1")
            # The kernel separates the common fields from the event's own by a
            # blank line; `common_` names are the fallback.
            (fields if seen_blank and not f.name.startswith("common_") else common).append(f)
        elif not line.strip() and (common or fields):
            seen_blank = True
    if not name or event_id < 0:
        raise KernelError("unreadable event format file (no name or ID)")
    return EventFormat(name=name, id=event_id, common_fields=tuple(common),
                       fields=tuple(fields), print_fmt=print_fmt)
