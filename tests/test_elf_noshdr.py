"""Files without section headers: exported functions found through PT_DYNAMIC.

The copies are made the way sstrip-like tools leave a file: e_shoff, e_shnum
and e_shstrndx zeroed (readelf then sees no sections), and also cut after the
last segment, or only cut (the header still points past the end).  `list`
and `resolve`, through the CLI, must give the same functions at the same file
offsets as the intact file, and the kernel must hit a probe placed by name.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, Compiler, without_section_headers
from test_elf_support import libc_path, run

from uprobes.commands import main
from uprobes.elf import ElfImage, SymbolTable

UPROBES = [sys.executable, "-m", "uprobes"]


def cli(*args: str) -> str:
    """The CLI in-process (`main` is the whole CLI); a failure shows its error line."""
    out, err = io.StringIO(), io.StringIO()
    assert main(list(args), out, err) == 0, err.getvalue()
    return out.getvalue()


def exported(path: Path | str, pattern: str = "*") -> set[tuple[str, str | None, int, int]]:
    doc = json.loads(cli("list", str(path), pattern, "--json"))
    return {(f["name"], f["version"], f["file_offset"], f["size"]) for f in doc["functions"]
            if f["source"] == "dynsym"}


@pytest.fixture(scope="module")
def programs(compile_c: Compiler) -> dict[str, Path]:
    return {
        "exe": compile_c("target.c", "-fPIE", "-pie", "-rdynamic"),
        "lib": compile_c("libversioned.c", "-shared", "-fPIC",
                         f"-Wl,--version-script={FIXTURES / 'libversioned.map'}",
                         name="libversioned-noshdr.so"),
        "libc": Path(libc_path()),
    }


@pytest.mark.parametrize("how", ["zeroed+cut", "zeroed", "cut"])
@pytest.mark.parametrize("which", ["exe", "lib", "libc"])
def test_list_and_resolve_as_the_intact_file(programs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             which: str, how: str) -> None:
    src = programs[which]
    copy = without_section_headers(src, tmp_path / src.name, zero="zeroed" in how,
                                   cut="cut" in how)
    if "zeroed" in how:
        assert "no sections" in run("readelf", "-S", copy)
    img = ElfImage.open(copy)
    assert img.sections == () and img.sections_cut == (how == "cut")
    assert img.build_id == ElfImage.open(src).build_id  # from PT_NOTE
    table = SymbolTable.load(img, debug_dirs=(), use_cache=False)
    assert "dynamic" in table.sources and any("no section headers" in n for n in table.notes)

    want = exported(src)
    capsys.readouterr()
    assert exported(copy) == want and len(want) > 3
    assert (f"uprobes: note: {copy}: no section headers" in capsys.readouterr().err)
    names = {"exe": ["add", "fib", "greet"], "lib": ["vfunc@VERS_1", "vfunc@@VERS_2", "plain"],
             "libc": ["malloc", "getppid", "memcpy@GLIBC_2.2.5"]}[which]
    intact = cli("resolve", *[f"{src}:{n}" for n in names]).splitlines()
    stripped = cli("resolve", *[f"{copy}:{n}" for n in names]).splitlines()
    assert len(intact) == len(names)
    assert [ln.replace(str(copy), "FILE") for ln in stripped] == [
        ln.replace(os.path.realpath(src), "FILE").replace(str(src), "FILE") for ln in intact]


def test_versions_through_the_dynamic_section(programs: dict[str, Path], tmp_path: Path) -> None:
    copy = without_section_headers(programs["lib"], tmp_path / "lib.so")
    got = {(n, v) for n, v, _o, _s in exported(copy, "vfunc")}
    assert got == {("vfunc", "VERS_1"), ("vfunc", "VERS_2")}


def test_a_probe_by_name_is_hit(programs: dict[str, Path], tmp_path: Path, tracefs: Path) -> None:
    """The kernel engine, by name, on a program that has no section headers."""
    exe = without_section_headers(programs["exe"], tmp_path / "target")
    proc = subprocess.run([*UPROBES, "count", "--json", f"{exe}:add", f"{exe}:greet", "--",
                           str(exe), "7"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "calls add=7 greet=7" in proc.stdout
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(counts.values()) == [7, 7]


def test_static_program_has_no_dynamic_symbols(compile_c: Compiler, tmp_path: Path) -> None:
    exe = compile_c("target.c", "-static")
    copy = without_section_headers(exe, tmp_path / "static")
    table = SymbolTable.load(ElfImage.open(copy), debug_dirs=(), use_cache=False)
    assert len(table) == 0
    proc = subprocess.run([*UPROBES, "resolve", f"{copy}:add"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("uprobes: error: symbol 'add' not found")

