"""The ELF64 little-endian structures we need, unpacked with precompiled `struct`s.

Every run of uprobes reads the ELF header, program headers, section headers,
notes and the dynamic section of each file it names.  pyelftools parses each
field through a `construct` object (about 1,000 section parses for libc and a
program: a third of a second); here one `Struct.unpack_from` reads one record
(a few microseconds for the whole table).  pyelftools stays for DWARF and is
the reference of a differential test (tests/test_elf_raw.py).

`RawElf` works over anything that supports the buffer protocol and slicing
(`bytes` or an `mmap`) and never reads outside it: every offset and size
from the file is checked, and a bad one is one `ElfError` naming the file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from uprobes.errors import ElfError

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr, 64 bytes
SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym, 24 bytes
DYN = struct.Struct("<qQ")  # Elf64_Dyn, 16 bytes
NHDR = struct.Struct("<III")  # Elf64_Nhdr (namesz, descsz, type)

PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE = 1, 2, 3, 4
PT_GNU_EH_FRAME = 0x6474E550  # .eh_frame_hdr, as the unwinder finds it (dl_iterate_phdr)
SHT_NULL, SHT_SYMTAB, SHT_STRTAB, SHT_NOTE, SHT_NOBITS, SHT_DYNSYM = 0, 2, 3, 7, 8, 11
SHN_XINDEX = 0xFFFF
PF_X, PF_W, PF_R = 1, 2, 4

# The names pyelftools gives section types (SectionInfo.type keeps its spelling).
SECTION_TYPES = {
    0: "SHT_NULL", 1: "SHT_PROGBITS", 2: "SHT_SYMTAB", 3: "SHT_STRTAB", 4: "SHT_RELA",
    5: "SHT_HASH", 6: "SHT_DYNAMIC", 7: "SHT_NOTE", 8: "SHT_NOBITS", 9: "SHT_REL",
    10: "SHT_SHLIB", 11: "SHT_DYNSYM", 14: "SHT_INIT_ARRAY", 15: "SHT_FINI_ARRAY",
    16: "SHT_PREINIT_ARRAY", 17: "SHT_GROUP", 18: "SHT_SYMTAB_SHNDX", 19: "SHT_RELR",
    0x6FFFFFF5: "SHT_GNU_ATTRIBUTES", 0x6FFFFFF6: "SHT_GNU_HASH",
    0x6FFFFFF7: "SHT_GNU_LIBLIST", 0x6FFFFFFD: "SHT_GNU_verdef",
    0x6FFFFFFE: "SHT_GNU_verneed", 0x6FFFFFFF: "SHT_GNU_versym",
    0x70000001: "SHT_AMD64_UNWIND",
}


class Buffer(Protocol):
    """bytes or mmap: what RawElf reads from."""

    def __len__(self) -> int: ...
    def __getitem__(self, key: slice) -> bytes: ...
    def find(self, sub: bytes, start: int = ..., end: int = ...) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...  # for struct and zlib


# Dataclasses, not NamedTuples: a tuple's field `index` would hide tuple.index.
@dataclass(frozen=True, slots=True)
class Phdr:
    index: int
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True, slots=True)
class Shdr:
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    entsize: int

    @property
    def has_bytes(self) -> bool:
        """Whether the section occupies bytes of the file."""
        return self.type not in (SHT_NOBITS, SHT_NULL)


class RawElf:
    """The headers of one ELF64 x86-64 file, read on construction.

    `shdrs` is empty when the file has no section header table, or when the
    table lies wholly past the end of the file (a file cut after its last
    segment, as sstrip-like tools do); `sections_cut` says which.  A table
    that is partly there is a damaged file and an error.
    """

    def __init__(self, buf: Buffer, name: str) -> None:
        self.buf = buf
        self.name = name
        self.size = len(buf)
        if self.size < EHDR.size:
            raise self.truncated("the ELF header", EHDR.size)
        (_ident, self.e_type, self.e_machine, _version, self.e_entry, self.e_phoff,
         self.e_shoff, _flags, _ehsize, self.e_phentsize, self.e_phnum, self.e_shentsize,
         shnum, shstrndx) = EHDR.unpack_from(buf, 0)
        self.phdrs = self._read_phdrs()
        self.sections_cut = False
        self.shdrs = self._read_shdrs(shnum, shstrndx)

    # -- errors and bounds ------------------------------------------------------------

    def truncated(self, what: str, end: int) -> ElfError:
        return ElfError(f"{self.name}: truncated ELF file ({what} ends at byte {end:#x}, "
                        f"the file has {self.size:#x})")

    def malformed(self, why: str) -> ElfError:
        return ElfError(f"{self.name}: malformed ELF file ({why})")

    def bytes_at(self, offset: int, size: int, what: str) -> bytes:
        """`size` bytes at `offset`, or an error naming `what` if they are not all there."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise self.truncated(what, offset + size)
        return self.buf[offset:offset + size]

    # -- tables -----------------------------------------------------------------------

    def _read_phdrs(self) -> list[Phdr]:
        if not self.e_phnum:
            return []
        # The kernel's loader insists on this size; trusting another lets a
        # tiny file claim thousands of headers all at one offset.
        if self.e_phentsize != PHDR.size:
            raise self.malformed(f"program header size {self.e_phentsize}, expected {PHDR.size}")
        end = self.e_phoff + self.e_phnum * PHDR.size
        if end > self.size:
            raise self.truncated("the program header table", end)
        out = []
        for i in range(self.e_phnum):
            p_type, flags, offset, vaddr, _paddr, filesz, memsz, _align = PHDR.unpack_from(
                self.buf, self.e_phoff + i * PHDR.size)
            out.append(Phdr(i, p_type, flags, offset, vaddr, filesz, memsz))
        return out

    def _read_shdrs(self, shnum: int, shstrndx: int) -> list[Shdr]:
        if self.e_shoff == 0:
            return []
        if self.e_shoff >= self.size:
            self.sections_cut = True
            return []
        if shnum == 0 or shstrndx == SHN_XINDEX:  # the real values are in section 0
            self._check_shdr_table(1)
            zero = SHDR.unpack_from(self.buf, self.e_shoff)
            shnum = shnum or zero[5]
            if shstrndx == SHN_XINDEX:
                shstrndx = zero[6]
        if not shnum:
            return []
        self._check_shdr_table(shnum)
        raw = [SHDR.unpack_from(self.buf, self.e_shoff + i * SHDR.size) for i in range(shnum)]
        names = b""
        if 0 < shstrndx < shnum and raw[shstrndx][1] != SHT_NOBITS:
            names = self._section_bytes(raw[shstrndx], "the section name table")
        out = []
        for i, (sh_name, sh_type, flags, addr, offset, size, link, info, _align,
                entsize) in enumerate(raw):
            end = names.find(b"\0", sh_name) if sh_name < len(names) else -1
            name = names[sh_name:end].decode("utf-8", "surrogateescape") if end >= 0 else ""
            sec = Shdr(i, name, sh_type, flags, addr, offset, size, link, info, entsize)
            if sec.has_bytes and offset + size > self.size:
                raise self.truncated(f"section {name or '?'}", offset + size)
            out.append(sec)
        return out

    def _check_shdr_table(self, shnum: int) -> None:
        if self.e_shentsize != SHDR.size:
            raise self.malformed(f"section header size {self.e_shentsize}, expected {SHDR.size}")
        end = self.e_shoff + shnum * SHDR.size
        if end > self.size:
            raise self.truncated("the section header table", end)

    def _section_bytes(self, raw: tuple[int, ...], what: str) -> bytes:
        return self.bytes_at(raw[4], raw[5], what)

    def section_data(self, sec: Shdr) -> bytes:
        """The bytes of `sec` (empty for SHT_NOBITS)."""
        if not sec.has_bytes:
            return b""
        return self.bytes_at(sec.offset, sec.size, f"section {sec.name or sec.index}")

    def section(self, name: str) -> Shdr | None:
        """The first section called `name`."""
        return next((s for s in self.shdrs if s.name == name), None)

    def linked(self, sec: Shdr) -> Shdr:
        """The section `sec.sh_link` names (a symbol table's string table)."""
        if not 0 < sec.link < len(self.shdrs):
            raise self.malformed(f"section {sec.name} links to section {sec.link}, "
                                 f"of {len(self.shdrs)}")
        return self.shdrs[sec.link]

    # -- addresses --------------------------------------------------------------------

    def loads(self) -> list[Phdr]:
        return [p for p in self.phdrs if p.type == PT_LOAD]

    def vaddr_to_offset(self, vaddr: int, size: int, what: str) -> int:
        """The file offset of `size` bytes at link address `vaddr`, all in one PT_LOAD."""
        for p in self.phdrs:
            if p.type == PT_LOAD and p.vaddr <= vaddr and vaddr + size <= p.vaddr + p.filesz:
                return vaddr - p.vaddr + p.offset
        raise self.malformed(f"{what} at {vaddr:#x} (+{size:#x}) is not in a loaded "
                             "part of the file")

    # -- notes and the dynamic section -------------------------------------------------

    def notes(self, data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
        """(owner name, type, descriptor) of each note in `data`; 4-byte alignment,
        as every x86-64 note (GNU, stapsdt) uses."""
        pos = 0
        while pos + NHDR.size <= len(data):
            namesz, descsz, n_type = NHDR.unpack_from(data, pos)
            name_at = pos + NHDR.size
            desc_at = name_at + ((namesz + 3) & ~3)
            end = desc_at + ((descsz + 3) & ~3)
            if desc_at + descsz > len(data):
                raise self.malformed(f"a note runs past its section or segment ({end:#x})")
            name = data[name_at:name_at + namesz].rstrip(b"\0")
            yield name, n_type, data[desc_at:desc_at + descsz]
            pos = end

    def note_blobs(self) -> Iterator[bytes]:
        """The contents of every note container: PT_NOTE segments, then SHT_NOTE sections
        (a debug file's segments have no bytes; a stripped file may have no sections)."""
        for p in self.phdrs:
            if p.type == PT_NOTE and p.filesz:
                yield self.bytes_at(p.offset, p.filesz, f"note segment {p.index}")
        for s in self.shdrs:
            if s.type == SHT_NOTE:
                yield self.section_data(s)

    def dynamic(self) -> dict[int, int]:
        """The dynamic section's tags (the first of each), from PT_DYNAMIC, else SHT_DYNAMIC."""
        seg = next((p for p in self.phdrs if p.type == PT_DYNAMIC), None)
        if seg is not None:
            data = self.bytes_at(seg.offset, seg.filesz, "the dynamic segment")
        else:
            sec = next((s for s in self.shdrs if s.type == 6), None)
            data = self.section_data(sec) if sec is not None else b""
        tags: dict[int, int] = {}
        for tag, val in DYN.iter_unpack(data[:len(data) - len(data) % DYN.size]):
            if tag == 0:  # DT_NULL ends the array
                break
            tags.setdefault(tag, val)
        return tags

    def string_at(self, table: bytes, index: int) -> str:
        """The NUL-terminated string at `index` of string table `table`."""
        if not 0 <= index < len(table):
            raise self.malformed(f"string index {index:#x} outside its table ({len(table):#x})")
        end = table.find(b"\0", index)
        return table[index:end if end >= 0 else len(table)].decode("utf-8", "surrogateescape")
