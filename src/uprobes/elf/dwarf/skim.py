"""Which DIEs of a unit hold an address, found from the unit's bytes.

To find the function (and the blocks and inlined copies inside it) that
holds a probe's address, pyelftools must parse every DIE before it at each
level: in a big C++ unit thousands of types and declarations, each with its
strings, which is most of what resolving one probe costs there. This reads
each DIE's abbreviation and attributes by their forms only as far as it
needs: its tag, its address range, its sibling; it skips everything else,
and hands the DIEs it finds to pyelftools by offset. A unit it cannot read
so (a form or an address form it does not know, 64-bit DWARF) returns None
and the caller walks it with pyelftools.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uprobes.elf.dwarf.unitnames import FORM_STRING, Unknown, form_value
from uprobes.elf.leb128 import leb128

DW_TAG = {0x2e: "subprogram", 0x0b: "lexical_block", 0x1d: "inlined_subroutine",
          0x39: "namespace", 0x02: "class", 0x13: "structure", 0x11: "compile_unit"}
_SCOPES = frozenset(("subprogram", "lexical_block", "inlined_subroutine"))
_CONTAINERS = frozenset(("namespace", "class", "structure"))
_AT_SIBLING, _AT_LOW_PC, _AT_HIGH_PC, _AT_RANGES = 0x01, 0x11, 0x12, 0x55
_FORM_ADDR, _FORM_INDIRECT = 0x01, 0x16
_REFS = {0x11, 0x12, 0x13, 0x14, 0x15}  # ref1/2/4/8/udata: from the unit's start

Decl = tuple[str, bool, list[tuple[int, int]]]
"""(tag, has children, [(attribute, form)...]) of one abbreviation."""


@dataclass
class Unit:
    """A unit as read here: its bytes, its abbreviations, and where each
    list of children measured so far ends (rustc writes no DW_AT_sibling:
    a second lookup in the unit skips what the first one walked)."""

    data: bytes
    abbrev: dict[int, Decl]
    ends: dict[int, int]


def scope_offsets(info: Any, cu: Any, link_addr: int,
                  ranges_of: Callable[[int], list[tuple[int, int]]],
                  units: dict[int, Unit]) -> list[int] | None:
    """The offsets (in `.debug_info`) of the DIEs of unit `cu` whose code
    holds `link_addr`, outermost first, as `DwarfFile.scopes_at` finds them;
    None when this cannot read the unit. `ranges_of(offset)`: the ranges of
    the DIE at that offset, for one whose range this does not read itself
    (DW_AT_ranges, an indexed address). `units`: the units read so far, by
    offset, kept by the caller."""
    if cu.dwarf_format() != 32 or cu["address_size"] != 8:
        return None
    start = cu.cu_offset
    if start not in units:
        stream = info.debug_info_sec.stream
        stream.seek(start)
        units[start] = Unit(stream.read(cu["unit_length"] + 4),
                            _abbreviations(info, cu["debug_abbrev_offset"]), {})
    reader = _Reader(units[start], cu["version"], link_addr, ranges_of, start)
    try:
        pos = cu.cu_die_offset - start
        tag, has_children, pos, _, _ = reader.die(pos)
        chain: list[int] = []
        parent = tag
        while has_children:
            found = reader.find(pos, parent)
            if found is None:
                break
            offset, parent, has_children, pos = found
            chain.append(start + offset)
        return chain
    except (Unknown, IndexError, KeyError, ValueError, struct.error):
        return None  # bytes this reader does not follow (or corrupt): pyelftools' parse decides


def _abbreviations(info: Any, offset: int) -> dict[int, Decl]:
    """The abbreviation table at `offset` of `.debug_abbrev`."""
    stream = info.debug_abbrev_sec.stream
    stream.seek(0)
    data = stream.read()
    out: dict[int, Decl] = {}
    pos = offset
    while True:
        code, pos = leb128(data, pos)
        if code == 0:
            return out
        tag, pos = leb128(data, pos)
        children = data[pos] == 1
        pos += 1
        attrs: list[tuple[int, int]] = []
        while True:
            attr, pos = leb128(data, pos)
            form, pos = leb128(data, pos)
            if form == 0x21:  # implicit_const: its value is here, not in the DIE
                _, pos = leb128(data, pos, signed=True)
            if attr == 0 and form == 0:
                break
            attrs.append((attr, form))
        out[code] = (DW_TAG.get(tag, "other"), children, attrs)


class _Reader:
    def __init__(self, unit: Unit, version: int, link_addr: int,
                 ranges_of: Callable[[int], list[tuple[int, int]]], start: int) -> None:
        self.data, self.abbrev, self.ends, self.version = unit.data, unit.abbrev, unit.ends, version
        self.addr, self.ranges_of, self.start = link_addr, ranges_of, start

    def die(self, pos: int, ask: bool = False) -> tuple[str, bool, int, int | None, bool | None]:
        """The DIE at `pos`: (tag, has children, where its children or next
        sibling start, its sibling's position, whether its code holds the
        address: None when it has no range or `ask` is not set)."""
        data = self.data
        at = pos
        code, pos = leb128(data, pos)
        tag, children, attrs = self.abbrev[code]
        low = high = sibling = None
        high_is_size = needs_ranges = False
        for attr, form in attrs:
            if form == _FORM_INDIRECT:
                form, pos = leb128(data, pos)
            if form == FORM_STRING:
                pos = data.index(b"\0", pos) + 1
                continue
            value, pos = form_value(data, pos, form, 4, 8, self.version)
            if attr == _AT_LOW_PC:
                if form != _FORM_ADDR:
                    needs_ranges = True
                low = value
            elif attr == _AT_HIGH_PC:
                high, high_is_size = value, form != _FORM_ADDR
            elif attr == _AT_RANGES:
                needs_ranges = True
            elif attr == _AT_SIBLING and form in _REFS:
                sibling = value
        holds: bool | None = None
        if ask and tag in _SCOPES:
            if needs_ranges:
                holds = any(lo <= self.addr < hi for lo, hi in self.ranges_of(self.start + at))
            elif low is not None and high is not None:
                holds = low <= self.addr < (low + high if high_is_size else high)
        return tag, children, pos, sibling, holds

    def find(self, pos: int, parent: str) -> tuple[int, str, bool, int] | None:
        """Among the DIEs from `pos` to the end of their parent's children
        (a `parent` tag), the first with code that holds the address, as
        `DwarfFile._children_with_code` orders them: (its offset in the
        unit, its tag, whether it has children, where they start)."""
        while True:
            if self.data[pos] == 0:
                return None
            at = pos
            tag, children, pos, sibling, holds = self.die(pos, ask=True)
            if holds:
                return at, tag, children, pos
            if children and tag in _CONTAINERS and parent in ("compile_unit", "namespace"):
                inner = self.find(pos, tag)
                if inner is not None and inner[1] == "subprogram":
                    return inner
            if children:
                pos = sibling if sibling is not None else self._skip_children(pos)

    def _skip_children(self, pos: int) -> int:
        """Where the DIE after the children starting at `pos` starts."""
        first = pos
        end = self.ends.get(first)
        if end is not None:
            return end
        while self.data[pos] != 0:
            _, children, pos, sibling, _ = self.die(pos)
            if children:
                pos = sibling if sibling is not None else self._skip_children(pos)
        self.ends[first] = pos + 1
        return pos + 1
