"""Call-frame information from a file's `.eh_frame`: for a code address, how
to find the caller's frame (the CFA rule and where registers were saved).

Every x86-64 ELF built by gcc or clang carries `.eh_frame` (exceptions need
it), also where frame pointers are omitted, as in Debian's libc: it is what
makes a stack walk possible there. Where the file has `.eh_frame_hdr` (ld and
lld write it; found by its program header, PT_GNU_EH_FRAME, so also in a file
without section headers), only the FDEs a walk needs are parsed, found
through its search table (elf/ehframe.py). Otherwise all FDEs are read with pyelftools (slow:
thousands of FDEs in libc), once per file version, and each FDE's rows
are decoded on first use.
Addresses here are link addresses (the ELF's own view).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Any

from uprobes.elf.ehframe import CfiFormatError, EhFrameTable
from uprobes.elf.framerule import FrameRule
from uprobes.elf.image import ElfImage, FileIdentity
from uprobes.errors import ElfError


class CfiTable:
    """The FDEs of one file, sorted by address (pyelftools), or its lazy
    `.eh_frame_hdr` reader."""

    def __init__(self, fdes: list[Any], lazy: EhFrameTable | None = None) -> None:
        self._lazy = lazy
        fdes = sorted(fdes, key=lambda f: f.header["initial_location"])
        self._fdes = fdes
        self._starts = [f.header["initial_location"] for f in fdes]
        self._rows: dict[int, list[tuple[int, FrameRule | None]]] = {}

    @classmethod
    def load(cls, image: ElfImage) -> CfiTable:
        key = image.identity
        if key is not None and key in _cache:
            _cache.move_to_end(key)
            return _cache[key]

        try:
            try:
                lazy = EhFrameTable.from_image(image)
            except CfiFormatError:
                lazy = None  # an .eh_frame_hdr we cannot read: read all FDEs instead
            table = cls([], lazy) if lazy is not None else cls.read_all(image)
        except ElfError:
            return cls([])  # not cached: the file may be readable again later
        if key is not None:
            _cache[key] = table
            if len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        return table

    @classmethod
    def read_all(cls, image: ElfImage) -> CfiTable:
        """All FDEs of `image` read with pyelftools: for files without
        `.eh_frame_hdr`, and the reference the lazy reader is tested against."""
        from elftools.dwarf.callframe import FDE

        with image.elffile() as elf:
            fdes = []
            if elf.has_dwarf_info():
                dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
                if dwarf.has_EH_CFI():
                    fdes = [e for e in dwarf.EH_CFI_entries() if isinstance(e, FDE)]
            return cls(fdes)

    def rule_at(self, link_addr: int) -> FrameRule | None:
        """The rule for the instruction at `link_addr`, or None (no FDE covers
        it, or its CFA is a DWARF expression we do not evaluate)."""
        if self._lazy is not None:
            return self._lazy.rule_at(link_addr)
        i = bisect.bisect_right(self._starts, link_addr) - 1
        if i < 0:
            return None
        fde = self._fdes[i]
        if link_addr >= fde.header["initial_location"] + fde.header["address_range"]:
            return None
        rows = self._rows.get(i)
        if rows is None:
            rows = self._decode(i)
        j = bisect.bisect_right(rows, link_addr, key=lambda r: r[0]) - 1
        return rows[j][1] if j >= 0 else None

    def _decode(self, i: int) -> list[tuple[int, FrameRule | None]]:
        """The rows of FDE `i` (its instructions were read with the table)."""
        try:
            table = self._fdes[i].get_decoded().table
        except Exception:  # a malformed FDE: no rule for its range
            self._rows[i] = []
            return []
        rows: list[tuple[int, FrameRule | None]] = []
        for row in table:
            cfa = row["cfa"]
            rule: FrameRule | None = None
            if cfa.expr is None and cfa.reg is not None:
                saved = tuple(sorted((reg, r.arg) for reg, r in row.items()
                                     if isinstance(reg, int)
                                     and getattr(r, "type", None) == "OFFSET"))
                rule = FrameRule(cfa.reg, cfa.offset, saved)
            rows.append((row["pc"], rule))
        self._rows[i] = rows
        return rows


_CACHE_SIZE = 16
_cache: OrderedDict[FileIdentity, CfiTable] = OrderedDict()
