"""Per-hit overhead of ptrace-based probing, side by side in one run.

    python -m bench.ptrace [--scale 1] [--repeats 5] [--syscalls] [--only NAME]

Every row probes the same workload (bench/workload.c: a loop calling one
noinline function N times) and is timed at two hit counts; the per-hit
figure is the median slope (bench/measure.py); rows of nanoseconds (untraced,
trap-free) time the workload's own loop instead of the whole run.  Rows:

- the naive ptrace loop written in Python (bench/naive_ptrace.py: int3,
  restore, single-step, re-insert);
- `ltrace -x FUNCTION` (it also breaks on every return, to print the value);
- gdb with `break FUNCTION` + `commands; silent; continue; end`;
- `uprobes count -e ptrace --no-trapfree`: entry probes on a function whose
  first instruction is emulated (push rbp) or boosted (mov), return probes on
  the function's rets and with --uretprobe (an int3 trap per hit);
- `uprobes count -e ptrace`: the same entry probes trap-free (the default for
  count: a jump to an in-process counter, no stop per hit);
- `uprobes trace -e ptrace 'FUNCTION a=%di'` (output to /dev/null): with an
  int3 per hit (`--no-trapfree`: stop, fetch, render), and trap-free (the
  default for trace: the hit is recorded into a ring the tracer reads; a
  full ring makes the program wait for the reader, so a long run goes at
  the reader's pace), timed whole; and trap-free with fewer hits than a
  ring holds, timing the workload's loop: what a hit costs the program;
- `uprobes latency -e ptrace FUNCTION`: entry and return timed in the
  program (no record, a histogram in shared memory), timing the workload's
  loop: what a timed call costs the program;
- `uprobes count -e ptrace --by a 'FUNCTION a=%di'`: counted by the
  argument's value in the program (a hash table in shared memory), timing
  the workload's loop;
- `uprobes count -e ptrace --if 'a == -1' 'FUNCTION a=%di'`: a filter that
  rejects every hit, compiled into the counting code, timing the loop;
- `uprobes record -e ptrace 'FUNCTION a=%di'`: the same ring as trace's, its
  slots written to disk as they are (no work per record), timed whole and
  by the loop: every hit kept, at the speed of a copy;
- `uprobes count -e ptrace --no-trapfree --comm NAME` (the workload's
  name: every hit kept): the name judged at each int3 hit;
- `uprobes count -e kernel`, the same probes, for reference.

A tool that is missing (or our engine before it is built) is skipped with the
reason.  `--syscalls` also runs each tracer under `strace -c` (its main
thread) and reports syscalls per hit.  Prints a Markdown table.

`--src DIR` (repeatable) runs every uprobes row once per source tree (a
checkout's src/, with this interpreter), the trees taking turns within each
repeat; each such row then names its tree (short commit, else directory) and
gives its per-hit cost as a ratio to the first tree's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bench.measure import (
    Outcome,
    Series,
    Skip,
    markdown_table,
    strace_calls,
    timed,
    tree_env,
    tree_labels,
)
from bench.workload import Workload, build, loop_ns

_ROOT = Path(__file__).resolve().parents[1]
TRAPFREE = "entry (trap-free jump)"
Count = Callable[[subprocess.CompletedProcess[str], Path], int | None]


@dataclass
class Tool:
    name: str
    probe: str
    function: str
    command: Callable[[int, Path], list[str]]
    count: Count
    traced: bool = True           # a tracer whose own syscalls are worth counting
    requires: str | None = None   # an executable that must be on PATH
    hits: tuple[int, int] = (2000, 20000)   # small and big hit counts: ~1-3 s of hits
    loop_timed: bool = False      # time the workload's own loop (ns hits: start-up noise
                                  # of a whole run would bury them), not the whole run
    ours: bool = False            # runs `python -m uprobes`: once per source tree
    src: str | None = None        # that tree's src/ (None: the installed package)

    def run(self, hits: int, work: Path, wrap: list[str] | None = None) -> Outcome:
        argv = (wrap or []) + self.command(hits, work)
        env = tree_env(self.src) if self.src is not None else None
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=_ROOT,
                              env=env)
        if proc.returncode != 0:
            err = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            raise Skip(err[-1] if err else f"exit status {proc.returncode}")
        return Outcome(self.count(proc, work), loop_ns=loop_ns(proc.stdout))


def _no_count(proc: subprocess.CompletedProcess[str], work: Path) -> int | None:
    return None


def _ltrace_count(function: str) -> Count:
    def count(proc: subprocess.CompletedProcess[str], work: Path) -> int:
        lines = (work / "ltrace.out").read_text().splitlines()
        return sum(1 for ln in lines if ln.startswith(function + "("))
    return count


def _gdb_count(proc: subprocess.CompletedProcess[str], work: Path) -> int | None:
    found = re.search(r"breakpoint already hit (\d+) time", proc.stdout)
    return int(found.group(1)) if found else 0


def _naive_count(proc: subprocess.CompletedProcess[str], work: Path) -> int | None:
    found = re.search(r"^hits (\d+)$", proc.stdout, re.M)
    return int(found.group(1)) if found else None


def _trace_count(proc: subprocess.CompletedProcess[str], work: Path) -> int | None:
    found = re.search(r"^uprobes: (\d+) events, (\d+) lost$", proc.stderr, re.M)
    return int(found.group(1)) if found and found.group(2) == "0" else None


def _latency_count(proc: subprocess.CompletedProcess[str], work: Path) -> int | None:
    doc = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), None)
    if doc is None:
        return None
    return sum(int(h["count"]) for h in json.loads(doc).values())


def _keyed_count(proc: subprocess.CompletedProcess[str], work: Path) -> int | None:
    doc = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), None)
    if doc is None:
        return None
    tables = json.loads(doc).values()
    return sum(int(r["count"]) for t in tables for r in t["keys"]) \
        + sum(int(t["overflow"]) for t in tables)


def _rejected_count(proc: subprocess.CompletedProcess[str], work: Path) -> int | None:
    """A filter that keeps nothing: no count to check (-1, wrong, if it kept any)."""
    return -1 if re.search(r"^uprobes/\S+\s+[1-9]", proc.stdout, re.M) else None


def _uprobes_count(proc: subprocess.CompletedProcess[str], work: Path) -> int | None:
    found = re.findall(r"^uprobes/\S+\s+(\d+)$", proc.stdout, re.M)
    return int(found[-1]) if found else 0


_GDB_SCRIPT = """set pagination off
set confirm off
break {function}
commands 1
silent
continue
end
run
info breakpoints
"""


def tools(workload: Workload) -> list[Tool]:
    emulated, boosted = "work_emulated", "work_boosted"
    py = sys.executable

    def plain(function: str) -> Callable[[int, Path], list[str]]:
        return lambda n, work: workload.argv(n, function)

    def naive(n: int, work: Path) -> list[str]:
        return [py, "-m", "bench.naive_ptrace", *workload.argv(n, emulated)]

    def ltrace(n: int, work: Path) -> list[str]:
        return ["ltrace", "-o", str(work / "ltrace.out"), "-x", emulated, "-e", "",
                *workload.argv(n, emulated)]

    def gdb(n: int, work: Path) -> list[str]:
        script = work / "bench.gdb"
        script.write_text(_GDB_SCRIPT.format(function=emulated))
        return ["gdb", "-q", "-nx", "-batch", "-x", str(script), "--args",
                *workload.argv(n, emulated)]

    def uprobes(engine: str, function: str, suffix: str = "",
                extra: tuple[str, ...] = ()) -> Callable[[int, Path], list[str]]:
        return lambda n, work: [py, "-m", "uprobes", "count", "-e", engine, *extra,
                                f"{workload.exe}:{function}{suffix}", "--",
                                *workload.argv(n, function)]

    rows = [
        Tool("untraced", "-", emulated, plain(emulated), _no_count, traced=False,
             hits=(100_000, 10_000_000), loop_timed=True),
        Tool("naive ptrace loop (Python)", "entry", emulated, naive, _naive_count),
        Tool("ltrace -x", "entry+return", emulated, ltrace, _ltrace_count(emulated),
             requires="ltrace"),
        Tool("gdb, commands: silent, continue", "entry", emulated, gdb, _gdb_count,
             requires="gdb", hits=(1000, 8000)),
    ]
    for engine in ("ptrace", "kernel"):
        traced = engine == "ptrace"
        n = (2000, 20000) if traced else (20_000, 200_000)
        traps = ("--no-trapfree",) if traced else ()
        rows += [
            Tool(f"uprobes -e {engine}", "entry", emulated, uprobes(engine, emulated, "", traps),
                 _uprobes_count, traced, hits=n, ours=True),
            Tool(f"uprobes -e {engine}", "entry", boosted, uprobes(engine, boosted, "", traps),
                 _uprobes_count, traced, hits=n, ours=True),
            Tool(f"uprobes -e {engine}", "return (rets)", emulated,
                 uprobes(engine, emulated, "%return", traps), _uprobes_count, traced, hits=n,
                 ours=True),
            Tool(f"uprobes -e {engine}", "return (--uretprobe)", emulated,
                 uprobes(engine, emulated, "%return", ("--uretprobe", *traps)), _uprobes_count,
                 traced, hits=n, ours=True),
        ]
        if traced:  # no stop per hit: nanoseconds, so many more hits to time
            rows += [Tool("uprobes -e ptrace", TRAPFREE, f, uprobes(engine, f), _uprobes_count,
                          traced, hits=(100_000, 10_000_000), loop_timed=True, ours=True)
                     for f in (emulated, boosted)]

    def trace(function: str, *extra: str) -> Callable[[int, Path], list[str]]:
        return lambda n, work: [py, "-m", "uprobes", "trace", "-e", "ptrace", *extra,
                                "-o", os.devnull, f"{workload.exe}:{function} a=%di", "--",
                                *workload.argv(n, function)]
    def record(function: str) -> Callable[[int, Path], list[str]]:
        return lambda n, work: [py, "-m", "uprobes", "record", "-e", "ptrace",
                                "-o", str(work / "recording"), f"{workload.exe}:{function} a=%di",
                                "--", *workload.argv(n, function)]
    def latency(function: str) -> Callable[[int, Path], list[str]]:
        return lambda n, work: [py, "-m", "uprobes", "latency", "-e", "ptrace", "--json",
                                f"{workload.exe}:{function}", "--", *workload.argv(n, function)]
    def keyed(function: str, by: str) -> Callable[[int, Path], list[str]]:
        return lambda n, work: [py, "-m", "uprobes", "count", "-e", "ptrace", "--json",
                                "--by", by, f"{workload.exe}:{function} a=%di:u64", "--",
                                *workload.argv(n, function)]
    rows += [Tool("uprobes count -e ptrace --by", probe, boosted, keyed(boosted, by),
                  _keyed_count, hits=(100_000, 3_000_000), loop_timed=True, ours=True)
             for by, probe in (("tid", "entry, by tid (one key)"),
                               ("a", "entry, by a=%di (a new key each call: the table "
                                     "fills, the rest overflow)"))]
    def rejected(function: str) -> Callable[[int, Path], list[str]]:
        return lambda n, work: [py, "-m", "uprobes", "count", "-e", "ptrace", "--if", "a == -1",
                                f"{workload.exe}:{function} a=%di:s64", "--",
                                *workload.argv(n, function)]
    rows += [Tool("uprobes count -e ptrace --if", "entry, a == -1 (every hit rejected in the "
                  "program)", boosted, rejected(boosted), _rejected_count,
                  hits=(100_000, 3_000_000), loop_timed=True, ours=True)]
    rows += [Tool("uprobes latency -e ptrace", "entry+return (timed in the program)", f,
                  latency(f), _latency_count, hits=(100_000, 3_000_000), loop_timed=True,
                  ours=True) for f in (emulated, boosted)]
    # --comm on the int3 path: the thread's name at each hit (the kernel's
    # rename word read from our mapping of it; re-read only when it moved).
    comm = ("--comm", workload.exe.name[:15])
    rows += [Tool("uprobes count -e ptrace --no-trapfree --comm", "entry, the name at each "
                  "hit (int3)", boosted, uprobes("ptrace", boosted, "", ("--no-trapfree", *comm)),
                  _uprobes_count, hits=(2000, 20000), ours=True)]
    rows += [
        Tool("uprobes trace -e ptrace --no-trapfree", "entry a=%di", boosted,
             trace(boosted, "--no-trapfree"), _trace_count, ours=True),
        Tool("uprobes trace -e ptrace", "entry a=%di (trap-free, whole run)", boosted,
             trace(boosted), _trace_count, hits=(20_000, 200_000), ours=True),
        Tool("uprobes trace -e ptrace", "entry a=%di (trap-free, the loop)", boosted,
             trace(boosted), _trace_count, hits=(1000, 30_000), loop_timed=True, ours=True),
        Tool("uprobes record -e ptrace", "entry a=%di (trap-free, whole run)", boosted,
             record(boosted), _trace_count, hits=(100_000, 3_000_000), ours=True),
        Tool("uprobes record -e ptrace", "entry a=%di (trap-free, the loop)", boosted,
             record(boosted), _trace_count, hits=(100_000, 3_000_000), loop_timed=True,
             ours=True),
    ]
    return rows


def _counts(tool: Tool, scale: float) -> tuple[int, int]:
    return max(1, int(tool.hits[0] * scale)), max(2, int(tool.hits[1] * scale))


_FIRST = {"work_emulated": "push rbp", "work_boosted": "mov rax,rdi"}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def bench(args: argparse.Namespace) -> str:
    workload = build()
    wanted = args.only.split(",") if args.only else [""]
    srcs: list[str | None] = list(args.src) if args.src else [None]
    labels = dict(zip(srcs, tree_labels(srcs)))
    # Each uprobes row once per tree, next to each other: the trees take turns
    # within each repeat, so they see the same machine state.
    all_tools = [replace(t, src=src) for t in tools(workload) if any(w in t.name for w in wanted)
                 for src in (srcs if t.ours else [None])]
    series: dict[int, Series] = {}
    skipped: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="uprobes-bench-") as tmp:
        work = Path(tmp)
        for i, tool in enumerate(all_tools):
            if tool.requires and shutil.which(tool.requires) is None:
                skipped[i] = f"{tool.requires} is not installed"
            else:
                try:
                    outcome = tool.run(1, work)
                    if outcome.hits not in (None, 1):
                        skipped[i] = f"counted {outcome.hits} of 1 hit"
                except Skip as why:
                    skipped[i] = str(why)
            series[i] = Series()
        for _ in range(args.repeats):
            for i, tool in enumerate(all_tools):
                if i in skipped:
                    continue
                small, big = _counts(tool, args.scale)
                for n, into in ((small, series[i].small), (big, series[i].big)):
                    seconds, outcome = timed(lambda k, tool=tool: tool.run(k, work), n)
                    if tool.loop_timed and outcome.loop_ns is not None:
                        seconds = outcome.loop_ns / 1e9
                    into.append(seconds)
                    series[i].hits_seen.add((n, outcome.hits))
        if args.syscalls and shutil.which("strace"):
            for i, tool in enumerate(all_tools):
                if i in skipped or not tool.traced:
                    continue
                for n in _counts(tool, args.scale):
                    summary = work / "strace.txt"
                    tool.run(n, work, ["strace", "-c", "-o", str(summary)])
                    series[i].syscalls[n] = strace_calls(summary)

    def per_hit_us(name: str) -> float | None:
        for i, tool in enumerate(all_tools):
            if tool.name.startswith(name) and i not in skipped:
                return series[i].per_hit(*_counts(tool, args.scale)) * 1e6
        return None

    naive_us, ltrace_us = per_hit_us("naive"), per_hit_us("ltrace")
    trees = len(srcs) > 1

    def first_tree_us(tool: Tool) -> float | None:
        """The per-hit cost of the same row on the first tree."""
        for i, other in enumerate(all_tools):
            if (other.name, other.probe, other.function, other.src) == \
                    (tool.name, tool.probe, tool.function, srcs[0]) and i not in skipped:
                return series[i].per_hit(*_counts(other, args.scale)) * 1e6
        return None

    rows = []
    notes = []
    for i, tool in enumerate(all_tools):
        first = f"{tool.function} ({_FIRST[tool.function]})"
        small, big = _counts(tool, args.scale)
        tree = [labels[tool.src] if tool.ours else "-"] if trees else []
        if i in skipped:
            notes.append(f"- {tool.name} {tool.probe} {tool.function}"
                         f"{f' ({tree[0]})' if tree else ''}: skipped: {skipped[i]}")
            rows.append([tool.name, *tree, tool.probe, first, "skipped",
                         *([""] if trees else []), "", "", "", "", "", ""])
            continue
        s = series[i]
        us = s.per_hit(small, big) * 1e6
        right = s.counted_right()
        base_us = first_tree_us(tool) if trees and tool.ours else None
        ratio = [_fmt(us / base_us if base_us else None, ".2f")] if trees else []
        rows.append([
            tool.name, *tree, tool.probe, first, f"{us:.1f}" if us >= 1 else f"{us:.4f}",
            *ratio, _fmt(us / naive_us if naive_us else None, ".2f"),
            _fmt(us / ltrace_us if ltrace_us else None, ".2f"),
            f"{s.startup(small, big) * 1e3:.0f}", f"{small}/{big}",
            {None: "-", True: "exact", False: "WRONG"}[right],
            _fmt(s.syscalls_per_hit(small, big), ".1f"),
        ])
    headers = ["tool", *(["tree"] if trees else []), "probe", "function (first insn)",
               "us/hit", *([f"x {labels[srcs[0]]}"] if trees else []), "x naive", "x ltrace",
               "startup ms", "hits timed", "count", "syscalls/hit"]
    load = os.getloadavg()
    head = (f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs, "
            f"load {load[0]:.1f} at the end; per-hit = median over {args.repeats} repeats of "
            "(time(big) - time(small)) / (big - small)")
    return "\n".join([head, "", markdown_table(headers, rows), "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ptrace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every row's hit counts (default 1: ~1-3 s per run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--syscalls", action="store_true",
                        help="also count each tracer's syscalls per hit (strace -c)")
    parser.add_argument("--only", help="only the tools whose name contains one of these "
                                       "(comma-separated), e.g. naive,ltrace,ptrace")
    parser.add_argument("--src", action="append", metavar="DIR",
                        help="run the uprobes rows with the package in this src/ directory "
                             "(repeat to compare trees, the first being the base of the ratio "
                             "column; default: the installed one, this checkout's src)")
    args = parser.parse_args(argv)
    print(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
