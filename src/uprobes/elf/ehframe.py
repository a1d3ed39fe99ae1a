"""A lazy reader of `.eh_frame` through `.eh_frame_hdr`'s search table.

Parsing every FDE of a big file up front (python3.11: 6,800; libc: 3,700)
costs seconds, while a stack walk needs a few dozen. `.eh_frame_hdr` (LSB
Core, "Exception Frame Header") holds a table of (initial_location,
fde_address) pairs sorted by location: one bisection finds the FDE that may
cover an address, and only that FDE and its CIE are parsed, then kept.
Both sections' bytes are read once; addresses here are link addresses.

The header is found as the unwinder at run time finds it, by the
PT_GNU_EH_FRAME program header (then `.eh_frame` by the header's
`eh_frame_ptr`), so a file without section headers (sstrip, some packers)
still has its CFI; by the section name only where that header is missing.
The instructions understood are those gcc and clang emit on x86-64; a CFA
given by a DWARF expression has no rule (None), as in the pyelftools path.
"""

from __future__ import annotations

import bisect
import struct
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from uprobes.elf.framerule import FrameRule
from uprobes.elf.leb128 import leb128
from uprobes.elf.raw import PT_GNU_EH_FRAME
from uprobes.errors import ElfError

if TYPE_CHECKING:
    from uprobes.elf.image import ElfImage

# Pointer encodings (DW_EH_PE_*): low nibble the value format, high the base.
_OMIT = 0xFF
_PCREL, _DATAREL, _INDIRECT = 0x10, 0x30, 0x80
_FIXED = {0x00: ("<Q", 8), 0x02: ("<H", 2), 0x03: ("<I", 4), 0x04: ("<Q", 8),
          0x0A: ("<h", 2), 0x0B: ("<i", 4), 0x0C: ("<q", 8)}
_ULEB, _SLEB = 0x01, 0x09


class CfiFormatError(ElfError):
    """Malformed or unsupported CFI bytes: the FDE concerned gets no rule."""


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    return leb128(data, pos, False)


def _sleb(data: bytes, pos: int) -> tuple[int, int]:
    return leb128(data, pos, True)


def _value(data: bytes, pos: int, enc: int) -> tuple[int, int]:
    """The raw value of format `enc & 0x0f` at `pos` (no base applied)."""
    fmt = enc & 0x0F
    if fmt == _ULEB:
        return _uleb(data, pos)
    if fmt == _SLEB:
        return _sleb(data, pos)
    spec = _FIXED.get(fmt)
    if spec is None:
        raise CfiFormatError(f"unsupported pointer encoding {enc:#x}")
    return struct.unpack_from(spec[0], data, pos)[0], pos + spec[1]


def _pointer(data: bytes, pos: int, enc: int, base_addr: int, datarel: int) -> tuple[int, int]:
    """The pointer encoded with `enc` at `pos`; `base_addr` is the link
    address of data[0] (for pcrel), `datarel` the base for datarel."""
    value, end = _value(data, pos, enc)
    app = enc & 0x70
    if app == _PCREL:
        value += base_addr + pos
    elif app == _DATAREL:
        value += datarel
    elif app != 0:
        raise CfiFormatError(f"unsupported pointer application {enc:#x}")
    if enc & _INDIRECT:
        raise CfiFormatError("indirect pointers are not read")
    return value & 0xFFFFFFFFFFFFFFFF, end


@dataclass(frozen=True)
class _Cie:
    code_align: int
    data_align: int
    fde_enc: int
    has_aug_data: bool
    initial: tuple[tuple[int, int] | None, dict[int, tuple[str, int]]]  # CFA, register rules


# A row's state: the CFA as (reg, offset) or None (an expression), and each
# register's rule as (kind, value); only "offset" rules become FrameRule.saved.
_State = tuple["tuple[int, int] | None", "dict[int, tuple[str, int]]"]


def _eh_frame_bytes(image: ElfImage, eh_addr: int) -> bytes:
    """`.eh_frame`'s bytes from link address `eh_addr`: its section where the
    file has one there, else the rest of the PT_LOAD holding it (its end is
    told only by the section; every FDE the search table names lies in it,
    and a record is bounded by its own length)."""
    sec = next((s for s in image.sections if s.name == ".eh_frame"
                and s.link_addr == eh_addr and s.type != "SHT_NOBITS"), None)
    if sec is not None:
        return image.read_file(sec.file_offset, sec.size)
    seg = image.segment_for_link_addr(eh_addr)
    if seg is None:
        raise CfiFormatError(f".eh_frame_hdr points at {eh_addr:#x}, outside the file's bytes")
    return image.read_file(eh_addr - seg.link_addr + seg.file_offset,
                           seg.link_addr + seg.file_size - eh_addr)


class EhFrameTable:
    """The CFI of one file, reached through its `.eh_frame_hdr`."""

    def __init__(self, hdr: bytes, hdr_addr: int, eh: bytes, eh_addr: int) -> None:
        self._eh = eh
        self._eh_addr = eh_addr
        self._cies: dict[int, _Cie] = {}
        self._rows: dict[int, list[tuple[int, FrameRule | None]]] = {}
        self._ranges: dict[int, tuple[int, int]] = {}  # FDE offset -> (pc_begin, pc_end)
        if len(hdr) < 4 or hdr[0] != 1:
            raise CfiFormatError("unknown .eh_frame_hdr version")
        _, count_enc, table_enc = hdr[1], hdr[2], hdr[3]
        pos = 4
        _, pos = _pointer(hdr, pos, hdr[1], hdr_addr, hdr_addr)  # eh_frame_ptr
        if count_enc == _OMIT or table_enc == _OMIT:
            raise CfiFormatError(".eh_frame_hdr has no search table")
        count, pos = _pointer(hdr, pos, count_enc, hdr_addr, hdr_addr)
        if table_enc == _DATAREL | 0x0B:  # datarel sdata4: what ld and lld write
            if pos + 8 * count > len(hdr):
                raise CfiFormatError(".eh_frame_hdr's table runs past its end")
            pairs = array("i", hdr[pos:pos + 8 * count])
            self._starts = [hdr_addr + v for v in pairs[0::2]]
            self._fdes = [hdr_addr + v - eh_addr for v in pairs[1::2]]
        else:
            starts, fdes = [], []
            for _ in range(count):
                start, pos = _pointer(hdr, pos, table_enc, hdr_addr, hdr_addr)
                fde, pos = _pointer(hdr, pos, table_enc, hdr_addr, hdr_addr)
                starts.append(start)
                fdes.append(fde - eh_addr)
            self._starts, self._fdes = starts, fdes

    @classmethod
    def from_image(cls, image: ElfImage) -> EhFrameTable | None:
        """The table of `image`, or None when it has no `.eh_frame_hdr`."""
        with image.raw() as elf:
            seg = next((p for p in elf.phdrs if p.type == PT_GNU_EH_FRAME and p.filesz), None)
        if seg is not None:
            hdr, hdr_addr = image.read_file(seg.offset, seg.filesz), seg.vaddr
        else:
            sec = image.section(".eh_frame_hdr")
            if sec is None or sec.type == "SHT_NOBITS":
                return None
            hdr, hdr_addr = image.read_file(sec.file_offset, sec.size), sec.link_addr
        if len(hdr) < 4 or hdr[0] != 1:
            raise CfiFormatError("unknown .eh_frame_hdr version")
        eh_addr, _ = _pointer(hdr, 4, hdr[1], hdr_addr, hdr_addr)
        return cls(hdr, hdr_addr, _eh_frame_bytes(image, eh_addr), eh_addr)

    def rule_at(self, link_addr: int) -> FrameRule | None:
        i = bisect.bisect_right(self._starts, link_addr) - 1
        if i < 0:
            return None
        fde = self._fdes[i]
        rows = self._rows.get(fde)
        if rows is None:
            try:
                rows = self._parse_fde(fde)
            except (CfiFormatError, IndexError, struct.error):
                rows = []  # a malformed FDE: no rule for its range
                self._ranges[fde] = (0, 0)
            self._rows[fde] = rows
        begin, end = self._ranges[fde]
        if not begin <= link_addr < end:
            return None
        j = bisect.bisect_right(rows, link_addr, key=lambda r: r[0]) - 1
        return rows[j][1] if j >= 0 else None

    # -- parsing ---------------------------------------------------------------

    def _record(self, offset: int) -> tuple[int, int, int]:
        """(position after the length, end of the record, its id field's value)."""
        eh = self._eh
        length = struct.unpack_from("<I", eh, offset)[0]
        pos = offset + 4
        if length == 0xFFFFFFFF:
            length = struct.unpack_from("<Q", eh, pos)[0]
            pos += 8
        end = pos + length
        if length == 0 or end > len(eh):
            raise CfiFormatError(f"bad CFI record at .eh_frame+{offset:#x}")
        return pos, end, struct.unpack_from("<I", eh, pos)[0]

    def _cie(self, offset: int) -> _Cie:
        cie = self._cies.get(offset)
        if cie is not None:
            return cie
        eh = self._eh
        pos, end, cie_id = self._record(offset)
        if cie_id != 0:
            raise CfiFormatError(f"no CIE at .eh_frame+{offset:#x}")
        pos += 4
        version = eh[pos]
        pos += 1
        nul = eh.index(0, pos, end)
        aug = eh[pos:nul].decode("ascii", "replace")
        pos = nul + 1
        if version >= 4:
            pos += 2  # address_size, segment_selector_size
        code_align, pos = _uleb(eh, pos)
        data_align, pos = _sleb(eh, pos)
        if version == 1:
            pos += 1
        else:
            _, pos = _uleb(eh, pos)
        fde_enc = 0  # absptr unless 'R' says otherwise
        has_aug_data = aug.startswith("z")
        if has_aug_data:
            aug_len, pos = _uleb(eh, pos)
            after = pos + aug_len
            for ch in aug[1:]:
                if ch == "R":
                    fde_enc = eh[pos]
                    pos += 1
                elif ch == "L":
                    pos += 1
                elif ch == "P":
                    penc = eh[pos]
                    _, pos = _value(eh, pos + 1, penc)
                elif ch in "SB":
                    continue
                else:
                    break  # unknown: the length lets us skip the rest
            pos = after
        elif aug not in ("",):
            raise CfiFormatError(f"unknown CIE augmentation {aug!r}")
        cie = _Cie(code_align, data_align, fde_enc, has_aug_data, (None, {}))
        _, final = self._run(eh, pos, end, cie, 0, (None, {}), [], None)
        cie = _Cie(code_align, data_align, fde_enc, has_aug_data, final)
        self._cies[offset] = cie
        return cie

    def _parse_fde(self, offset: int) -> list[tuple[int, FrameRule | None]]:
        eh = self._eh
        pos, end, cie_ptr = self._record(offset)
        if cie_ptr == 0:
            raise CfiFormatError(f"a CIE where an FDE was expected at .eh_frame+{offset:#x}")
        cie = self._cie(pos - cie_ptr)
        pos += 4
        begin, pos = _pointer(eh, pos, cie.fde_enc, self._eh_addr, self._eh_addr)
        size, pos = _value(eh, pos, cie.fde_enc & 0x0F)
        self._ranges[offset] = (begin, begin + size)
        if cie.has_aug_data:
            aug_len, pos = _uleb(eh, pos)
            pos += aug_len
        cfa, regs = cie.initial
        rows: list[tuple[int, _State]] = []
        rows.append(self._run(eh, pos, end, cie, begin, (cfa, dict(regs)), rows, cie.initial))
        return [(pc, _rule(state)) for pc, state in rows]

    def _run(self, data: bytes, pos: int, end: int, cie: _Cie, pc: int, state: _State,
             rows: list[tuple[int, _State]], initial: _State | None) -> tuple[int, _State]:
        """Execute the CFA instructions in data[pos:end] from `state` at `pc`,
        appending a row at each advance; returns the last row (pc, state).
        `initial` is the CIE's state, for DW_CFA_restore (None in a CIE)."""

        cfa, regs = state
        stack: list[_State] = []
        ca, da = cie.code_align, cie.data_align

        def advance(delta: int) -> None:
            nonlocal pc
            rows.append((pc, (cfa, dict(regs))))
            pc += delta * ca

        def restore(reg: int) -> None:
            if initial is None:
                raise CfiFormatError("DW_CFA_restore in a CIE")
            rule = initial[1].get(reg)
            if rule is None:
                regs.pop(reg, None)
            else:
                regs[reg] = rule

        while pos < end:
            op = data[pos]
            pos += 1
            high, low = op & 0xC0, op & 0x3F
            if high == 0x40:
                advance(low)
            elif high == 0x80:
                off, pos = _uleb(data, pos)
                regs[low] = ("offset", off * da)
            elif high == 0xC0:
                restore(low)
            elif op == 0x00:  # nop
                pass
            elif op == 0x01:  # set_loc
                new, pos = _pointer(data, pos, cie.fde_enc, self._eh_addr, self._eh_addr)
                rows.append((pc, (cfa, dict(regs))))
                pc = new
            elif op == 0x02:
                advance(data[pos])
                pos += 1
            elif op == 0x03:
                advance(struct.unpack_from("<H", data, pos)[0])
                pos += 2
            elif op == 0x04:
                advance(struct.unpack_from("<I", data, pos)[0])
                pos += 4
            elif op in (0x05, 0x11, 0x2F, 0x14, 0x15):
                # offset_extended, offset_extended_sf, GNU_negative_offset_extended,
                # val_offset, val_offset_sf
                reg, pos = _uleb(data, pos)
                if op in (0x11, 0x15):
                    off, pos = _sleb(data, pos)
                else:
                    off, pos = _uleb(data, pos)
                if op == 0x2F:
                    off = -off
                kind = "val_offset" if op in (0x14, 0x15) else "offset"
                regs[reg] = (kind, off * da)
            elif op == 0x06:  # restore_extended
                reg, pos = _uleb(data, pos)
                restore(reg)
            elif op in (0x07, 0x08):  # undefined, same_value
                reg, pos = _uleb(data, pos)
                regs[reg] = ("undefined" if op == 0x07 else "same_value", 0)
            elif op == 0x09:  # register
                reg, pos = _uleb(data, pos)
                other, pos = _uleb(data, pos)
                regs[reg] = ("register", other)
            elif op == 0x0A:  # remember_state
                stack.append((cfa, dict(regs)))
            elif op == 0x0B:  # restore_state
                if not stack:
                    raise CfiFormatError("DW_CFA_restore_state with nothing remembered")
                cfa, regs = stack.pop()
            elif op in (0x0C, 0x12):  # def_cfa, def_cfa_sf
                reg, pos = _uleb(data, pos)
                if op == 0x0C:
                    off, pos = _uleb(data, pos)
                else:
                    off, pos = _sleb(data, pos)
                    off *= da
                cfa = (reg, off)
            elif op == 0x0D:  # def_cfa_register
                reg, pos = _uleb(data, pos)
                cfa = (reg, cfa[1]) if cfa is not None else None
            elif op in (0x0E, 0x13):  # def_cfa_offset, def_cfa_offset_sf
                if op == 0x0E:
                    off, pos = _uleb(data, pos)
                else:
                    off, pos = _sleb(data, pos)
                    off *= da
                cfa = (cfa[0], off) if cfa is not None else None
            elif op == 0x0F:  # def_cfa_expression
                size, pos = _uleb(data, pos)
                pos += size
                cfa = None
            elif op in (0x10, 0x16):  # expression, val_expression
                reg, pos = _uleb(data, pos)
                size, pos = _uleb(data, pos)
                pos += size
                regs[reg] = ("expression", 0)
            elif op == 0x2E:  # GNU_args_size
                _, pos = _uleb(data, pos)
            else:
                raise CfiFormatError(f"unknown CFA instruction {op:#x}")
        return pc, (cfa, regs)


def _rule(state: _State) -> FrameRule | None:
    cfa, regs = state
    if cfa is None:
        return None
    saved = tuple(sorted((reg, v) for reg, (kind, v) in regs.items() if kind == "offset"))
    return FrameRule(cfa[0], cfa[1], saved)
