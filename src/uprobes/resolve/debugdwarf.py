"""Which file holds a program's DWARF: the program itself, or its separate
debug file (by build-id under /usr/lib/debug/.build-id/, or by
`.gnu_debuglink`); and, when there is none, what would provide it."""

from __future__ import annotations

import os
import subprocess

from uprobes.elf.debuginfo import DEFAULT_DEBUG_DIRS, debug_file_candidates, debug_file_path
from uprobes.elf.dwarf.index import DwarfFile
from uprobes.elf.image import ElfImage
from uprobes.errors import ResolveError

_DPKG_TIMEOUT = 10


def dwarf_if_any(image: ElfImage,
                 debug_dirs: tuple[str, ...] | None = None) -> DwarfFile | None:
    """The DWARF of `image` where it has some (in the file or a debug file),
    else None: `dwarf_of` without the search for what would provide it."""
    own = DwarfFile.open(image.path)
    if own is not None:
        return own
    path = debug_file_path(image, debug_dirs if debug_dirs is not None else DEFAULT_DEBUG_DIRS,
                           [])
    return None if path is None else DwarfFile.open(path)


def dwarf_of(image: ElfImage, display: str,
             debug_dirs: tuple[str, ...] | None = None) -> DwarfFile:
    """The DWARF of `image`; a ResolveError naming what would provide it if none."""
    dirs = debug_dirs if debug_dirs is not None else DEFAULT_DEBUG_DIRS
    own = DwarfFile.open(image.path)
    if own is not None:
        return own
    notes: list[str] = []
    path = debug_file_path(image, dirs, notes)
    if path is not None:
        found = DwarfFile.open(path)
        if found is not None:
            return found
        notes.append(f"{path} has no .debug_info")
    raise ResolveError(_no_debug_info(image, display, dirs, notes))


def _no_debug_info(image: ElfImage, display: str, dirs: tuple[str, ...],
                   notes: list[str]) -> str:
    where = debug_file_candidates(image, dirs)
    looked = f"; looked for {where[0]}" if where else \
        " and no build-id or .gnu_debuglink to find a debug file by"
    package = _owning_package(image.path)
    if package is not None:
        provide = (f"install its debug symbols: {package}-dbgsym from Debian's debug archive "
                   f"(glibc's are in libc6-dbg)")
    else:
        provide = "rebuild it with -g, or install the debug file for its build-id"
    also = f" ({'; '.join(notes)})" if notes else ""
    return f"{display} has no DWARF debug info{looked}{also}: {provide}"


def _owning_package(path: str) -> str | None:
    """The Debian package that installed `path` (dpkg-query -S), or None.
    dpkg may know a merged-/usr file by its /lib name, so both are asked."""
    real = os.path.realpath(path)
    names = list(dict.fromkeys([real, real.removeprefix("/usr"), path]))
    try:
        out = subprocess.run(["dpkg-query", "-S", *names], capture_output=True, text=True,
                             timeout=_DPKG_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        if ": " in line:
            return line.split(":", 1)[0].split(",")[0].strip() or None
    return None
