"""The dynamic symbol table found through PT_DYNAMIC, for files without section headers.

The dynamic linker never reads section headers, so a file can lose them
(sstrip, `objcopy --strip-section-headers`, a copy cut after its last
segment) and still run.  Its exported functions are still named in the
dynamic section: DT_SYMTAB and DT_STRTAB (link addresses of the tables),
DT_STRSZ, DT_SYMENT, and DT_VERSYM / DT_VERDEF / DT_VERNEED for versions.
No tag gives the number of symbols; the hash tables do:

- DT_HASH (SysV): `nchain`, its second word, is the number of symbols.
- DT_GNU_HASH: symbols below `symoffset` are not hashed; each bucket holds
  the first symbol of its chain, and a chain ends at the entry whose hash
  value has its low bit set.  So the count is one past the end of the chain
  of the highest bucket (or `symoffset` when every bucket is empty).
"""

from __future__ import annotations

import struct

from uprobes.elf.raw import SYM, RawElf
from uprobes.elf.symread import Symbol, decode_symbols, version_names

DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT = 4, 5, 6, 10, 11
DT_GNU_HASH = 0x6FFFFEF5
DT_VERSYM, DT_VERDEF, DT_VERDEFNUM = 0x6FFFFFF0, 0x6FFFFFFC, 0x6FFFFFFD
DT_VERNEED, DT_VERNEEDNUM = 0x6FFFFFFE, 0x6FFFFFFF
_GNU_HASH_HEAD = struct.Struct("<IIII")  # nbuckets, symoffset, bloom_size, bloom_shift
# Bounds a corrupt chain or count: more symbols than this is not a real file.
MAX_SYMBOLS = 1 << 22


def _table(elf: RawElf, link_addr: int, size: int, what: str) -> bytes:
    return elf.bytes_at(elf.vaddr_to_offset(link_addr, size, what), size, what)


def _loaded_bytes_from(elf: RawElf, link_addr: int, what: str) -> bytes:
    """Everything from `link_addr` to the end of its PT_LOAD's file bytes."""
    for p in elf.loads():
        if p.vaddr <= link_addr < p.vaddr + p.filesz:
            return _table(elf, link_addr, p.vaddr + p.filesz - link_addr, what)
    raise elf.malformed(f"{what} at {link_addr:#x} is not in a loaded part of the file")


def gnu_hash_count(elf: RawElf, link_addr: int) -> int:
    """The number of dynamic symbols, from the DT_GNU_HASH table at `link_addr`."""
    data = _loaded_bytes_from(elf, link_addr, "DT_GNU_HASH")
    if len(data) < _GNU_HASH_HEAD.size:
        raise elf.malformed("DT_GNU_HASH table shorter than its header")
    head: tuple[int, int, int, int] = _GNU_HASH_HEAD.unpack_from(data)
    nbuckets, symoffset, bloom_size, _shift = head
    buckets_at = _GNU_HASH_HEAD.size + 8 * bloom_size  # ELF64 bloom words are 8 bytes
    chains_at = buckets_at + 4 * nbuckets
    if chains_at > len(data):
        raise elf.malformed("DT_GNU_HASH buckets run past their segment")
    buckets = struct.unpack_from(f"<{nbuckets}I", data, buckets_at)
    last = max(buckets, default=0)
    if last < symoffset:
        return symoffset
    i = last
    while True:
        at = chains_at + 4 * (i - symoffset)
        if at + 4 > len(data) or i >= MAX_SYMBOLS:
            raise elf.malformed("a DT_GNU_HASH chain runs past its segment")
        if struct.unpack_from("<I", data, at)[0] & 1:
            return i + 1
        i += 1


def sysv_hash_count(elf: RawElf, link_addr: int) -> int:
    """The number of dynamic symbols: `nchain` of the DT_HASH table at `link_addr`."""
    nchain: int = struct.unpack("<I", _table(elf, link_addr + 4, 4, "DT_HASH"))[0]
    return nchain


def dynamic_symbol_count(elf: RawElf, tags: dict[int, int]) -> int:
    if DT_GNU_HASH in tags:
        count = gnu_hash_count(elf, tags[DT_GNU_HASH])
    elif DT_HASH in tags:
        count = sysv_hash_count(elf, tags[DT_HASH])
    else:
        raise elf.malformed("no section headers and no DT_HASH or DT_GNU_HASH to count "
                            "the dynamic symbols by")
    if count > MAX_SYMBOLS:
        raise elf.malformed(f"{count} dynamic symbols")
    return count


def dynamic_symbols(elf: RawElf) -> list[Symbol]:
    """The defined symbols of the dynamic symbol table, read through PT_DYNAMIC
    (empty for a file with no DT_SYMTAB: a static program)."""
    tags = elf.dynamic()
    if DT_SYMTAB not in tags or DT_STRTAB not in tags:
        return []
    if tags.get(DT_SYMENT, SYM.size) != SYM.size:
        raise elf.malformed(f"DT_SYMENT {tags[DT_SYMENT]}, expected {SYM.size}")
    count = dynamic_symbol_count(elf, tags)
    symtab = _table(elf, tags[DT_SYMTAB], count * SYM.size, "DT_SYMTAB")
    strtab = _table(elf, tags[DT_STRTAB], tags.get(DT_STRSZ, 0), "DT_STRTAB")
    versym = versions = None
    if DT_VERSYM in tags:
        versym = _table(elf, tags[DT_VERSYM], 2 * count, "DT_VERSYM")
        verdef = (_loaded_bytes_from(elf, tags[DT_VERDEF], "DT_VERDEF")
                  if DT_VERDEF in tags else b"")
        verneed = (_loaded_bytes_from(elf, tags[DT_VERNEED], "DT_VERNEED")
                   if DT_VERNEED in tags else b"")
        versions = version_names(elf, strtab, verdef, tags.get(DT_VERDEFNUM, 0),
                                 verneed, tags.get(DT_VERNEEDNUM, 0))
    return decode_symbols(elf, symtab, strtab, "dynsym", versym, versions)
