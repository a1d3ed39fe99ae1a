"""Read the defined symbols of one symbol table section into `Symbol` records.

GNU symbol versioning: `.gnu.version` holds one half-word per `.dynsym` entry,
an index into the version definitions (`.gnu.version_d`) or needs
(`.gnu.version_r`); bit 15 marks a hidden (non-default) version, which readelf
prints as `name@VER` against the default's `name@@VER`.  Index 0 and 1 mean
local and global without a version.  In `.symtab` the link editor writes the
version into the name itself (`memcpy@@GLIBC_2.14`), so that is parsed too.
"""

from __future__ import annotations

import struct
from typing import Literal, NamedTuple

from uprobes.elf.raw import SHT_DYNSYM, SHT_NOBITS, SHT_SYMTAB, SYM, RawElf, Shdr
from uprobes.elf.source_names import SourceName, source_name

Source = Literal["symtab", "dynsym", "minidebuginfo", "debugfile", "gopclntab"]

_KINDS = {2: "func", 10: "ifunc", 1: "object", 6: "tls", 0: "notype", 5: "common"}
_SKIPPED_TYPES = (3, 4)  # STT_SECTION, STT_FILE
# STB_GNU_UNIQUE is 10, STB_LOOS
_BINDINGS = {1: "global", 2: "weak", 0: "local", 10: "unique"}
_SKIPPED_SHNDX = (0, 0xFFF1, 0xFFF2)  # SHN_UNDEF, SHN_ABS, SHN_COMMON
_VERSYM_HIDDEN = 0x8000
_VER_FLG_BASE = 0x1
# vd_version, vd_flags, vd_ndx, vd_cnt, vd_hash, vd_aux, vd_next
_VERDEF = struct.Struct("<HHHHIII")
_VERDAUX = struct.Struct("<II")  # vda_name, vda_next
_VERNEED = struct.Struct("<HHIII")  # vn_version, vn_cnt, vn_file, vn_aux, vn_next
_VERNAUX = struct.Struct("<IHHII")  # vna_hash, vna_flags, vna_other, vna_name, vna_next
_SHT_VERDEF, _SHT_VERNEED, _SHT_VERSYM = 0x6FFFFFFD, 0x6FFFFFFE, 0x6FFFFFFF


class Symbol(NamedTuple):
    """A defined symbol, at its link address (a NamedTuple: libc and its debug
    file make 11,000 of these on every run, at a quarter of a frozen dataclass's cost).

    `version` is the GNU symbol version (None when unversioned);
    `default_version` is True for `name@@VER`, the version a plain `name`
    binds to, and False for a hidden `name@VER` or an unversioned symbol.
    `kind` is 'func', 'ifunc', 'object', 'tls', 'notype', 'common' or 'other'.
    """

    name: str
    version: str | None
    default_version: bool
    link_addr: int
    size: int
    kind: str
    binding: str
    source: Source

    @property
    def display_name(self) -> str:
        """The name as readelf prints it: `name`, `name@VER` or `name@@VER`."""
        if self.version is None:
            return self.name
        return f"{self.name}{'@@' if self.default_version else '@'}{self.version}"

    @property
    def source_name(self) -> SourceName | None:
        """The name as its C++ or Rust source writes it (None for a name that
        is not mangled); cached per name."""
        return source_name(self.name)

    @property
    def pretty_name(self) -> str:
        """What output shows: the demangled label (`ns::C::add(int)`) of a
        mangled name, else `display_name`."""
        src = source_name(self.name)
        return src.label if src is not None else self.display_name

    @property
    def is_function(self) -> bool:
        """Code one can probe: a function or an IFUNC resolver."""
        return self.kind in ("func", "ifunc")

    @property
    def is_ifunc_resolver(self) -> bool:
        """An STT_GNU_IFUNC symbol: its address is the resolver, which runs once at
        load time and returns the implementation that calls actually reach."""
        return self.kind == "ifunc"


def split_version(name: str) -> tuple[str, str | None, bool]:
    """`memcpy@@GLIBC_2.14` -> ('memcpy', 'GLIBC_2.14', True); `f@V` -> ('f', 'V', False)."""
    at = name.find("@", 1)
    if at < 0:
        return name, None, False
    if name.startswith("@", at + 1):
        return name[:at], name[at + 2:] or None, True
    return name[:at], name[at + 1:] or None, False


def version_names(elf: RawElf, strtab: bytes, verdef: bytes, verdef_count: int,
                  verneed: bytes, verneed_count: int) -> dict[int, tuple[str, bool]]:
    """Version index -> (name, defined here), from `.gnu.version_d` and `.gnu.version_r`.

    Only a version this file defines can be its default (`@@`); a needed one
    (a copy-relocated `stdout` in an executable, bound to libc's GLIBC_2.2.5)
    prints as `@`, as readelf does.  The chains are followed by their `next`
    offsets, at most `count` entries and never outside the bytes given: a
    corrupt count or offset ends the walk, it cannot make it loop.
    """
    names: dict[int, tuple[str, bool]] = {}
    pos = 0
    for _ in range(min(verdef_count, len(verdef) // _VERDEF.size)):
        if pos + _VERDEF.size > len(verdef):
            break
        _v, flags, ndx, cnt, _h, aux, nxt = _VERDEF.unpack_from(verdef, pos)
        if not flags & _VER_FLG_BASE and cnt and pos + aux + _VERDAUX.size <= len(verdef):
            name_at = _VERDAUX.unpack_from(verdef, pos + aux)[0]
            if name_at < len(strtab):  # BASE names the file itself
                names[ndx] = (elf.string_at(strtab, name_at), True)
        if nxt == 0:
            break
        pos += nxt
    pos = 0
    for _ in range(min(verneed_count, len(verneed) // _VERNEED.size)):
        if pos + _VERNEED.size > len(verneed):
            break
        _v, cnt, _file, aux, nxt = _VERNEED.unpack_from(verneed, pos)
        at = pos + aux
        for _ in range(min(cnt, len(verneed) // _VERNAUX.size)):
            if at + _VERNAUX.size > len(verneed):
                break
            _h, _f, other, name_at, anext = _VERNAUX.unpack_from(verneed, at)
            if name_at < len(strtab):
                names.setdefault(other, (elf.string_at(strtab, name_at), False))
            if anext == 0:
                break
            at += anext
        if nxt == 0:
            break
        pos += nxt
    return names


def decode_symbols(elf: RawElf, table: bytes, strtab: bytes, source: Source,
                   versym: bytes | None = None,
                   versions: dict[int, tuple[str, bool]] | None = None) -> list[Symbol]:
    """The defined, non-section, non-file symbols of the Elf64_Sym array `table`.

    With `versym` (the `.gnu.version` half-words, one per entry) versions come
    from `versions`; without, from the name (`memcpy@@GLIBC_2.14` in `.symtab`).
    """
    vers = (struct.unpack_from(f"<{len(versym) // 2}H", versym) if versym is not None
            else None)
    versions = versions or {}
    out: list[Symbol] = []
    find = strtab.find
    for i, (st_name, info, _other, shndx, value, size) in enumerate(
            SYM.iter_unpack(table[:len(table) - len(table) % SYM.size])):
        typ = info & 0xF
        if shndx in _SKIPPED_SHNDX or typ in _SKIPPED_TYPES or st_name == 0:
            continue
        end = find(b"\0", st_name)
        raw_name = strtab[st_name:end if end >= 0 else len(strtab)]
        if not raw_name:
            continue
        name = raw_name.decode("utf-8", "surrogateescape")
        kind = _KINDS.get(typ, "other")
        binding = _BINDINGS.get(info >> 4, "other")
        if vers is not None:
            raw = vers[i] if i < len(vers) else 0
            index = raw & ~_VERSYM_HIDDEN
            version, own = versions.get(index, (None, False)) if index > 1 else (None, False)
            default = own and not raw & _VERSYM_HIDDEN
        elif "@" in name:
            name, version, default = split_version(name)
        else:
            version, default = None, False
        out.append(Symbol(name, version, default, value, size, kind, binding, source))
    return out


def _check_entsize(elf: RawElf, sec: Shdr) -> None:
    if sec.entsize != SYM.size:
        raise elf.malformed(f"symbol table {sec.name}: entry size {sec.entsize}, "
                            f"expected {SYM.size}")


def read_symbols(elf: RawElf, section: Shdr, source: Source) -> list[Symbol]:
    """The defined symbols of symbol table `section`; a `.dynsym`'s versions attached."""
    _check_entsize(elf, section)
    strtab = elf.section_data(elf.linked(section))
    versym = verdef = verneed = None
    if section.type == SHT_DYNSYM:
        for sec in elf.shdrs:
            if sec.type == _SHT_VERSYM and sec.link == section.index:
                versym = elf.section_data(sec)
            elif sec.type == _SHT_VERDEF:
                verdef = sec
            elif sec.type == _SHT_VERNEED:
                verneed = sec
    versions = None
    if versym is not None:
        def blob(sec: Shdr | None) -> tuple[bytes, int]:
            if sec is None or sec.type == SHT_NOBITS:
                return b"", 0
            return elf.section_data(sec), sec.info
        versions = version_names(elf, strtab, *blob(verdef), *blob(verneed))
    return decode_symbols(elf, elf.section_data(section), strtab, source, versym, versions)


def symbol_sections(elf: RawElf) -> dict[str, Shdr]:
    """The file's `.symtab` and `.dynsym` by type ('symtab', 'dynsym'); the first of each."""
    found: dict[str, Shdr] = {}
    for sec in elf.shdrs:
        if sec.type in (SHT_SYMTAB, SHT_DYNSYM):
            found.setdefault("dynsym" if sec.type == SHT_DYNSYM else "symtab", sec)
    return found
