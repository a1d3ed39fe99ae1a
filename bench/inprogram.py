"""Answers computed in the program, side by side with the tools that do the same.

    python -m bench.inprogram [--calls 300000] [--repeats 5] [--only NAME,...]

One workload (bench/workload.c's `work_c`: `lea rax,[rdi+1]; ret` after the
five bytes of nops that `-fpatchable-function-entry=5` leaves for uftrace),
called `--calls` times in a loop; each row runs it under one tool, and the
workload times its own loop (CLOCK_MONOTONIC), so start-up, attach and
teardown are left out. The overhead per call is the row's loop time minus
the untraced loop time, over the calls: the median over `--repeats`, every
row once per repeat, in turn. Rows:

- uprobes (ptrace engine, trap-free): `count`; `count --if 'a == -1'` (a
  filter that rejects every hit, compiled into the code); `count --comm
  nobody` (every hit rejected by the thread's name, asked of the kernel at
  each hit); `count --by
  tid` (a hash table in shared memory); `latency` (entry and return timed
  in the program, a histogram per thread); `latency --if 'tid == 1'` (every
  call rejected by the entry's code, its return let go); `latency --by ra` and `--by a`
  (keyed by a value fetched at entry and kept with the open call: the
  return address, one key; the argument, a new key each call, so the table
  of keyed histograms fills and the rest are counted as not keyed); `count
  --by comm` and `latency --by comm` (the thread's name asked of the kernel
  at each hit); `record` (entry `a=%di` and
  return into the shared ring, slots copied to disk as they are); `trace`
  (the same ring, each record rendered in Python) for reference;
- uftrace `record -P work_c` (entry and exit, to disk; the build's nops
  patched at run time);
- frida: an Interceptor with a CModule `onEnter` counting in C, and with a
  JavaScript `onEnter` counting;
- bpftrace: `uprobe ... { @ = count() }`, and a latency histogram
  (`uprobe` + `uretprobe`, `hist(nsecs - @start[tid])`);

A tool that is missing is skipped with the reason; each row's count of
calls is checked (a row that missed calls is marked). Prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import Outcome, Skip, markdown_table
from bench.others import frida_run
from bench.workload import Workload, build, loop_ns

FUNCTION = "work_c"
PY = sys.executable


@dataclass
class Row:
    tool: str
    what: str
    run: Callable[[Workload, int, Path], Outcome]
    loops: list[int] = field(default_factory=list)
    counts: set[int | None] = field(default_factory=set)
    skipped: str | None = None


def _uprobes(*args: str, count: Callable[[subprocess.CompletedProcess[str]], int | None]
             ) -> Callable[[Workload, int, Path], Outcome]:
    def run(w: Workload, calls: int, work: Path) -> Outcome:
        argv = [PY, "-m", "uprobes", *(a.replace("EXE", str(w.exe)).replace("WORK", str(work))
                                       for a in args), "--", *w.argv(calls, FUNCTION)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {proc.stderr[-500:]}")
        return Outcome(count(proc), loop_ns=loop_ns(proc.stdout))
    return run


def _count_table(proc: subprocess.CompletedProcess[str]) -> int | None:
    found = re.search(rf"^uprobes/{FUNCTION}\s+(\d+)$", proc.stdout, re.M)
    return int(found[1]) if found else None


def _keyed(proc: subprocess.CompletedProcess[str]) -> int | None:
    doc = json.loads(proc.stdout.splitlines()[-1])
    return sum(int(r["count"]) for r in doc[f"uprobes/{FUNCTION}"]["keys"])


def _rejected(proc: subprocess.CompletedProcess[str]) -> int | None:
    """Every hit rejected in the program: 0 counted, which `count` prints as
    its one probe not hit."""
    if "(1 of 1 probes not hit)" in proc.stdout:
        return 0
    return _count_table(proc)


def _latency(proc: subprocess.CompletedProcess[str]) -> int | None:
    doc = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), None)
    return None if doc is None else sum(int(h["count"]) for h in json.loads(doc).values())


def _keyed_latency(proc: subprocess.CompletedProcess[str]) -> int | None:
    """The calls in the histograms, and those the run says it could not key."""
    timed = _latency(proc)
    found = re.search(r"^uprobes: (\d+) calls could not be keyed", proc.stderr, re.M)
    return None if timed is None else timed + (int(found[1]) if found else 0)


def _events(proc: subprocess.CompletedProcess[str]) -> int | None:
    found = re.search(r"^uprobes: (\d+) events, 0 lost$", proc.stderr, re.M)
    return int(found[1]) // 2 if found else None  # entry + return per call


def _uftrace(w: Workload, calls: int, work: Path) -> Outcome:
    if shutil.which("uftrace") is None:
        raise Skip("uftrace is not installed (apt-get install uftrace)")
    data = work / "uftrace.data"
    shutil.rmtree(data, ignore_errors=True)
    proc = subprocess.run(["uftrace", "record", "-d", str(data), "-P", FUNCTION,
                           "--no-libcall", *w.argv(calls, FUNCTION)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"uftrace: {proc.stderr[-500:]}")
    report = subprocess.run(["uftrace", "report", "-d", str(data)], capture_output=True,
                            text=True, timeout=600).stdout
    found = re.search(rf"(\d+)\s+{FUNCTION}$", report, re.M)
    return Outcome(int(found[1]) if found else None, loop_ns=loop_ns(proc.stdout))


_FRIDA_C = """
const counter = Memory.alloc(8);
const cm = new CModule(`
#include <gum/guminterceptor.h>
extern volatile long counter;
void onEnter(GumInvocationContext *ic) { counter++; }
`, { counter });
Interceptor.attach(ptr('%s'), cm);
Interceptor.attach(Module.getGlobalExportByName('exit'), {
  onEnter() { send(counter.readLong().toNumber()); recv('ack', () => {}).wait(); }
});
"""

_FRIDA_JS = """
let n = 0;
Interceptor.attach(ptr('%s'), { onEnter() { n++; } });
Interceptor.attach(Module.getGlobalExportByName('exit'), {
  onEnter() { send(n); recv('ack', () => {}).wait(); }
});
"""


def _frida(source: str) -> Callable[[Workload, int, Path], Outcome]:
    return lambda w, calls, work: frida_run(w, FUNCTION, calls, source)


def _bpftrace(program: str, counted: str) -> Callable[[Workload, int, Path], Outcome]:
    def run(w: Workload, calls: int, work: Path) -> Outcome:
        if shutil.which("bpftrace") is None:
            raise Skip("bpftrace is not installed (apt-get install bpftrace)")
        text = program.replace("EXE", str(w.exe)).replace("FUNC", FUNCTION)
        proc = subprocess.run(["bpftrace", "-e", text, "-c", " ".join(w.argv(calls, FUNCTION))],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"bpftrace: {proc.stderr[-500:]}")
        found = re.search(rf"^@{counted}: (\d+)$", proc.stdout, re.M)
        return Outcome(int(found[1]) if found else None, loop_ns=loop_ns(proc.stdout))
    return run


def _untraced(w: Workload, calls: int, work: Path) -> Outcome:
    proc = subprocess.run(w.argv(calls, FUNCTION), capture_output=True, text=True,
                          timeout=600, check=True)
    return Outcome(calls, loop_ns=loop_ns(proc.stdout))


def rows() -> list[Row]:
    spec = f"EXE:{FUNCTION}"
    return [
        Row("untraced", "-", _untraced),
        Row("uprobes count -e ptrace", "entry, counted", _uprobes(
            "count", "-e", "ptrace", spec, count=_count_table)),
        Row("uprobes count -e ptrace --if 'a == -1'", "entry, every hit rejected", _uprobes(
            "count", "-e", "ptrace", "--if", "a == -1", f"{spec} a=%di:s64", count=_rejected)),
        Row("uprobes count -e ptrace --comm nobody", "entry, every hit rejected by its name",
            _uprobes("count", "-e", "ptrace", "--comm", "nobody", spec, count=_rejected)),
        Row("uprobes count -e ptrace --by tid", "entry, counted per thread", _uprobes(
            "count", "-e", "ptrace", "--json", "--by", "tid", spec, count=_keyed)),
        Row("uprobes latency -e ptrace", "entry+return, histogram", _uprobes(
            "latency", "-e", "ptrace", "--json", spec, count=_latency)),
        Row("uprobes latency -e ptrace --if 'tid == 1'", "entry+return, every call rejected "
            "at its entry", _uprobes("latency", "-e", "ptrace", "--json", "--if", "tid == 1",
                                     spec, count=_latency)),
        Row("uprobes count -e ptrace --by comm", "entry, counted per thread name (asked at "
            "each hit)", _uprobes("count", "-e", "ptrace", "--json", "--by", "comm", spec,
                                  count=_keyed)),
        Row("uprobes latency -e ptrace --by comm", "entry+return, a histogram per thread name "
            "(asked at each entry)", _uprobes("latency", "-e", "ptrace", "--json", "--by",
                                              "comm", spec, count=_keyed_latency)),
        Row("uprobes latency -e ptrace --by ra", "entry+return, a histogram per return "
            "address (one key)", _uprobes("latency", "-e", "ptrace", "--json", "--by", "ra",
                                          f"{spec} ra=+0(%sp):u64", count=_keyed_latency)),
        Row("uprobes latency -e ptrace --by a", "entry+return, a histogram per a=%di (a new "
            "key each call: the table fills)", _uprobes(
                "latency", "-e", "ptrace", "--json", "--by", "a", f"{spec} a=%di:s64",
                count=_keyed_latency)),
        Row("uprobes record -e ptrace", "entry a=%di + return, to disk", _uprobes(
            "record", "-e", "ptrace", "-o", "WORK/rec", f"{spec} a=%di", f"r {spec}",
            count=_events)),
        Row("uprobes trace -e ptrace", "entry a=%di + return, rendered", _uprobes(
            "trace", "-e", "ptrace", "-o", os.devnull, f"{spec} a=%di", f"r {spec}",
            count=_events)),
        Row("uftrace record -P", "entry+exit, to disk", _uftrace),
        Row("frida Interceptor, CModule", "entry, counted in C", _frida(_FRIDA_C)),
        Row("frida Interceptor, JavaScript", "entry, counted in JS", _frida(_FRIDA_JS)),
        Row("bpftrace", "entry, @ = count()",
            _bpftrace("uprobe:EXE:FUNC { @n = count(); }", "n")),
        Row("bpftrace", "entry+return, hist()",
            _bpftrace("uprobe:EXE:FUNC { @s[tid] = nsecs; } "
                      "uretprobe:EXE:FUNC /@s[tid]/ { @h = hist(nsecs - @s[tid]); "
                      "delete(@s[tid]); @n = count(); }", "n")),
    ]


def bench(args: argparse.Namespace) -> str:
    w = build(flags=("-fpatchable-function-entry=5",))
    wanted = args.only.split(",") if args.only else None
    table = [r for r in rows() if wanted is None or r.tool == "untraced"
             or any(x in r.tool for x in wanted)]
    with tempfile.TemporaryDirectory(prefix="uprobes-inprogram-") as tmp:
        work = Path(tmp)
        for r in table:  # a first run each: what is missing is skipped, not timed
            try:
                r.run(w, 1000, work)
            except Skip as why:
                r.skipped = str(why)
        for _ in range(args.repeats):
            for r in table:
                if r.skipped:
                    continue
                outcome = r.run(w, args.calls, work)
                if outcome.loop_ns is None:
                    raise RuntimeError(f"{r.tool}: the workload printed no loop time")
                r.loops.append(outcome.loop_ns)
                r.counts.add(outcome.hits)
    base = statistics.median(table[0].loops) / args.calls
    uftrace = next((r for r in table if r.tool.startswith("uftrace") and r.loops), None)
    uf = None if uftrace is None else statistics.median(uftrace.loops) / args.calls - base
    lines = []
    for r in table:
        if r.skipped:
            lines.append([r.tool, r.what, "-", "-", f"skipped: {r.skipped}"])
            continue
        per = statistics.median(r.loops) / args.calls
        over = per - base
        exact = r.counts == {args.calls} or (r.counts == {0} and "rejected" in r.what)
        lines.append([r.tool, r.what, f"{per:.1f}" if r is table[0] else f"{over:.1f}",
                      "-" if uf is None or r is table[0] else f"{over / uf:.2f}",
                      "exact" if exact else f"counted {sorted(map(str, r.counts))}"])
    head = (f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs, load "
            f"{os.getloadavg()[0]:.1f} at the end; {args.calls} calls of {FUNCTION} "
            f"(lea; ret, after 5 bytes of nops), median of {args.repeats} runs each")
    return head + "\n\n" + markdown_table(
        ["tool", "what", "ns per call (untraced: the call; others: over it)",
         "x uftrace", "calls seen"], lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated parts of tool names")
    args = p.parse_args()
    print(bench(args))


if __name__ == "__main__":
    main()
