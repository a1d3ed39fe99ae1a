"""Fetcharg types: `u8..x64`, `char`, `string`, `ustring`, bitfields, arrays.

The lookup follows find_fetch_type() in kernel/trace/trace_probe.c; the
bitfield syntax check is done later (see fetchargs), as the kernel does.
"""

from __future__ import annotations

from uprobes.lang.ast import Bitfield, FetchType
from uprobes.lang.numbers import kstrtoul, simple_strtoul

INT_TYPES = tuple(f"{k}{n}" for k in "usx" for n in (8, 16, 32, 64))
NAMED_TYPES = frozenset(INT_TYPES + ("char", "string", "ustring"))
STRING_TYPES = frozenset(("string", "ustring"))
DEFAULT_TYPE = FetchType("x64", explicit=False)
"""x86-64's default (x64: BITS_PER_LONG); recorded as not explicit."""
DEFAULT_STRING = FetchType("string", explicit=False)
"""The type of `$comm` and `\\"imm"` when none is written."""


def container_bits(type_text: str) -> int | None:
    """For `b...`: the container size the kernel reads after the first '/'
    (8, 16, 32 or 64), or None where find_fetch_type() fails. `symbol` and
    `symstr` are refused for uprobes and fall out here as unknown."""
    slash = type_text.find("/")
    if slash < 0:
        return None
    bits = kstrtoul(type_text[slash + 1:])
    return bits if bits in (8, 16, 32, 64) else None


def known_type(type_text: str) -> bool:
    if type_text[:1] == "b":
        return container_bits(type_text) is not None
    return type_text in NAMED_TYPES


def parse_bitfield(type_text: str) -> Bitfield | None:
    """`b<width>@<offset>/<container>` as __parse_bitfield_probe_arg() reads
    it (simple_strtoul, base 0), or None for "Invalid bitfield". The caller
    checks the fetch-instruction budget in between, as the kernel does."""
    container = container_bits(type_text)
    assert container is not None
    width, tail = simple_strtoul(type_text[1:])
    tail += 1
    if width == 0 or type_text[tail:tail + 1] != "@":
        return None
    start = tail + 1
    offset, used = simple_strtoul(type_text[start:])
    if used == 0 or type_text[start + used:start + used + 1] != "/":
        return None
    return Bitfield(width, offset, container)


def make_type(type_text: str, bitfield: Bitfield | None, array: int | None) -> FetchType:
    if bitfield is not None:
        return FetchType("bitfield", bitfield=bitfield, array=array)
    return FetchType(type_text, array=array)


def render_type(t: FetchType) -> str:
    """`TYPE[N]` as written in a fetcharg after the ':'."""
    if t.bitfield is not None:
        b = t.bitfield
        base = f"b{b.width}@{b.offset}/{b.container}"
    else:
        base = t.base
    return base + (f"[{t.array}]" if t.array is not None else "")
