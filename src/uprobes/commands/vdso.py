"""`uprobes vdso`: the vDSO's functions, and its image as a file.

The vDSO is the only code every process runs that has no file: the kernel's
uprobes (keyed by inode) and every tool built on them cannot see it. Its
image is a complete ELF file in memory; `--dump` writes it out so that
readelf, objdump or gdb can look at it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import Symbol, SymbolTable
from uprobes.errors import UsageError
from uprobes.render.json import write_json
from uprobes.render.table import write_table
from uprobes.resolve.vdso import vdso_bytes, vdso_region

NAME = "vdso"
HELP = "list the vDSO's functions (versions, aliases) and write its image to a file"
EXAMPLES = [
    "uprobes vdso",
    "uprobes vdso -p $$ --json",
    "uprobes vdso --dump /tmp/vdso.so && readelf -Ws /tmp/vdso.so | grep clock_gettime",
]
VDSO_PREFIX = "__vdso_"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--pid", type=int,
                   help="the vDSO of process PID (default: our own; the image is the same "
                        "in every process of one kernel, only its address differs)")
    p.add_argument("--dump", metavar="FILE", help="write the vDSO's image (an ELF file) to FILE")
    p.add_argument("--json", action="store_true", help="one JSON document")


def run(args: argparse.Namespace, out: TextIO) -> int:
    data = vdso_bytes(args.pid)
    start, _ = vdso_region(args.pid)
    image = ElfImage.from_bytes(data, "[vdso]")
    if args.dump:
        try:
            with open(args.dump, "wb") as f:
                f.write(data)
        except OSError as e:
            raise UsageError(f"cannot write {args.dump}: {e.strerror}") from e
        sys.stderr.write(f"uprobes: wrote the vDSO ({len(data)} bytes) to {args.dump}\n")
    doc = describe(image, SymbolTable.load(image), args.pid, start, len(data))
    if args.json:
        write_json(out, doc)
    else:
        _write_text(out, doc)
    return 0


def describe(image: ElfImage, table: SymbolTable, pid: int | None, start: int,
             size: int) -> dict[str, Any]:
    """One entry per function (per address): its public name, version, and
    the other names it goes by (`__vdso_clock_gettime` for `clock_gettime`)."""
    by_addr: dict[int, list[Symbol]] = {}
    for s in table.functions():
        by_addr.setdefault(s.link_addr, []).append(s)
    functions = []
    for addr, syms in sorted(by_addr.items()):
        main = min(syms, key=lambda s: (s.name.startswith(VDSO_PREFIX), len(s.name), s.name))
        aliases = sorted({s.display_name for s in syms} - {main.display_name})
        functions.append({
            "name": main.name, "version": main.version, "file_offset":
            image.link_to_file_offset(addr), "size": main.size,
            "runtime_addr": start + image.link_to_file_offset(addr), "aliases": aliases})
    return {"pid": pid, "runtime_addr": start, "size": size, "build_id": image.build_id,
            "functions": functions}


def _write_text(out: TextIO, doc: dict[str, Any]) -> None:
    who = f"process {doc['pid']}" if doc["pid"] is not None else "this process"
    rows = [[f["name"], f["version"] or "-", f"0x{f['file_offset']:x}", str(f["size"]),
             f"0x{f['runtime_addr']:x}", " ".join(f["aliases"])] for f in doc["functions"]]
    title = (f"[vdso] of {who}: {doc['size']} bytes at 0x{doc['runtime_addr']:x}, "
             f"{len(rows)} functions")
    write_table(out, ["FUNCTION", "VERSION", "OFFSET", "SIZE", "ADDRESS", "ALIASES"], rows,
                title=title, right=(3,))
