"""LEB128 numbers (DWARF's variable-length integers; Go's uvarint is ULEB128)."""

from __future__ import annotations


def leb128(data: bytes, pos: int, signed: bool = False) -> tuple[int, int]:
    """The (U|S)LEB128 number at `pos` and the position after it
    (IndexError when the data ends inside it)."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            if signed and byte & 0x40:
                value -= 1 << shift
            return value, pos
