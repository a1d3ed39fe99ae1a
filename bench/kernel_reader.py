"""What `trace --kernel` costs per event in the reader: CPU time to decode
the rings and write JSON lines, away from the machine's load.

    python -m bench.kernel_reader [--calls 200000] [--repeats 5]

bench/syscall_rate.c makes CALLS getppid() calls (as fast as it can) with
`--kernel sched,syscalls` recorded into the rings; then what the rings hold
is read again and again as `trace --kernel ... --json` reads it (rows,
the Timeline, JSON lines into /dev/null), each time by a fresh reader.
Prints the best CPU time per event and the events a CPU-second reads: the
rate the reader keeps up with when it has a CPU of its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from uprobes.engines.kevents.decode import parse_kernel_option
from uprobes.engines.kevents.source import KernelEvents
from uprobes.engines.launch import launch
from uprobes.errors import KernelError
from uprobes.render.jsonl import JsonLinesRenderer
from uprobes.render.timeline import Timeline

SOURCE = Path(__file__).with_name("syscall_rate.c")
KERNEL = "sched,syscalls"


class Recorded:
    """A ring's bytes, recorded once, handed over as a ring does."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def peek(self, limit: int) -> tuple[bytes, bool]:
        return self.data[self.at:self.at + limit], self.at + limit >= len(self.data)

    def advance(self, n: int) -> None:
        self.at += n

    def corrupt(self, size: int) -> KernelError:
        return KernelError(f"corrupt record of size {size}")


def record(exe: Path, calls: int) -> tuple[dict[int, bytes], dict[int, str]]:
    """Each CPU's ring after the program made `calls` calls, and the comms."""
    with KernelEvents(parse_kernel_option(KERNEL)) as events:
        child = launch([str(exe), str(calls), "1"])
        events.open(child=child.pid)
        child.release()
        if child.wait() != 0:
            raise SystemExit("the workload failed")
        events.disable()
        rings = {cpu: ring.take() for cpu, ring in events.rings.items()}
        for cpu, data in rings.items():  # counted as read: what `lost` compares with
            events.records.read(data, [], events.rings[cpu].corrupt)
        if events.lost:
            raise SystemExit(f"{events.lost} events lost while recording: fewer --calls")
        events._comm(child.pid)
        return rings, dict(events._comms)


def read(rings: dict[int, bytes], comms: dict[int, str]) -> tuple[int, float]:
    """Events read and the CPU seconds it took."""
    events = KernelEvents(parse_kernel_option(KERNEL))
    recorded = {cpu: Recorded(data) for cpu, data in rings.items()}
    events.rings = recorded  # type: ignore[assignment]  # (what a ring gives, recorded)
    events._comms.update(comms)
    with open(os.devnull, "w") as out:
        timeline = Timeline(JsonLinesRenderer(out, {}), events)
        start = time.process_time()
        while any(r.at < len(r.data) for r in recorded.values()):
            timeline.tick(0)  # held back, as in a run (written when past MAX_HELD)
        timeline.summary(0, 0)
        return events.count, time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="uprobes-bench-") as tmp:
        exe = Path(tmp) / "syscall_rate"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(SOURCE)], check=True)
        rings, comms = record(exe, args.calls)
    runs = [read(rings, comms) for _ in range(args.repeats)]
    events, cpu = min(runs, key=lambda r: r[1])
    print(f"{events:,} events (--kernel {KERNEL}, {args.calls:,} calls) into JSON lines: "
          f"best of {args.repeats}: {cpu * 1e6 / events:.2f} us of CPU an event, "
          f"{events / cpu:,.0f} events a CPU-second; load average {os.getloadavg()[0]:.1f}",
          flush=True)


if __name__ == "__main__":
    main()
