"""What making the ptrace engine kill -9 safe costs a traced process at set-up.

    python -m bench.orphan [--repeats 20]

Runs `uprobes count -e ptrace --no-trapfree WORKLOAD:work_boosted -- WORKLOAD 1` in this
process (uprobes.commands.main), `--repeats` times with the orphan guard
(engines/ptrace/orphan.py) and as many times with its set-up and per-probe
calls made no-ops, alternating, and prints the medians: the time spent in
OrphanGuard.setup (the injected mmap and rt_sigaction, the handler written;
the reaper is started at the first record, so inside the first process's
set-up: its share is shown apart) and in OrphanGuard.guard, and the whole
command's wall time. The hit path has no code of the guard's: its
per-hit cost is bench.ptrace's boosted row, with and without this change.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.workload import build
from uprobes.commands import main as uprobes_main
from uprobes.engines.ptrace import orphan


@contextlib.contextmanager
def _timed(owner: Any, name: str, spent: dict[str, float], off: bool) -> Iterator[None]:
    """`owner.name` timed into `spent[name]`, or a no-op if `off`."""
    real: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any) -> Any:
        if off:
            return None
        t0 = time.perf_counter()
        try:
            return real(*args)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, real)


def _once(argv: list[str], off: bool) -> dict[str, float]:
    spent: dict[str, float] = {}
    guard = orphan.OrphanGuard
    quiet = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(1)
    os.dup2(quiet, 1)  # the workload's own line
    try:
        with _timed(guard, "setup", spent, off), _timed(guard, "guard", spent, off), \
                _timed(orphan.reaper, "start_watcher", spent, off), \
                contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            status = uprobes_main(argv)
            spent["wall"] = time.perf_counter() - t0
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(quiet)
    assert status == 0, status
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.orphan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    workload = build()
    cmd = ["count", "-e", "ptrace", "--no-trapfree", "-o", os.devnull,
           f"{workload.exe}:work_boosted", "--",
           *workload.argv(1, "work_boosted")]
    _once(cmd, False)  # warm caches
    on: list[dict[str, float]] = []
    off: list[dict[str, float]] = []
    for _ in range(args.repeats):
        on.append(_once(cmd, False))
        off.append(_once(cmd, True))

    def ms(runs: list[dict[str, float]], key: str) -> str:
        return f"{statistics.median(r.get(key, 0.0) for r in runs) * 1e3:.2f} ms"
    print("| | guard on | guard off |\n|---|---|---|")
    print(f"| OrphanGuard.setup (per process; includes the reaper's start, once a run) "
          f"| {ms(on, 'setup')} | - |")
    print(f"| of which the reaper's start (once a run) | {ms(on, 'start_watcher')} | - |")
    print(f"| OrphanGuard.guard (1 probe) | {ms(on, 'guard')} | - |")
    print(f"| uprobes count, whole run | {ms(on, 'wall')} | {ms(off, 'wall')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
