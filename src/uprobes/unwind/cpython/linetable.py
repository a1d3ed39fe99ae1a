"""Line numbers from a CPython 3.11 code object's location table
(`co_linetable`, the format of CPython's Objects/locations.md).

Each entry starts with a byte whose top bit is set: bits 3-6 are its kind,
bits 0-2 the number of code units it covers minus one. The line changes by
a signed varint (kinds 13 and 14), by 0-2 (kinds 10-12) or not at all
(0-9); kind 15 covers code with no line. Varints are 6-bit groups, least
significant first, bit 6 set on every group but the last.
"""

from __future__ import annotations

_NO_LOCATION, _LONG, _NO_COLUMNS, _ONE_LINE0 = 15, 14, 13, 10


def _svarint(table: bytes, i: int) -> int:
    byte = table[i]
    value, shift = byte & 63, 0
    while byte & 64:
        i += 1
        byte = table[i]
        shift += 6
        value |= (byte & 63) << shift
    return -(value >> 1) if value & 1 else value >> 1


def line_at(table: bytes, firstlineno: int, index: int) -> int | None:
    """The line of the code unit at `index` (None: it has no line, or the
    table does not reach it); before the first unit, `firstlineno`, as
    CPython's PyCode_Addr2Line says."""
    if index < 0:
        return firstlineno
    line, addr, i, n = firstlineno, 0, 0, len(table)
    try:
        while i < n:
            first = table[i]
            kind = (first >> 3) & 15
            end = addr + (first & 7) + 1
            if kind in (_LONG, _NO_COLUMNS):
                line += _svarint(table, i + 1)
            elif _ONE_LINE0 <= kind < _NO_COLUMNS:
                line += kind - _ONE_LINE0
            if addr <= index < end:
                return None if kind == _NO_LOCATION else line
            addr = end
            i += 1
            while i < n and not table[i] & 128:
                i += 1
    except IndexError:
        return None  # a table cut short (read while being written)
    return None
