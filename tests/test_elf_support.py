"""Shared plumbing for the ELF tests: fixture builds and parsers of binutils output.

The references (readelf, objdump, nm) are parsed here once so every test
compares our reading of a file with theirs.  Imported by the test_elf_*
modules; it holds no tests itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
PYTHON311 = "/usr/bin/python3.11"


def run(*cmd: str | os.PathLike[str]) -> str:
    return subprocess.run([os.fspath(c) for c in cmd], check=True, capture_output=True,
                          text=True, errors="replace").stdout


def ldconfig() -> str | None:
    """ldconfig's path: in sbin, which an ordinary user's PATH often leaves out."""
    return shutil.which("ldconfig", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def libc_path() -> str:
    """libc.so.6 as the dynamic linker's cache names it (falls back to the Debian path)."""
    tool = ldconfig()
    if tool:
        out = subprocess.run([tool, "-p"], capture_output=True, text=True).stdout
        m = re.search(r"libc\.so\.6 \(libc6,x86-64\) => (\S+)", out)
        if m:
            return m.group(1)
    return LIBC


# -- readelf ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RSym:
    table: str
    name: str
    version: str | None
    default: bool
    value: int
    size: int
    type: str
    bind: str
    ndx: str


_SYM_LINE = re.compile(r"\s*\d+:\s+([0-9a-f]+)\s+(\d+|0x[0-9a-f]+)\s+(\S+)\s+(\S+)\s+(\S+)"
                       r"\s+(\S+)\s*(.*)$")


def readelf_symbols(path: str | os.PathLike[str]) -> list[RSym]:
    """Every entry of `readelf -Ws --wide`, with the version split off the name."""
    out: list[RSym] = []
    table = ""
    for line in run("readelf", "-Ws", "--wide", path).splitlines():
        m = re.match(r"Symbol table '(\S+)'", line)
        if m:
            table = m.group(1).lstrip(".")
            continue
        m = _SYM_LINE.match(line)
        if not m:
            continue
        value, size, typ, bind, _vis, ndx, name = m.groups()
        name = re.sub(r" \(\d+\)$", "", name)  # undefined symbols: "name@VER (2)"
        version = None
        default = False
        at = name.find("@", 1)
        if at > 0:
            default = name.startswith("@", at + 1)
            version = name[at + (2 if default else 1):]
            name = name[:at]
        out.append(RSym(table, name, version, default, int(value, 16), int(size, 0), typ,
                        bind, ndx))
    return out


_KINDS = {"FUNC": "func", "IFUNC": "ifunc", "OBJECT": "object", "TLS": "tls",
          "NOTYPE": "notype", "COMMON": "common"}


def defined(rsyms: list[RSym], table: str) -> set[tuple[str, str | None, bool, int, int, str]]:
    """readelf's defined symbols of `table` as our Symbol fields would give them."""
    return {(s.name, s.version, s.default, s.value, s.size, _KINDS.get(s.type, "other"))
            for s in rsyms
            if s.table == table and s.ndx not in ("UND", "ABS", "COM")
            and s.type not in ("SECTION", "FILE") and s.name}


@dataclass(frozen=True)
class RSection:
    name: str
    type: str
    addr: int
    offset: int
    size: int
    flags: str


def readelf_sections(path: str | os.PathLike[str]) -> list[RSection]:
    out = []
    for line in run("readelf", "-SW", path).splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)"
                     r"\s+[0-9a-f]+\s+([A-Za-z]*)\s+\d+", line)
        if m:
            name, typ, addr, off, size, flags = m.groups()
            out.append(RSection(name, typ, int(addr, 16), int(off, 16), int(size, 16), flags))
    return out


@dataclass(frozen=True)
class RSegment:
    type: str
    offset: int
    vaddr: int
    filesz: int
    memsz: int
    flags: str


def readelf_segments(path: str | os.PathLike[str]) -> list[RSegment]:
    out = []
    for line in run("readelf", "-lW", path).splitlines():
        m = re.match(r"\s+(\w+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x[0-9a-f]+\s+0x([0-9a-f]+)"
                     r"\s+0x([0-9a-f]+)\s+([RWE ]+?)\s+0x[0-9a-f]+$", line)
        if m:
            typ, off, vaddr, filesz, memsz, flags = m.groups()
            out.append(RSegment(typ, int(off, 16), int(vaddr, 16), int(filesz, 16),
                                int(memsz, 16), flags.replace(" ", "")))
    return out


@dataclass(frozen=True)
class RNote:
    provider: str
    name: str
    location: int
    base: int
    semaphore: int
    arguments: str


def readelf_usdt(path: str | os.PathLike[str]) -> list[RNote]:
    text = run("readelf", "-n", path)
    pat = re.compile(r"Provider: (\S+)\n\s+Name: (\S+)\n\s+Location: 0x([0-9a-f]+), "
                     r"Base: 0x([0-9a-f]+), Semaphore: 0x([0-9a-f]+)\n\s+Arguments: ?(.*)")
    return [RNote(p, n, int(loc, 16), int(b, 16), int(s, 16), a.strip())
            for p, n, loc, b, s, a in pat.findall(text)]


def readelf_build_id(path: str | os.PathLike[str]) -> str | None:
    m = re.search(r"Build ID: ([0-9a-f]+)", run("readelf", "-n", path))
    return m.group(1) if m else None


# -- objdump ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OInsn:
    addr: int
    length: int
    text: str


def objdump_function(path: str | os.PathLike[str], start: int, end: int) -> list[OInsn]:
    """objdump's instructions in [start, end) with their lengths (raw bytes counted)."""
    text = run("objdump", "-d", "--insn-width=16", f"--start-address={start:#x}",
               f"--stop-address={end:#x}", path)
    out = []
    for line in text.splitlines():
        m = re.match(r"\s+([0-9a-f]+):\t((?:[0-9a-f]{2} )+)\s*\t?(.*)$", line)
        if m:
            out.append(OInsn(int(m.group(1), 16), len(m.group(2).split()), m.group(3).strip()))
    return out


# -- fixture builds ---------------------------------------------------------------------

def build(out: Path, name: str, source: str, *flags: str) -> Path:
    """gcc `source` from tests/fixtures into `out/name` (once per session)."""
    exe = out / name
    if not exe.exists():
        run("gcc", "-O1", "-g", "-fno-omit-frame-pointer", *flags, "-o", exe, FIXTURES / source)
    return exe


@pytest.fixture(scope="session")
def elf_bins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture programs in every shape the ELF layer must handle."""
    assert shutil.which("gcc"), "gcc is required to build the test fixtures"
    out = tmp_path_factory.mktemp("elf")
    bins = {
        "pie": build(out, "target-pie", "target.c", "-fPIE", "-pie"),
        "nopie": build(out, "target-nopie", "target.c", "-fno-pie", "-no-pie"),
        "static": build(out, "target-static", "target.c", "-static"),
        "lib": build(out, "libversioned.so", "libversioned.c", "-shared", "-fPIC",
                     f"-Wl,--version-script={FIXTURES / 'libversioned.map'}"),
        "usdt-pie": build(out, "usdt-pie", "usdt_target.c", "-fPIE", "-pie"),
        "usdt-nopie": build(out, "usdt-nopie", "usdt_target.c", "-fno-pie", "-no-pie"),
    }
    stripped = out / "target-stripped"
    shutil.copy(bins["pie"], stripped)
    run("strip", "--strip-all", stripped)
    bins["stripped"] = stripped
    shapes = out / "elf-shapes"
    run("gcc", "-O2", "-g", "-o", shapes, FIXTURES / "elf_shapes.c")
    bins["shapes"] = shapes
    return bins


def readelf_func(exe: str | os.PathLike[str], name: str) -> tuple[int, int]:
    """(file offset, size) of FUNC `name` (as readelf prints it, `malloc@@GLIBC_2.2.5`
    included), from readelf's symbols mapped through readelf's PT_LOADs."""
    def printed(s: RSym) -> str:
        return s.name if s.version is None else f"{s.name}{'@@' if s.default else '@'}{s.version}"

    hits = [s for s in readelf_symbols(exe) if s.type == "FUNC" and printed(s) == name]
    assert hits, f"{name} not in {exe}"
    value, size = hits[-1].value, hits[-1].size
    for seg in readelf_segments(exe):
        if seg.type == "LOAD" and seg.vaddr <= value < seg.vaddr + seg.filesz:
            return value - seg.vaddr + seg.offset, size
    raise AssertionError(f"{name} at {value:#x} is in no PT_LOAD of {exe}")
