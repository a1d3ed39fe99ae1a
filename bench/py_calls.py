"""What a `py:` probe costs each Python call of the program it is in.

    python -m bench.py_calls [--calls 200000] [--ptrace-calls 3000] [--runs 3]

A CPython 3.11 program calls an empty Python function `f` in a loop and
times the loop itself (`time.perf_counter_ns`), so the figure is what the
program pays per call, as it sees it. Run unprobed, then under `uprobes
count` on each engine with a probe on another function (`py:__main__.g`,
never called: the filter rejects every call) and on `f` itself (every call
counted). Every Python call passes the eval loop's RESUME handler, where the
probes are, so the rejected case is what every function of a probed
program pays. Medians of `--runs` runs, in ns per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

PROGRAM = """
import sys, time
def f():
    pass
def g():
    pass
n = int(sys.argv[1])
f()
start = time.perf_counter_ns()
for _ in range(n):
    f()
print("NS", (time.perf_counter_ns() - start) / n, flush=True)
"""
PYTHON = "/usr/bin/python3.11"


def _run(argv: list[str]) -> float:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("NS "))
    return float(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000, help="calls (unprobed, kernel)")
    ap.add_argument("--ptrace-calls", type=int, default=3_000,
                    help="calls under the ptrace engine (a stop per call)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    uprobes = [sys.executable, "-m", "uprobes", "count"]
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "calls.py")
        with open(script, "w") as f:
            f.write(PROGRAM)
        cases = [
            ("unprobed", [], args.calls),
            ("kernel, another function", ["-e", "kernel", "py:__main__.g"], args.calls),
            ("kernel, this function", ["-e", "kernel", "py:__main__.f"], args.calls),
            ("ptrace, another function", ["-e", "ptrace", "py:__main__.g"], args.ptrace_calls),
            ("ptrace, this function", ["-e", "ptrace", "py:__main__.f"], args.ptrace_calls),
        ]
        print(f"{PYTHON}: an empty function called in a loop, ns per call "
              f"(median of {args.runs})")
        base = None
        for name, probe, calls in cases:
            cmd = [PYTHON, script, str(calls)]
            argv = cmd if not probe else [*uprobes, *probe, "--", *cmd]
            ns = statistics.median(_run(argv) for _ in range(args.runs))
            base = ns if base is None else base
            print(f"  {name:28} {ns:12.1f}   +{ns - base:10.1f}")


if __name__ == "__main__":
    main()
