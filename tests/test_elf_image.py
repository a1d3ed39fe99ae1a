"""ElfImage: what it reports and how it translates addresses, checked against readelf."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
from test_elf_support import (
    PYTHON311,
    elf_bins,  # noqa: F401 - fixture
    libc_path,
    readelf_build_id,
    readelf_sections,
    readelf_segments,
    run,
)

from uprobes.elf import ElfImage
from uprobes.errors import ElfError, ResolveError

SHAPES = ["pie", "nopie", "static", "lib", "stripped", "usdt-pie", "usdt-nopie"]


def _path(elf_bins: dict[str, Path], shape: str) -> str:
    return libc_path() if shape == "libc" else PYTHON311 if shape == "python" else str(
        elf_bins[shape])


@pytest.mark.parametrize("shape", SHAPES + ["libc", "python"])
def test_segments_match_readelf(elf_bins: dict[str, Path], shape: str) -> None:
    path = _path(elf_bins, shape)
    img = ElfImage.open(path)
    loads = [s for s in readelf_segments(path) if s.type == "LOAD"]
    assert [(s.file_offset, s.link_addr, s.file_size, s.mem_size) for s in img.segments] == [
        (s.offset, s.vaddr, s.filesz, s.memsz) for s in loads]
    assert [s.executable for s in img.segments] == ["E" in s.flags for s in loads]
    assert [s.writable for s in img.segments] == ["W" in s.flags for s in loads]


@pytest.mark.parametrize("shape", SHAPES + ["libc", "python"])
def test_link_to_file_offset_matches_section_table(elf_bins: dict[str, Path], shape: str) -> None:
    """Every allocated, file-backed section: sh_addr translates to sh_offset (and back)."""
    path = _path(elf_bins, shape)
    img = ElfImage.open(path)
    checked = 0
    for sec in readelf_sections(path):
        if "A" not in sec.flags or sec.type == "NOBITS" or sec.size == 0 or "T" in sec.flags:
            continue
        for link_addr, offset in ((sec.addr, sec.offset),
                                  (sec.addr + sec.size - 1, sec.offset + sec.size - 1)):
            assert img.link_to_file_offset(link_addr) == offset, sec.name
            assert img.file_to_link_addr(offset) == link_addr, sec.name
        assert img.is_executable_file_offset(sec.offset) == ("X" in sec.flags), sec.name
        checked += 1
    assert checked >= 5 or shape == "stripped"
    text = img.section(".text")
    assert text is not None and img.is_executable_file_offset(text.file_offset)


def test_pie_and_nopie_differ_as_readelf_says(elf_bins: dict[str, Path]) -> None:
    pie, nopie = ElfImage.open(elf_bins["pie"]), ElfImage.open(elf_bins["nopie"])
    assert (pie.elf_type, pie.is_pie) == ("DYN", True)
    assert (nopie.elf_type, nopie.is_pie) == ("EXEC", False)
    assert nopie.segments[0].link_addr == 0x400000
    # non-PIE: link address != file offset, the classic bpftrace#1763 confusion
    text = nopie.section(".text")
    assert text is not None
    assert nopie.link_to_file_offset(text.link_addr) == text.file_offset != text.link_addr


def test_header_facts_match_readelf(elf_bins: dict[str, Path]) -> None:
    lib = ElfImage.open(elf_bins["lib"])
    assert lib.elf_type == "DYN" and not lib.is_pie and lib.interp is None
    libc = ElfImage.open(libc_path())
    assert libc.soname == "libc.so.6" and not libc.is_pie
    static = ElfImage.open(elf_bins["static"])
    assert static.interp is None and static.elf_type == "EXEC"
    pie = ElfImage.open(elf_bins["pie"])
    interp = run("readelf", "-lW", elf_bins["pie"]).split("interpreter: ")[1].split("]")[0]
    assert pie.interp == interp
    for p in (elf_bins["pie"], elf_bins["static"], libc_path(), PYTHON311):
        assert ElfImage.open(p).build_id == readelf_build_id(p)


def test_debuglink_is_read(elf_bins: dict[str, Path], tmp_path: Path) -> None:
    exe = tmp_path / "t"
    run("objcopy", "--only-keep-debug", elf_bins["pie"], tmp_path / "t.debug")
    run("objcopy", "--strip-debug", f"--add-gnu-debuglink={tmp_path / 't.debug'}",
        elf_bins["pie"], exe)
    name, crc = ElfImage.open(exe).debuglink  # type: ignore[misc]
    run("objcopy", "--dump-section", f".gnu_debuglink={tmp_path / 'link'}", exe)
    raw = (tmp_path / "link").read_bytes()
    assert name == "t.debug" and raw.startswith(b"t.debug\0")
    assert crc == int.from_bytes(raw[-4:], "little")
    assert crc == zlib.crc32((tmp_path / "t.debug").read_bytes())


def test_bss_and_unmapped_addresses_are_refused(elf_bins: dict[str, Path]) -> None:
    img = ElfImage.open(elf_bins["pie"])
    bss = img.section(".bss")
    assert bss is not None
    with pytest.raises(ResolveError, match="bss"):
        img.link_to_file_offset(bss.link_addr + bss.size - 1)
    with pytest.raises(ResolveError, match="not in any loadable segment"):
        img.link_to_file_offset(0x7FFF_0000_0000)
    with pytest.raises(ResolveError, match="not in any loadable segment"):
        img.file_to_link_addr(img.file_size + 100)


def test_read_link_reads_the_right_bytes(elf_bins: dict[str, Path]) -> None:
    path = elf_bins["nopie"]
    img = ElfImage.open(path)
    ro = img.section(".rodata")
    assert ro is not None
    with open(path, "rb") as f:
        f.seek(ro.file_offset)
        want = f.read(ro.size)
    assert img.read_link(ro.link_addr, ro.size) == want


def test_from_bytes_matches_open(elf_bins: dict[str, Path]) -> None:
    data = Path(elf_bins["lib"]).read_bytes()
    mem = ElfImage.from_bytes(data, "[vdso-like]")
    disk = ElfImage.open(elf_bins["lib"])
    assert mem.segments == disk.segments and mem.build_id == disk.build_id
    assert mem.identity is None and mem.path == "[vdso-like]"


def test_no_fd_leaks(elf_bins: dict[str, Path]) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    for _ in range(20):
        img = ElfImage.open(elf_bins["pie"])
        img.read_link(img.segments[0].link_addr, 4)
        with img:
            assert fds() == before + 1
            img.read_link(img.segments[0].link_addr, 4)
        with pytest.raises(ElfError):
            ElfImage.open(Path(__file__))
    assert fds() == before


def test_file_replaced_after_open_is_noticed(elf_bins: dict[str, Path], tmp_path: Path) -> None:
    exe = tmp_path / "t"
    exe.write_bytes(Path(elf_bins["pie"]).read_bytes())
    img = ElfImage.open(exe)
    exe.unlink()
    exe.write_bytes(Path(elf_bins["nopie"]).read_bytes())
    with pytest.raises(ElfError, match="changed on disk"):
        img.read_file(0, 4)
