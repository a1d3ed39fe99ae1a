"""What a read of a running ptrace Timer or Counter costs (an exporter reads at every scrape).

    python -m bench.live_reads [--threads 4] [--reads 50]

tests/fixtures/timed.c in `rounds` mode, attached (-p): one round of
`--threads` threads x 20,000 calls of tiny(), timed in the program (the
Timer of `latency -e ptrace`), then `latencies()` read `--reads` times while
the tracer stays attached; the first read, which measures the probes' cost
(once per process), is shown apart. Then the same with tiny() counted
trap-free (the Counter of `count -e ptrace`) and `live_counts()`. Prints
the median and the slowest read of each, in ms. As root.
"""

from __future__ import annotations

import argparse
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from uprobes.commands.resolve import parse_specs
from uprobes.engines.base import Counter, Request, Timer, open_counter, open_timer
from uprobes.resolve.resolver import Resolver

SOURCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "timed.c"
CALLS = 20000


def _build() -> Path:
    exe = Path(tempfile.gettempdir()) / "uprobes-bench-timed"
    subprocess.run(["gcc", "-O1", "-g", "-pthread", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def _timings(read: Callable[[], object], reads: int) -> list[float]:
    took = []
    for _ in range(reads):
        start = time.perf_counter()
        read()
        took.append((time.perf_counter() - start) * 1e3)
    return took


def _measure(exe: Path, threads: int, reads: int, timer: bool) -> tuple[float, list[float]]:
    """(the first read's ms, the next reads' ms)."""
    proc = subprocess.Popen([str(exe), "rounds", str(CALLS), str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().startswith("ready ")
        lines = [f"{exe}:tiny", f"r {exe}:tiny"] if timer else [f"{exe}:tiny"]
        probes = Resolver(pid=proc.pid, uretprobe=False).resolve_all(parse_specs(lines))
        request = Request(probes, "ptrace", pid=proc.pid, trapfree=True)
        run: Timer | Counter
        read: Callable[[], object]
        if timer:
            timing = open_timer(request)
            assert timing is not None
            run, read = timing, timing.latencies
        else:
            counting = open_counter(request)
            run, read = counting, counting.live_counts
        with run:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            deadline = time.monotonic() + 120
            while not select.select([proc.stdout], [], [], 0)[0]:
                assert time.monotonic() < deadline, "the round did not end within 120 s"
                run.count(0.02)
            proc.stdout.readline()
            first = _timings(read, 1)[0]
            return first, _timings(read, reads)
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.live_reads")
    p.add_argument("--threads", type=int, default=4, help="0: the calls in the main thread")
    p.add_argument("--reads", type=int, default=50)
    args = p.parse_args(argv)
    exe = _build()
    for what, timer in (("Timer.latencies()", True), ("Counter.live_counts()", False)):
        first, took = _measure(exe, args.threads, args.reads, timer)
        who = f"{args.threads} threads" if args.threads else "the main thread"
        print(f"{what:22}: {who} x {CALLS} calls; first read {first:.2f} ms, "
              f"then median {statistics.median(took):.2f} ms, slowest {max(took):.2f} ms "
              f"over {args.reads} reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
