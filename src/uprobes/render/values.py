"""Values with a DWARF view (`ValueView`) as the source reads them: enums by
name, bools, chars, floats, pointers in hex, strings, and the values that are
not there (`<optimized out>`, as gdb prints it). Text for trace lines, plain
JSON values for JSON output."""

from __future__ import annotations

import struct

from uprobes.lang.ast import FetchType, ValueView
from uprobes.model.event import ArgValue

_FLOAT = {4: (struct.Struct("<I"), struct.Struct("<f"), ".9g"),
          8: (struct.Struct("<Q"), struct.Struct("<d"), ".17g")}
"""gdb prints a float with 9 significant digits and a double with 17, the
fewest that always read back to the same value, then trims trailing zeros."""


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _bits(ftype: FetchType) -> int:
    return ftype.bitfield.container if ftype.bitfield else ftype.size * 8


def _number(value: int, ftype: FetchType, view: ValueView) -> int:
    if view.sign_bits:
        return _signed(value, view.sign_bits)
    if ftype.base.startswith("s"):
        return _signed(value, _bits(ftype))
    return value & ((1 << _bits(ftype)) - 1)


def _float(value: int, ftype: FetchType) -> float:
    raw, cooked, _ = _FLOAT[ftype.size]
    return float(cooked.unpack(raw.pack(value & ((1 << (8 * ftype.size)) - 1)))[0])


def view_text(value: ArgValue, ftype: FetchType) -> str:
    """One value as text (a list as `{a,b}`, like the kernel's arrays)."""
    view = ftype.view
    assert view is not None
    if isinstance(value, list):
        one = FetchType(ftype.base, ftype.bitfield, None, ftype.explicit, view)
        return "{" + ",".join(view_text(v, one) for v in value) + "}"
    kind = view.kind
    if kind == "optimized_out":
        return "<optimized out>"
    if kind == "unsupported":
        return f"<unsupported: {view.note}>"
    if kind == "elided":
        return "{...}"
    if kind == "string" or isinstance(value, str) or value is None:
        return "(fault)" if value is None else f'"{value}"'
    if kind == "float":
        text = format(_float(value, ftype), _FLOAT[ftype.size][2])
        return text
    if kind == "pointer":
        return f"0x{value & ((1 << 64) - 1):x}"
    n = _number(value, ftype, view)
    if kind == "bool":
        return "true" if n == 1 else "false" if n == 0 else str(n)
    if kind == "char" and ftype.size == 4:  # a Rust char, as gdb prints it
        c = chr(n) if 0 <= n < 0x110000 and not 0xD800 <= n < 0xE000 else ""
        return f"{n} '{c}'" if c.isprintable() and c else f"{n} '\\u{{{n:x}}}'"
    if kind == "char":
        c = chr(n & 0xFF)
        return f"{n} '{c}'" if 0x20 <= ord(c) < 0x7F else f"{n} '\\{n & 0xFF:03o}'"
    if kind == "enum":
        return next((name for v, name in view.enumerators if v == n), str(n))
    return str(n)


def view_json(value: ArgValue, ftype: FetchType) -> object:
    """One value as JSON: enums by name, bools, floats as numbers, pointers
    and chars as numbers, values not there as null."""
    view = ftype.view
    assert view is not None
    if isinstance(value, list):
        one = FetchType(ftype.base, ftype.bitfield, None, ftype.explicit, view)
        return [view_json(v, one) for v in value]
    kind = view.kind
    if kind in ("optimized_out", "unsupported", "elided") or value is None:
        return None
    if kind == "string" or isinstance(value, str):
        return value
    if kind == "float":
        return _float(value, ftype)
    if kind == "pointer":
        return value & ((1 << 64) - 1)
    n = _number(value, ftype, view)
    if kind == "bool":
        return bool(n) if n in (0, 1) else n
    if kind == "enum":
        return next((name for v, name in view.enumerators if v == n), n)
    return n
