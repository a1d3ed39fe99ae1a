"""`uprobes record`'s reader alone: how fast it empties full rings to disk.

    python -m bench.record_drain [--laps 40] [--repeats 5] [--dir DIR]

A ring of each shape (64- and 128-byte slots) in this process, filled with
committed slots (its `head` and the writers' count of commits moved a
ring's worth on, as the recording code leaves them), is emptied by the
reader `uprobes record` runs (`Recorder.dump` into a `RecordWriter`, files
in DIR, by default the system's temporary directory), `--laps` times. The
reader's own CPU time (thread time, so another process's load counts less)
per record, the median over `--repeats`: records a second and MB a second
of what the reader can take while the program writes nothing. In a real run
the program and the reader share the machine; `bench.inprogram` times that.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path

from uprobes.engines.trapfree.layout import COMMITTED, HEAD, LONG, RING_BYTES, SHORT, RingShape
from uprobes.engines.trapfree.reader import Recorder
from uprobes.engines.trapfree.ring import Ring
from uprobes.record.writer import RecordWriter


def drain_ns(shape: RingShape, laps: int, directory: Path) -> float:
    """The reader's CPU ns a record, emptying `laps` full rings of `shape`."""
    view = mmap.mmap(-1, RING_BYTES)
    ring = Ring(view, 0x7F00_0000_0000, shape)
    writer = RecordWriter(directory, [], {}, set(), "ptrace", None, None)
    recorder = Recorder({})
    spent = 0.0
    try:
        for _ in range(laps):
            ring.words[HEAD // 8] = ring.words[COMMITTED // 8] = ring.tail + shape.slots
            start = time.thread_time()
            while recorder.dump([ring], lambda: [(1, (1, "bench"))], writer):
                pass
            spent += time.thread_time() - start
    finally:
        writer.abandon(0, 0)
        ring.close()
    return spent * 1e9 / (laps * shape.slots)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--laps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the recordings go (then removed)")
    args = p.parse_args()
    print(f"load {os.getloadavg()[0]:.1f}; {args.laps} rings a run, median of {args.repeats}")
    print("| slots | ns a record (reader CPU) | M records/s | MB/s |")
    print("|---|---|---|---|")
    for shape in (SHORT, LONG):
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                runs.append(drain_ns(shape, args.laps, Path(tmp)))
        ns = statistics.median(runs)
        print(f"| {shape.slot_bytes} bytes | {ns:.1f} | {1e3 / ns:.1f} | "
              f"{shape.slot_bytes * 1e3 / ns:,.0f} |")


if __name__ == "__main__":
    main()
