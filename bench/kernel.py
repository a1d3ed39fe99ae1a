"""The kernel engine's benchmark: `python -m bench.kernel` (as root, from the repo root).

Per-hit costs, measured side by side in each round and reported as medians:
the workload unprobed; under a raw `uprobe` PMU counter opened directly;
under `count`'s counter (KernelCounter, system-wide: a tracepoint counter
and uprobe_profile); under `uprobes trace` to /dev/null as text and as
--json. Then the rates trace sustains with no lost record, the time to
attach and detach 1, 100 and ~1,000 `libc:*` probes, each way the engine
places them, and (`shared`) what a hit costs `count`'s per-probe counters
when its probe shares a kernel event with others.

`--src DIR` (repeatable) runs the per-hit part's `count` and `trace` modes
once per source tree (a checkout's src/, with this interpreter), the trees
taking turns within each round; `count` is then `uprobes count -e kernel`
system-wide (the command, which every tree has, not this tree's
KernelCounter), and each row names its tree and gives its cost as a ratio
to the first tree's.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.measure import markdown_table, tree_env, tree_labels, wait_for
from bench.workload import RESULT, Workload, build
from uprobes.commands.resolve import parse_specs
from uprobes.engines.kernel.counting import KernelCounter
from uprobes.engines.kernel.tracer import KernelTracer
from uprobes.engines.launch import Launched, launch
from uprobes.model.filters import HitFilter
from uprobes.model.probe import ResolvedProbe
from uprobes.render.jsonl import JsonLinesRenderer
from uprobes.render.trace_text import TraceTextRenderer
from uprobes.resolve.resolver import Resolver
from uprobes.sys.pmu import UprobeCounter

_SUMMARY = re.compile(r"uprobes: (\d+) events, (\d+) lost")
UPROBES = [sys.executable, "-m", "uprobes"]
FUNCTION = "work_emulated"  # its first instruction (push) is emulated: one trap per hit
median = statistics.median


@dataclass(frozen=True)
class Run:
    """One run of the workload: when its loop started, how long it took."""

    start_ns: int
    loop_ns: int
    calls: int
    end_ns: int  # when the command (the workload, or uprobes around it) was done
    stderr: str = ""

    @property
    def ns_per_call(self) -> float:
        return self.loop_ns / self.calls


def workload(w: Workload, calls: int, rate: int = 0) -> list[str]:
    return [*w.argv(calls, FUNCTION), *([str(rate)] if rate else [])]


def run(argv: list[str], env: dict[str, str] | None = None) -> Run:
    """Run `argv` (the workload, or uprobes running it) and read the
    workload's timing from its last line."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    end = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    m = RESULT.search(proc.stdout)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"bench: {' '.join(argv)} failed ({proc.returncode}):\n"
                         f"{proc.stdout}{proc.stderr}")
    calls = int(argv[argv.index(FUNCTION) - 1])
    return Run(int(m[1]), int(m[2]), calls, end, proc.stderr)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def table(header: list[str], rows: list[list[object]]) -> str:
    return markdown_table(header, [[str(c) for c in row] for row in rows])


def machine() -> str:
    """What the figures were measured on."""
    model = next((ln.split(":", 1)[1].strip() for ln in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "")
    return (f"{os.uname().release}, {os.cpu_count()} CPUs ({model}), "
            f"load average {os.getloadavg()[0]:.1f}")


def _probe(exe: Path) -> ResolvedProbe:
    return Resolver().resolve_all(parse_specs([f"{exe}:{FUNCTION}"]))[0]


def counted(make: Callable[[], object], argv: list[str],
            read: Callable[[object], int]) -> tuple[Run, int]:
    """Run the workload under a counter made by `make`: the run and what it counted."""
    with make() as counter:  # type: ignore[attr-defined]
        r = run(argv)
        return r, read(counter)


def raw_counter(probe: ResolvedProbe) -> UprobeCounter:
    """The baseline: one uprobe PMU counter opened directly, enabled."""
    return _enabled(UprobeCounter(probe.path, probe.file_offset))


def count_hits(counter: object) -> int:
    """What `read` gives for a raw counter or a KernelCounter."""
    if isinstance(counter, UprobeCounter):
        return counter.read()
    return sum(counter.counts.values())  # type: ignore[attr-defined]


def _counted(make: Callable[[], object], argv: list[str], read: Callable[[object], int],
             calls: int) -> Run:
    """Run the workload under a counter made by `make`; check the count is exact."""
    r, got = counted(make, argv, read)
    if got != calls:
        raise SystemExit(f"bench: counted {got} hits of {calls}")
    return r


def _enabled(counter: UprobeCounter) -> UprobeCounter:
    counter.enable()
    return counter


def _trace(argv: list[str], spec: str, json: bool, ring_pages: int | None = None,
           env: dict[str, str] | None = None) -> Run:
    cmd = [*UPROBES, "trace", "-o", "/dev/null", spec]
    if json:
        cmd.insert(len(UPROBES) + 1, "--json")
    if ring_pages:
        cmd[len(UPROBES) + 1:len(UPROBES) + 1] = ["--ring-pages", str(ring_pages)]
    return run([*cmd, "--", *argv], env)


COUNTED = re.compile(rb"^uprobes/\S+\s+(\d+)$", re.M)
TIMEOUT = 120.0


def _cli_counted(argv: list[str], spec: str, calls: int, env: dict[str, str]) -> Run:
    """Run the workload while `uprobes count -e kernel SPEC` counts system-wide
    (started from the tree `env` names); check the count is exact."""
    counter = subprocess.Popen([*UPROBES, "count", "-e", "kernel", spec],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    try:
        wait_for(counter, b"uprobes: counting ", TIMEOUT, f"uprobes count {spec!r}")
        r = run(argv)
    finally:
        counter.send_signal(signal.SIGINT)
        try:
            out, err = counter.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            counter.kill()
            counter.wait()
            raise
    got = COUNTED.findall(out)
    if counter.returncode != 0 or [int(n) for n in got] != [calls]:
        raise SystemExit(f"bench: uprobes count counted {got} of {calls} hits "
                         f"(exit {counter.returncode}):\n{err.decode(errors='replace')}")
    return r


def _events(r: Run) -> tuple[int, int]:
    m = _SUMMARY.search(r.stderr)
    if not m:
        raise SystemExit(f"bench: no summary from uprobes trace:\n{r.stderr}")
    return int(m[1]), int(m[2])


def per_hit(w: Workload, calls: int, repeats: int, srcs: Sequence[str] = ()) -> str:
    """The per-hit table: each mode once per round (the modes that run uprobes
    once per source tree in `srcs`, the trees in turn), rounds repeated."""
    exe = w.exe
    probe = _probe(exe)
    spec = f"{exe}:{FUNCTION} n=%di:s64 sp=%sp:x64"
    argv = workload(w, calls)
    trees: list[str | None] = list(srcs) or [None]
    envs = {src: tree_env(src) for src in srcs}
    modes: dict[tuple[str, str | None], list[Run]] = {
        (m, src): [] for m, srcs_of in (("unprobed", [None]), ("raw", [None]), ("count", trees),
                                        ("text", trees), ("json", trees))
        for src in srcs_of}
    for _ in range(repeats):
        modes["unprobed", None].append(run(argv))
        modes["raw", None].append(_counted(lambda: raw_counter(probe), argv, count_hits,
                                           calls))
        for src in trees:
            modes["count", src].append(
                _counted(lambda: KernelCounter([probe]), argv, count_hits, calls)
                if src is None else _cli_counted(argv, f"{exe}:{FUNCTION}", calls, envs[src]))
        for m in ("text", "json"):
            for src in trees:
                modes[m, src].append(_trace(argv, spec, json=m == "json",
                                            env=None if src is None else envs[src]))
    base = median([r.ns_per_call for r in modes["unprobed", None]])
    cost = {key: median([r.ns_per_call for r in runs]) - base for key, runs in modes.items()}
    several = len(trees) > 1
    labels = dict(zip(trees, tree_labels(trees)))

    def row(label: str, m: str, src: str | None, figure: str, *rest: object) -> list[object]:
        """A row; where trees are compared, with its tree and its cost as a ratio to
        the first tree's (the modes that run no uprobes have neither)."""
        if not several:
            return [label, figure, *rest]
        if m in ("unprobed", "raw"):
            return [label, "-", figure, "", *rest]
        return [label, labels[src], figure, f"{cost[m, src] / cost[m, trees[0]]:.2f}", *rest]

    raw = cost["raw", None]
    rows = [row("unprobed", "unprobed", None, f"{base:.1f} ns/call", "", ""),
            row("raw uprobe PMU counter (perf_event_open directly)", "raw", None,
                f"{raw:.0f} ns/hit", "", "")]
    count_label = ("`uprobes count -e kernel` (system-wide: uprobe_profile)" if srcs
                   else "`count` (KernelCounter, system-wide: uprobe_profile)")
    for src in trees:
        rows.append(row(count_label, "count", src, f"{cost['count', src]:.0f} ns/hit",
                        f"{cost['count', src] / raw:.3f}x raw", ""))
    for m, label in (("text", "`trace -o /dev/null` (text)"),
                     ("json", "`trace --json -o /dev/null`")):
        for src in trees:
            runs = modes[m, src]
            lost = [_events(r)[1] for r in runs]
            # The reader's rate: records delivered per second from the workload's
            # first call until uprobes had written the last one and exited.
            rates = [_events(r)[0] / ((r.end_ns - r.start_ns) / 1e9) for r in runs]
            rows.append(row(label, m, src, f"{cost[m, src]:.0f} ns/hit",
                            f"{median(rates) / 1e3:.0f}k events/s end to end",
                            f"lost {median(lost):.0f} of {calls} (median)"))
    cost_header = f"cost ({calls:,} calls, median of {repeats})"
    header = (["mode", "tree", cost_header, f"x {labels[trees[0]]}", "", "lost"] if several
              else ["mode", cost_header, "", "lost"])
    return table(header, rows)


def _quiet_launch(argv: list[str]) -> Launched:
    """launch() with the workload's stdout on /dev/null (the child inherits fd 1)."""
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return launch(argv)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def reader_rate(w: Workload, calls: int, repeats: int) -> str:
    """How fast the tracer reads, decodes, orders and renders, apart from the
    kernel's cost per hit (which bounds how fast one thread can make hits):
    the workload runs to its end with records piling up in large rings, then
    `run_render` (what `uprobes trace` runs) delivers them all into a
    renderer writing to /dev/null; and, for comparison, `run_hits`, which
    decodes hit by hit. Wall time, and the reader's CPU time per event
    (less disturbed by other jobs on the machine)."""
    probes = Resolver().resolve_all(parse_specs([f"{w.exe}:{FUNCTION} n=%di:s64 sp=%sp:x64"]))
    pages = 1 << max(0, (calls * 128 // 4096).bit_length())  # room for every record
    rows = []
    for name, renderer, fast in (("text", TraceTextRenderer, True),
                                 ("--json", JsonLinesRenderer, True),
                                 ("--json", JsonLinesRenderer, False)):
        rates, cpu, lost = [], [], []
        for _ in range(repeats):
            child = _quiet_launch(workload(w, calls))
            try:
                with open(os.devnull, "w") as sink, \
                        KernelTracer(probes, child=child.pid, ring_pages=pages) as tracer:
                    child.release()
                    child.wait()
                    out = renderer(sink, tracer.infos)
                    used = time.process_time()
                    took = timed(lambda: tracer.run_render(out) if fast  # noqa: B023
                                 else tracer.run_hits(out.hits))  # noqa: B023
                    cpu.append((time.process_time() - used) / tracer.events)
                    rates.append(tracer.events / took)
                    lost.append(tracer.lost)
            finally:
                child.abort()
        how = "" if fast else ", hit by hit (`run_hits`: what Session and perfetto read)"
        rows.append([f"`trace {name}` reader{how}", f"{median(rates) / 1e3:.0f}k events/s",
                     f"{median(cpu) * 1e9:.0f} ns", f"{max(lost)}"])
    return table([f"{calls:,} records already in the rings", "delivered", "CPU per event",
                  "lost"], rows)


def sustained(w: Workload, rates: Sequence[int], seconds: float, repeats: int,
              spec_args: str = "n=%di:s64 sp=%sp:x64", ring_pages: int | None = None) -> str:
    """trace --json while the workload runs, paced (calls per second) or, at
    rate 0, as fast as it goes: the rate it made hits at, the records
    delivered per second (from its first call until uprobes had written
    the last and exited), and the records lost."""
    spec = f"{w.exe}:{FUNCTION} {spec_args}"
    rows = []
    for rate in rates:
        calls = int((rate or 600_000) * seconds)
        lost, made, delivered = [], [], []
        for _ in range(repeats):
            r = _trace(workload(w, calls, rate), spec, json=True, ring_pages=ring_pages)
            events, n = _events(r)
            lost.append(n)
            made.append(calls / (r.loop_ns / 1e9))
            delivered.append(events / ((r.end_ns - r.start_ns) / 1e9))
        label = f"{rate / 1e3:.0f}k/s" if rate else "unpaced"
        rows.append([f"{label}, {calls:,} calls", f"{median(made) / 1e3:.0f}k/s",
                     f"{median(delivered) / 1e3:.0f}k/s", f"{max(lost)}",
                     f"{sum(1 for n in lost if n == 0)} of {repeats}"])
    rings = f" (--ring-pages {ring_pages})" if ring_pages else ""
    return table([f"`trace --json`{rings} at", "hits made", "delivered (end to end)",
                  "lost (worst)", "runs with none lost"], rows)


def libc_probes(n: int) -> list[ResolvedProbe]:
    """The first `n` probes of `libc:*` (entry probes, by file offset)."""
    probes = Resolver().resolve_all(parse_specs(["libc:*"]))
    return sorted(probes, key=lambda p: p.file_offset)[:n]


WAYS = ("trace", "trace -p", "count", "count -p", "count --if")


def place(way: str, probes: list[ResolvedProbe], pid: int) -> tuple[int, float, float]:
    """Place `probes` one of the WAYS (`-p`: on process `pid`), then remove them:
    how many the engine placed, seconds to attach, seconds to detach."""
    makers: dict[str, Callable[[], object]] = {
        "trace": lambda: KernelTracer(probes),
        "trace -p": lambda: KernelTracer(probes, pid=pid),
        "count": lambda: KernelCounter(probes),
        "count -p": lambda: KernelCounter(probes, pids=[pid]),
        # A filter: counters per probe and CPU, each filtered to its own probe.
        "count --if": lambda: KernelCounter(probes, hit_filter=HitFilter.parse("tid != 0")),
    }
    obj = makers[way]()
    up = timed(obj.__enter__)  # type: ignore[attr-defined]
    try:
        placed = len(obj.placed)  # type: ignore[attr-defined]
    finally:
        down = timed(lambda: obj.__exit__(None, None, None))  # type: ignore[attr-defined]
    return placed, up, down


def attach_detach(sizes: Sequence[int], repeats: int, ways: Sequence[str]) -> str:
    """Seconds to place and to remove N libc probes, each way."""
    sleeper = subprocess.Popen(["sleep", "3600"])
    rows = []
    try:
        for n in sizes:
            probes = libc_probes(n)
            for way in ways:
                up, down, placed = [], [], 0
                for _ in range(repeats if n < 500 else 1):
                    placed, t_up, t_down = place(way, probes, sleeper.pid)
                    up.append(t_up)
                    down.append(t_down)
                rows.append([f"`{way}`", f"{n} ({placed} placed)", f"{median(up):.3f} s",
                             f"{median(down):.3f} s"])
    finally:
        sleeper.kill()
        sleeper.wait()
    return table(["way", "libc:* probes", "attach", "detach"], rows)


SHARED_SITES = 256
SHARED_SOURCE = (
    "#include <stdio.h>\n#include <stdlib.h>\n#include <time.h>\n"
    "static long now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);"
    " return t.tv_sec * 1000000000L + t.tv_nsec; }\n"
    # 256 functions 16 bytes apart in one page: distinct low 12 bits, one event.
    'asm(".intel_syntax noprefix\\n.text\\n.p2align 12\\n"\n'
    + "".join(f'"f{i}:\\n.globl f{i}\\n.type f{i},@function\\n push rbp\\n mov rbp, rsp\\n'
              f' lea rax, [rdi+1]\\n pop rbp\\n ret\\n.size f{i}, .-f{i}\\n.p2align 4\\n"\n'
              for i in range(SHARED_SITES))
    + '".att_syntax prefix\\n");\n'
    "long f7(long);\n"
    "int main(int argc, char **argv) { long n = atol(argv[1]), s = 0, t0 = now_ns();"
    " for (long i = 0; i < n; i++) s += f7(i);"
    ' printf("sum=%ld start_ns=%ld loop_ns=%ld\\n", s, t0, now_ns() - t0); return 0; }\n')


def shared_cost(calls: int, repeats: int, sizes: Sequence[int] = (1, 16, 64, 256)) -> str:
    """A hit's cost under `count`'s per-probe counters (what a pid or a
    filter takes) when its probe (f7, a `push`) shares a kernel event with
    k-1 probes that are not hit: the kernel runs every counter's filter of
    the event at each hit. Here counted system-wide with a filter that keeps
    every hit (`tid != 0`): one counter per probe and CPU."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"uprobes-bench-shared-{os.getpid()}"
    out.with_suffix(".c").write_text(SHARED_SOURCE)
    subprocess.run(["gcc", "-O2", "-o", str(out), str(out.with_suffix(".c"))], check=True)
    try:
        probes = sorted(Resolver().resolve_all(parse_specs([f"{out}:f*"])),
                        key=lambda p: p.file_offset)
        hit = next(p for p in probes if p.event == "f7")
        others = [p for p in probes if p is not hit]
        keep = HitFilter.parse("tid != 0")

        def loop(counter: KernelCounter | None) -> float:
            proc = subprocess.run([str(out), str(calls)], capture_output=True, text=True,
                                  check=True)
            m = RESULT.search(proc.stdout)
            assert m, proc.stdout
            if counter is not None and counter.counts["uprobes/f7"] != calls:
                raise SystemExit(f"bench: counted {counter.counts} of {calls} calls")
            return int(m[2]) / calls

        runs: dict[int, list[float]] = {k: [] for k in (0, *sizes)}
        for _ in range(repeats):
            runs[0].append(loop(None))
            for k in sizes:
                with KernelCounter([hit, *others[:k - 1]], hit_filter=keep,
                                   max_shared=k) as counter:
                    runs[k].append(loop(counter))
        base = median(runs[0])
        alone = median(runs[1]) - base if 1 in runs else None
        rows: list[list[object]] = [["unprobed", f"{base:.1f} ns/call", ""]]
        for k in sizes:
            cost = median(runs[k]) - base
            rows.append([f"{k}", f"{cost:.0f} ns/hit",
                         f"+{(cost - alone) / max(1, k - 1):.0f} ns per other probe"
                         if alone is not None and k > 1 else ""])
    finally:
        out.unlink(missing_ok=True)
        out.with_suffix(".c").unlink(missing_ok=True)
    return table(["probes in the event", f"cost ({calls:,} calls, median of {repeats})",
                  ""], rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1_000_000, help="calls per per-hit run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rates", default="100000,300000,0",
                    help="paced rates for trace --json, comma-separated (0: unpaced)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each paced run")
    ap.add_argument("--ring-pages", type=int, default=None,
                    help="trace's --ring-pages in the sustained runs (default: trace's own)")
    ap.add_argument("--sizes", default="1,100,1000", help="probe counts for attach/detach")
    ap.add_argument("--ways", default=",".join(WAYS),
                    help="placements to time for attach/detach, comma-separated")
    ap.add_argument("--only", choices=("per-hit", "reader", "sustained", "attach", "shared"),
                    action="append", help="run only these parts (repeatable)")
    ap.add_argument("--src", action="append", metavar="DIR", default=[],
                    help="per-hit: run uprobes with the package in this src/ directory "
                         "(repeat to compare trees, the first being the base of the ratio "
                         "column; default: the installed one, this checkout's src)")
    args = ap.parse_args(argv)
    parts = set(args.only or ("per-hit", "reader", "sustained", "attach", "shared"))
    w = build()
    cmd = "python -m bench.kernel " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"`{cmd.strip()}` on {machine()}, {time.strftime('%Y-%m-%d')}\n")
    if "per-hit" in parts:
        print(per_hit(w, args.calls, args.repeats, args.src), "\n", flush=True)
    if "reader" in parts:
        print(reader_rate(w, args.calls, args.repeats), "\n", flush=True)
    if "sustained" in parts:
        rates = [int(r) for r in args.rates.split(",")]
        print(sustained(w, rates, args.seconds, args.repeats, ring_pages=args.ring_pages), "\n",
              flush=True)
    if "attach" in parts:
        sizes = [int(s) for s in args.sizes.split(",")]
        print(attach_detach(sizes, args.repeats, args.ways.split(",")), "\n", flush=True)
    if "shared" in parts:
        print(shared_cost(min(args.calls, 200_000), args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
