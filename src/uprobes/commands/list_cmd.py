"""`uprobes list`: what can be probed in a file, a process, or the vDSO."""

from __future__ import annotations

import argparse
import fnmatch
import sys
from typing import Any, TextIO

from uprobes.commands.list_python import list_python
from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import Symbol, SymbolTable, matches
from uprobes.elf.usdt import usdt_notes
from uprobes.errors import ResolveError
from uprobes.render.json import write_json
from uprobes.render.table import write_table
from uprobes.resolve.resolver import Resolver
from uprobes.resolve.vdso import read_vdso
from uprobes.sys import procfs

NAME = "list"
HELP = ("list the functions and USDT probes of a program, a library, a process or the vDSO; "
        "py:PID: a running Python's functions")
EXAMPLES = [
    "uprobes list libc 'str*'            # libc's functions named str*",
    "uprobes list /usr/bin/python3.11 'python:*'   # its USDT probes",
    "uprobes list :vdso                  # the vDSO's functions",
    "uprobes list -p $$                  # the files a process maps",
    "uprobes list -p $$ libc malloc --json",
    "python3.11 -c 'import json, os; os.system(f\"uprobes list py:{os.getpid()} json.dump*\")'",
]


_NAME_WIDTH = 64
"""Names wider than this (C++ templates run to hundreds of characters) run
over their column instead of widening it for every row."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="TARGET",
                   help="a path, a library name (libc), a program on PATH, :vdso, or "
                        "py:PID (the Python functions of a running CPython 3.11)")
    p.add_argument("glob", nargs="?", metavar="GLOB",
                   help="only names matching this glob (functions: NAME; USDT: PROVIDER:NAME; "
                        "py: MODULE.QUALNAME)")
    p.add_argument("-p", "--pid", type=int, help="resolve TARGET as process PID sees it")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--debug-dir", action="append", dest="debug_dirs", metavar="DIR",
                   help="also look for separate debug files here")


def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.target is None:
        if args.pid is None:
            raise ResolveError("give a TARGET (a path, a library name or :vdso), or -p PID")
        return _list_process(args.pid, args.json, out)
    pattern = args.glob or "*"
    if args.target.startswith("py:"):
        return list_python(args.target, args.glob, args.pid, args.json, out)
    if args.target in (":vdso", "vdso", "[vdso]"):
        image = read_vdso(args.pid)
        table = SymbolTable.load(image)
        doc = _doc("[vdso]", image, table, [], pattern)
    else:
        dirs = tuple(args.debug_dirs) if args.debug_dirs else None
        resolver = Resolver(pid=args.pid, debug_dirs=dirs)
        ref = resolver.file(args.target)
        image = resolver.image(ref)
        table = resolver.symbols(ref)
        for note in table.notes:  # no section headers, a debug file that did not match
            sys.stderr.write(f"uprobes: note: {note}\n")
        doc = _doc(ref.display, image, table, usdt_notes(image), pattern)
    if args.json:
        write_json(out, doc)
    else:
        _write_text(out, doc)
    return 0


def _doc(path: str, image: ElfImage, table: SymbolTable, notes: list[Any],
         pattern: str) -> dict[str, Any]:
    funcs = [s for s in table.functions() if matches(s, pattern)]
    usdt = [n for n in notes if fnmatch.fnmatchcase(f"{n.provider}:{n.name}", pattern)
            or fnmatch.fnmatchcase(n.name, pattern)]
    return {
        "file": path,
        "build_id": image.build_id,
        "functions": [_func(image, s) for s in funcs],
        "usdt": [{
            "provider": n.provider, "name": n.name, "file_offset": n.file_offset,
            "args": [f"{-a.size if a.signed else a.size}@{a.operand}" for a in n.args],
            "semaphore": n.semaphore_file_offset,
        } for n in usdt],
    }


def _func(image: ElfImage, s: Symbol) -> dict[str, Any]:
    src = s.source_name
    return {
        "name": s.name, "display_name": s.display_name, "version": s.version,
        "demangled": src.label if src else None,
        "file_offset": image.link_to_file_offset(s.link_addr),
        "link_addr": s.link_addr, "size": s.size, "kind": s.kind, "source": s.source,
    }


def _write_text(out: TextIO, doc: dict[str, Any]) -> None:
    funcs = doc["functions"]
    if funcs:
        rows = [[(f["demangled"] or f["display_name"])
                 + (" [ifunc]" if f["kind"] == "ifunc" else ""),
                 f"0x{f['file_offset']:x}", str(f["size"])] for f in funcs]
        write_table(out, ["FUNCTION", "OFFSET", "SIZE"], rows,
                    title=f"{doc['file']}: {len(funcs)} functions", right=(2,),
                    widest=_NAME_WIDTH)
    if doc["usdt"]:
        if funcs:
            out.write("\n")
        rows = [[f"{u['provider']}:{u['name']}", f"0x{u['file_offset']:x}",
                 f"0x{u['semaphore']:x}" if u["semaphore"] else "-", " ".join(u["args"])]
                for u in doc["usdt"]]
        write_table(out, ["USDT PROBE", "OFFSET", "SEMAPHORE", "ARGUMENTS"], rows,
                    title=f"{doc['file']}: {len(rows)} USDT probes")
    if not funcs and not doc["usdt"]:
        out.write(f"{doc['file']}: nothing matches\n")


def _list_process(pid: int, as_json: bool, out: TextIO) -> int:
    objects: dict[str, dict[str, Any]] = {}
    for m in procfs.maps(pid):
        if not (m.path.startswith("/") or m.path == "[vdso]"):
            continue
        o = objects.setdefault(m.path, {"path": m.path, "inode": m.inode,
                                        "start": m.start, "executable": False})
        o["start"] = min(o["start"], m.start)
        o["executable"] = o["executable"] or "x" in m.perms
    rows = [o for o in objects.values() if o["executable"]]
    if as_json:
        write_json(out, {"pid": pid, "objects": rows})
    else:
        write_table(out, ["OBJECT", "INODE", "BASE"],
                    [[o["path"], str(o["inode"]), f"0x{o['start']:x}"] for o in rows],
                    title=f"process {pid}: {len(rows)} executable mappings")
    return 0
