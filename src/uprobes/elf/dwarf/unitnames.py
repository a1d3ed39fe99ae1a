"""Each compilation unit's name (its top DIE's `DW_AT_name`), read straight
from the sections' bytes.

pyelftools reads a unit's name by parsing the unit's whole abbreviation
table first, through `construct`: 4 ms a unit, 8.4 s over libc's 2,063
units, which a probe on `FILE.c:LINE` must look at to learn which units
were compiled from that file. A unit's top DIE uses only its first
abbreviation, so this reads that one declaration and the DIE's attributes
by their forms (DWARF 2 to 5, 32- and 64-bit), and stops: milliseconds for
the whole file. A unit it cannot read this way (a form it does not know)
is left to pyelftools by the caller.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from uprobes.elf.leb128 import leb128

DW_AT_name = 0x03
DW_AT_str_offsets_base = 0x72
_FORM_FIXED = {0x0b: 1, 0x05: 2, 0x06: 4, 0x07: 8, 0x1e: 16,  # data1/2/4/8/16
               0x0c: 1, 0x19: 0, 0x21: 0,                  # flag, flag_present, implicit_const
               0x11: 1, 0x12: 2, 0x13: 4, 0x14: 8,               # ref1/2/4/8
               0x20: 8, 0x1c: 4, 0x24: 8,                        # ref_sig8, ref_sup4, ref_sup8
               0x25: 1, 0x26: 2, 0x27: 3, 0x28: 4,               # strx1..4
               0x29: 1, 0x2a: 2, 0x2b: 3, 0x2c: 4}               # addrx1..4
# sdata udata ref_udata strx addrx loclistx rnglistx, GNU_addr_index GNU_str_index
_FORM_LEB = {0x0d, 0x0f, 0x15, 0x1a, 0x1b, 0x22, 0x23, 0x1f01, 0x1f02}
# strp line_strp sec_offset strp_sup GNU_ref_alt GNU_strp_alt: an offset's size
_FORM_OFFSET = {0x0e, 0x1f, 0x17, 0x1d, 0x1f20, 0x1f21}
_FORM_BLOCK = {0x0a: 1, 0x03: 2, 0x04: 4}  # block1/2/4 (length, then bytes)
_STRP, _LINE_STRP, FORM_STRING, _STRX = 0x0e, 0x1f, 0x08, {0x1a, 0x25, 0x26, 0x27, 0x28}
_REF_ADDR = 0x10  # DWARF 2: an address's size; later: an offset's
_ADDR, _EXPRLOC, _BLOCK = 0x01, 0x18, 0x09


class Unknown(Exception):
    """A form this reader does not size."""


def unit_names(info: Any) -> Iterator[tuple[int, str | None]]:
    """(offset in .debug_info, name or None) of every unit of pyelftools'
    DWARFInfo `info`, from the decompressed sections it holds; None for a
    unit whose top DIE this cannot read (then ask pyelftools)."""
    data = _bytes(info.debug_info_sec)
    abbrev = _bytes(info.debug_abbrev_sec)
    strs = _bytes(info.debug_str_sec)
    line_strs = _bytes(getattr(info, "debug_line_str_sec", None))
    str_offsets = _bytes(getattr(info, "debug_str_offsets_sec", None))
    declarations: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = {}
    pos = 0
    while pos + 11 <= len(data):
        start = pos
        try:
            pos, end, name = _unit(data, pos, abbrev, strs, line_strs, str_offsets,
                                   declarations)
        except (struct.error, IndexError):
            return  # a header cut short: no unit after it can be found either
        yield start, name
        pos = end


def _unit(data: bytes, pos: int, abbrev: bytes, strs: bytes, line_strs: bytes,
          str_offsets: bytes,
          declarations: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]]
          ) -> tuple[int, int, str | None]:
    """(position after the header, the unit's end, its name or None)."""
    (length,) = struct.unpack_from("<I", data, pos)
    offset_size = 4
    pos += 4
    if length == 0xffffffff:
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        offset_size = 8
    end = pos + length
    if end > len(data) or length < 7:
        raise IndexError("a unit past the section's end")
    (version,) = struct.unpack_from("<H", data, pos)
    pos += 2
    off_fmt = "<I" if offset_size == 4 else "<Q"
    if version >= 5:
        unit_type, address_size = data[pos], data[pos + 1]
        pos += 2
        (abbrev_offset,) = struct.unpack_from(off_fmt, data, pos)
        pos += offset_size
        if unit_type in (0x02, 0x06):  # type units: a signature and a type offset
            pos += 8 + offset_size
        elif unit_type in (0x04, 0x05):  # skeleton and split units: a unit id
            pos += 8
    else:
        (abbrev_offset,) = struct.unpack_from(off_fmt, data, pos)
        pos += offset_size
        address_size = data[pos]
        pos += 1
    try:
        code, pos = leb128(data, pos)
        key = (abbrev_offset, code)
        if key not in declarations:
            declarations[key] = _declaration(abbrev, abbrev_offset, code)
        _, attrs = declarations[key]
        name = _name(data, pos, attrs, offset_size, address_size, version, strs,
                     line_strs, str_offsets)
    except (Unknown, IndexError, ValueError, struct.error, UnicodeDecodeError):
        name = None  # (pyelftools then reads it)
    return pos, end, name


def _bytes(section: Any) -> bytes:
    if section is None:
        return b""
    stream = section.stream
    stream.seek(0)
    return bytes(stream.read())


def _declaration(abbrev: bytes, offset: int, code: int
                 ) -> tuple[int, list[tuple[int, int, int]]]:
    """(tag, [(attribute, form, implicit constant)...]) of abbreviation `code`
    in the table at `offset`."""
    pos = offset
    while True:
        got, pos = leb128(abbrev, pos)
        if got == 0:
            raise Unknown(f"no abbreviation {code}")
        tag, pos = leb128(abbrev, pos)
        pos += 1  # has children
        attrs: list[tuple[int, int, int]] = []
        while True:
            attr, pos = leb128(abbrev, pos)
            form, pos = leb128(abbrev, pos)
            const = 0
            if form == 0x21:  # implicit_const: the value is in the declaration
                const, pos = leb128(abbrev, pos, signed=True)
            if attr == 0 and form == 0:
                break
            attrs.append((attr, form, const))
        if got == code:
            return tag, attrs


def _name(data: bytes, pos: int, attrs: list[tuple[int, int, int]], offset_size: int,
          address_size: int, version: int, strs: bytes, line_strs: bytes,
          str_offsets: bytes) -> str | None:
    """DW_AT_name of the DIE whose attributes start at `pos`."""
    off_fmt = "<I" if offset_size == 4 else "<Q"
    name: tuple[int, int] | None = None  # (form, raw value)
    base: int | None = None
    for attr, form, _ in attrs:
        if form == 0x16:  # indirect: the form is in the data
            form, pos = leb128(data, pos)
        if form == FORM_STRING:
            end = data.index(b"\0", pos)
            if attr == DW_AT_name:
                return data[pos:end].decode()
            pos = end + 1
            continue
        value, pos = form_value(data, pos, form, offset_size, address_size, version)
        if attr == DW_AT_name:
            name = (form, value)
        elif attr == DW_AT_str_offsets_base:
            base = value
    if name is None:
        return None
    form, value = name
    if form == _STRP:
        return _cstring(strs, value)
    if form == _LINE_STRP:
        return _cstring(line_strs, value)
    if form in _STRX and base is not None:
        (at,) = struct.unpack_from(off_fmt, str_offsets, base + value * offset_size)
        return _cstring(strs, at)
    raise Unknown(f"a name of form {form:#x}")


def form_value(data: bytes, pos: int, form: int, offset_size: int, address_size: int,
               version: int) -> tuple[int, int]:
    """The value of an attribute of `form` at `pos` (a number, an offset, an
    address; 0 for a block) and the position after it. Raises `Unknown` for
    DW_FORM_string (the caller reads the string) and forms it does not size."""
    if form in _FORM_FIXED:
        size = _FORM_FIXED[form]
        return int.from_bytes(data[pos:pos + size], "little"), pos + size
    if form in _FORM_LEB:
        return leb128(data, pos)
    if form in _FORM_OFFSET or form == _REF_ADDR:
        size = address_size if form == _REF_ADDR and version == 2 else offset_size
        return int.from_bytes(data[pos:pos + size], "little"), pos + size
    if form == _ADDR:
        return int.from_bytes(data[pos:pos + address_size], "little"), pos + address_size
    if form in (_EXPRLOC, _BLOCK):
        size, pos = leb128(data, pos)
        return 0, pos + size
    if form in _FORM_BLOCK:
        width = _FORM_BLOCK[form]
        return 0, pos + width + int.from_bytes(data[pos:pos + width], "little")
    raise Unknown(f"form {form:#x}")


def _cstring(section: bytes, offset: int) -> str:
    return section[offset:section.index(b"\0", offset)].decode()
