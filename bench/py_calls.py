"""What a `py:` probe costs each Python call of the program it is in.

    python -m bench.py_calls [--calls 3000000] [--trap-calls 3000] [--runs 9]

A CPython 3.11 program calls a Python function in a loop and times the
loop itself by its thread's CPU time (`time.thread_time_ns`: what the
program pays per call, as it sees it, without the time other work on
the machine takes the CPU from it). Two functions: `f`, empty (the cost of a
probe on a call that does nothing), and `w`, about a microsecond of work
(the goal: counting it costs under 5% of its own time). Each is run
unprobed, then under `uprobes count` with a probe on another function
(`py:__main__.g`, never called: every call is turned away) and on itself
(every call counted): on the ptrace engine (counted in the jump's code, no
stop), with `--no-trapfree` (an int3 and a stop per call) and on the
kernel engine (a kernel uprobe per call, the filter in the kernel). Every
Python call passes the eval loop's handlers where the probes are, so the
"another function" rows are what every function of a probed program pays.
The cases run in turn, `--runs` times; medians, in ns per call.
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
def w():
    t = 0
    for i in range(40):
        t += i
    return t
def g():
    pass
func = globals()[sys.argv[1]]
n = int(sys.argv[2])
func()
start = time.thread_time_ns()
for _ in range(n):
    func()
print("NS", (time.thread_time_ns() - start) / n, flush=True)
"""
PYTHON = "/usr/bin/python3.11"


def _run(argv: list[str]) -> float:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("NS "))
    return float(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3_000_000,
                    help="calls (unprobed, trap-free)")
    ap.add_argument("--trap-calls", type=int, default=3_000,
                    help="calls when each traps (the kernel engine, --no-trapfree)")
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    uprobes = [sys.executable, "-m", "uprobes", "count"]
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "calls.py")
        with open(script, "w") as f:
            f.write(PROGRAM)
        for func, what in (("f", "an empty function"), ("w", "a function of ~1 us")):
            cases = [
                ("unprobed", [], args.calls),
                ("ptrace, another function", ["-e", "ptrace", "py:__main__.g"], args.calls),
                ("ptrace, this function", ["-e", "ptrace", f"py:__main__.{func}"],
                 args.calls),
                ("ptrace --no-trapfree, this", ["-e", "ptrace", "--no-trapfree",
                                                f"py:__main__.{func}"], args.trap_calls),
                ("kernel, this function", ["-e", "kernel", f"py:__main__.{func}"],
                 args.trap_calls),
            ]
            print(f"{PYTHON}: {what} called in a loop, ns per call "
                  f"(median of {args.runs}); + over unprobed, and as a share of it")
            # (the cases in turn, run after run: a change of the machine's
            # load in between moves every case alike)
            times: list[list[float]] = [[] for _ in cases]
            for _ in range(args.runs):
                for (_, probe, calls), got in zip(cases, times):
                    cmd = [PYTHON, script, func, str(calls)]
                    got.append(_run(cmd if not probe else [*uprobes, *probe, "--", *cmd]))
            base = statistics.median(times[0])
            for (name, _, _), got in zip(cases, times):
                ns = statistics.median(got)
                print(f"  {name:28} {ns:12.1f}   +{ns - base:10.1f}  "
                      f"{100 * (ns - base) / base:8.1f}%")


if __name__ == "__main__":
    main()
