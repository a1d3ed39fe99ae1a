"""Us against the other tools, side by side in one run:  python -m bench  (as root).

Every row probes the same workload (bench/workload.c: a loop calling one
noinline function N times) and the workload times its own loop, so tools'
start-up and teardown drop out; a row's per-hit cost is the median over
repeats of loop time / N, less the unprobed loop's.  Rounds run every row
once each, so all rows see the same machine, and each cost is also given as a
ratio to the kernel's raw uprobe PMU counter (the least a kernel uprobe
costs).  Rows: no probe; the raw counter; our kernel engine's `count` and
`trace` (text, --json); our ptrace engine (entry on an emulated and on a
boosted first instruction, boosted and not, return probes); then, where
installed, bpftrace, `perf probe` + `perf stat`, frida (Interceptor.attach),
the naive Python ptrace loop, ltrace and gdb.  Then seconds to attach and
detach 1, 100 and 1,000 probes on libc functions, for our kernel engine and
the tools that can.  A missing tool is skipped and the table says so.

Writes the tables as Markdown (bench.md) and a chart (bench.png, with the
`bench` extra: pip install -e '.[bench]') into --out.  Reuses bench.kernel
(our kernel engine's runs), bench.ptrace (the ptrace tools' commands) and
bench.others (bpftrace, perf, frida).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench import kernel, others
from bench import ptrace as ptrace_bench
from bench.measure import Outcome, Skip, markdown_table
from bench.workload import Workload, build
from uprobes.elf.image import ElfImage
from uprobes.elf.symbols import SymbolTable
from uprobes.engines.kernel.counting import KernelCounter
from uprobes.engines.kernel.insn_guard import screen_sites
from uprobes.model.probe import ResolvedProbe

EMULATED, BOOSTED = "work_emulated", "work_boosted"
_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One line of the per-hit table: how to run the workload once under a tool."""

    tool: str
    probe: str
    function: str
    calls: int                       # hits per run (full size; --quick divides)
    run: Callable[[int], Outcome]
    ours: bool = False
    counts: bool = True              # the tool reports a hit count
    requires: Callable[[], None] | None = None   # raises Skip when the tool is missing
    group: str = "other"             # "ours", "kernel", "ptrace" (for the chart)
    loops: list[float] = field(default_factory=list)   # ns per call, each run
    counted: list[tuple[int, int | None]] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)    # a tracer's lost records, each run
    skipped: str | None = None

    def ns_per_call(self) -> float:
        return statistics.median(self.loops)


def _outcome(r: kernel.Run, hits: int | None) -> Outcome:
    return Outcome(hits, loop_ns=r.loop_ns)


def _kernel_rows(w: Workload) -> list[Row]:
    probe = kernel._probe(w.exe)
    spec = f"{w.exe}:{EMULATED} n=%di:s64 sp=%sp:x64"

    def raw(n: int) -> Outcome:
        r, got = kernel.counted(lambda: kernel.raw_counter(probe), w.argv(n, EMULATED),
                                kernel.count_hits)
        return _outcome(r, got)

    def count(n: int) -> Outcome:
        r, got = kernel.counted(lambda: KernelCounter([probe]), w.argv(n, EMULATED),
                                kernel.count_hits)
        return _outcome(r, got)

    def trace(json: bool) -> Callable[[int], Outcome]:
        def one(n: int) -> Outcome:
            r = kernel._trace(w.argv(n, EMULATED), spec, json=json)
            events, lost = kernel._events(r)
            return Outcome(events + lost, loop_ns=r.loop_ns, lost=lost)
        return one

    k = 200_000
    return [
        Row("raw uprobe PMU counter (perf_event_open)", "entry", EMULATED, k, raw,
            group="kernel"),
        Row("uprobes count -e kernel", "entry", EMULATED, k, count, ours=True),
        Row("uprobes trace (text, 2 args)", "entry", EMULATED, k, trace(False), ours=True),
        Row("uprobes trace --json (2 args)", "entry", EMULATED, k, trace(True), ours=True),
    ]


def _ptrace_rows(w: Workload, work: Path) -> list[Row]:
    tools = ptrace_bench.tools(w)

    def tool(name: str, probe: str, function: str) -> ptrace_bench.Tool:
        return next(t for t in tools if t.name == name and t.probe == probe
                    and t.function == function)

    def runner(t: ptrace_bench.Tool) -> Callable[[int], Outcome]:
        return lambda n: t.run(n, work)

    unboosted = ptrace_bench.Tool(
        "uprobes -e ptrace", "entry", BOOSTED,
        lambda n, _work: [sys.executable, "-m", "bench.unboosted", "count", "-e", "ptrace",
                          "--no-trapfree", f"{w.exe}:{BOOSTED}", "--", *w.argv(n, BOOSTED)],
        ptrace_bench._uprobes_count)
    p = 5000
    ours = "uprobes count -e ptrace"
    rows = [
        Row(ours, "entry (push: emulated)", EMULATED, p,
            runner(tool("uprobes -e ptrace", "entry", EMULATED)), ours=True),
        Row(ours, "entry (mov: boosted)", BOOSTED, p,
            runner(tool("uprobes -e ptrace", "entry", BOOSTED)), ours=True),
        Row(ours, "entry (mov: not boosted, stepped)", BOOSTED, p, runner(unboosted),
            ours=True),
        Row(ours, "entry (mov: trap-free jump, the default)", BOOSTED, 200_000,
            runner(tool("uprobes -e ptrace", ptrace_bench.TRAPFREE, BOOSTED)), ours=True),
        Row(ours, "return (probes on the rets)", EMULATED, p,
            runner(tool("uprobes -e ptrace", "return (rets)", EMULATED)), ours=True),
        Row(ours, "return (--uretprobe)", EMULATED, p,
            runner(tool("uprobes -e ptrace", "return (--uretprobe)", EMULATED)), ours=True),
    ]
    naive = tool("naive ptrace loop (Python)", "entry", EMULATED)
    ltrace = tool("ltrace -x", "entry+return", EMULATED)
    gdb = tool("gdb, commands: silent, continue", "entry", EMULATED)
    rows += [
        Row("naive ptrace loop (Python)", "entry", EMULATED, p, runner(naive), group="ptrace"),
        Row("ltrace -x", "entry+return", EMULATED, 3000, runner(ltrace), group="ptrace",
            requires=lambda: others.require("ltrace")),
        Row("gdb (commands; silent; continue)", "entry", EMULATED, 1000, runner(gdb),
            group="ptrace", requires=lambda: others.require("gdb")),
    ]
    return rows


def _other_rows(w: Workload, stack: ExitStack) -> list[Row]:
    probe = kernel._probe(w.exe)
    perf_event: list[str] = []

    def perf_run(n: int) -> Outcome:
        if not perf_event:
            assert probe.link_addr is not None
            perf_event.extend(stack.enter_context(
                others.perf_probes(probe.path, [probe.link_addr])))
        return others.perf_stat_run(perf_event[0], w, EMULATED, n)

    k = 200_000
    return [
        Row("bpftrace (@ = count())", "entry", EMULATED, k,
            lambda n: others.bpftrace_run(w, EMULATED, n),
            requires=lambda: others.require("bpftrace"), group="kernel"),
        Row("perf probe -x + perf stat -e", "entry", EMULATED, k, perf_run,
            requires=lambda: others.require("perf"), group="kernel"),
        Row("frida (Interceptor.attach, JS onEnter)", "entry", EMULATED, k,
            lambda n: others.frida_run(w, EMULATED, n),
            requires=lambda: others._frida() and None),
    ]


def rows_for(w: Workload, work: Path, stack: ExitStack, only_ours: bool) -> list[Row]:
    unprobed = Row("no probe", "-", EMULATED, 1_000_000,
                   lambda n: Outcome(None, loop_ns=kernel.run(w.argv(n, EMULATED)).loop_ns),
                   counts=False, group="none")
    rows = [unprobed, *_kernel_rows(w), *_ptrace_rows(w, work)]
    if not only_ours:
        rows += _other_rows(w, stack)
    else:
        rows = [r for r in rows if r.ours or r.group in ("none", "kernel")]
    return rows


def measure(rows: Sequence[Row], repeats: int, scale: float) -> None:
    """Each row once per round, `repeats` rounds; a row that fails is skipped
    with the reason (its first line)."""
    for row in rows:
        if row.requires is not None:
            try:
                row.requires()
            except Skip as why:
                row.skipped = str(why)
    for _ in range(repeats):
        for row in rows:
            if row.skipped:
                continue
            n = max(10, int(row.calls * scale))
            try:
                outcome = row.run(n)
            except (Skip, RuntimeError, OSError, SystemExit) as why:
                row.skipped = (str(why).strip().splitlines() or ["failed"])[-1][:200]
                continue
            if outcome.loop_ns is None:
                row.skipped = "the workload printed no loop time"
                continue
            row.loops.append(outcome.loop_ns / n)
            row.counted.append((n, outcome.hits))
            if outcome.lost is not None:
                row.lost.append(outcome.lost)


def _count_text(row: Row) -> str:
    if not row.counts:
        return "-"
    wrong = [(n, got) for n, got in row.counted if got != n]
    lost = f", {statistics.median(row.lost):,.0f} of them lost (median)" if any(row.lost) else ""
    if not wrong:
        return f"exact ({len(row.counted)} runs{lost})"
    n, got = max(wrong, key=lambda c: abs((c[1] or 0) - c[0]))
    return f"WRONG in {len(wrong)} of {len(row.counted)} runs (worst: {got} of {n})"


@dataclass
class Figures:
    rows: list[Row]
    base: float          # ns per unprobed call
    raw: float | None    # ns per hit under the raw counter

    def cost(self, row: Row) -> float:
        return row.ns_per_call() - self.base


def figures(rows: list[Row]) -> Figures:
    base = rows[0].ns_per_call()
    raw_row = next((r for r in rows if r.tool.startswith("raw") and not r.skipped), None)
    return Figures(rows, base, raw_row.ns_per_call() - base if raw_row else None)


def per_hit_table(f: Figures, repeats: int) -> str:
    out = []
    for row in f.rows:
        if row.skipped:
            out.append([row.tool, row.probe, row.function, "skipped", "", "", row.skipped])
            continue
        n = row.counted[0][0]
        if row is f.rows[0]:
            out.append([row.tool, row.probe, row.function, f"{f.base:.1f} per call", "",
                        f"{n:,}", "-"])
            continue
        cost = f.cost(row)
        ratio = f"{cost / f.raw:.2f}x" if f.raw else "-"
        out.append([f"**{row.tool}**" if row.ours else row.tool, row.probe, row.function,
                    f"{cost:,.0f}", ratio, f"{n:,}", _count_text(row)])
    return markdown_table(["tool", "probe", "function", "ns/hit", "x raw counter",
                           "hits/run", f"hit count ({repeats} runs)"], out)


@dataclass
class Attach:
    tool: str
    asked: int
    placed: int = 0
    up: float = 0.0
    down: float = 0.0
    skipped: str | None = None


def libc_sites(n: int) -> list[ResolvedProbe]:
    """The first `n` `libc:*` functions (by offset) that every tool can take:
    not a site the kernel refuses (bpftrace gives up on the whole program
    at the first) or that our engine refuses as unsafe (a uprobe on some
    AVX-512 entries crashes every process calling them, machine-wide), and
    a name libc has once, for a function with a size (bpftrace takes names,
    a repeated local name is any of its functions, and it refuses a
    zero-size symbol)."""
    probes = kernel.libc_probes(1 << 30)
    names = Counter(p.symbol for p in probes)
    unsafe, refusable = screen_sites((p.path, p.file_offset) for p in probes)
    with ElfImage.open(probes[0].path) as image:
        table = SymbolTable.load(image)
        sized = {p.symbol for p in probes if p.symbol and names[p.symbol] == 1
                 and all(sym.size > 0 for sym in table.lookup(p.symbol))}
    return [p for p in probes if p.symbol in sized and (p.path, p.file_offset)
            not in unsafe and (p.path, p.file_offset) not in refusable][:n]


# Tools that detach per-probe perf events one by one, a kernel grace period
# each: 1,000 probes take minutes, so they stop at --slow-max.
_SLOW = {"bpftrace (one uprobe per function)": "1,000 took 14 s to attach and 135 s to "
                                               "detach here"}


def attach_times(sizes: Sequence[int], only_ours: bool, slow_max: int) -> list[Attach]:
    """Attach and detach N libc probes (libc_sites), once each: our `trace`
    and `count` (shared kernel events, counted through uprobe_profile), then
    bpftrace, perf probe, frida."""
    ways: list[tuple[str, Callable[[list[ResolvedProbe]], tuple[int, float, float]]]] = []
    pid = os.getpid()   # `-p` ways are not timed here; any live pid will do
    for way in ("trace", "count"):
        ways.append((f"uprobes {way} -e kernel",
                     lambda probes, way=way: kernel.place(way, probes, pid)))
    if not only_ours:
        ways += [("bpftrace (one uprobe per function)", others.bpftrace_attach),
                 ("perf probe -x (create the events)", others.perf_attach),
                 ("frida (Interceptor.attach in a running process)", others.frida_attach)]
    results = []
    for n in sizes:
        probes = libc_sites(n)
        for name, place in ways:
            a = Attach(name, n)
            if name in _SLOW and n > slow_max:
                a.skipped = f"over --slow-max {slow_max}: {_SLOW[name]}"
            else:
                try:
                    a.placed, a.up, a.down = place(probes)
                except (Skip, RuntimeError, OSError) as why:
                    a.skipped = (str(why).strip().splitlines() or ["failed"])[-1][:200]
            results.append(a)
    return results


def attach_table(results: Sequence[Attach]) -> str:
    rows = []
    for a in results:
        if a.skipped:
            rows.append([a.tool, f"{a.asked:,}", "skipped", "", a.skipped])
        else:
            rows.append([a.tool, f"{a.asked:,} ({a.placed:,} placed)", f"{a.up:.3f}",
                         f"{a.down:.3f}", ""])
    return markdown_table(["tool", "libc probes", "attach s", "detach s", "note"], rows)


def chart(f: Figures, attach: Sequence[Attach], path: Path) -> str | None:
    """A PNG: per-hit cost of every row (log scale) and attach time by probe
    count.  None if drawn; else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart"
    shown = [r for r in f.rows[1:] if not r.skipped]
    colors = {"ours": "tab:blue", "kernel": "tab:gray", "ptrace": "tab:orange",
              "other": "tab:purple"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.42 * len(shown) + 1.8),
                                   gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{r.tool}: {r.probe}" for r in shown]
    costs = [max(f.cost(r), 1.0) for r in shown]
    ax1.barh(range(len(shown)), costs,
             color=[colors["ours"] if r.ours else colors.get(r.group, "tab:purple")
                    for r in shown])
    ax1.set_yticks(range(len(shown)), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("overhead per hit, ns (log scale); blue: uprobes")
    for i, (r, c) in enumerate(zip(shown, costs)):
        ratio = f"  {f.cost(r) / f.raw:.2f}x raw" if f.raw else ""
        ax1.text(c, i, f" {f.cost(r):,.0f} ns{ratio}", va="center", fontsize=7)
    ax1.set_xlim(left=100, right=max(costs) * 30)
    tools = list(dict.fromkeys(a.tool for a in attach if not a.skipped))
    for tool in tools:
        pts = [(a.asked, max(a.up, 1e-4)) for a in attach if a.tool == tool and not a.skipped]
        ax2.plot(*zip(*pts), marker="o", label=tool)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("libc probes")
    ax2.set_ylabel("attach, s (log scale)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def machine() -> str:
    load = os.getloadavg()
    return f"{kernel.machine()} ({load[0]:.1f} {load[1]:.1f} {load[2]:.1f})"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one round at a tenth of the hits, attach for 1 and 10 probes "
                         "(seconds, for the tests; figures are rough)")
    ap.add_argument("--repeats", type=int, help="rounds (default 5; --quick: 1)")
    ap.add_argument("--scale", type=float, help="multiply every row's hits (default 1; "
                                                "--quick: 0.1)")
    ap.add_argument("--sizes", help="libc probe counts to attach (default 1,100,1000; "
                                    "--quick: 1,10; 0: none)")
    ap.add_argument("--slow-max", type=int, default=100,
                    help="largest probe count for the tools that detach probes one by one, "
                         "~0.1 s each (our `count`, bpftrace; default 100)")
    ap.add_argument("--ours", action="store_true",
                    help="only our engines and the raw counter (what the tests run)")
    ap.add_argument("--out", type=Path, default=_ROOT / "bench" / "results",
                    help="where bench.md and bench.png go (default bench/results)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    scale = args.scale or (0.1 if args.quick else 1.0)
    sizes = [int(s) for s in (args.sizes or ("1,10" if args.quick else "1,100,1000"))
             .split(",") if int(s) > 0]
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    started = f"{machine()} at the start"
    w = build()
    with tempfile.TemporaryDirectory(prefix="uprobes-bench-") as tmp, ExitStack() as stack:
        rows = rows_for(w, Path(tmp), stack, args.ours)
        t0 = time.perf_counter()
        measure(rows, repeats, scale)
        took = time.perf_counter() - t0
    if rows[0].skipped or not rows[0].loops:
        raise SystemExit(f"bench: the unprobed workload failed: {rows[0].skipped}")
    f = figures(rows)
    attach = attach_times(sizes, args.ours, args.slow_max)
    head = (f"`{command.strip()}`, {time.strftime('%Y-%m-%d %H:%M')}; {started}, load "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end. Per-hit: median "
            f"over {repeats} rounds of the workload's own loop time / hits, less the "
            f"unprobed loop's; {took:.0f} s.")
    skipped = [f"- {r.tool} ({r.probe}): skipped: {r.skipped}" for r in rows if r.skipped]
    text = "\n".join([head, "", per_hit_table(f, repeats), "", *skipped,
                      *([""] if skipped else []), attach_table(attach) if attach else ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(text + "\n")
    why_not = chart(f, attach, args.out / "bench.png")
    print(text)
    print(f"\nwrote {args.out / 'bench.md'}"
          + (f"; {why_not}" if why_not else f" and {args.out / 'bench.png'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
