"""elf/dwarf/unitnames.py: every unit's name read from the sections' bytes
equals what pyelftools reads (its top DIE's DW_AT_name), on builds of a
fixture in each DWARF shape gcc makes (2, 4, 5, 64-bit, compressed, split
strings), and on libc's debug file (DWARF 5, compressed, 2,000 units)."""

from __future__ import annotations

import pytest
from conftest import Compiler

from uprobes.elf.dwarf.index import DwarfFile
from uprobes.elf.dwarf.unitnames import unit_names
from uprobes.elf.image import ElfImage
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
