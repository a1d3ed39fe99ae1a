"""What a Session consumer's filter saves when it is pushed into the kernel.

    python -m bench.session_filter [--calls 300000] [--repeats 3]

A `uprobes.Session` on the kernel engine spawns the bench workload
(`--calls` calls of work_boosted(x), x = 0, 1, ...) with one consumer that
wants the first 10 calls: as `condition="x < 10"` (pushed: the kernel's
event filter drops the rest before they are records) and as
`filter=lambda ev: ...` (Python only: every hit a record to read),
alternating. Per run: events handled, records read (`Session.events`),
records lost, the run's wall time and this process's CPU time (the reader).
"""

from __future__ import annotations

import argparse
import resource
import time

import uprobes
from bench.workload import build

WANTED = 10


def run_once(argv: list[str], exe: str, pushed: bool) -> str:
    s = uprobes.Session(engine="kernel")
    handled: list[uprobes.Event] = []
    line = f"{exe}:work_boosted x=%di:s64"
    if pushed:
        s.probe(line, handled.append, condition=f"x < {WANTED}")
    else:
        s.probe(line, handled.append, filter=lambda ev: ev.args["x"] < WANTED)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    status = s.spawn(argv)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    assert status == 0, status
    return (f"{'condition= (pushed)' if pushed else 'filter= (Python)':<20} handled "
            f"{len(handled):>3}  records {s.events:>9,}  lost {s.lost:>9,}  "
            f"wall {wall:5.2f} s  cpu {cpu:5.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=300_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    workload = build()
    argv = workload.argv(args.calls, "work_boosted")
    for _ in range(args.repeats):
        for pushed in (True, False):
            print(run_once(argv, str(workload.exe), pushed), flush=True)


if __name__ == "__main__":
    main()
