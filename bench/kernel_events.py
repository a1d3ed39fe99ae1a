"""Does `trace --kernel` keep up? Kernel events lost at a given system call rate.

    python -m bench.kernel_events [--rate 50000] [--seconds 2] [--engine kernel]

bench/syscall_rate.c makes RATE getppid() calls a second for SECONDS
between two probed calls of mark(); `uprobes trace --kernel sched,syscalls
--json` records them (two events each, plus the switches) into a file.
Prints the calls made, the kernel events recorded and lost (the summary's
`kernel` counts, which count every PERF_RECORD_LOST), the CPU time, and
the load average (the reader shares the CPUs with whatever else runs). The
goal: none lost at 50k calls a second for 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("syscall_rate.c")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=int, default=50_000)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--engine", default="kernel", choices=("kernel", "ptrace"))
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="uprobes-bench-") as tmp:
        exe = Path(tmp) / "syscall_rate"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(SOURCE)], check=True)
        out = Path(tmp) / "trace.jsonl"
        for _ in range(args.repeats):
            load = os.getloadavg()[0]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "uprobes", "trace", "-e", args.engine, "--json", "-o",
                 str(out), "--kernel", "sched,syscalls", f"{exe}:mark n=%di:s32", "--",
                 str(exe), str(args.rate), str(args.seconds)],
                capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            made = re.search(r"syscalls=(\d+) seconds=([\d.]+) rate=(\d+)", run.stdout)
            assert made, run.stdout + run.stderr
            summary = json.loads(out.read_text().splitlines()[-1])["summary"]
            print(f"{args.engine}: {made.group(1)} syscalls at {made.group(3)}/s; kernel events "
                  f"{summary['kernel']['events']:,} (>= {2 * int(made.group(1)):,} expected), "
                  f"lost {summary['kernel']['lost']:,}; hits {summary['events']}; "
                  f"wall {wall:.2f} s, cpu {cpu:.2f} s (uprobes and the workload); load "
                  f"average {load:.1f} before, {os.getloadavg()[0]:.1f} after", flush=True)


if __name__ == "__main__":
    main()
