"""elf/dwarf/unitnames.py: every unit's name read from the sections' bytes
equals what pyelftools reads (its top DIE's DW_AT_name), on builds of a
fixture in each DWARF shape gcc makes (2, 4, 5, 64-bit, compressed, split
strings), and on libc's debug file (DWARF 5, compressed, 2,000 units). And
the other readers of raw DWARF bytes against pyelftools: sections read as
far as they are used (`sections.py`), and the DIEs that hold an address
found from a unit's bytes (`skim.py`), in C, C++ and Rust builds and libc."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import Compiler, RustCompiler, need

from uprobes.elf.dwarf.index import DwarfFile
from uprobes.elf.dwarf.unitnames import unit_names
from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.resolve.debugdwarf import dwarf_of


def _pyelftools_names(df: DwarfFile, offsets: list[int]) -> list[str | None]:
    out = []
    for at in offsets:
        attr = df.info.get_CU_at(at).get_top_DIE().attributes.get("DW_AT_name")
        out.append(None if attr is None else attr.value.decode())
    return out


@pytest.mark.parametrize("flags", ["-gdwarf-2", "-gdwarf-4", "-gdwarf-5", "-gdwarf64",
                                   "-gz", "-gdwarf-4 -gstrict-dwarf", "-g3"])
def test_names_equal_pyelftools_on_each_shape(compile_c: Compiler, flags: str) -> None:
    exe = compile_c("dwarf_args.c", *flags.split())
    df = DwarfFile.open(str(exe))
    assert df is not None
    got = list(unit_names(df.info))
    assert got and all(name is not None for _, name in got), got
    assert [name for _, name in got] == _pyelftools_names(df, [at for at, _ in got])
    assert any(name is not None and name.endswith("dwarf_args.c") for _, name in got)


def test_names_equal_pyelftools_on_libc() -> None:
    path = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    with ElfImage.open(path) as image:
        df = dwarf_of(image, path)  # libc6-dbg (./bootstrap test installs it)
    got = list(unit_names(df.info))
    assert len(got) > 1000 and all(name is not None for _, name in got)
    sample = got[::50]
    assert [name for _, name in sample] == _pyelftools_names(df, [at for at, _ in sample])



def test_a_name_pointing_past_its_string_section_is_left_to_pyelftools() -> None:
    """A unit whose DW_AT_name (DW_FORM_strp) points past .debug_str: None
    for it (the caller asks pyelftools), no exception."""
    import io
    import struct
    from types import SimpleNamespace

    abbrev = bytes([1, 0x11, 0, 0x03, 0x0e, 0, 0, 0])  # 1: compile_unit, no children: name strp
    body = struct.pack("<HBBI", 5, 0x01, 8, 0) + bytes([1]) + struct.pack("<I", 999)
    info = struct.pack("<I", len(body)) + body

    def section(data: bytes) -> SimpleNamespace:
        return SimpleNamespace(stream=io.BytesIO(data))
    dwarf = SimpleNamespace(debug_info_sec=section(info), debug_abbrev_sec=section(abbrev),
                            debug_str_sec=section(b"x.c\0"), debug_line_str_sec=None,
                            debug_str_offsets_sec=None)
    assert list(unit_names(dwarf)) == [(0, None)]
    dwarf.debug_info_sec = section(info.replace(struct.pack("<I", 999), struct.pack("<I", 0)))
    assert list(unit_names(dwarf)) == [(0, "x.c")]


# ------------------------------------------------------------ sections read lazily

def test_sections_read_lazily_are_pyelftools_bytes(compile_c: Compiler, tmp_path: Path) -> None:
    """A compressed build's sections as `sections.dwarf_info` reads them are
    the bytes pyelftools decompresses whole, and a probe's resolution reads
    only what it needs: no line table for an optimized function's arguments."""
    from elftools.elf.elffile import ELFFile

    from uprobes.elf.dwarf.sections import SECTION_NAMES, dwarf_info

    exe = tmp_path / "app"  # a file of its own: no DwarfFile kept from another test
    shutil.copy(compile_c("dwarf_args.c", "-O2", "-gz"), exe)
    with open(exe, "rb") as f:
        elf = ELFFile(f)
        whole, lazy = elf.get_dwarf_info(relocate_dwarf_sections=False), dwarf_info(elf, f)
        assert lazy is not None
        compared = 0
        for name in SECTION_NAMES:
            attr = name[1:] + "_sec"
            want, got = getattr(whole, attr, None), getattr(lazy, attr, None)
            assert (want is None) == (got is None), name
            if want is None:
                continue
            want.stream.seek(0)
            got.stream.seek(7)  # a read from the middle, then from the start
            assert got.stream.read(5) == want.stream.read(12)[7:]
            got.stream.seek(0)
            want.stream.seek(0)
            assert got.size == want.size and got.stream.read() == want.stream.read(), name
            compared += 1
        assert compared >= 5
    df = DwarfFile.open(str(exe))
    assert df is not None
    image = ElfImage.open(str(exe))
    visit = next(s for s in SymbolTable.load(image, use_cache=False) if s.name == "visit")
    assert [d.tag for d in df.scopes_at(visit.link_addr)] == ["DW_TAG_subprogram"]
    assert df.info.debug_line_sec.stream.inflated == 0  # never read
    assert df.info.debug_info_sec.stream.inflated > 0


# ------------------------------------------------------------ scopes from the unit's bytes

def _scopes_agree(path: Path, debug: Path, step: int = 1) -> int:
    """Every `step`th function's first and middle address: the DIEs
    `scopes_at` finds from the unit's bytes are those pyelftools' walk of
    the unit finds. How many addresses were compared."""
    table = SymbolTable.load(ElfImage.open(str(path)), use_cache=False)
    df = DwarfFile.open(str(debug))
    assert df is not None
    compared = 0
    for sym in [s for s in table.functions() if s.size][::step]:
        for addr in (sym.link_addr, sym.link_addr + sym.size // 2):
            cu = df.unit_at(addr)
            if cu is None:
                continue
            fast = [d.offset for d in df.scopes_at(addr)]
            assert fast == [d.offset for d in df._scopes_by_walk(cu, addr)], (sym.name, addr)
            compared += bool(fast)
    return compared


@pytest.mark.parametrize("flags", ["-O0", "-O2", "-O2 -gdwarf-4", "-O2 -gz", "-O0 -gdwarf-2"])
def test_scopes_from_bytes_are_pyelftools_walks_c(compile_c: Compiler, flags: str) -> None:
    exe = compile_c("dwarf_args.c", *flags.split())
    assert _scopes_agree(exe, exe) > 10


def test_scopes_from_bytes_are_pyelftools_walks_cxx_rust(compile_c: Compiler,
                                                         compile_rust: RustCompiler) -> None:
    for exe, step in ((compile_c("dwarf_args.cc", "-O2", name="dwarf_args_cc-O2"), 1),
                      (compile_rust("dwarf_args.rs"), 20)):
        assert _scopes_agree(exe, exe, step) > 10, exe


def test_scopes_from_bytes_are_pyelftools_walks_libc() -> None:
    image = ElfImage.open("/lib/x86_64-linux-gnu/libc.so.6")
    bid = image.build_id or ""
    debug = Path(f"/usr/lib/debug/.build-id/{bid[:2]}/{bid[2:]}.debug")
    need(debug.exists(), "libc6-dbg (./bootstrap test installs it)")
    assert _scopes_agree(Path("/lib/x86_64-linux-gnu/libc.so.6"), debug, 97) > 20
