"""Instruction boundaries and ret sites against objdump -d."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_elf_support import (
    elf_bins,  # noqa: F401 - fixture
    libc_path,
    objdump_function,
)

from uprobes.elf import (
    ElfImage,
    Symbol,
    SymbolTable,
    check_boundary,
    decode_at,
    find_return_sites,
    return_sites,
)
from uprobes.errors import ResolveError


def _fn(table: SymbolTable, name: str) -> Symbol:
    (sym,) = table.lookup(name)
    return sym


def _assert_boundaries(path: str | Path, img: ElfImage, sym: Symbol) -> int:
    insns = objdump_function(path, sym.link_addr, sym.link_addr + sym.size)
    assert insns and insns[0].addr == sym.link_addr
    assert sum(i.length for i in insns) == sym.size
    starts = {i.addr for i in insns}
    for link_addr in range(sym.link_addr, sym.link_addr + sym.size):
        off = img.link_to_file_offset(link_addr)
        if link_addr in starts:
            check_boundary(img, sym, off)
        else:
            with pytest.raises(ResolveError, match="inside an instruction"):
                check_boundary(img, sym, off)
    return len(insns)


@pytest.mark.parametrize("shape", ["pie", "nopie", "shapes", "lib"])
def test_boundaries_match_objdump(elf_bins: dict[str, Path], shape: str) -> None:
    path = elf_bins[shape]
    img = ElfImage.open(path)
    table = SymbolTable.load(img)
    n = 0
    with img:
        for sym in table.functions():
            if sym.size and sym.source == "symtab" and not sym.name.startswith("_"):
                n += _assert_boundaries(path, img, sym)
    assert n > (20 if shape != "lib" else 5)


def test_boundaries_in_libc_sample() -> None:
    path = libc_path()
    img = ElfImage.open(path)
    table = SymbolTable.load(img)
    with img:
        for name in ("malloc", "free", "printf", "__libc_start_main", "getpid", "qsort"):
            _assert_boundaries(path, img, _fn(table, name))


def test_start_plus_one_is_refused(elf_bins: dict[str, Path]) -> None:
    img = ElfImage.open(elf_bins["shapes"])
    sym = _fn(SymbolTable.load(img), "long_first")
    start = img.link_to_file_offset(sym.link_addr)
    first = decode_at(img, start)
    assert first.length > 1
    with pytest.raises(ResolveError, match=rf"inside an instruction.*is {first.length} bytes"):
        check_boundary(img, sym, start + 1)
    check_boundary(img, sym, start + first.length)
    with pytest.raises(ResolveError, match="outside"):
        check_boundary(img, sym, start + sym.size)


def test_decode_at_matches_objdump(elf_bins: dict[str, Path]) -> None:
    path = elf_bins["shapes"]
    img = ElfImage.open(path)
    sym = _fn(SymbolTable.load(img), "two_returns")
    for ins in objdump_function(path, sym.link_addr, sym.link_addr + sym.size):
        got = decode_at(img, img.link_to_file_offset(ins.addr))
        assert (got.link_addr, got.length) == (ins.addr, ins.length)
        assert got.text.split()[0].rstrip("q") == ins.text.split()[0].rstrip("q")
    with pytest.raises(ResolveError, match="not in an executable segment"):
        decode_at(img, img.link_to_file_offset(img.section(".rodata").link_addr))  # type: ignore[union-attr]


def _objdump_rets(path: Path, sym: Symbol, img: ElfImage) -> list[int]:
    return [img.link_to_file_offset(i.addr)
            for i in objdump_function(path, sym.link_addr, sym.link_addr + sym.size)
            if i.text.split()[0] in ("ret", "retq") or i.text.startswith(("repz ret", "bnd ret"))]


def test_return_sites(elf_bins: dict[str, Path]) -> None:
    path = elf_bins["shapes"]
    img = ElfImage.open(path)
    table = SymbolTable.load(img)
    two = _fn(table, "two_returns")
    rets = return_sites(img, two)
    assert rets is not None and len(rets) >= 2
    assert rets == _objdump_rets(path, two, img)
    assert all(decode_at(img, off).text == "ret" for off in rets)

    tail = find_return_sites(img, _fn(table, "tail_caller"))
    assert tail.file_offsets is None and "tail call" in (tail.reason or "")
    switch = find_return_sites(img, _fn(table, "dispatch"))
    assert switch.file_offsets is None
    assert "indirect jump" in (switch.reason or "") or "outside" in (switch.reason or "")
    never = find_return_sites(img, _fn(table, "never_returns"))
    assert never.file_offsets == () and "never returns" in (never.reason or "")


def test_return_sites_agree_with_objdump_everywhere(elf_bins: dict[str, Path]) -> None:
    """Where we find the exits, they are exactly objdump's rets."""
    found = 0
    for shape in ("pie", "static"):
        path = elf_bins[shape]
        img = ElfImage.open(path)
        with img:
            for sym in SymbolTable.load(img).glob("*")[:400]:
                rets = return_sites(img, sym)
                if rets is not None and sym.size:
                    assert rets == _objdump_rets(path, sym, img), sym.display_name
                    found += 1
    assert found > 100


def test_size_zero_symbol_has_no_return_sites() -> None:
    sym = Symbol("x", None, False, 0x1000, 0, "func", "global", "symtab")
    img = ElfImage.open(libc_path())
    assert find_return_sites(img, sym).reason == "x has no size in the symbol table"
