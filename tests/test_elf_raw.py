"""Our struct-based ELF reader (elf/raw.py, symread.py, dynamic.py) against pyelftools.

pyelftools parses every field through its own construct structs; it is the
reference here.  Same sections, segments, build-id, soname, interpreter,
USDT notes and the same symbols (names, versions, values, sizes, kinds) in
libc, python3.11, a C and a C++ fixture; and the dynamic symbol table read
through PT_DYNAMIC (DT_GNU_HASH, or DT_HASH) equals the `.dynsym` section.
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest
from conftest import Compiler
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerNeedSection, GNUVerSymSection
from elftools.elf.sections import NoteSection, SymbolTableSection
from test_elf_support import PYTHON311, libc_path, run

from uprobes.elf import ElfImage, usdt_notes
from uprobes.elf.dynamic import dynamic_symbols
from uprobes.elf.symread import read_symbols, split_version, symbol_sections

SKIPPED_SHNDX = ("SHN_UNDEF", "SHN_ABS", "SHN_COMMON")
KINDS = {"STT_FUNC": "func", "STT_LOOS": "ifunc", "STT_GNU_IFUNC": "ifunc",
         "STT_OBJECT": "object", "STT_TLS": "tls", "STT_NOTYPE": "notype",
         "STT_COMMON": "common"}

Row = tuple[str, "str | None", bool, int, int, str]


@pytest.fixture(scope="module", params=["libc", "python3.11", "c", "c++"])
def target(request: pytest.FixtureRequest, compile_c: Compiler) -> str:
    if request.param == "libc":
        return libc_path()
    if request.param == "python3.11":
        return PYTHON311
    if request.param == "c":
        return str(compile_c("target.c", "-fPIE", "-pie", "-rdynamic"))
    return str(compile_c("retsites.cc", "-fPIE", "-pie", "-rdynamic"))


def _reference_versions(elf: ELFFile) -> dict[int, tuple[str, bool]]:
    names: dict[int, tuple[str, bool]] = {}
    for sec in elf.iter_sections():
        if isinstance(sec, GNUVerDefSection):
            for verdef, aux in sec.iter_versions():
                if not verdef["vd_flags"] & 1:
                    first = next(aux, None)
                    if first is not None:
                        names[verdef["vd_ndx"]] = (first.name, True)
        elif isinstance(sec, GNUVerNeedSection):
            for _verneed, aux in sec.iter_versions():
                for a in aux:
                    names.setdefault(a["vna_other"], (a.name, False))
    return names


def reference_symbols(path: str, table: str) -> set[Row]:
    """The defined symbols of `.symtab` or `.dynsym`, every field through pyelftools."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        sec = next((s for s in elf.iter_sections() if isinstance(s, SymbolTableSection)
                    and s["sh_type"] == ("SHT_DYNSYM" if table == "dynsym" else "SHT_SYMTAB")),
                   None)
        if sec is None:
            return set()
        versym = next((s for s in elf.iter_sections() if isinstance(s, GNUVerSymSection)), None)
        versions = _reference_versions(elf) if table == "dynsym" and versym else {}
        out: set[Row] = set()
        for i, sym in enumerate(sec.iter_symbols()):
            typ = sym["st_info"]["type"]
            if (sym["st_shndx"] in SKIPPED_SHNDX or typ in ("STT_SECTION", "STT_FILE")
                    or not sym.name):
                continue
            if versions and versym is not None:
                ndx = versym.get_symbol(i)["ndx"]
                hidden = isinstance(ndx, int) and bool(ndx & 0x8000)
                index = ndx & 0x7FFF if isinstance(ndx, int) else 0
                version, own = versions.get(index, (None, False)) if index > 1 else (None, False)
                name, default = sym.name, own and not hidden
            else:
                name, version, default = split_version(sym.name)
            out.add((name, version, default, sym["st_value"], sym["st_size"],
                     KINDS.get(typ, "other")))
        return out


def _rows(symbols: list) -> set[Row]:  # type: ignore[type-arg]
    return {(s.name, s.version, s.default_version, s.link_addr, s.size, s.kind) for s in symbols}


@pytest.mark.parametrize("table", ["dynsym", "symtab"])
def test_symbols_equal_pyelftools(target: str, table: str) -> None:
    want = reference_symbols(target, table)
    with ElfImage.open(target).raw() as elf:
        sec = symbol_sections(elf).get(table)
        got = _rows(read_symbols(elf, sec, table)) if sec is not None else set()  # type: ignore[arg-type]
    assert got == want
    if table == "dynsym":
        assert len(want) > 5


def test_dynamic_segment_symbols_equal_dynsym(target: str) -> None:
    """What PT_DYNAMIC names (counted by DT_GNU_HASH) is exactly the `.dynsym` section."""
    with ElfImage.open(target).raw() as elf:
        got = _rows(dynamic_symbols(elf))
    assert got == reference_symbols(target, "dynsym")


def test_sysv_hash_count(compile_c: Compiler) -> None:
    """DT_HASH's nchain counts the same symbols as DT_GNU_HASH does."""
    lib = compile_c("libversioned.c", "-shared", "-fPIC", "-Wl,--hash-style=both",
                    f"-Wl,--version-script={Path(__file__).parent / 'fixtures/libversioned.map'}",
                    name="libversioned-bothhash.so")
    from uprobes.elf.dynamic import DT_GNU_HASH, DT_HASH, gnu_hash_count, sysv_hash_count
    with ElfImage.open(lib).raw() as elf:
        tags = elf.dynamic()
        assert DT_HASH in tags and DT_GNU_HASH in tags
        dynsym = symbol_sections(elf)["dynsym"]
        assert sysv_hash_count(elf, tags[DT_HASH]) == dynsym.size // 24
        assert gnu_hash_count(elf, tags[DT_GNU_HASH]) == dynsym.size // 24


def test_headers_equal_pyelftools(target: str) -> None:
    img = ElfImage.open(target)
    with open(target, "rb") as f:
        elf = ELFFile(f)
        sections = [(s.name, str(s["sh_type"]), s["sh_addr"], s["sh_offset"], s["sh_size"],
                     s["sh_flags"]) for s in elf.iter_sections()]
        loads = [(s["p_offset"], s["p_vaddr"], s["p_filesz"], s["p_memsz"], s["p_flags"])
                 for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        interp = next((s.get_interp_name() for s in elf.iter_segments()
                       if s["p_type"] == "PT_INTERP"), None)
        build_id = next((n["n_desc"] for s in elf.iter_sections() if isinstance(s, NoteSection)
                         for n in s.iter_notes() if n["n_type"] == "NT_GNU_BUILD_ID"), None)
        dyn = elf.get_section_by_name(".dynamic")
        soname = next((t.soname for t in dyn.iter_tags() if t.entry.d_tag == "DT_SONAME"),
                      None) if dyn is not None else None
        stapsdt = [bytes(n["n_descdata"]) for s in elf.iter_sections()
                   if isinstance(s, NoteSection) for n in s.iter_notes()
                   if n["n_name"] == "stapsdt"]
    assert [(s.name, s.type, s.link_addr, s.file_offset, s.size, s.flags)
            for s in img.sections] == sections
    assert [(s.file_offset, s.link_addr, s.file_size, s.mem_size, s.flags)
            for s in img.segments] == loads
    assert (img.interp, img.build_id, img.soname) == (interp, build_id, soname)
    notes = usdt_notes(img)
    assert [(n.note_pc, n.note_base, n.note_semaphore) for n in notes] == [
        struct.unpack_from("<QQQ", d) for d in stapsdt]
    if target == PYTHON311:
        assert len(notes) >= 8


def test_section_header_edge_cases(target: str, tmp_path: Path) -> None:
    """e_shnum 0 with the count in section 0 (the >= 0xff00 sections convention) reads the
    same sections; readelf agrees the file is still valid."""
    data = bytearray(Path(target).read_bytes())
    shoff, = struct.unpack_from("<Q", data, 40)
    shnum, = struct.unpack_from("<H", data, 60)
    struct.pack_into("<Q", data, shoff + 32, shnum)  # section 0's sh_size: the count
    struct.pack_into("<H", data, 60, 0)
    copy = tmp_path / "xnum"
    copy.write_bytes(bytes(data))
    assert "There are" in run("readelf", "-S", copy)
    assert ElfImage.open(copy).sections[1:] == ElfImage.open(target).sections[1:]


def test_walks_are_bounded(compile_c: Compiler) -> None:
    """A verdef chain whose counts are huge stops at the bytes it has."""
    lib = compile_c("libversioned.c", "-shared", "-fPIC",
                    f"-Wl,--version-script={Path(__file__).parent / 'fixtures/libversioned.map'}",
                    name="libversioned-walk.so")
    data = bytearray(lib.read_bytes())
    img = ElfImage.open(lib)
    for sec in img.sections:
        if sec.type in ("SHT_GNU_verdef", "SHT_GNU_verneed"):
            index = img.sections.index(sec)
            shoff, = struct.unpack_from("<Q", data, 40)
            struct.pack_into("<I", data, shoff + 64 * index + 44, 0xFFFFFFFF)  # sh_info
    with ElfImage.from_bytes(bytes(data), "huge").raw() as elf:
        got = read_symbols(elf, symbol_sections(elf)["dynsym"], "dynsym")
    assert _rows(got) == reference_symbols(str(lib), "dynsym")
    assert any(v for v in itertools.chain(s.version for s in got))
