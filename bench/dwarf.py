"""What reading DWARF costs a probe: resolution of one function's arguments by
name against the same probe with registers only, each in a fresh process (so
nothing is cached), on real binaries with big debug info.

    python -m bench.dwarf [--runs N]

Prints a table of the median CPU and wall seconds of `Resolver.resolve_all`
(imports excluded). Skips a binary whose debug info is not installed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CEPH = "/usr/lib/x86_64-linux-gnu/ceph/libceph-common.so.2"
APPEND = "ceph::buffer::v15_2_0::list::append(char const*, unsigned int)"
"""A C++ method of a library whose debug file holds 146 MiB of .debug_info."""

CASES = [
    ("libc (libc6-dbg: DWARF 5, compressed)", "libc:malloc bytes", "libc:malloc size=%di"),
    ("python3.11 (its debug file: DWARF 5, compressed)",
     "python3.11:PyObject_GetAttr v name->ob_type->tp_name", "python3.11:PyObject_GetAttr a=%di"),
    ("libceph-common.so.2 (librados2-dbg: 262 MiB of DWARF 5, compressed to 90 MiB)",
     f"{CEPH}:{APPEND} data len this->_len", f"{CEPH}:{APPEND} a=%si"),
]

_ONE = """
import sys, time
from uprobes.commands.resolve import parse_specs
from uprobes.resolve.resolver import Resolver
specs = parse_specs(sys.argv[1:])
c, w = time.process_time(), time.perf_counter()
Resolver().resolve_all(specs)
print(time.process_time() - c, time.perf_counter() - w)
"""


def _once(spec: str) -> tuple[float, float] | None:
    done = subprocess.run([sys.executable, "-c", _ONE, spec], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        return None
    cpu, wall = done.stdout.split()
    return float(cpu), float(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print("| binary | probe | CPU s (registers only) | wall s (registers only) |")
    print("|---|---|---|---|")
    for label, named, plain in CASES:
        got = {}
        for spec in (named, plain):
            runs = [r for r in (_once(spec) for _ in range(args.runs)) if r is not None]
            got[spec] = runs
        if not got[named] or not got[plain]:
            print(f"| {label} | {named} | skipped (no debug info) | |")
            continue
        cpu = statistics.median(c for c, _ in got[named])
        cpu0 = statistics.median(c for c, _ in got[plain])
        wall = statistics.median(w for _, w in got[named])
        wall0 = statistics.median(w for _, w in got[plain])
        print(f"| {label} | `{named}` | {cpu:.2f} ({cpu0:.2f}) | {wall:.2f} ({wall0:.2f}) |")


if __name__ == "__main__":
    main()
