"""Source lines to addresses, through the DWARF line table.

`PATH:app.c:42` is every address where line 42 of app.c starts a run of
statement rows (`is_stmt`): a line split by the compiler (a loop's test at
the top and at the bottom) or copied with an inlined function has several,
and each is probed, as gdb breaks at each. `PATH:FUNC:+N` is line
(FUNC's DW_AT_decl_line + N) of FUNC's file, in FUNC's unit, inlined copies
in that unit included. A line with no code says which lines near it have some.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from uprobes.elf.dwarf.index import DwarfFile, die_attr, die_name
from uprobes.elf.dwarf.unitnames import unit_names
from uprobes.errors import ResolveError


@dataclass(frozen=True)
class LineSites:
    """The addresses (link) where one source line starts, and what it is."""

    label: str
    """`app.c:42`"""
    link_addrs: tuple[int, ...]
    inlined: int
    """How many of them are in inlined code (a scope there is an inlined function)."""


def _matches(name: str, wanted: str) -> bool:
    return name == wanted or os.path.basename(name) == wanted or name.endswith("/" + wanted)


def _starts(rows: list[Any], files: set[int], line: int) -> set[int]:
    """Addresses where `line` of one of `files` starts a run of statement rows."""
    out: set[int] = set()
    prev = None
    for row in rows:
        if row.line == line and row.file in files and row.is_stmt and not row.end_sequence \
                and (prev is None or prev.line != line or prev.file != row.file):
            out.add(row.address)
        prev = None if row.end_sequence else row
    return out


def _near(rows: list[Any], files: set[int], line: int) -> list[int]:
    lines = {r.line for r in rows if r.file in files and r.is_stmt}
    return sorted(lines, key=lambda n: (abs(n - line), n))[:4]


def _count_inlined(df: DwarfFile, addrs: set[int]) -> int:
    return sum(1 for a in addrs
               if any(s.tag == "DW_TAG_inlined_subroutine" for s in df.scopes_at(a)))


def source_line(df: DwarfFile, source_file: str, line: int, display: str) -> LineSites:
    """Every start of `source_file:line`. The units compiled from that file
    are searched first; only if none has code there (a header's line, which
    is in the units that include it) is every unit's line table read."""
    names = list(unit_names(df.info))  # (pyelftools reads each unit's name in ~4 ms)
    own = [cu for cu in (df.info.get_CU_at(at) for at, name in names if name is None
                         or _matches(name, source_file))
           if _matches(_unit_name(cu), source_file)]
    found, near, known = _search(df, own, source_file, line)
    if not found:
        mine = {cu.cu_offset for cu in own}
        others = [cu for cu in df.info.iter_CUs() if cu.cu_offset not in mine]
        more, near2, known2 = _search(df, others, source_file, line)
        found, near, known = more, near | near2, known or known2
    label = f"{source_file}:{line}"
    if not known:
        raise ResolveError(f"{display}: no source file '{source_file}' in its DWARF line table")
    if not found:
        nearest = sorted(near, key=lambda n: (abs(n - line), n))[:4]
        raise ResolveError(f"{display}: no code at {label}; lines near it with code: "
                           f"{', '.join(map(str, sorted(nearest)))}")
    return LineSites(label, tuple(sorted(found)), _count_inlined(df, found))


def _unit_name(cu: Any) -> str:
    attr = cu.get_top_DIE().attributes.get("DW_AT_name")
    value = attr.value if attr is not None else b""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _search(df: DwarfFile, units: list[Any], source_file: str,
            line: int) -> tuple[set[int], set[int], bool]:
    """(starts of the line, lines near it with code, whether any unit has the file)."""
    found: set[int] = set()
    near: set[int] = set()
    known = False
    for cu in units:
        files = {i for i, name in enumerate(df.line_files(cu)) if _matches(name, source_file)}
        if not files:
            continue
        known = True
        rows = df.line_rows(cu)
        found |= _starts(rows, files, line)
        near.update(_near(rows, files, line))
    return found, near, known


def function_line(df: DwarfFile, sub: Any, plus: int, display: str) -> LineSites:
    """Line (the function's own line + `plus`) of its file, in its unit (the
    function's DIE `sub`: a concrete copy or the abstract one of an inlined
    function)."""
    func = die_name(sub) or "?"
    decl_line, decl_file = die_attr(sub, "DW_AT_decl_line"), die_attr(sub, "DW_AT_decl_file")
    if decl_line is None or decl_file is None:
        raise ResolveError(f"{display}: {func} has no source line in its DWARF")
    line = int(decl_line.value) + plus
    cu = sub.cu
    names = df.line_files(cu)
    index = int(decl_file.value)
    name = names[index] if 0 <= index < len(names) else "?"
    files = {i for i, n in enumerate(names) if n == name}
    rows = df.line_rows(cu)
    found = _starts(rows, files, line)
    label = f"{os.path.basename(name)}:{line} ({func}:+{plus})"
    if not found:
        raise ResolveError(f"{display}: no code at {label}; lines near it with code: "
                           f"{', '.join(map(str, sorted(_near(rows, files, line))))}")
    return LineSites(label, tuple(sorted(found)), _count_inlined(df, found))


MAX_NAME_SEARCH = 16 << 20
"""The most `.debug_info` bytes searched for a function by name (pyelftools
walks about 7 MB of DWARF a second here): a name the symbol table lacks
(a function only ever inlined) is looked for in files up to this size."""


def functions_by_name(df: DwarfFile, name: str, display: str) -> list[Any]:
    """The DIEs of function `name` in the DWARF, for one the symbol table lacks."""
    if df.info_size() > MAX_NAME_SEARCH:
        raise ResolveError(f"symbol '{name}' not found in {display}, and its DWARF "
                           f"({df.info_size() >> 20} MiB) is too big to search by name: if "
                           f"{name} is only inlined, probe one of its lines (PATH:FILE.c:LINE)")
    return df.functions_named(name)
