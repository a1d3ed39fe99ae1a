"""Symbol tables against readelf -Ws / nm, every source, and the lookup API."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_elf_support import (
    defined,
    elf_bins,  # noqa: F401 - fixture
    libc_path,
    readelf_build_id,
    readelf_symbols,
    run,
)

from uprobes.elf import ElfImage, SymbolTable, clear_cache, ifunc_warning
from uprobes.elf.symread import read_symbols, symbol_sections


def _ours(path: str | Path, table: str) -> set[tuple[str, str | None, bool, int, int, str]]:
    img = ElfImage.open(path)
    with img.raw() as elf:
        sec = symbol_sections(elf).get(table)
        syms = read_symbols(elf, sec, table) if sec is not None else []  # type: ignore[arg-type]
    return {(s.name, s.version, s.default_version, s.link_addr, s.size, s.kind) for s in syms}


@pytest.mark.parametrize("shape", ["pie", "nopie", "static", "lib", "stripped", "usdt-pie"])
@pytest.mark.parametrize("table", ["symtab", "dynsym"])
def test_tables_equal_readelf(elf_bins: dict[str, Path], shape: str, table: str) -> None:
    path = elf_bins[shape]
    want = defined(readelf_symbols(path), table)
    assert _ours(path, table) == want
    if shape in ("pie", "static", "lib") and table == "symtab":
        assert len(want) > 10


def test_libc_dynsym_equals_readelf() -> None:
    want = defined(readelf_symbols(libc_path()), "dynsym")
    assert len(want) > 2000
    assert _ours(libc_path(), "dynsym") == want
    assert ("memcpy", "GLIBC_2.14", True) in {w[:3] for w in want}
    assert ("memcpy", "GLIBC_2.2.5", False) in {w[:3] for w in want}


def test_function_names_equal_nm(elf_bins: dict[str, Path]) -> None:
    path = elf_bins["static"]
    nm = {}
    for line in run("nm", "--defined-only", path).splitlines():
        value, typ, name = line.split(maxsplit=2)
        if typ in "TtWiI" and "@" not in name:
            nm.setdefault(name, set()).add(int(value, 16))
    table = SymbolTable.load(ElfImage.open(path), use_cache=False)
    ours: dict[str, set[int]] = {}
    for s in table.functions():
        if s.version is None:
            ours.setdefault(s.name, set()).add(s.link_addr)
    # nm types T/t/W/i cover the FUNC/IFUNC symbols; nm also calls NOTYPE text labels T.
    assert {n: a for n, a in nm.items() if n in ours} == ours
    assert len(ours) > 500


def test_versions_lookup(elf_bins: dict[str, Path]) -> None:
    table = SymbolTable.load(ElfImage.open(elf_bins["lib"]))
    rs = {(s.name, s.version, s.default): s.value for s in readelf_symbols(elf_bins["lib"])
          if s.table == "dynsym"}
    v1, v2 = rs[("vfunc", "VERS_1", False)], rs[("vfunc", "VERS_2", True)]
    assert v1 != v2
    assert [s.link_addr for s in table.lookup("vfunc")] == [v2]
    assert [s.link_addr for s in table.lookup("vfunc@@VERS_2")] == [v2]
    assert [s.link_addr for s in table.lookup("vfunc@VERS_2")] == [v2]
    assert [s.link_addr for s in table.lookup("vfunc@VERS_1")] == [v1]
    assert table.lookup("vfunc@@VERS_1") == []
    assert table.lookup("vfunc@VERS_9") == []
    assert table.lookup("vfunc")[0].display_name == "vfunc@@VERS_2"
    # the local implementation names come from .symtab, unversioned
    assert [s.source for s in table.lookup("vfunc_v1")] == ["symtab"]

    libc = SymbolTable.load(ElfImage.open(libc_path()))
    (new,) = libc.lookup("memcpy")
    (old,) = libc.lookup("memcpy@GLIBC_2.2.5")
    assert new.display_name == "memcpy@@GLIBC_2.14" and new.kind == "ifunc"
    assert old.link_addr != new.link_addr and not old.default_version


def test_glob_one_probe_per_address(elf_bins: dict[str, Path]) -> None:
    table = SymbolTable.load(ElfImage.open(elf_bins["lib"]))
    found = table.glob("*plain*")
    assert [s.name for s in found] == ["plain"]  # global beats weak; shortest of globals
    assert {s.name for s in table.aliases(found[0])} == {"plain_alias", "weak_alias"}
    assert [s.name for s in table.glob("weak_*")] == ["weak_alias"]
    assert table.glob("exported_*") == []  # data, not functions
    assert [s.display_name for s in table.glob("vfunc@VERS_1")] == ["vfunc@VERS_1"]

    libc = SymbolTable.load(ElfImage.open(libc_path()))
    hits = libc.glob("str*")
    addrs = [s.link_addr for s in hits]
    assert len(addrs) == len(set(addrs)) and len(hits) > 20
    every = {s.link_addr for s in libc.functions()
             if s.name.startswith("str") and not s.name.endswith(".cold")}
    assert set(addrs) == every


def test_containing(elf_bins: dict[str, Path]) -> None:
    table = SymbolTable.load(ElfImage.open(elf_bins["static"]))
    checked = 0
    for sym in table.functions():
        if sym.size == 0:
            continue
        for addr in (sym.link_addr, sym.link_addr + sym.size - 1):
            got = table.containing(addr)
            assert got is not None
            assert got.link_addr <= addr < got.link_addr + max(got.size, 1)
            assert got.link_addr >= sym.link_addr  # innermost
        checked += 1
    assert checked > 500
    first = min(s.link_addr for s in table.functions())
    assert table.containing(first - 1) is None or table.containing(first - 1).size  # type: ignore[union-attr]
    assert table.containing(0) is None


def test_suggest(elf_bins: dict[str, Path]) -> None:
    table = SymbolTable.load(ElfImage.open(elf_bins["pie"]))
    assert table.suggest("fbi")[0] == "fib"
    assert "greet" in table.suggest("gret")
    assert table.suggest("zzzzzzzzzzqqq") == []
    lib = SymbolTable.load(ElfImage.open(elf_bins["lib"]))
    libc = SymbolTable.load(ElfImage.open(libc_path()))
    assert libc.suggest("memcyp")[0] == "memcpy"
    # a name that only exists with a hidden version: say how to spell it
    hidden_only = [s for s in lib if s.version and not s.default_version
                   and not lib.lookup(s.name)]
    assert hidden_only == []
    assert lib.suggest("vfunc@VERS_3")[0].startswith("vfunc@")


def test_stripped_keeps_dynsym_only(elf_bins: dict[str, Path]) -> None:
    table = SymbolTable.load(ElfImage.open(elf_bins["stripped"]), debug_dirs=())
    assert table.sources == ("dynsym",)
    assert table.lookup("fib") == []
    assert table.suggest("fib") == [] or "fib" not in table.suggest("fib")


def _debug_pair(src: Path, tmp: Path) -> tuple[Path, Path]:
    """A stripped copy of `src` with .gnu_debuglink, and its debug file (objcopy's recipe)."""
    exe, dbg = tmp / "prog", tmp / "prog.debug"
    run("objcopy", "--only-keep-debug", src, dbg)
    run("objcopy", "--strip-all", f"--add-gnu-debuglink={dbg}", src, exe)
    return exe, dbg


def _check_debugfile_symbols(table: SymbolTable, dbg: Path) -> None:
    want = {(n, v, a) for n, v, _d, a, _s, k in defined(readelf_symbols(dbg), "symtab")
            if k in ("func", "ifunc")}
    got = {(s.name, s.version, s.link_addr) for s in table.functions() if s.source == "debugfile"}
    assert got == {w for w in want if w not in {(s.name, s.version, s.link_addr)
                                                 for s in table if s.source == "dynsym"}}
    assert table.lookup("fib") and table.lookup("fib")[0].source == "debugfile"


@pytest.mark.parametrize("where", ["same-dir", ".debug-subdir", "debug-dir"])
def test_debuglink_search(elf_bins: dict[str, Path], tmp_path: Path, where: str) -> None:
    exe, dbg = _debug_pair(Path(elf_bins["pie"]), tmp_path)
    root = tmp_path / "debugroot"
    if where == ".debug-subdir":
        (tmp_path / ".debug").mkdir()
        dbg = dbg.rename(tmp_path / ".debug" / dbg.name)
    elif where == "debug-dir":
        dest = root / str(tmp_path.resolve()).lstrip("/")
        dest.mkdir(parents=True)
        dbg = dbg.rename(dest / dbg.name)
    table = SymbolTable.load(ElfImage.open(exe), debug_dirs=[str(root)], use_cache=False)
    assert any(s.startswith("debugfile") for s in table.sources), table.notes
    _check_debugfile_symbols(table, dbg)


def test_debug_file_by_build_id(elf_bins: dict[str, Path], tmp_path: Path) -> None:
    exe, dbg = _debug_pair(Path(elf_bins["nopie"]), tmp_path)
    bid = readelf_build_id(exe)
    assert bid
    dest = tmp_path / "root" / ".build-id" / bid[:2]
    dest.mkdir(parents=True)
    dbg = dbg.rename(dest / (bid[2:] + ".debug"))
    table = SymbolTable.load(ElfImage.open(exe), debug_dirs=[str(tmp_path / "root")],
                             use_cache=False)
    assert table.sources[-1] == f"debugfile {dbg}"
    _check_debugfile_symbols(table, dbg)


def test_debug_file_with_wrong_crc_is_ignored(elf_bins: dict[str, Path], tmp_path: Path) -> None:
    exe, dbg = _debug_pair(Path(elf_bins["pie"]), tmp_path)
    other = tmp_path / "other"
    run("objcopy", "--only-keep-debug", elf_bins["nopie"], other)
    other.rename(dbg)
    table = SymbolTable.load(ElfImage.open(exe), debug_dirs=(), use_cache=False)
    assert table.lookup("fib") == []
    assert any("CRC32 does not match" in n for n in table.notes)


def test_minidebuginfo(elf_bins: dict[str, Path], tmp_path: Path) -> None:
    """Build .gnu_debugdata the way Fedora's find-debuginfo does, then read it back."""
    for tool in ("nm", "objcopy", "strip", "xz"):
        assert shutil.which(tool), f"{tool} is needed to build the MiniDebugInfo fixture"
    src = Path(elf_bins["pie"])
    exe, dbg, mini = tmp_path / "prog", tmp_path / "debug", tmp_path / "mini_debuginfo"
    shutil.copy(src, exe)
    dyn = set(run("nm", "-D", "--format=posix", "--defined-only", exe).split("\n"))
    dynsyms = {ln.split()[0] for ln in dyn if ln.strip()}
    funcs = {ln.split()[0] for ln in run("nm", "--format=posix", "--defined-only", exe).splitlines()
             if ln.split()[1] in ("T", "t")}
    (tmp_path / "keep").write_text("\n".join(sorted(funcs - dynsyms)) + "\n")
    run("objcopy", "--only-keep-debug", exe, dbg)
    run("objcopy", "-S", "--remove-section", ".gdb_index", "--remove-section", ".comment",
        f"--keep-symbols={tmp_path / 'keep'}", dbg, mini)
    run("strip", "--strip-all", "-R", ".comment", exe)
    run("xz", "-f", mini)
    run("objcopy", "--add-section", f".gnu_debugdata={mini}.xz", exe)

    assert "symtab" not in symbol_sections_of(exe)
    table = SymbolTable.load(ElfImage.open(exe), debug_dirs=(), use_cache=False)
    assert "minidebuginfo" in table.sources
    orig = {(n, a) for n, _v, _d, a, _s, k in defined(readelf_symbols(src), "symtab")
            if k == "func"}
    got = {(s.name, s.link_addr) for s in table.functions() if s.source == "minidebuginfo"}
    assert got and got <= orig
    assert {"add", "greet", "fib", "point_sum"} <= {n for n, _ in got}
    (fib,) = table.lookup("fib")
    assert (fib.name, fib.link_addr) in orig


def symbol_sections_of(path: Path) -> set[str]:
    return {m for m in re.findall(r"Symbol table '\.(\w+)'", run("readelf", "-Ws", path))}


def test_cache_per_file_version(elf_bins: dict[str, Path], tmp_path: Path) -> None:
    clear_cache()
    exe = tmp_path / "t"
    shutil.copy(elf_bins["pie"], exe)
    a = SymbolTable.load(ElfImage.open(exe))
    assert SymbolTable.load(ElfImage.open(exe)) is a
    shutil.copy(elf_bins["nopie"], tmp_path / "t2")
    (tmp_path / "t2").rename(exe)  # a new inode, as a package upgrade does
    b = SymbolTable.load(ElfImage.open(exe))
    assert b is not a and b.lookup("fib")[0].link_addr != a.lookup("fib")[0].link_addr


def test_ifunc_is_flagged() -> None:
    libc = SymbolTable.load(ElfImage.open(libc_path()))
    (strlen,) = libc.lookup("strlen")
    assert strlen.is_ifunc_resolver
    assert "IFUNC" in (ifunc_warning(strlen) or "")
    (malloc,) = libc.lookup("malloc")
    assert not malloc.is_ifunc_resolver and ifunc_warning(malloc) is None


def test_libc_load_is_cached_per_file_version() -> None:
    """libc's symbols (dynsym, plus its debug file where installed) load once per
    file version; how fast is bench/startup.py's business, not a timed test."""
    img = ElfImage.open(libc_path())
    table = SymbolTable.load(img, use_cache=False)
    assert len(table) > 2000 and table.sources[0] == "dynsym"
    cached = SymbolTable.load(img)
    assert SymbolTable.load(ElfImage.open(libc_path())) is cached
    assert [s for s in cached] == [s for s in table]
