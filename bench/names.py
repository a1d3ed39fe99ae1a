"""What demangling costs `uprobes list` and resolution on big C++ libraries:
each case in a fresh process (nothing cached), names demangled as shipped
against names left as the linker wrote them (the demangler stubbed out).

    python -m bench.names [--runs N] [LIBRARY...]

Prints a table of the best CPU and wall seconds of `uprobes list LIBRARY`
(imports excluded) and of resolving a probe by its demangled name (which
demangles every name of the library once) against the same probe by its
symbol with names raw. Skips a library that is not installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

LIBRARIES = ["/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
             "/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1"]

_ONE = """
import io, sys, time
from uprobes.commands import main
from uprobes.commands.resolve import parse_specs
from uprobes.resolve.resolver import Resolver
import uprobes.elf.symread
if sys.argv[1] == "raw":
    uprobes.elf.symread.source_name = lambda name: None
what, lib = sys.argv[2], sys.argv[3]
c, w = time.process_time(), time.perf_counter()
if what == "list":
    assert main(["list", lib], out=io.StringIO()) == 0
else:
    Resolver().resolve_all(parse_specs([f"{lib}:{sys.argv[4]}"]))
print(time.process_time() - c, time.perf_counter() - w)
"""


def _best(runs: int, *argv: str) -> tuple[float, float] | None:
    best: tuple[float, float] | None = None
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", _ONE, *argv], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-2000:])
            return None
        cpu, wall = (float(x) for x in done.stdout.split())
        best = (cpu, wall) if best is None else (min(best[0], cpu), min(best[1], wall))
    return best


def _a_cxx_name(lib: str) -> tuple[str, str]:
    """One C++ method of `lib` with a plain name (the common case: see
    `SymbolTable.lookup_source`): (its demangled label, its symbol)."""
    from uprobes.elf.image import ElfImage
    from uprobes.elf.source_names import mangled_needle
    from uprobes.elf.symbols import SymbolTable

    table = SymbolTable.load(ElfImage.open(lib))
    for sym in table.functions():
        src = sym.source_name
        if src is not None and src.language == "c++" and "::" in src.base \
                and mangled_needle(src.label) and len(table.lookup_source(src.label)) == 1:
            return src.label, sym.name
    raise SystemExit(f"{lib}: no C++ function")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per case; the best is shown")
    ap.add_argument("libraries", nargs="*", default=LIBRARIES)
    args = ap.parse_args()
    print("| library | functions | case | demangled: CPU s | wall s | raw names: CPU s | wall s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for lib in args.libraries:
        if not Path(lib).exists():
            print(f"| {lib} | | not installed | | | | |")
            continue
        from uprobes.elf.image import ElfImage
        from uprobes.elf.symbols import SymbolTable

        n = len(SymbolTable.load(ElfImage.open(lib)).functions())
        label, mangled = _a_cxx_name(lib)
        for case, shown, linked in (("list", ("list", lib), ("list", lib)),
                                    (f"resolve '{label}' (raw: by its symbol)",
                                     ("resolve", lib, label), ("resolve", lib, mangled))):
            shipped, raw = _best(args.runs, "demangled", *shown), _best(args.runs, "raw", *linked)
            cells = [f"{v:.2f}" for pair in (shipped, raw) if pair for v in pair]
            print(f"| {Path(lib).name} | {n} | {case} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
