"""The DWARF of one file, parsed only where it is asked about.

pyelftools parses a whole compilation unit at a time and is slow on big
files, so nothing here walks every unit: the unit that holds an address is
found through `.debug_aranges` (or, where a file has none, by the ranges of
each unit's top DIE, read once), and only that unit is parsed. Open files
are kept per (device, inode, mtime), so a run that probes a library twice
parses it once. Sections are read, and decompressed, only as far as they are
used (`sections.py`); pyelftools reads DWARF 2 to 5.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from uprobes.elf.dwarf.sections import dwarf_info
from uprobes.elf.dwarf.skim import Unit, scope_offsets
from uprobes.errors import ElfError

_ARANGE_HEADER = struct.Struct("<IHIBB")

_OPEN: OrderedDict[tuple[int, int, int], DwarfFile] = OrderedDict()
_KEEP = 4

SCOPE_TAGS = frozenset(("DW_TAG_subprogram", "DW_TAG_lexical_block",
                        "DW_TAG_inlined_subroutine"))
# Where a unit's functions may sit: at its top, or in C++ namespaces and classes.
_CONTAINERS = frozenset(("DW_TAG_namespace", "DW_TAG_class_type", "DW_TAG_structure_type"))


_PARSERS = (os.path.dirname(__file__) + os.sep,
            os.sep + "elftools" + os.sep)
"""Where DWARF is parsed: this package and pyelftools."""


def unreadable(exc: BaseException) -> bool:
    """Whether `exc` is debug info that could not be parsed (corrupt bytes,
    a compressed section that does not inflate) rather than a fault of ours:
    pyelftools' and zlib's errors, or a lookup (an abbreviation code, an
    offset, a string's end) that failed inside the DWARF parsers. DIEs are
    parsed lazily, so this can surface wherever one is walked."""
    from elftools.common.exceptions import DWARFError, ELFError

    if isinstance(exc, (ELFError, DWARFError, zlib.error)):
        return True
    if not isinstance(exc, (KeyError, IndexError, ValueError, struct.error)):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return any(part in where for part in _PARSERS)


def die_name(die: Any) -> str | None:
    """A DIE's name, through its abstract origin or specification."""
    seen = 0
    while die is not None and seen < 8:
        attr = die.attributes.get("DW_AT_name")
        if attr is not None:
            value = attr.value
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        for link in ("DW_AT_abstract_origin", "DW_AT_specification"):
            if link in die.attributes:
                die = die.get_DIE_from_attribute(link)
                break
        else:
            return None
        seen += 1
    return None


def die_attr(die: Any, name: str) -> Any:
    """An attribute of a DIE or of its abstract origin (an inlined or
    out-of-line copy keeps its name and type there)."""
    seen = 0
    while die is not None and seen < 8:
        if name in die.attributes:
            return die.attributes[name]
        link = next((k for k in ("DW_AT_abstract_origin", "DW_AT_specification")
                     if k in die.attributes), None)
        if link is None:
            return None
        die = die.get_DIE_from_attribute(link)
        seen += 1
    return None


@dataclass
class DwarfFile:
    """The DWARF sections of the file at `path` (the program itself or its
    separate debug file)."""

    path: str
    _stream: IO[bytes]
    _elf: Any
    info: Any
    _unit_ranges: list[tuple[int, int, int]] | None = None
    _aranges: list[tuple[int, int, int]] | None = None
    _line_cache: dict[int, list[Any]] = field(default_factory=dict)
    _units: dict[int, Unit] = field(default_factory=dict)
    """Units' bytes and abbreviations as `skim.scope_offsets` read them."""

    @classmethod
    def open(cls, path: str) -> DwarfFile | None:
        """The file's DWARF (kept for later calls), or None if it has no `.debug_info`."""
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        got = _OPEN.get(key)
        if got is not None:
            _OPEN.move_to_end(key)
            return got
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        stream = open(path, "rb")  # noqa: SIM115 - kept open with the parsed file
        try:
            elf = ELFFile(stream)
            if elf.get_section_by_name(".debug_info") is None and \
                    elf.get_section_by_name(".zdebug_info") is None:
                stream.close()
                return None
            sec = elf.get_section_by_name(".debug_info")
            if sec is not None and sec["sh_type"] == "SHT_NOBITS":
                stream.close()
                return None
            info = dwarf_info(elf, stream) or elf.get_dwarf_info(relocate_dwarf_sections=False)
        except (ELFError, OSError, ValueError, zlib.error) as exc:
            stream.close()
            raise ElfError(f"{path}: cannot read its DWARF: {exc}") from exc
        got = cls(path, stream, elf, info)
        _OPEN[key] = got
        while len(_OPEN) > _KEEP:
            _OPEN.popitem(last=False)[1]._stream.close()
        return got

    # ------------------------------------------------------------ units

    def unit_at(self, link_addr: int) -> Any | None:
        """The compilation unit whose code holds `link_addr`, or None."""
        for lo, hi, offset in self._address_ranges(link_addr):
            if lo <= link_addr < hi:
                return self.info.get_CU_at(offset)
        return None

    def _address_ranges(self, link_addr: int) -> list[tuple[int, int, int]]:
        """(low, high, unit offset) entries that may hold `link_addr`: from
        `.debug_aranges` when the file has it and it covers the address, else
        from each unit's top DIE."""
        if self._aranges is None:
            self._aranges = sorted(_read_aranges(self.info))
        i = bisect.bisect_right(self._aranges, (link_addr, 1 << 64, 0))
        near = self._aranges[max(0, i - 8):i]
        if any(lo <= link_addr < hi for lo, hi, _ in near):
            return near[::-1]
        return self._ranges_of_units()

    def _ranges_of_units(self) -> list[tuple[int, int, int]]:
        """(low, high, unit offset) of every unit's top DIE, sorted: read
        once, for files without `.debug_aranges` (a top DIE each, not whole units)."""
        if self._unit_ranges is None:
            out = []
            for cu in self.info.iter_CUs():
                top = cu.get_top_DIE()
                out += [(lo, hi, cu.cu_offset) for lo, hi in self.ranges(top)]
            self._unit_ranges = sorted(out)
        return self._unit_ranges

    def ranges(self, die: Any) -> list[tuple[int, int]]:
        """The [low, high) address ranges of a DIE (low_pc/high_pc or DW_AT_ranges)."""
        attrs = die.attributes
        if "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
            low = attrs["DW_AT_low_pc"].value
            high = attrs["DW_AT_high_pc"]
            end = high.value if high.form == "DW_FORM_addr" else low + high.value
            return [(low, end)]
        if "DW_AT_ranges" not in attrs:
            return []
        lists = self.info.range_lists()
        if lists is None:
            return []
        attr = attrs["DW_AT_ranges"]
        cu = die.cu
        offset = attr.value
        if attr.form == "DW_FORM_rnglistx":
            base = cu.get_top_DIE().attributes.get("DW_AT_rnglists_base")
            offset = (base.value if base else 0) + _rnglistx(self, cu, attr.value)
        top = cu.get_top_DIE().attributes.get("DW_AT_low_pc")
        base_addr = top.value if top is not None else 0
        out = []
        for entry in lists.get_range_list_at_offset(offset, cu=cu):
            if hasattr(entry, "base_address"):
                base_addr = entry.base_address
                continue
            lo, hi = entry.begin_offset, entry.end_offset
            if not entry.is_absolute:
                lo, hi = lo + base_addr, hi + base_addr
            if hi > lo:
                out.append((lo, hi))
        return out

    def contains(self, die: Any, link_addr: int) -> bool:
        return any(lo <= link_addr < hi for lo, hi in self.ranges(die))

    # ------------------------------------------------------------ scopes

    def scopes_at(self, link_addr: int) -> list[Any]:
        """The DIEs whose code holds `link_addr`, outermost first: the
        function (`DW_TAG_subprogram`), then lexical blocks and inlined
        copies of functions inside it. Empty when no unit covers it."""
        cu = self.unit_at(link_addr)
        if cu is None:
            return []
        offsets = scope_offsets(self.info, cu, link_addr,
                                lambda offset: self.ranges(cu._get_cached_DIE(offset)),
                                self._units)
        if offsets is not None:  # read from the unit's bytes; else pyelftools walks it
            return [cu._get_cached_DIE(offset) for offset in offsets]
        return self._scopes_by_walk(cu, link_addr)

    def _scopes_by_walk(self, cu: Any, link_addr: int) -> list[Any]:
        chain: list[Any] = []
        parent = cu.get_top_DIE()
        while True:
            inner = next((d for d in self._children_with_code(parent)
                          if self.contains(d, link_addr)), None)
            if inner is None:
                return chain
            chain.append(inner)
            parent = inner

    def _children_with_code(self, die: Any) -> Iterator[Any]:
        for child in die.iter_children():
            if child.tag in SCOPE_TAGS:
                yield child
            elif child.tag in _CONTAINERS and die.tag in ("DW_TAG_compile_unit",
                                                          "DW_TAG_namespace"):
                yield from (d for d in self._children_with_code(child)
                            if d.tag == "DW_TAG_subprogram")

    def unit_variables(self, cu: Any) -> Iterator[Any]:
        """The variables at the top of a unit (globals and statics)."""
        for child in cu.get_top_DIE().iter_children():
            if child.tag == "DW_TAG_variable":
                yield child

    def producer(self, cu: Any) -> str:
        attr = cu.get_top_DIE().attributes.get("DW_AT_producer")
        value = attr.value if attr is not None else b""
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    def location_parser(self) -> Any:
        from elftools.dwarf.locationlists import LocationParser

        return LocationParser(self.info.location_lists())

    def expr_parser(self, cu: Any) -> Any:
        from elftools.dwarf.dwarf_expr import DWARFExprParser

        return DWARFExprParser(cu.structs)

    # ------------------------------------------------------------ by name

    def info_size(self) -> int:
        """Bytes of `.debug_info` (decompressed): what a walk of every unit reads."""
        sec = self.info.debug_info_sec
        return int(sec.size) if sec is not None else 0

    def functions_named(self, name: str) -> list[Any]:
        """Every unit's top-level function DIEs called `name` (abstract ones of
        inlined functions included). Walks every unit's top level: slow on
        big files, so callers bound it by `info_size`."""
        out = []
        for cu in self.info.iter_CUs():
            for die in self._children_with_code(cu.get_top_DIE()):
                if die.tag == "DW_TAG_subprogram" and die_name(die) == name \
                        and "DW_AT_declaration" not in die.attributes:
                    out.append(die)
        return out

    def entries(self, function: Any) -> tuple[list[int], list[int]]:
        """(out-of-line entries, inline sites) of a function DIE: the first
        address of each concrete copy, and of each DW_TAG_inlined_subroutine
        whose origin it is, in its unit."""
        wanted = {function.offset}
        copies: list[int] = []
        sites: list[int] = []
        for die in function.cu.iter_DIEs():
            origin = die.attributes.get("DW_AT_abstract_origin")
            if die.offset == function.offset or (
                    origin is not None and die.get_DIE_from_attribute(
                        "DW_AT_abstract_origin").offset in wanted):
                first = self._entry_pc(die)
                if first is None:
                    continue
                (sites if die.tag == "DW_TAG_inlined_subroutine" else copies).append(first)
        return sorted(set(copies)), sorted(set(sites))

    def _entry_pc(self, die: Any) -> int | None:
        attr = die.attributes.get("DW_AT_entry_pc")
        if attr is not None and attr.form == "DW_FORM_addr":
            return int(attr.value)
        ranges = self.ranges(die)
        if attr is not None and ranges:  # DWARF 5: an offset from the base address
            return min(lo for lo, _ in ranges) + int(attr.value)
        return min((lo for lo, _ in ranges), default=None)

    # ------------------------------------------------------------ lines

    def line_rows(self, cu: Any) -> list[Any]:
        """The unit's line table as rows (address, file, line, is_stmt, end_sequence)."""
        rows = self._line_cache.get(cu.cu_offset)
        if rows is None:
            program = self.info.line_program_for_CU(cu)
            rows = [] if program is None else [e.state for e in program.get_entries()
                                               if e.state is not None]
            self._line_cache[cu.cu_offset] = rows
        return rows

    def line_files(self, cu: Any) -> list[str]:
        """The unit's line table file names, by index (DWARF 5 counts from 0,
        earlier versions from 1: index 0 is then a placeholder)."""
        program = self.info.line_program_for_CU(cu)
        if program is None:
            return []
        names = []
        for entry in program.header["file_entry"]:
            name = entry.name
            names.append(name.decode(errors="replace") if isinstance(name, bytes) else str(name))
        return names if cu.header["version"] >= 5 else ["", *names]


def _rnglistx(df: DwarfFile, cu: Any, index: int) -> int:
    """The offset (from the unit's rnglists base) of range list `index`."""
    base = cu.get_top_DIE().attributes.get("DW_AT_rnglists_base")
    sec = df.info.debug_rnglists_sec
    if base is None or sec is None:
        raise ElfError(f"{df.path}: DW_FORM_rnglistx without DW_AT_rnglists_base")
    size = 8 if cu.dwarf_format() == 64 else 4
    sec.stream.seek(base.value + index * size)
    return int.from_bytes(sec.stream.read(size), "little")


def _read_aranges(info: Any) -> list[tuple[int, int, int]]:
    """Every (low, high, unit offset) of `.debug_aranges` (DWARF 2-5, 32-bit
    units, 8-byte addresses: what x86-64 toolchains write), read with struct:
    pyelftools' reader takes about a second on libc's."""
    sec = info.debug_aranges_sec
    if sec is None:
        return []
    sec.stream.seek(0)
    data = sec.stream.read(sec.size)
    out: list[tuple[int, int, int]] = []
    pos = 0
    while pos + _ARANGE_HEADER.size <= len(data):
        length, _version, cu_offset, addr_size, seg_size = _ARANGE_HEADER.unpack_from(data, pos)
        end = pos + 4 + length
        if length == 0 or length >= 0xFFFFFFF0 or addr_size != 8 or seg_size:
            return out  # 64-bit DWARF or another layout: the top DIEs serve
        at = pos + _ARANGE_HEADER.size
        at += -at % 16  # tuples start at a multiple of twice the address size
        for low, size in struct.iter_unpack("<QQ", data[at:end - (end - at) % 16]):
            if low == 0 and size == 0:
                break
            out.append((low, low + size, cu_offset))
        pos = end
    return out
