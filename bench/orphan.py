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

    python -m bench.orphan --returns [--repeats 10] [--calls 20000]

The one per-hit cost: a return probe by trampoline (`count --uretprobe 'r
WORKLOAD:work_emulated'`) mirrors each hijacked return address into the
process's return table (engines/ptrace/rettable.py). Runs it with the table
and without (OrphanGuard._returns a no-op: no table), alternating, and
prints the medians of the workload's own loop time per call (an entry and a
trampoline stop each), of the tracer's CPU time per call (user, system:
steadier than wall time on a loaded machine) and of the table's set-up per
process; then the
tracer's own work for one call's hijack and return with and without the
table (timeit on a table in an anonymous mapping, the stack a stub), which
the difference of the whole runs holds along with the machine's noise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import mmap
import os
import resource
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from typing import Any, cast

from bench.workload import build, loop_ns
from uprobes.commands import main as uprobes_main
from uprobes.engines.ptrace import orphan, retprobes, rettable
from uprobes.model.registry import Probe
from uprobes.sys.procmem import ProcessMemory


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


def _returns_once(argv: list[str], calls: int, off: bool) -> dict[str, float]:
    """One traced run of `argv` (the workload's loop time per call, in `loop`)."""
    spent: dict[str, float] = {}
    out = tempfile.TemporaryFile()
    saved = os.dup(1)
    os.dup2(out.fileno(), 1)  # the workload's line, with its loop time
    try:
        with _timed(orphan.OrphanGuard, "_returns", spent, off), \
                contextlib.redirect_stdout(io.StringIO()):
            before = resource.getrusage(resource.RUSAGE_SELF)
            status = uprobes_main(argv)
            after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    out.seek(0)
    loop = loop_ns(out.read().decode())
    assert status == 0 and loop is not None, status
    assert off == ("_returns" not in spent), spent  # the table was there, or not
    spent["loop"] = loop / 1e9 / calls
    spent["cpu"] = (after.ru_utime - before.ru_utime) / calls
    spent["sys"] = (after.ru_stime - before.ru_stime) / calls
    return spent


def _returns(repeats: int, calls: int) -> None:
    workload = build()
    cmd = ["count", "-e", "ptrace", "--uretprobe", "-o", os.devnull,
           f"r {workload.exe}:work_emulated", "--", *workload.argv(calls, "work_emulated")]
    _returns_once(cmd, calls, False)  # warm caches
    on: list[dict[str, float]] = []
    off: list[dict[str, float]] = []
    for _ in range(repeats):
        on.append(_returns_once(cmd, calls, False))
        off.append(_returns_once(cmd, calls, True))

    def us(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs) * 1e6
    print(f"{calls} calls of work_emulated, each an entry and a trampoline stop; "
          f"medians of {repeats} runs each")
    print("| | table on | table off |\n|---|---|---|")
    print(f"| loop time per call (workload) | {us(on, 'loop'):.1f} us | {us(off, 'loop'):.1f} us |")
    print(f"| tracer's user CPU per call | {us(on, 'cpu'):.1f} us | {us(off, 'cpu'):.1f} us |")
    print(f"| tracer's system CPU per call | {us(on, 'sys'):.1f} us | {us(off, 'sys'):.1f} us |")
    print(f"| OrphanGuard._returns (per process) | {us(on, '_returns') / 1e3:.2f} ms | - |")
    n, rounds = 50_000, 30
    each = {on: min(timeit.repeat(_hit_pair(on), number=n, repeat=rounds)) / n
            for on in (True, False)}
    print(f"| retprobes hijack + complete + release (timeit, best of {rounds} x {n}) "
          f"| {each[True] * 1e6:.2f} us | {each[False] * 1e6:.2f} us |")


class _StackWord:
    """The 8 bytes at a stack address, for timing the tracer's own work alone."""

    def read(self, addr: int, size: int) -> bytes:
        return (0x401000).to_bytes(8, "little")

    def write(self, addr: int, data: bytes) -> None:
        pass


def _hit_pair(table_on: bool) -> Callable[[], None]:
    """What the tracer does in Python for one call's hijack and return."""
    table = rettable.ReturnTable(mmap.mmap(-1, rettable.SIZE), 0, print) if table_on else None
    returns: list[retprobes.ReturnInstance] = []
    mem = cast(ProcessMemory, _StackWord())
    probe = cast(Probe, None)

    def one() -> None:
        retprobes.hijack(returns, mem, 0x7FFD0000, 0x1000, probe, 0x400000, 0, table, 1234)
        retprobes.release(retprobes.complete(returns, 0x7FFD0008, table), table)
    return one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.orphan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--returns", action="store_true",
                        help="the return table's per-hit cost instead")
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args(argv)
    if args.returns:
        _returns(args.repeats, args.calls)
        return 0
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
