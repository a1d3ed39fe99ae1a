"""A file's DWARF sections for pyelftools, read only as far as they are used.

pyelftools' `get_dwarf_info` copies every debug section into memory and
decompresses each compressed one whole before anything is asked. On a big
C++ library's debug file (hundreds of MiB of DWARF, zlib-compressed) that
alone takes seconds, although a probe reads one unit of `.debug_info`, the
strings it names and a few location lists. Here a section is a stream over
the file: an uncompressed one reads the file's bytes where they are (a
memory map, no copy); a compressed one (SHF_COMPRESSED, zlib) is
decompressed as it is read, up to the furthest byte asked for.
"""

from __future__ import annotations

import io
import mmap
import struct
import zlib
from typing import IO, Any, cast

SHF_COMPRESSED = 0x800
ELFCOMPRESS_ZLIB = 1
_CHDR64 = struct.Struct("<IIQQ")  # ch_type, ch_reserved, ch_size, ch_addralign
_CHUNK = 1 << 18
"""Compressed bytes fed to zlib at a time: a read decompresses at most this much past its end."""

SECTION_NAMES = (".debug_info", ".debug_aranges", ".debug_abbrev", ".debug_str", ".debug_line",
                 ".debug_frame", ".debug_loc", ".debug_ranges", ".debug_pubtypes",
                 ".debug_pubnames", ".debug_addr", ".debug_str_offsets", ".debug_line_str",
                 ".debug_loclists", ".debug_rnglists", ".debug_sup", ".gnu_debugaltlink",
                 ".debug_types")


class SectionStream(io.RawIOBase):
    """A section's bytes as a seekable stream: `data` is the file's bytes
    (a memory map) from `start`; compressed, `size` bytes come out of zlib
    as they are read."""

    def __init__(self, data: Any, start: int, stored: int, size: int, compressed: bool) -> None:
        super().__init__()
        self._data, self._start, self._stored, self._size = data, start, stored, size
        self._pos = 0
        self._zlib = zlib.decompressobj() if compressed else None
        self._out = bytearray()
        self._fed = 0  # compressed bytes given to zlib so far

    @property
    def inflated(self) -> int:
        """Bytes decompressed so far (0 for a section stored as it is)."""
        return len(self._out)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        if self._zlib is None:
            got = bytes(self._data[self._start + self._pos:self._start + end])
        else:
            if end > len(self._out):
                self._inflate(end)
            got = bytes(self._out[self._pos:end])
        self._pos += len(got)
        return got

    def readall(self) -> bytes:
        return self.read(-1)

    def _inflate(self, end: int) -> None:
        assert self._zlib is not None
        while len(self._out) < end and self._fed < self._stored:
            take = min(_CHUNK, self._stored - self._fed)
            at = self._start + self._fed
            self._out += self._zlib.decompress(self._data[at:at + take])
            self._fed += take
        if len(self._out) < end:
            raise zlib.error(f"the section ends after {len(self._out)} of {self._size} bytes")


def dwarf_info(elf: Any, stream: Any) -> Any | None:
    """pyelftools' DWARFInfo of `elf` (an ELFFile over the open file
    `stream`) over lazily read sections; None where this reader does not
    apply (GNU `.zdebug_*` sections, a compression other than zlib, a
    32-bit file): the caller asks pyelftools."""
    from elftools.dwarf.dwarfinfo import DebugSectionDescriptor, DwarfConfig, DWARFInfo

    if elf.elfclass != 64 or not elf.little_endian or elf.has_section(".zdebug_info"):
        return None
    data = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    found: dict[str, Any] = {}
    for name in (*SECTION_NAMES, ".eh_frame"):
        section = elf.get_section_by_name(name)
        if section is None or section["sh_type"] == "SHT_NOBITS":
            found[name] = None
            continue
        start, stored = section["sh_offset"], section["sh_size"]
        size, compressed = stored, bool(section["sh_flags"] & SHF_COMPRESSED)
        if compressed:
            ch_type, _, size, _ = _CHDR64.unpack_from(data, start)
            if ch_type != ELFCOMPRESS_ZLIB:
                return None
            start, stored = start + _CHDR64.size, stored - _CHDR64.size
        found[name] = DebugSectionDescriptor(
            # a raw stream: what pyelftools calls on one (seek, tell, read) it has
            stream=cast("IO[bytes]", SectionStream(data, start, stored, size, compressed)),
            name=name,
            global_offset=section["sh_offset"], size=size, address=section["sh_addr"])
    info = DWARFInfo(
        config=DwarfConfig(little_endian=True, default_address_size=8,
                           machine_arch=elf.get_machine_arch()),
        debug_info_sec=found[".debug_info"], debug_aranges_sec=found[".debug_aranges"],
        debug_abbrev_sec=found[".debug_abbrev"], debug_frame_sec=found[".debug_frame"],
        eh_frame_sec=found[".eh_frame"], debug_str_sec=found[".debug_str"],
        debug_loc_sec=found[".debug_loc"], debug_ranges_sec=found[".debug_ranges"],
        debug_line_sec=found[".debug_line"], debug_pubtypes_sec=found[".debug_pubtypes"],
        debug_pubnames_sec=found[".debug_pubnames"], debug_addr_sec=found[".debug_addr"],
        debug_str_offsets_sec=found[".debug_str_offsets"],
        debug_line_str_sec=found[".debug_line_str"],
        debug_loclists_sec=found[".debug_loclists"],
        debug_rnglists_sec=found[".debug_rnglists"], debug_sup_sec=found[".debug_sup"],
        gnu_debugaltlink_sec=found[".gnu_debugaltlink"],
        debug_types_sec=found[".debug_types"])
    info.supplementary_dwarfinfo = elf.get_supplementary_dwarfinfo(info)
    return info
