"""What naming the thread costs an int3 hit, alone (a `--comm` test, an event's comm).

    python -m bench.int3_names [--calls 200000] [--repeats 5]

The bench's own thread stands for the stopped thread; each row asks for
its name `--calls` times (the median over `--repeats` of the mean):

- kept 100 ms: `Thread.comm`, a name read at most 100 ms ago (what an int3
  hit used before: a rename between two hits went unseen);
- read at each hit: `Thread.comm_now(None)`, a pread of its /proc comm;
- kept under the rename word: `Thread.comm_now(word)`, the word read from
  our own mapping of it (trapfree/renames.py), the name read again only when
  the word moved (root: the word's BPF programs);

and what opening and closing a rename word takes (closing waits for the
kernel to let go of the programs on 11 tracepoints). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable

from bench.measure import markdown_table
from uprobes.engines.ptrace.tasks import AddressSpace, Thread
from uprobes.engines.trapfree.renames import RenameWatch
from uprobes.sys.procmem import ProcessMemory


def _per_call(ask: Callable[[], object], calls: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            ask()
        runs.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(runs)


def bench(calls: int, repeats: int) -> str:
    pid = os.getpid()
    mm = AddressSpace(pid, ProcessMemory(pid))
    t = Thread(threading.get_native_id(), pid, mm)  # (this thread, named by itself)
    try:
        rows = [["kept 100 ms (before)", f"{_per_call(lambda: t.comm, calls, repeats):.0f}"],
                ["read at each hit (pread of /proc/PID/task/TID/comm)",
                 f"{_per_call(lambda: t.comm_now(None), calls, repeats):.0f}"]]
        start = time.perf_counter()
        watch = RenameWatch.open()
        opened = time.perf_counter() - start
        if isinstance(watch, RenameWatch):
            kept = _per_call(lambda: t.comm_now(watch.value()), calls, repeats)
            rows.append(["kept under the rename word (read from our mapping)", f"{kept:.0f}"])
            start = time.perf_counter()
            watch.close()
            closed = time.perf_counter() - start
            rows.append(["a rename word opened, then closed (once a run)",
                         f"{opened * 1e3:.1f} ms + {closed * 1e3:.0f} ms"])
        else:
            rows.append(["kept under the rename word", f"skipped: {watch}"])
    finally:
        t.close()
        mm.mem.close()
    head = (f"load {os.getloadavg()[0]:.1f} at the end; {calls} asks, median of {repeats} "
            "runs")
    return head + "\n\n" + markdown_table(["the name at an int3 hit", "ns an ask"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(bench(args.calls, args.repeats))


if __name__ == "__main__":
    main()
