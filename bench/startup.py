"""Time to first probe: `python -m bench.startup [-n RUNS] [SPEC...]` (as root, repo root).

What a user waits for on every run: from exec of `uprobes trace` to the line
`uprobes: tracing N probes ...` on stderr, when the probes are in place.
That is interpreter start-up, imports, resolving (ELF headers, symbols,
instruction checks) and attaching.  Each spec runs RUNS times, alternating
between specs so they see the same machine state; the median and the
spread (min-max) are printed, with the machine's load average.

Runs use compiled bytecode, as an installed package has: PYTHONDONTWRITEBYTECODE
is dropped from the children's environment, so the warm-up run writes the
`__pycache__` files.  `--src DIR` times another checkout's `src/` (e.g. an
export of main: `git archive main | tar -x -C /tmp/base`) with this interpreter.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from bench.measure import tree_env, wait_for

DEFAULT_SPECS = (
    "libc:getppid",
    "libc:*",
    "usdt:/usr/bin/python3.11:python:function__entry",
)
UPROBES = [sys.executable, "-m", "uprobes"]
TIMEOUT = 120.0


def time_to_tracing(spec: str, env: dict[str, str] | None = None,
                    command: Sequence[str] = UPROBES) -> float:
    """Seconds from exec of `uprobes trace SPEC` to its 'tracing' line; the run is then stopped."""
    start = time.perf_counter()
    proc = subprocess.Popen([*command, "trace", spec], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_for(proc, b"uprobes: tracing ", TIMEOUT, f"uprobes trace {spec!r}")
        elapsed = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--runs", type=int, default=11, help="runs per spec (default 11)")
    parser.add_argument("--src", action="append", metavar="DIR",
                        help="time the uprobes package in this src/ directory (repeat to "
                             "compare checkouts run by run; default: the installed one)")
    parser.add_argument("specs", nargs="*", default=list(DEFAULT_SPECS),
                        help=f"probe specs (default: {' '.join(DEFAULT_SPECS)})")
    args = parser.parse_args(argv)
    srcs: list[str | None] = list(args.src) if args.src else [None]
    envs = {src: tree_env(src) for src in srcs}
    times: dict[tuple[str | None, str], list[float]] = {
        (src, spec): [] for spec in args.specs for src in srcs}
    for src, spec in times:  # warm the page cache and write __pycache__
        time_to_tracing(spec, envs[src])
    for _ in range(args.runs):
        for src, spec in times:
            times[src, spec].append(time_to_tracing(spec, envs[src]))
    load = os.getloadavg()
    print(f"time from exec to 'uprobes: tracing', median of {args.runs} runs "
          f"(load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} after)")
    print("| spec | src | median | min | max |")
    print("|---|---|---:|---:|---:|")
    for (src, spec), ts in times.items():
        print(f"| `{spec}` | {src or 'installed'} | {statistics.median(ts):.3f} s | "
              f"{min(ts):.3f} s | {max(ts):.3f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
