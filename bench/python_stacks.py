"""What reading a hit's Python frames adds to the time a thread stays stopped,
and what stacks cost the program with no stop (trap-free).

    python -m bench.python_stacks [--calls 3000] [--depth 10] [--python /usr/bin/python3.11]
                                  [--repeat 1]
    python -m bench.python_stacks --rate SECONDS [--python ...]

A Python program calls os.getpid() (libc's getpid) `--calls` times from
`--depth` nested Python functions; `uprobes.Session(engine="ptrace")` probes
getpid with stacks, once without and once with `python=True`. Timed inside
uprobes, per hit: the capture the thread is stopped for (registers, the
stack copy and, with python, the interpreter's frames), and the Python part
alone; medians and 90th percentiles in µs, the reads of the program's
memory (system calls) per hit for the Python part, and the hits per second
the run delivered. The first hit of a run (the interpreter found, its layout read or
compiled) is left out.

Each case runs in one go, side by side: native stacks at an int3 (`--no-trapfree`),
native stacks recorded by the jump's code (trap-free: no stop; "capture" is
then the reader's work per record, not time the program waits), and
`--python`: at an int3 for a command, and for a running process (`-p`,
`Session.attach`) at an int3 and trap-free (the jump's code copies the
Python frames too). `--repeat N` runs each case N times and shows the run
whose loop took the median time.

`--rate SECONDS`: the sustained rate instead. A running process calls
getpid in a loop for SECONDS under `uprobes stacks --json -e ptrace -p PID
libc:getpid`, native or `--python`, trap-free or not (`--no-trapfree`):
its calls per second (every call a hit: a trap-free hit that finds the
ring full waits for the reader, so this is the rate uprobes keeps up
with), µs per hit above the untraced loop, and its calls against the hits
uprobes counted (none lost: the same). The program times its own loop: its µs per call,
and what that is above the same loop untraced ("cost/hit": what a hit
costs the program, stop or not: with more calls than the ring holds, 256,
the trap-free program runs at the reader's pace, "reader/hit"; fewer show
the jump's own cost).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import uprobes
from uprobes.engines.ptrace.tracer import PtraceTracer
from uprobes.engines.trapfree.reader import Recorder
from uprobes.unwind.cpython.reader import PythonStacks

PROGRAM = """
import os, sys, time
def deep(n, calls):
    if n:
        return deep(n - 1, calls)
    t = time.perf_counter()
    for _ in range(calls):
        os.getpid()
    with open(sys.argv[3], "w") as f:
        f.write(str(time.perf_counter() - t))
wait = sys.argv[4:] == ["wait"]
if wait:
    sys.stdin.readline()  # the probes are in
deep(int(sys.argv[1]), int(sys.argv[2]))
if wait:
    sys.stdin.readline()  # every hit read: its code objects were alive until then
"""


RATE_PROGRAM = """
import ctypes, os, sys, time
at = ctypes.cast(ctypes.CDLL("libc.so.6").getpid, ctypes.c_void_p).value
if sys.argv[2:] == ["traced"]:  # until getpid starts with a jump or an int3 (bounded)
    give_up = time.monotonic() + 120
    while ctypes.string_at(at, 1) not in (b"\\xe9", b"\\xcc") and time.monotonic() < give_up:
        time.sleep(0.01)
def leaf(until):
    n = 0
    while time.perf_counter() < until:
        os.getpid()
        n += 1
    return n
def mid(until):
    return leaf(until)
t = time.perf_counter()
n = mid(t + float(sys.argv[1]))
print(n, time.perf_counter() - t, flush=True)
sys.stdin.readline()  # every hit read: its code objects were alive until then
"""


def rate(python: str, seconds: float, flags: list[str] | None) -> tuple[float, int, int]:
    """A loop calling getpid for `seconds`, untraced (`flags` None) or under
    `uprobes stacks --json -e ptrace FLAGS -p PID libc:getpid`: (its calls
    per second, its calls, the hits uprobes counted)."""
    prog = subprocess.Popen([python, "-c", RATE_PROGRAM, str(seconds),
                             *(["traced"] if flags is not None else [])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert prog.stdin is not None and prog.stdout is not None
    tracer = None
    with tempfile.NamedTemporaryFile("r") as out:
        try:
            if flags is not None:
                tracer = subprocess.Popen([sys.executable, "-m", "uprobes", "stacks", "--json",
                                           "-e", "ptrace", *flags, "-o", out.name,
                                           "-p", str(prog.pid), "libc:getpid"])
            calls, took = prog.stdout.readline().split()
            hits = 0
            if tracer is not None:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=300)
                hits = sum(p["hits"] for p in json.loads(out.read() or "{}").values())
        finally:
            prog.stdin.write("\n")
            prog.stdin.close()
            prog.wait(timeout=60)
            if tracer is not None and tracer.poll() is None:
                tracer.kill()
    return int(calls) / float(took), int(calls), hits


def rates(python: str, seconds: float) -> None:
    base = rate(python, seconds, None)[0]
    print(f"{python}: getpid in a loop for {seconds:g} s, -p, each call a hit")
    print(f"untraced: {base:,.0f} calls/s")
    print(f"{'':26} {'hits/s':>8} {'µs/hit':>8} {'calls':>8} {'counted':>8}")
    for name, flags in (("native trap-free", []), ("--python trap-free", ["--python"]),
                        ("native int3", ["--no-trapfree"]),
                        ("--python int3", ["--python", "--no-trapfree"])):
        per_s, calls, hits = rate(python, seconds, flags)
        print(f"{name:26} {per_s:>8,.0f} {1e6 / per_s - 1e6 / base:>6.1f}µs {calls:>8} {hits:>8}")


def untraced(python: str, depth: int, calls: int) -> float:
    """The program's loop, untraced: seconds."""
    with tempfile.NamedTemporaryFile("r") as out:
        subprocess.run([python, "-c", PROGRAM, str(depth), str(calls), out.name], check=True)
        return float(out.read())


def tell(prog: subprocess.Popen[str] | None) -> None:
    """A line to the waiting program (it goes on)."""
    if prog is not None and prog.stdin is not None:
        prog.stdin.write("go\n")
        prog.stdin.flush()


def _timed(store: list[int], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        t = time.perf_counter_ns()
        try:
            return fn(*args)
        finally:
            store.append(time.perf_counter_ns() - t)
    return wrapper


def run_once(python: str, depth: int, calls: int, with_python: bool,
             trapfree: bool = False, attach: bool = False) -> dict[str, float]:
    captures: list[int] = []
    py_reads: list[int] = []
    orig_capture, orig_py = PtraceTracer._capture, PythonStacks.capture
    PtraceTracer._capture = _timed(captures, orig_capture)  # type: ignore[method-assign]
    reads: list[int] = []

    def counted(self: PythonStacks, pid: int, tid: int, read: Any) -> Any:
        def counting(addr: int, n: int) -> bytes:
            reads.append(1)
            return read(addr, n)  # type: ignore[no-any-return]
        return orig_py(self, pid, tid, counting)
    PythonStacks.capture = _timed(py_reads, counted)  # type: ignore[method-assign]
    drains: list[int] = []
    orig_drain = Recorder._drain_once
    Recorder._drain_once = _timed(drains, orig_drain)  # type: ignore[method-assign]
    try:
        s = uprobes.Session(engine="ptrace", stack_bytes=8192, python=with_python,
                            trapfree=trapfree)
        frames: list[int] = []
        prog: subprocess.Popen[str] | None = None

        def hit(ev: uprobes.Event) -> None:
            frames.append(sum(f.python for f in ev.stack or ()))
            if prog is not None and len(frames) == calls:
                tell(prog)
        s.probe("libc:getpid", hit)
        start = time.perf_counter()
        with tempfile.NamedTemporaryFile("r") as out:
            argv = [python, "-c", PROGRAM, str(depth), str(calls), out.name]
            if attach:  # -p: a running process (Python frames are trap-free there)
                prog = subprocess.Popen([*argv, "wait"], stdin=subprocess.PIPE, text=True)
                s.attach(prog.pid, ready=lambda: tell(prog))
                status = prog.wait()
            else:
                status = s.spawn(argv)
            wall = time.perf_counter() - start
            loop = float(out.read())
    finally:
        PtraceTracer._capture = orig_capture  # type: ignore[method-assign]
        PythonStacks.capture = orig_py  # type: ignore[method-assign]
        Recorder._drain_once = orig_drain  # type: ignore[method-assign]
    assert status == 0 and len(frames) == calls, (status, len(frames))

    def us(xs: list[int], q: float) -> float:
        xs = sorted(xs[1:])
        return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000 if xs else 0.0
    return {"capture_p50": us(captures, 0.5), "capture_p90": us(captures, 0.9),
            "python_p50": us(py_reads, 0.5), "python_p90": us(py_reads, 0.9),
            "py_frames": statistics.median(frames), "hits_per_s": calls / wall,
            "reads": len(reads) / calls, "per_call": loop / calls * 1e6,
            # The reader's time per record (trap-free), the first read (the
            # files' symbols and CFI loaded) left out as the first hit is above.
            "reader": sum(sorted(drains)[:-1]) / calls / 1000 if trapfree else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--python", default="/usr/bin/python3.11")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the median's shown")
    ap.add_argument("--rate", type=float, metavar="SECONDS",
                    help="instead: the hits per second `stacks -p` sustains, each case")
    args = ap.parse_args()
    if args.rate:
        rates(args.python, args.rate)
        return
    print(f"{args.python}: {args.calls} hits, {args.depth} nested functions")
    base = untraced(args.python, args.depth, args.calls) / args.calls * 1e6
    print(f"untraced: {base:.2f}µs per call")
    print(f"{'':21} {'capture p50':>12} {'p90':>8} {'python p50':>11} {'p90':>8} "
          f"{'py frames':>9} {'reads/hit':>9} {'hits/s':>8} {'µs/call':>8} {'cost/hit':>8} "
          f"{'reader/hit':>10}")
    for name, with_python, trapfree, attach in (("native int3", False, False, False),
                                                ("native trap-free", False, True, False),
                                                ("--python int3", True, False, False),
                                                ("-p --python int3", True, False, True),
                                                ("-p --python trap-free", True, True, True)):
        runs = [run_once(args.python, args.depth, args.calls, with_python, trapfree, attach)
                for _ in range(args.repeat)]
        # The run whose loop took its median time (load on the machine varies).
        r = sorted(runs, key=lambda x: x["per_call"])[len(runs) // 2]
        print(f"{name:21} {r['capture_p50']:>10.1f}µs "
              f"{r['capture_p90']:>6.1f}µs {r['python_p50']:>9.1f}µs {r['python_p90']:>6.1f}µs "
              f"{r['py_frames']:>9.0f} {r['reads']:>9.1f} {r['hits_per_s']:>8.0f} "
              f"{r['per_call']:>6.1f}µs {r['per_call'] - base:>6.1f}µs {r['reader']:>8.1f}µs")


if __name__ == "__main__":
    main()
