"""Read the defined symbols of one symbol table section into `Symbol` records.

GNU symbol versioning: `.gnu.version` holds one half-word per `.dynsym` entry,
an index into the version definitions (`.gnu.version_d`) or needs
(`.gnu.version_r`); bit 15 marks a hidden (non-default) version, which readelf
prints as `name@VER` against the default's `name@@VER`.  Index 0 and 1 mean
local and global without a version.  In `.symtab` the link editor writes the
version into the name itself (`memcpy@@GLIBC_2.14`), so that is parsed too.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_ST_INFO_BIND, ENUM_ST_INFO_TYPE, ENUM_ST_SHNDX
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerNeedSection, GNUVerSymSection
from elftools.elf.sections import SymbolTableSection

from uprobes.errors import ElfError

Source = Literal["symtab", "dynsym", "minidebuginfo", "debugfile", "gopclntab"]

_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym
_T = ENUM_ST_INFO_TYPE
_KINDS = {
    _T["STT_FUNC"]: "func",
    _T["STT_LOOS"]: "ifunc",  # STT_GNU_IFUNC shares the number 10 with STT_LOOS
    _T["STT_OBJECT"]: "object",
    _T["STT_TLS"]: "tls",
    _T["STT_NOTYPE"]: "notype",
    _T["STT_COMMON"]: "common",
}
_SKIPPED_TYPES = (_T["STT_SECTION"], _T["STT_FILE"])
_B = ENUM_ST_INFO_BIND
_BINDINGS = {_B["STB_GLOBAL"]: "global", _B["STB_WEAK"]: "weak", _B["STB_LOCAL"]: "local",
             _B["STB_LOOS"]: "unique"}  # STB_GNU_UNIQUE is 10, STB_LOOS
_SKIPPED_SHNDX = tuple(ENUM_ST_SHNDX[n] for n in ("SHN_UNDEF", "SHN_ABS", "SHN_COMMON"))
_VERSYM_HIDDEN = 0x8000
_VER_FLG_BASE = 0x1
_MIN_VERSION_ENTRY = 16  # sizeof(Elf64_Verdef) == sizeof(Elf64_Verneed) == 16 (Vernaux too)


@dataclass(frozen=True)
class Symbol:
    """A defined symbol, at its link address.

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


def _version_names(elf: ELFFile) -> dict[int, tuple[str, bool]]:
    """Version index -> (name, defined here).  Only a version this file defines
    can be its default (`@@`); a needed one (a copy-relocated `stdout` in an
    executable, bound to libc's GLIBC_2.2.5) prints as `@`, as readelf does."""
    names: dict[int, tuple[str, bool]] = {}
    for sec in elf.iter_sections():
        # pyelftools trusts the entry count (sh_info) and keeps re-reading the
        # last entry when vd_next/vn_next is 0: a corrupt count means billions of
        # iterations.  A real chain fits in the section and ends with next == 0.
        limit = sec["sh_size"] // _MIN_VERSION_ENTRY + 1
        if isinstance(sec, GNUVerDefSection):
            for verdef, auxiliaries in itertools.islice(sec.iter_versions(), limit):
                if not verdef["vd_flags"] & _VER_FLG_BASE:  # BASE names the file itself
                    aux = next(auxiliaries, None)
                    if aux is not None:
                        names[verdef["vd_ndx"]] = (aux.name, True)
                if verdef["vd_next"] == 0:
                    break
        elif isinstance(sec, GNUVerNeedSection):
            for verneed, auxiliaries in itertools.islice(sec.iter_versions(), limit):
                for aux in itertools.islice(auxiliaries, limit):
                    names.setdefault(aux["vna_other"], (aux.name, False))
                    if aux["vna_next"] == 0:
                        break
                if verneed["vn_next"] == 0:
                    break
    return names


def _versym_indexes(elf: ELFFile, symtab: SymbolTableSection) -> list[int] | None:
    """The raw .gnu.version entries for `symtab` (a .dynsym), or None."""
    for sec in elf.iter_sections():
        # pyelftools makes a new object per get_section call: compare headers.
        if isinstance(sec, GNUVerSymSection) and (
            elf.get_section(sec["sh_link"]).header == symtab.header
        ):
            data = sec.data()
            return [v for (v,) in struct.iter_unpack("<H", data[: len(data) & ~1])]
    return None


def _raw_entries(section: SymbolTableSection) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(st_name, st_info, st_other, st_shndx, st_value, st_size) per entry.

    pyelftools finds the table and its string table; the fixed 24-byte
    Elf64_Sym records themselves are unpacked with `struct`, because parsing
    them one by one through pyelftools' construct costs ~60 us a symbol (1 s
    for libc with its debug file) against ~1 us here.
    """
    if section["sh_entsize"] != _SYM.size:
        raise ElfError(f"malformed symbol table {section.name}: entry size "
                       f"{section['sh_entsize']}, expected {_SYM.size}")
    data = section.data()
    return _SYM.iter_unpack(data[: len(data) - len(data) % _SYM.size])


def read_symbols(elf: ELFFile, section: SymbolTableSection, source: Source) -> list[Symbol]:
    """The defined, non-section, non-file symbols of `section`, versions attached."""
    versym = _versym_indexes(elf, section) if section["sh_type"] == "SHT_DYNSYM" else None
    version_names = _version_names(elf) if versym is not None else {}
    strtab = elf.get_section(section["sh_link"]).data()
    out: list[Symbol] = []
    for i, (st_name, info, _other, shndx, value, size) in enumerate(_raw_entries(section)):
        typ = info & 0xF
        if shndx in _SKIPPED_SHNDX or typ in _SKIPPED_TYPES or st_name == 0:
            continue
        end = strtab.find(b"\0", st_name)
        raw_name = strtab[st_name:end if end >= 0 else len(strtab)]
        if not raw_name:
            continue
        name = raw_name.decode("utf-8", "surrogateescape")
        kind = _KINDS.get(typ, "other")
        binding = _BINDINGS.get(info >> 4, "other")
        if versym is not None:
            raw = versym[i] if i < len(versym) else 0
            index = raw & ~_VERSYM_HIDDEN
            version, own = version_names.get(index, (None, False)) if index > 1 else (None, False)
            default = own and not raw & _VERSYM_HIDDEN
        else:
            name, version, default = split_version(name)
        out.append(Symbol(name, version, default, value, size, kind, binding, source))
    return out


def symbol_sections(elf: ELFFile) -> dict[str, SymbolTableSection]:
    """The file's `.symtab` and `.dynsym` by type ('symtab', 'dynsym'); the first of each."""
    found: dict[str, SymbolTableSection] = {}
    for sec in elf.iter_sections():
        if isinstance(sec, SymbolTableSection):
            key = "dynsym" if sec["sh_type"] == "SHT_DYNSYM" else "symtab"
            found.setdefault(key, sec)
    return found
