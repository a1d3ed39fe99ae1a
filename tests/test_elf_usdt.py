"""USDT notes against readelf -n, with file offsets computed independently from readelf -lW."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from test_elf_support import (
    PYTHON311,
    elf_bins,  # noqa: F401 - fixture
    readelf_sections,
    readelf_segments,
    readelf_usdt,
)

from uprobes.elf import ElfImage, UsdtArg, find_usdt, parse_usdt_args, usdt_notes
from uprobes.errors import ElfError


def _file_offset(path: str | Path, link_addr: int) -> int:
    for seg in readelf_segments(path):
        if seg.type == "LOAD" and seg.vaddr <= link_addr < seg.vaddr + seg.filesz:
            return link_addr - seg.vaddr + seg.offset
    raise AssertionError(f"{link_addr:#x} not in a LOAD segment of {path}")


def _compare(path: str | Path) -> None:
    want = readelf_usdt(path)
    got = usdt_notes(ElfImage.open(path))
    assert want, f"readelf finds no USDT notes in {path}"
    probes = {s.name: s for s in readelf_sections(path)}
    assert [(n.provider, n.name, n.note_pc, n.note_base, n.note_semaphore, n.arg_text)
            for n in got] == [(w.provider, w.name, w.location, w.base, w.semaphore, w.arguments)
                              for w in want]
    for note, ref in zip(got, want):
        # no prelink here: .stapsdt.base is where the notes say
        assert probes[".stapsdt.base"].addr == ref.base
        assert note.link_addr == ref.location
        assert note.file_offset == _file_offset(path, ref.location)
        if ref.semaphore:
            sec = next(s for s in probes.values()
                       if s.addr <= ref.semaphore < s.addr + s.size and s.type == "PROGBITS")
            assert note.semaphore_link_addr == ref.semaphore
            assert note.semaphore_file_offset == ref.semaphore - sec.addr + sec.offset
        else:
            assert note.semaphore_link_addr is None and note.semaphore_file_offset is None


def test_python311_notes_match_readelf() -> None:
    assert Path(PYTHON311).exists(), "this machine's /usr/bin/python3.11 carries USDT probes"
    _compare(PYTHON311)
    notes = usdt_notes(ElfImage.open(PYTHON311))
    (entry,) = find_usdt(notes, "python", "function__entry")
    assert len(entry.args) == 3 and entry.semaphore_file_offset is not None
    # the semaphore is in .probes, a data segment: file offset != link address (non-PIE)
    assert entry.semaphore_file_offset != entry.semaphore_link_addr


@pytest.mark.parametrize("shape", ["usdt-pie", "usdt-nopie"])
def test_fixture_notes_match_readelf(elf_bins: dict[str, Path], shape: str) -> None:
    _compare(elf_bins[shape])
    notes = usdt_notes(ElfImage.open(elf_bins[shape]))
    assert [n.full_name for n in notes] == ["demo:tick", "demo:start", "demo:done"]
    tick, start, done = notes
    assert [(a.size, a.signed) for a in tick.args] == [(4, True), (8, True), (1, False)]
    assert tick.semaphore_file_offset is not None
    assert start.semaphore_link_addr is None and done.args == ()
    img = ElfImage.open(elf_bins[shape])
    assert all(img.read_file(n.file_offset, 1) == b"\x90" for n in notes)  # the nop


def test_base_adjustment(elf_bins: dict[str, Path], tmp_path: Path) -> None:
    """Notes written before .stapsdt.base moved (prelink): pc and semaphore shift with it."""
    src = Path(elf_bins["usdt-pie"])
    before = usdt_notes(ElfImage.open(src))
    data = bytearray(src.read_bytes())
    sec = next(s for s in readelf_sections(src) if s.name == ".note.stapsdt")
    shift = 0x1000
    pos = sec.offset
    while pos < sec.offset + sec.size:
        namesz, descsz, _type = struct.unpack_from("<III", data, pos)
        desc = pos + 12 + ((namesz + 3) & ~3)
        pc, base, sem = struct.unpack_from("<QQQ", data, desc)
        struct.pack_into("<QQQ", data, desc, pc - shift, base - shift, sem - shift if sem else 0)
        pos = desc + ((descsz + 3) & ~3)
    moved = tmp_path / "moved"
    moved.write_bytes(bytes(data))
    after = usdt_notes(ElfImage.open(moved))
    assert [n.note_pc for n in after] == [n.note_pc - shift for n in before]
    assert [(n.link_addr, n.file_offset, n.semaphore_link_addr, n.semaphore_file_offset)
            for n in after] == [(n.link_addr, n.file_offset, n.semaphore_link_addr,
                                 n.semaphore_file_offset) for n in before]


def test_no_notes(elf_bins: dict[str, Path]) -> None:
    assert usdt_notes(ElfImage.open(elf_bins["pie"])) == []


def test_parse_args() -> None:
    assert parse_usdt_args("-4@%eax 8@-16(%rbp) 8@%rdi -4@$5 8@8(%rax,%rbx,8)") == (
        UsdtArg(4, True, "%eax"), UsdtArg(8, False, "-16(%rbp)"), UsdtArg(8, False, "%rdi"),
        UsdtArg(4, True, "$5"), UsdtArg(8, False, "8(%rax,%rbx,8)"))
    assert parse_usdt_args("") == ()
    assert parse_usdt_args("1@%al  -2@%si") == (UsdtArg(1, False, "%al"), UsdtArg(2, True, "%si"))
    for bad in ("%eax", "3@%eax", "8@", "x@%eax", "@%eax"):
        with pytest.raises(ValueError):
            parse_usdt_args(bad)


def test_bad_arg_spec_is_an_elf_error(elf_bins: dict[str, Path], tmp_path: Path) -> None:
    data = Path(elf_bins["usdt-pie"]).read_bytes()
    spot = data.index(b"-4@%ebx") if b"-4@%ebx" in data else data.index(b"@%")
    bad = tmp_path / "bad"
    bad.write_bytes(data[:spot] + b"?" + data[spot + 1:])
    with pytest.raises(ElfError, match="USDT probe demo:tick"):
        usdt_notes(ElfImage.open(bad))
