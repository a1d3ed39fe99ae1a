"""Any input file: the ELF layer works or raises ElfError/ResolveError, never anything else.

Truncated and bit-flipped copies of a small fixture go through everything the
layer offers (headers, segments, symbols, USDT notes, decoding); special files
(directory, FIFO, device, empty, foreign ELF) must be refused in one line that
names the file, without blocking.
"""

from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_elf_support import FIXTURES, elf_bins, readelf_sections, run  # noqa: F401

from uprobes.elf import (
    ElfImage,
    SymbolTable,
    check_boundary,
    decode_at,
    find_return_sites,
    usdt_notes,
)
from uprobes.errors import ElfError, ResolveError

WATCHDOG_S = 60  # a hang, not a slow example on a loaded machine (hypothesis has no deadline)


class Hang(Exception):
    pass


def _alarm(_sig: int, _frame: object) -> None:
    raise Hang(f"no answer within {WATCHDOG_S} s")


def exercise(image_of: object) -> None:
    """Use every part of the public API on one input; only our errors may come out."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(WATCHDOG_S)
    try:
        img = image_of() if callable(image_of) else image_of  # type: ignore[operator]
        assert isinstance(img, ElfImage)
        for seg in img.segments:
            off = img.link_to_file_offset(seg.link_addr) if seg.file_size else seg.file_offset
            if seg.file_size:
                img.file_to_link_addr(off)
            img.is_executable_file_offset(off)
        table = SymbolTable.load(img, debug_dirs=(), use_cache=False)
        table.lookup("main")
        table.lookup("tick@@V")
        table.glob("*")
        table.suggest("mian")
        funcs = table.functions()
        for sym in funcs[:6]:
            table.containing(sym.link_addr)
            try:
                start = img.link_to_file_offset(sym.link_addr)
                check_boundary(img, sym, start + 1)
            except ResolveError:
                pass
            try:
                find_return_sites(img, sym)
                decode_at(img, img.link_to_file_offset(sym.link_addr))
            except ResolveError:
                pass
        usdt_notes(img)
    except ResolveError as exc:
        message = str(exc)
        assert "\n" not in message and message
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def small_elf(elf_bins: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The USDT fixture without debug info: symbols, versions, notes, code, in ~16 KiB."""
    out = tmp_path_factory.mktemp("fuzz") / "small"
    run("objcopy", "--strip-debug", elf_bins["usdt-pie"], out)
    data = out.read_bytes()
    assert len(data) < 40_000
    return data


def _interesting_lengths(data: bytes, path: Path) -> list[int]:
    """Every header, table, section and segment edge, and one byte either side."""
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    edges = {0, 1, 4, 5, 16, 20, 52, 63, 64, phoff + phentsize * phnum, shoff,
             shoff + shentsize * shnum, len(data) - 1}
    for i in range(phnum):
        off, _va, _pa, filesz = struct.unpack_from("<QQQQ", data, phoff + i * phentsize + 8)
        edges |= {off, off + filesz}
    for sec in readelf_sections(path):
        edges |= {sec.offset, sec.offset + sec.size}
    return sorted({e + d for e in edges for d in (-1, 0, 1) if 0 <= e + d < len(data)})


def test_truncated_at_every_interesting_length(small_elf: bytes, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(small_elf)
    lengths = _interesting_lengths(small_elf, src)
    assert len(lengths) > 50
    full = ElfImage.from_bytes(small_elf, "full")
    loads_end = max(s.file_offset + s.file_size for s in full.segments)
    shoff = struct.unpack_from("<Q", small_elf, 40)[0]
    dynamic = {s for s in SymbolTable.load(full, debug_dirs=()) if s.source == "dynsym"}
    accepted = []
    for n in lengths:
        try:
            img = ElfImage.from_bytes(small_elf[:n], f"trunc-{n}")
        except ElfError:
            assert not loads_end <= n <= shoff, n
        else:
            # Cut after every segment but before the section headers: a file
            # with no section headers, read through its program headers.
            assert loads_end <= n <= shoff and img.sections_cut, n
            assert set(SymbolTable.load(img, debug_dirs=())) == dynamic
            accepted.append(n)
        exercise(lambda n=n: ElfImage.from_bytes(small_elf[:n], f"trunc-{n}"))
    assert accepted and len(accepted) < len(lengths) - 50


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_truncated_anywhere(small_elf: bytes, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, len(small_elf)))
    exercise(lambda: ElfImage.from_bytes(small_elf[:n], f"trunc-{n}"))


def _flip_positions(elf: bytes) -> st.SearchStrategy[int]:
    phoff, shoff = struct.unpack_from("<QQ", elf, 32)
    shnum = struct.unpack_from("<H", elf, 60)[0]
    return st.one_of(st.integers(0, 63), st.integers(phoff, phoff + 13 * 56 - 1),
                     st.integers(shoff, shoff + shnum * 64 - 1), st.integers(0, len(elf) - 1))


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_bit_flips(small_elf: bytes, data: st.DataObject) -> None:
    buf = bytearray(small_elf)
    for pos in data.draw(st.lists(_flip_positions(small_elf), min_size=1, max_size=8)):
        if pos < len(buf):
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    exercise(lambda: ElfImage.from_bytes(bytes(buf), "flipped"))


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_field_overwrites(small_elf: bytes, data: st.DataObject) -> None:
    """Whole header and table fields set to extreme values (sizes, offsets, counts)."""
    buf = bytearray(small_elf)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(_flip_positions(small_elf))
        width = data.draw(st.sampled_from([1, 2, 4, 8]))
        value = data.draw(st.sampled_from([0, 1, 0x7F, 0xFF, 2**(8 * width) - 1,
                                           2**(8 * width - 1)]))
        if pos + width <= len(buf):
            buf[pos:pos + width] = value.to_bytes(width, "little")
    exercise(lambda: ElfImage.from_bytes(bytes(buf), "overwritten"))


def test_fuzzed_files_on_disk(small_elf: bytes, tmp_path: Path) -> None:
    """The path-based entry (stat, open, cache key) with damaged files."""
    for i, (pos, mask) in enumerate([(0x10, 0xFF), (0x28, 0x40), (0x3C, 0x01), (0x38, 0x02),
                                     (len(small_elf) - 40, 0xFF), (0x300, 0xFF)]):
        buf = bytearray(small_elf)
        buf[pos] ^= mask
        path = tmp_path / f"damaged-{i}"
        path.write_bytes(bytes(buf))
        exercise(lambda path=path: ElfImage.open(path))


# -- special files ----------------------------------------------------------------------

def _refused(path: str | Path, *words: str) -> str:
    with pytest.raises(ElfError) as info:
        exercise(lambda: ElfImage.open(path))
        ElfImage.open(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_directory(tmp_path: Path) -> None:
    _refused(tmp_path, "is a directory")
    (tmp_path / "link").symlink_to(tmp_path)
    _refused(tmp_path / "link", "is a directory")


def test_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused(fifo, "FIFO")  # the watchdog in exercise() fails the test if open() blocks


def test_device() -> None:
    _refused("/dev/null", "character device")


def test_missing(tmp_path: Path) -> None:
    _refused(tmp_path / "nope", "no such file")


def test_empty_and_non_elf(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    _refused(tmp_path / "empty", "empty")
    (tmp_path / "script").write_text("#!/bin/sh\necho hi\n")
    _refused(tmp_path / "script", "not an ELF file")
    (tmp_path / "short").write_bytes(b"\x7fELF\x02\x01")
    _refused(tmp_path / "short", "truncated")


def _with_header(small: bytes, **fields: int) -> bytes:
    buf = bytearray(small)
    offsets = {"ei_class": (4, 1), "ei_data": (5, 1), "e_type": (16, 2), "e_machine": (18, 2)}
    for name, value in fields.items():
        pos, width = offsets[name]
        buf[pos:pos + width] = value.to_bytes(width, "little")
    return bytes(buf)


def test_foreign_elf_says_what_it_is(small_elf: bytes, tmp_path: Path) -> None:
    cases = {
        "i386": (_with_header(small_elf, ei_class=1, e_machine=3), ("32-bit", "EM_386")),
        "aarch64": (_with_header(small_elf, e_machine=183), ("64-bit", "EM_AARCH64")),
        "bigendian": (_with_header(small_elf, ei_data=2), ("big-endian",)),
        "core": (_with_header(small_elf, e_type=4), ("core dump",)),
        "badclass": (_with_header(small_elf, ei_class=7), ("ELF class",)),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        _refused(tmp_path / name, *words)
    assert "x86-64" in _refused(tmp_path / "i386")


def test_relocatable_object(tmp_path: Path) -> None:
    obj = tmp_path / "target.o"
    subprocess.run(["gcc", "-c", "-o", obj, FIXTURES / "target.c"], check=True)
    _refused(obj, "relocatable object")


def _unreadable(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        path = tmp_path / "secret"
        path.write_bytes(b"\x7fELF")
        path.chmod(0)
        yield path
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    else:
        # root reads any mode-000 file; procfs's write-only sysctls refuse even root.
        yield Path("/proc/sys/vm/drop_caches")


def test_unreadable(tmp_path: Path) -> None:
    gen = _unreadable(tmp_path)
    path = next(gen)
    assert stat.S_ISREG(os.stat(path).st_mode)
    _refused(path, "Permission denied")
    next(gen, None)


def _section_header_at(data: bytes, path: Path, name: str) -> int:
    shoff = struct.unpack_from("<Q", data, 40)[0]
    index = next(i for i, s in enumerate(readelf_sections(path)) if s.name == name)
    return shoff + 64 * index


def test_huge_version_count_does_not_hang(small_elf: bytes, tmp_path: Path) -> None:
    """Regression: pyelftools loops sh_info times over .gnu.version_r; 2**32-1 took hours."""
    src = tmp_path / "src"
    src.write_bytes(small_elf)
    buf = bytearray(small_elf)
    hdr = _section_header_at(small_elf, src, ".gnu.version_r")
    struct.pack_into("<I", buf, hdr + 44, 0xFFFFFFFF)  # sh_info: the entry count
    exercise(lambda: ElfImage.from_bytes(bytes(buf), "verneed"))
    table = SymbolTable.load(ElfImage.from_bytes(bytes(buf), "verneed"), use_cache=False)
    assert table.lookup("main")


def test_zero_section_header_size_is_refused(small_elf: bytes) -> None:
    buf = bytearray(small_elf)
    struct.pack_into("<HH", buf, 58, 0, 0xFFFF)  # e_shentsize 0, e_shnum 65535
    with pytest.raises(ElfError, match="section header size 0"):
        ElfImage.from_bytes(bytes(buf), "shentsize")


# -- files without section headers: the PT_DYNAMIC path ----------------------------------

_DYNAMIC_PARTS = (".dynamic", ".gnu.hash", ".hash", ".dynsym", ".dynstr", ".gnu.version",
                  ".gnu.version_d", ".gnu.version_r")


@pytest.fixture(scope="module")
def noshdr_lib(elf_bins: dict[str, Path]) -> tuple[bytes, list[tuple[int, int]]]:
    """The versioned library with e_shoff/e_shnum/e_shstrndx zeroed, and the byte
    ranges of what the dynamic section points at (hash, symbols, strings, versions)."""
    data = bytearray(Path(elf_bins["lib"]).read_bytes())
    ranges = [(s.offset, s.offset + s.size) for s in readelf_sections(elf_bins["lib"])
              if s.name in _DYNAMIC_PARTS and s.size]
    struct.pack_into("<Q", data, 40, 0)
    struct.pack_into("<HH", data, 60, 0, 0)
    table = SymbolTable.load(ElfImage.from_bytes(bytes(data), "noshdr"), debug_dirs=(),
                             use_cache=False)
    assert {s.version for s in table.lookup("vfunc@VERS_1") + table.lookup("vfunc")} == {
        "VERS_1", "VERS_2"}
    return bytes(data), ranges


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_dynamic_tables_damaged(noshdr_lib: tuple[bytes, list[tuple[int, int]]],
                                data: st.DataObject) -> None:
    """Flipped bits and extreme words in the dynamic section, the hash tables, the
    symbols, strings and version chains: an answer or one ElfError, never a hang."""
    elf, ranges = noshdr_lib
    buf = bytearray(elf)
    where = st.one_of(*(st.integers(a, b - 1) for a, b in ranges))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(where)
        if data.draw(st.booleans()):
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            width = data.draw(st.sampled_from([2, 4, 8]))
            value = data.draw(st.sampled_from([0, 1, 2**(8 * width) - 1, 2**(8 * width - 1)]))
            if pos + width <= len(buf):
                buf[pos:pos + width] = value.to_bytes(width, "little")
    exercise(lambda: ElfImage.from_bytes(bytes(buf), "noshdr-damaged"))
