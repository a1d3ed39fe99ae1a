"""Libraries mapped after start (dlopen): the dynamic linker's rendezvous.

The engine's version of the kernel's uprobe_mmap() hook, the way debuggers
do it: ld.so calls `_dl_debug_state()` (the address it publishes as
`r_debug.r_brk`) around every change of its link map, RT_CONSISTENT coming
after the new objects are mapped and relocated and before their
constructors run. An internal breakpoint there makes the engine rescan the
process's mappings and place what is new. ld.so is found from the
auxiliary vector (AT_BASE: where the interpreter is loaded); a static
program has none, and needs none.
"""

from __future__ import annotations

from dataclasses import dataclass

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.errors import UprobesError
from uprobes.sys import procfs

AT_BASE = 7
RENDEZVOUS_SYMBOL = "_dl_debug_state"


@dataclass(frozen=True)
class Rendezvous:
    """Where r_brk is in one process, and the file it is in."""

    runtime_addr: int
    path: str
    dev: int
    ino: int
    file_offset: int


_offsets: dict[tuple[int, int], int | None] = {}


def find(pid: int, maps: list[procfs.Mapping]) -> Rendezvous | None:
    """The dynamic linker's r_brk in process `pid`, or None (static program,
    no symbol, or an interpreter we cannot read)."""
    try:
        base = procfs.auxv(pid).get(AT_BASE, 0)
    except UprobesError:
        return None
    if not base:
        return None
    mine = [m for m in maps if m.start >= base and m.inode and
            any(b.start == base and b.inode == m.inode for b in maps)]
    if not mine:
        return None
    first = mine[0]
    found = procfs.mapped_file(pid, first)
    if found is None:
        return None
    path = found.path
    key = (found.dev, found.ino)
    if key not in _offsets:
        _offsets[key] = _symbol_file_offset(path)
    file_offset = _offsets[key]
    if file_offset is None:
        return None
    for m in mine:
        if m.executable and m.contains_file_offset(file_offset):
            return Rendezvous(m.file_to_runtime_addr(file_offset), path, found.dev, found.ino,
                              file_offset)
    return None


def _symbol_file_offset(path: str) -> int | None:
    try:
        image = ElfImage.open(path)
        syms = SymbolTable.load(image).lookup(RENDEZVOUS_SYMBOL)
        if not syms:
            return None
        return image.link_to_file_offset(syms[0].link_addr)
    except UprobesError:
        return None
